"""The epoch loops the handler runs: they thread the TrainState through the core.

Nothing here computes a gradient, an update or a mean: that is the core's job. The loops
move batches to the device, call :func:`nnh.core.train_step` / :func:`nnh.core.eval_step`
(donating the record), accumulate sums on the device, fire callbacks, and update the
progress bar at most twice a second (one host sync then, never per step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import torch
from tqdm.auto import tqdm

from nnh.callbacks.base import CallbackList
from nnh.core import TrainConfig, TrainState, end_epoch, eval_step, train_step
from nnh.core.accumulate import EpochSums, add_to_sums, new_sums, sums_to_means
from nnh.core.objectives import batch_size
from nnh.distributed.ddp import ShardCounter, trim_batch
from nnh.handler.data import move_to_device
from nnh.handler.ensemble import trim_member_batch
from nnh.handler.metric_objects import begin_phase, end_phase
from nnh.handler.validation import check_samples_seen

__all__ = ["EpochResult", "run_train_epoch", "run_val_epoch"]

_PBAR_INTERVAL_S = 0.5


@attrs.frozen(eq=False)
class EpochResult:
    """A finished epoch's device sums and the new state."""

    state: TrainState | None
    sums: EpochSums


def _running_loss(sums: EpochSums) -> float:
    count = float(sums.count)
    return float(sums.loss) / count if count else math.nan


def run_train_epoch(
    state: TrainState,
    config: TrainConfig,
    loader: Iterable[Any],
    *,
    device: torch.device,
    metrics: Mapping[str, Callable[[Any, Any], Any]],
    callbacks: CallbackList,
    progress: tqdm | None = None,
    status: tqdm | None = None,
    debug_print_interval: int | None = None,
    log: Callable[[str], None] | None = None,
    epoch_label: str = "",
    skip_batches: int = 0,
    after_skip: Callable[[], None] | None = None,
    initial_sums: Mapping[str, Any] | None = None,
    on_step: Callable[[TrainState, int, EpochSums], None] | None = None,
    real_samples: int | None = None,
) -> EpochResult:
    """Train one epoch; returns the state after :func:`end_epoch` and the epoch sums.

    ``skip_batches`` fast-forwards over batches already trained before a mid-epoch resume
    (they are drawn from the loader, so the order is unchanged, but not computed); then
    ``after_skip()`` runs (it restores the RNG of the interrupted step) and the sums start
    from ``initial_sums``. ``on_step(state, batch_index, sums)`` runs after every
    micro-step (step checkpoints).
    ``real_samples``: this rank's count of real (non-padding) samples under a padded
    DistributedSampler; the padding still trains (as in torch) but is not logged.
    ``progress`` counts batches; ``status`` (default: ``progress``) shows the running loss,
    refreshed at most every 0.5 s.
    """
    status = status if status is not None else progress
    begin_phase(metrics, "train")
    sums = new_sums(list(metrics), device, members=config.members)
    if initial_sums is not None:
        add_to_sums(
            sums,
            initial_sums["loss"].to(device),
            0,
            {k: v.to(device) for k, v in initial_sums["metrics"].items()},
        )
        sums.count.add_(initial_sums["count"].to(device))
    batch_hooks_begin = callbacks.wants("on_train_batch_begin")
    batch_hooks_end = callbacks.wants("on_train_batch_end")
    last_refresh = time.monotonic()
    total = _safe_len(loader)
    shard = ShardCounter(real_samples)
    for index, batch in enumerate(loader):
        if index < skip_batches:
            if index == skip_batches - 1 and after_skip is not None:
                after_skip()
            shard.take(batch_size(batch))
            continue
        batch = move_to_device(batch, device)
        if batch_hooks_begin:
            callbacks.call("on_train_batch_begin", index, {"batch": batch})
        last = total is not None and index == total - 1
        state, out = train_step(state, batch, config, donate=True, last_batch=last)
        loss, output, target = out.loss, out.output, out.target
        n = shard.take(out.num_samples)
        if n < out.num_samples:
            # DistributedSampler padding trains (as in torch) but is not logged
            loss_of = getattr(config.objective, "loss_of", None)
            if loss_of is None:
                n = out.num_samples  # the loss cannot be recomputed on part of the batch
            else:
                trim = trim_batch if config.members is None else trim_member_batch
                output, target = trim(output, n), trim(target, n)
                if n:
                    with torch.no_grad():
                        loss = loss_of(output, target, state.epoch).detach()
        if n:
            add_to_sums(
                sums,
                loss.double() * n,
                n,
                config.metric_sums(metrics, output, target, n) if metrics else None,
            )
        if batch_hooks_end:
            callbacks.call(
                "on_train_batch_end",
                index,
                {
                    "loss": out.loss,
                    "batch_size": out.num_samples,
                    "output": out.output,
                    "updated": out.updated,
                },
            )
        if on_step is not None:
            on_step(state, index, sums)
        if progress is not None:
            progress.update(1)
        if status is not None:
            now = time.monotonic()
            if now - last_refresh >= _PBAR_INTERVAL_S:
                status.set_postfix(loss=f"{_running_loss(sums):.4g}")
                last_refresh = now
        if debug_print_interval and (index + 1) % debug_print_interval == 0 and log is not None:
            log(
                f"{epoch_label} batch {index + 1}: loss {float(out.loss):.6g} (running {_running_loss(sums):.6g})"
            )
    state = end_epoch(state, config, donate=True)
    return EpochResult(state=state, sums=sums)


def run_val_epoch(
    state: TrainState,
    config: TrainConfig,
    loader: Iterable[Any],
    *,
    device: torch.device,
    metrics: Mapping[str, Callable[[Any, Any], Any]],
    callbacks: CallbackList,
    progress: tqdm | None = None,
    real_samples: int | None = None,
    loss_epoch: int | None = None,
) -> EpochResult:
    """Evaluate one epoch (no gradients); returns the epoch sums.

    ``real_samples`` trims DistributedSampler padding off the batches (never evaluated).
    ``loss_epoch`` is the ``epoch=`` a loss that asks for it gets (default ``state.epoch``):
    the handler passes the index its training steps of that epoch got, so both agree.
    """
    if loss_epoch is not None and loss_epoch != state.epoch:
        state = attrs.evolve(state, epoch=loss_epoch)
    begin_phase(metrics, "val")
    sums = new_sums(list(metrics), device, members=config.members)
    hooks_begin = callbacks.wants("on_val_batch_begin")
    hooks_end = callbacks.wants("on_val_batch_end")
    shard = ShardCounter(real_samples)
    for index, batch in enumerate(loader):
        n = batch_size(batch)
        k = shard.take(n)
        if k == 0:
            continue  # all DistributedSampler padding: never evaluated
        batch = move_to_device(trim_batch(batch, k) if k < n else batch, device)
        if hooks_begin:
            callbacks.call("on_val_batch_begin", index, {"batch": batch})
        out = eval_step(state, batch, config, metrics=metrics)
        add_to_sums(sums, out.loss_sum, out.num_samples, out.metric_sums)
        if hooks_end:
            callbacks.call(
                "on_val_batch_end",
                index,
                {"loss_sum": out.loss_sum, "batch_size": out.num_samples, "output": out.output},
            )
        if progress is not None:
            progress.update(1)
    return EpochResult(state=None, sums=sums)


def epoch_means(
    packed: torch.Tensor, metrics: Mapping[str, Any], phase: str
) -> tuple[float, dict[str, float]]:
    """``(mean loss, {metric: value})`` of an epoch phase from its packed, reduced sums.

    Stateful metrics (torchmetrics) get their computed value; a phase that saw no sample is
    an error saying its loader yielded no batches (not a NaN loss).

    Example:
        >>> epoch_means(torch.tensor([6.0, 3.0, 3.0], dtype=torch.float64), {"acc": None}, "train")
        (2.0, {'acc': 1.0})
    """
    loss, values, seen = sums_to_means(packed, list(metrics))
    check_samples_seen("training" if phase == "train" else "validation", seen)
    return loss, end_phase(metrics, phase, values)


def _safe_len(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
