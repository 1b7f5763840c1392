"""The epoch loop behind ``NNHandler.train()``: epochs, validation, the scheduler, the
automatic saves (per epoch and every N steps), and the clean-up when training stops early.

The arithmetic lives in the core (:mod:`nnh.core`) and one epoch's pass over a loader in
:mod:`nnh.handler.training`; this module threads the handler's state through them. The
functions read and update an :class:`~nnh.handler.NNHandler`'s private fields; they belong
to the shell and are not public API (call ``NNHandler.train``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from nnh.callbacks.base import CallbackList
from nnh.core import TrainConfig, TrainState
from nnh.core.accumulate import pack_sums
from nnh.distributed.ddp import real_samples
from nnh.distributed.fsdp import set_amp_precision
from nnh.handler import validation as check
from nnh.handler.data import fast_loader
from nnh.handler.persistence import capture_rng, restore_rng
from nnh.handler.progress import epoch_line, interactive
from nnh.handler.saving import (
    check_resume_batch_size,
    raise_save_failures,
    submit_checkpoint,
    wait_for_saves,
    write_checkpoint,
    write_step_checkpoint,
)
from nnh.handler.train_setup import amp_dtype, check_ready, ensure_state, train_config, train_mode
from nnh.handler.training import epoch_means, run_train_epoch, run_val_epoch

if TYPE_CHECKING:
    from nnh.handler.nnhandler import NNHandler

__all__ = ["run_epoch", "train", "validate_epoch"]


def train(
    h: NNHandler,
    *,
    epochs: int,
    validate_every: int,
    gradient_accumulation_steps: int,
    use_amp: bool | str | torch.dtype,
    gradient_clipping_norm: float | None,
    ema_decay: float,
    seed: int | None,
    progress_bar: bool,
    debug_print_interval: int | None,
    save_on_last_epoch: bool,
    epoch_train_and_val_pbar: bool,
) -> None:
    """Run ``epochs`` epochs of ``h`` (the body of :meth:`NNHandler.train`, whose docstring
    describes the options)."""
    check.check_train_args(**{k: v for k, v in locals().items() if k != "h"})
    check_ready(h)
    raise_save_failures(h)
    if h._resume is not None:
        check_resume_batch_size(h._resume, h._train_loader)
    h._last_train_kwargs = {
        "validate_every": validate_every,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "use_amp": use_amp if isinstance(use_amp, (bool, str)) else str(use_amp).split(".")[-1],
        "gradient_clipping_norm": gradient_clipping_norm,
        "ema_decay": float(ema_decay),
        "progress_bar": progress_bar,
        "debug_print_interval": debug_print_interval,
        "save_on_last_epoch": save_on_last_epoch,
        "epoch_train_and_val_pbar": epoch_train_and_val_pbar,
    }
    dtype = amp_dtype(h, use_amp)
    set_amp_precision(h.module, h._fsdp, dtype)  # FSDP units gather in the autocast dtype
    use_scaler = dtype is torch.float16
    if seed is not None and h._resume is None:
        h.seed = seed
    state = ensure_state(h, ema=ema_decay > 0, scaler=use_scaler)
    config = train_config(
        h,
        accumulation_steps=gradient_accumulation_steps,
        clip_norm=gradient_clipping_norm,
        amp_dtype=dtype,
        loss_scaler=h._loss_scaler_config if use_scaler else None,
        ema_decay=float(ema_decay),
    )
    h._auto_saver.check_name(h._log_keys())
    h.stop_training = False
    callbacks = CallbackList(h._callbacks, is_main=h._dist.is_main)
    show = progress_bar and h._dist.is_main
    bars = show and interactive()  # a log file gets one line per epoch instead of bar frames
    start_epoch, history_at_start = state.epoch, len(h._history.train_losses)
    h._target_epoch = start_epoch + epochs
    h._log(
        f"training epochs {start_epoch + 1}..{start_epoch + epochs} "
        f"(accumulation {gradient_accumulation_steps}, amp {dtype}, clip {gradient_clipping_norm}, "
        f"ema {ema_decay})"
    )
    callbacks.call("on_train_begin", {"epochs": epochs, "start_epoch": start_epoch})
    epoch_bar = tqdm(
        total=epochs, desc="Epochs", unit="epoch", disable=not bars, dynamic_ncols=True
    )
    logs: dict[str, Any] = {}
    try:
        for i in range(epochs):
            epoch = start_epoch + i + 1
            logs = run_epoch(
                h,
                state_config=config,
                epoch=epoch,
                callbacks=callbacks,
                validate=(epoch % validate_every == 0),
                epoch_bar=epoch_bar if bars else None,
                batch_bars=bars and epoch_train_and_val_pbar,
                debug_print_interval=debug_print_interval,
                last=(i == epochs - 1),
                save_on_last_epoch=save_on_last_epoch,
            )
            raise_save_failures(h)
            if show and not bars:
                epoch_line(epoch, start_epoch + epochs, logs)
            if bars:
                epoch_bar.update(1)
                epoch_bar.set_postfix(
                    {
                        k: f"{v:.4g}"
                        for k, v in logs.items()
                        if k in ("loss", "val_loss") and not math.isnan(v)
                    },
                    refresh=False,
                )
            if h._dist.any_true(h.stop_training, h._device):
                h.stop_training = True
                h._target_epoch = epoch  # the call is complete: nothing left to resume
                h._log(f"training stopped by a callback after epoch {epoch}")
                if i != epochs - 1:
                    auto_saver_final(h, logs, save_on_last_epoch)
                break
        wait_for_saves(h)  # every background save is on disk before train() returns
    except BaseException as exc:
        drain_saves_after(h, exc)
        recorded = len(h._history.train_losses) - history_at_start
        h._state = check.epoch_matching_history(h._state, start_epoch, recorded)
        error = h._dist.fail(exc)
        if error is exc:
            raise
        raise error from exc
    finally:
        epoch_bar.close()
    callbacks.call("on_train_end", logs)


def run_epoch(
    h: NNHandler,
    *,
    state_config: TrainConfig,
    epoch: int,
    callbacks: CallbackList,
    validate: bool,
    epoch_bar: Any,
    batch_bars: bool,
    debug_print_interval: int | None,
    last: bool,
    save_on_last_epoch: bool,
) -> dict[str, Any]:
    assert h._state is not None and h._train_loader is not None
    config = state_config
    sampler = getattr(h._train_loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch - 1)
    resume, h._resume = h._resume, None
    if resume is not None and resume.get("epoch") != epoch:
        resume = None
    generator = getattr(h._train_loader, "generator", None)
    if not isinstance(generator, torch.Generator):
        generator = None
    if resume is not None:
        restore_rng(resume["epoch_start_rng"])
        loader_rng = resume["epoch_start_rng"].get("loader")
        if generator is not None and isinstance(loader_rng, torch.Tensor):
            generator.set_state(loader_rng)  # the loader's own shuffle replays too
    if h._auto_saver.every_n_steps:
        h._epoch_start_rng = capture_rng()
        if generator is not None:
            h._epoch_start_rng["loader"] = generator.get_state()
    if resume is None:
        callbacks.call("on_epoch_begin", epoch, {})
    train_mode(h)
    loader = fast_loader(h._train_loader)
    bar = (
        tqdm(total=len(loader), desc=f"Epoch {epoch} train", leave=False, dynamic_ncols=True)
        if batch_bars
        else None
    )
    uneven = (
        h._dist.enabled
        and isinstance(h._model, nn.parallel.DistributedDataParallel)
        and not isinstance(getattr(h._train_loader, "sampler", None), DistributedSampler)
    )
    join = h._model.join() if uneven else contextlib.nullcontext()
    try:
        with join:
            result = run_train_epoch(
                h._state,
                config,
                loader,
                device=h._device,
                metrics=h._metrics,
                callbacks=callbacks,
                progress=bar,
                status=bar if bar is not None else epoch_bar,
                debug_print_interval=debug_print_interval,
                log=h._log,
                epoch_label=f"epoch {epoch}",
                on_step=step_hook(h, epoch),
                skip_batches=resume["batch_offset"] if resume else 0,
                after_skip=(lambda: restore_rng(resume["step_rng"])) if resume else None,
                initial_sums=resume["sums"] if resume else None,
                real_samples=real_samples(h._train_loader),
            )
    finally:
        if bar is not None:
            bar.close()
    h._state = result.state
    packed = [pack_sums(result.sums)]
    val_result = None
    has_val = validate and h._val_loader is not None
    if has_val:
        callbacks.call("on_val_begin", {"epoch": epoch})
        val_result = validate_epoch(h, config, callbacks, batch_bars, epoch)
        packed.append(pack_sums(val_result.sums))
    flat = torch.cat(packed)
    h._dist.all_reduce_sum(flat)
    names = list(h._metrics)
    n_train = packed[0].numel()
    train_loss, train_metrics = epoch_means(flat[:n_train], h._metrics, "train")
    if not math.isfinite(train_loss):
        raise FloatingPointError(
            f"the training loss of epoch {epoch} is {train_loss} (on every rank): training diverged. "
            "Lower the learning rate, clip gradients (gradient_clipping_norm=...), or check the "
            "data and the loss function for inf/NaN"
        )
    logs: dict[str, Any] = {"epoch": epoch, "loss": train_loss, **train_metrics}
    val_loss, val_metrics = None, None
    if has_val:
        val_loss, val_metrics = epoch_means(flat[n_train:], h._metrics, "val")
        logs["val_loss"] = val_loss
        logs.update({f"val_{k}": v for k, v in val_metrics.items()})
        callbacks.call("on_val_end", dict(logs))
    h._history.append(train_loss, val_loss, train_metrics, val_metrics)
    if h._ensemble is not None:
        h._ensemble.record_epoch(flat, n_train, names, has_val)
    optimizer = h.optimizer
    if optimizer is not None:
        logs["lr"] = float(optimizer.param_groups[0]["lr"])  # the rate this epoch trained with
    step_scheduler(h, train_loss, val_loss)
    h._log(f"epoch {epoch}: " + ", ".join(f"{k}={v:.6g}" for k, v in logs.items() if k != "epoch"))
    callbacks.call("on_epoch_end", epoch, logs)
    auto_saver_epoch(h, epoch, logs, last and save_on_last_epoch)
    return logs


def validate_epoch(
    h: NNHandler, config: TrainConfig, callbacks: CallbackList, batch_bars: bool, epoch: int
) -> Any:
    assert h._val_loader is not None and h._state is not None
    loader = fast_loader(h._val_loader)
    bar = (
        tqdm(total=len(loader), desc=f"Epoch {epoch} val", leave=False, dynamic_ncols=True)
        if batch_bars
        else None
    )
    if h._dist.enabled:
        config = attrs.evolve(config, model=h._inference_model())
    h.module.eval()
    try:
        return run_val_epoch(
            h._state,
            config,
            loader,
            device=h._device,
            metrics=h._metrics,
            callbacks=callbacks,
            progress=bar,
            real_samples=real_samples(h._val_loader),
            loss_epoch=epoch - 1,
        )
    finally:
        if bar is not None:
            bar.close()
        train_mode(h)


def step_scheduler(h: NNHandler, train_loss: float, val_loss: float | None) -> None:
    if h._scheduler is None:
        return
    if isinstance(h._scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        if val_loss is not None:
            h._scheduler.step(val_loss)
        elif h._val_loader is None:
            h._scheduler.step(train_loss)
    else:
        h._scheduler.step()


# ------------------------------------------------------------------ auto-saving
def step_hook(h: NNHandler, epoch: int) -> Callable[[TrainState, int, Any], None] | None:
    every = h._auto_saver.every_n_steps
    if not every:
        return None

    def on_step(state: TrainState, index: int, sums: Any) -> None:
        if (index + 1) % every:
            return
        h._state = state
        resume = {
            "epoch": epoch,
            "batch_offset": index + 1,
            "batch_size": getattr(h._train_loader, "batch_size", None),
            "epoch_start_rng": h._epoch_start_rng,
            "step_rng": capture_rng(),
            "sums": {"loss": sums.loss, "count": sums.count, "metrics": dict(sums.metrics)},
            "target_epoch": h._target_epoch,
        }
        saver = h._auto_saver
        write_step_checkpoint(h, str(saver.step_path()), resume=resume,
                              guard_replace=saver.from_checkpoint, background=saver.async_save)  # fmt: skip

    return on_step


def auto_saver_epoch(h: NNHandler, epoch: int, logs: dict[str, Any], final: bool) -> None:
    saver = h._auto_saver
    due = saver.due(epoch, final)
    if due:
        save_auto(h, logs)


def auto_saver_final(h: NNHandler, logs: dict[str, Any], save_on_last_epoch: bool) -> None:
    if save_on_last_epoch and h._auto_saver.enabled:
        save_auto(h, logs)


def save_auto(h: NNHandler, logs: dict[str, Any]) -> None:
    saver = h._auto_saver
    path = saver.path_for(logs)
    # the file records itself as the last save, so a run resumed from it rotates it
    h._auto_saver = attrs.evolve(saver, last_saved=str(path))
    run_id = h._run_id
    try:
        if saver.async_save:  # the previous file goes once the new one is written
            submit_checkpoint(
                h,
                str(path),
                guard_replace=saver.from_checkpoint,
                after=lambda written: saver.remove_previous(written, run_id),
                in_training=True,
            )
            return
        write_checkpoint(h, str(path), guard_replace=saver.from_checkpoint)
    except BaseException:
        h._auto_saver = saver
        raise
    if h._dist.is_main:
        saver.remove_previous(path, run_id)


def drain_saves_after(h: NNHandler, exc: BaseException) -> None:
    """Finish pending background saves after ``exc`` stopped training; report, not raise,
    their failures (``exc`` is the error to surface)."""
    from nnh.handler.saving import _writers

    for err in (e for w in _writers(h) for e in w.wait()):
        if err is not exc:
            h._log(f"a background save failed while training stopped: {err}", logging.ERROR)
