"""Rebuilding a handler from a checkpoint, treating the file as data from a stranger.

:func:`load_handler` is what ``NNHandler.load`` runs. In order, before anything named in the
file is called:

1. the file is read with ``weights_only=True`` and its checksums are verified
   (:func:`nnh.checkpoint.load_checkpoint`);
2. every section is checked for its expected shape (:mod:`nnh.checkpoint.schema`);
3. every class and function the file names is resolved and type-checked against its slot
   (:mod:`nnh.checkpoint.trust`): the model (``nn.Module``), optimizer, scheduler,
   callbacks, SDE, sampler, loss and metrics (functions or ``nn.Module`` objects).

Only then is the handler constructed and its state restored. Paths stored in the file are
never acted on directly: deleting or replacing files goes through
:mod:`nnh.checkpoint.ownership`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from nnh.callbacks.base import Callback
from nnh.checkpoint import (
    CheckpointError,
    ImportPathError,
    load_checkpoint,
    load_model_state,
    rebuild_class_from_source,
    strip_wrapper_prefixes,
)
from nnh.checkpoint.callables import restore_callable
from nnh.checkpoint.schema import check_handler_payload
from nnh.checkpoint.trust import resolve_class_record
from nnh.core.tree import flat_td
from nnh.handler.logs import logging_options
from nnh.handler.persistence import restore_rng

if TYPE_CHECKING:  # pragma: no cover
    from nnh.handler import NNHandler

__all__ = ["SCHEDULER_BASES", "apply_payload", "load_handler", "resolve_model_class"]

SCHEDULER_BASES: tuple[type, ...] = (
    torch.optim.lr_scheduler.LRScheduler,
    torch.optim.lr_scheduler.ReduceLROnPlateau,
)


@attrs.define
class _Resolved:
    """Everything a checkpoint names, resolved and type-checked; ``None`` = set it again."""

    model: type[nn.Module]
    optimizer: type[torch.optim.Optimizer] | None = None
    scheduler: type | None = None
    loss: Any = None
    metrics: dict[str, Any] = attrs.Factory(dict)
    callbacks: list[tuple[type, dict[str, Any]]] = attrs.Factory(list)
    sde: tuple[type, dict[str, Any]] | None = None
    sampler: tuple[type, dict[str, Any]] | None = None
    messages: list[str] = attrs.Factory(list)


def resolve_model_class(
    record: dict[str, Any], path: str, trust_model_code: bool
) -> type[nn.Module]:
    """The model class of a checkpoint: by import path, else (opt-in) from stored source.

    Either way it must be an ``nn.Module`` subclass.

    Example:
        >>> resolve_model_class({"class": "torch.nn.Linear"}, "run.pth", False).__name__
        'Linear'
    """
    try:
        return resolve_class_record(record["class"], nn.Module, record="model.class", path=path)
    except ImportPathError as err:
        if record.get("source") is None:
            raise CheckpointError(
                f"{path}: the model class {record['class']!r} cannot be imported ({err}); make "
                "its module importable (install the package or add it to sys.path), or pass it "
                "explicitly with NNHandler.initialize_from_checkpoint(path, model_class=...)",
                path=path,
                kind="not_importable",
            ) from err
        reason = str(err).split(". What to do", 1)[0]
        cls = rebuild_class_from_source(
            record["source"],
            trust_code=trust_model_code,
            path=path,
            reason=reason,
            flag="trust_model_code",
        )
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(
            f"{path}: the stored model source defines {record['class']!r} as something other "
            "than an nn.Module subclass; nnh will not use it.",
            path=path,
            kind="untrusted",
        )
    return cls


def _optional_class(
    resolved: _Resolved, name: Any, base: Any, record: str, what: str, path: str
) -> type | None:
    """Resolve an optional part; an untrusted name raises, a missing one means 'set it again'."""
    if name is None:
        resolved.messages.append(
            f"{what} was not saved (not importable): set it again after loading"
        )
        return None
    try:
        return resolve_class_record(name, base, record=record, path=path)
    except ImportPathError as err:
        resolved.messages.append(
            f"{what} {name!r} cannot be imported ({err}): set it again after loading"
        )
        return None


def _optional_callable(resolved: _Resolved, rec: Any, record: str, what: str, path: str) -> Any:
    if rec is None:
        resolved.messages.append(
            f"{what} was not saved (not importable): set it again after loading"
        )
        return None
    try:
        return restore_callable(rec, record=record, path=path)
    except ImportPathError as err:
        resolved.messages.append(f"{what} cannot be imported ({err}): set it again after loading")
        return None
    except CheckpointError as err:
        if err.kind == "untrusted":
            raise
        resolved.messages.append(f"{what}: {err}")
        return None


def _component_kwargs(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec["config"].items() if k != "class"}


def resolve_payload(
    payload: dict[str, Any], path: str, *, trust_model_code: bool, skip: dict[str, bool]
) -> _Resolved:
    """Resolve and type-check every name the checkpoint holds, calling none of them."""
    from nnh.generative.sampler import Sampler
    from nnh.generative.sde import SDE

    r = _Resolved(model=resolve_model_class(payload["model"], path, trust_model_code))
    if payload.get("optimizer"):
        r.optimizer = resolve_class_record(
            payload["optimizer"]["class"],
            torch.optim.Optimizer,
            record="optimizer.class",
            path=path,
        )
    if payload.get("scheduler") and not skip["scheduler"]:
        r.scheduler = _optional_class(
            r,
            payload["scheduler"]["class"],
            SCHEDULER_BASES,
            "scheduler.class",
            "the scheduler",
            path,
        )
    if payload.get("loss"):
        r.loss = _optional_callable(r, payload["loss"]["fn"], "loss.fn", "the loss function", path)
    for name, rec in (payload.get("metrics") or {}).items():
        fn = _optional_callable(r, rec, f"metrics[{name!r}]", f"metric {name!r}", path)
        if fn is not None:
            r.metrics[name] = fn
    if not skip["callbacks"]:
        for i, rec in enumerate(payload.get("callbacks") or []):
            cls = _optional_class(
                r, rec["class"], Callback, f"callbacks[{i}].class", "a callback", path
            )
            if cls is not None:
                r.callbacks.append((cls, rec))
    if not skip["sampler_sde"]:
        for key, base in (("sde", SDE), ("sampler", Sampler)):
            rec = payload.get(key)
            if rec:
                cls = _optional_class(r, rec["class"], base, f"{key}.class", f"the {key}", path)
                if cls is not None:
                    setattr(r, key, (cls, rec))
    return r


def load_handler(
    handler_class: type[NNHandler],
    path: str,
    *,
    device: torch.device | str | None,
    strict_load: bool,
    skip_optimizer: bool,
    skip_scheduler: bool,
    skip_history: bool,
    skip_callbacks: bool,
    skip_sampler_sde: bool,
    skip_ema: bool,
    trust_model_code: bool,
) -> NNHandler:
    """What :meth:`NNHandler.load` does (see the module docstring for the order of checks)."""
    from nnh.handler.nnhandler import _CHECKPOINT_TENSORS

    payload = load_checkpoint(path, map_location="cpu")
    check_handler_payload(payload, path)
    skip = {
        "scheduler": skip_scheduler,
        "callbacks": skip_callbacks,
        "sampler_sde": skip_sampler_sde,
    }
    resolved = resolve_payload(payload, str(path), trust_model_code=trust_model_code, skip=skip)
    model = payload["model"]
    weights = strip_wrapper_prefixes(payload["model_state_dict"])
    payload["model_state_dict"] = weights
    with _section(str(path), "logging"):
        log_options = logging_options(payload.get("logging"), str(path))
    token = _CHECKPOINT_TENSORS.set(frozenset(weights))
    ensemble = payload.get("ensemble")
    try:
        handler = handler_class(
            resolved.model,
            device=torch.device(device) if device is not None else "cpu",
            model_type=model["type"],
            save_model_code=model.get("source") is not None,
            ensemble_size=None if ensemble is None else ensemble["size"],
            **log_options,
            **model["kwargs"],
        )
    finally:
        _CHECKPOINT_TENSORS.reset(token)
    apply_payload(
        handler,
        payload,
        str(path),
        resolved,
        strict_load=strict_load,
        skip_optimizer=skip_optimizer,
        skip_history=skip_history,
        skip_ema=skip_ema,
    )
    handler._dist.barrier()
    handler._log(f"loaded {path} (epoch {handler._state.epoch if handler._state else 0})")
    return handler


@contextlib.contextmanager
def _section(path: str, name: str) -> Iterator[None]:
    """Turn a bad value inside a checked section into a CheckpointError naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint {path!r}: section {name!r} could not be restored ({type(err).__name__}: "
            f"{err}). The file was damaged or edited, or written by incompatible code. What to "
            "do: use an intact copy, or load with the matching skip_* flag and set that part "
            "again.",
            path=path,
            kind="damaged",
        ) from err


def _report(h: NNHandler, message: str) -> None:
    warnings.warn(message, stacklevel=4)
    h._log(message, logging.WARNING)


def _load_weights(h: NNHandler, weights: dict[str, Any], path: str, strict_load: bool) -> None:
    module = h.module
    if getattr(module, "_nnh_meta_init", False):
        # built on the meta device because the checkpoint supplies every tensor: take them as they are
        load_model_state(module, weights, strict=strict_load, source=path, assign=True)
        del module._nnh_meta_init
        module.to(h.device)
        h._model = h._wrap(module)
    else:
        load_model_state(module, weights, strict=strict_load, source=path)


def _restore_model(h: NNHandler, payload: dict[str, Any], path: str, strict_load: bool) -> None:
    model = payload["model"]
    _load_weights(h, payload["model_state_dict"], path, strict_load)
    module = h.module
    params = dict(module.named_parameters())
    for name in model.get("frozen") or []:
        if name in params:
            params[name].requires_grad_(False)
    submodules = dict(module.named_modules())
    for name in model.get("keep_eval") or []:
        if name in submodules:
            h.keep_eval_on_module(submodules[name])


def _restore_objective(h: NNHandler, payload: dict[str, Any], resolved: _Resolved) -> None:
    if payload.get("loss") and resolved.loss is not None:
        h.set_loss_fn(
            resolved.loss,
            pass_epoch_to_loss=payload["loss"]["pass_epoch"],
            **payload["loss"]["kwargs"],
        )
    for name, fn in resolved.metrics.items():
        h.add_metric(name, fn)


def _restore_optimization(
    h: NNHandler, payload: dict[str, Any], path: str, resolved: _Resolved, skip_optimizer: bool
) -> None:
    if resolved.optimizer is not None:
        rec = payload["optimizer"]
        with _section(path, "optimizer"):
            h.set_optimizer(resolved.optimizer, **rec["kwargs"])  # fresh when skipped
        if not skip_optimizer:
            try:
                h._adapter.optimizer.load_state_dict(rec["state_dict"])
            except (ValueError, KeyError, TypeError) as err:
                raise CheckpointError(
                    f"{path}: the optimizer state does not fit the model ({err}); "
                    "load with skip_optimizer=True to start the optimizer afresh",
                    path=path,
                    kind="mismatch",
                ) from err
    if resolved.scheduler is not None and h._adapter is not None:
        rec = payload["scheduler"]
        with _section(path, "scheduler"):
            h.set_scheduler(resolved.scheduler, **rec["kwargs"])
            h._scheduler.load_state_dict(rec["state_dict"])


def _restore_components(h: NNHandler, path: str, resolved: _Resolved) -> None:
    for i, (cls, rec) in enumerate(resolved.callbacks):
        with _section(path, f"callbacks[{i}]"):
            try:
                cb = cls(**rec["config"])
            except ImportError as err:  # e.g. TensorBoardLogger without tensorboard installed
                resolved.messages.append(f"callback {rec['class']} skipped: {err}")
                continue
            cb.load_state_dict(rec.get("state") or {})
            h.add_callback(cb)
    for key in ("sde", "sampler"):
        found = getattr(resolved, key)
        if found is not None:
            cls, rec = found
            with _section(path, key):
                obj = cls(**_component_kwargs(rec))
                if rec.get("state") is not None and hasattr(obj, "load_state_dict"):
                    obj.load_state_dict(rec["state"])
                setattr(h, key, obj)  # the sampler setter attaches it to the handler


def apply_payload(
    handler: NNHandler,
    payload: dict[str, Any],
    path: str,
    resolved: _Resolved,
    *,
    strict_load: bool,
    skip_optimizer: bool,
    skip_history: bool,
    skip_ema: bool,
) -> None:
    """Restore a checked checkpoint's state into a handler built with its model."""
    from nnh.core import LossScaler
    from nnh.handler.autosaver import AutoSaver

    h = handler
    _restore_model(h, payload, path, strict_load)
    data = payload.get("data") or {}
    for which in ("train", "val"):
        with _section(path, f"data.{which}"):
            _restore_loader(h, which, data.get(which))
    _restore_objective(h, payload, resolved)
    _restore_optimization(h, payload, path, resolved, skip_optimizer)
    if not skip_history:
        with _section(path, "history"):
            h._history.load_state_dict(payload.get("history") or {})
            if h._ensemble is not None:
                h._ensemble.load_state_dict(payload.get("ensemble") or {})
    _restore_components(h, path, resolved)
    with _section(path, "auto_saver"):
        h._auto_saver = AutoSaver.from_state_dict(payload.get("auto_saver") or {})
    with _section(path, "loss_scaler"):
        h._loss_scaler_config = LossScaler(**(payload.get("loss_scaler") or {}))
    h._seed = payload.get("seed")
    h._last_train_kwargs = payload.get("last_train_kwargs")
    resume = payload.get("resume")
    h._target_epoch = payload.get("target_epoch") or (resume or {}).get("target_epoch") or 0
    run = payload.get("run")
    if run:
        h._run_id = run["id"]  # a loaded handler continues the run of its file
    if not skip_history and h._history.train_losses:
        with _section(path, "run.resumed_at"):
            earlier = [int(e) for e in (run or {}).get("resumed_at") or []]
            h._history.resumed_at = [*earlier, len(h._history.train_losses)]
    with _section(path, "train_state"):
        _restore_train_state(
            h, payload.get("train_state"), skip_ema=skip_ema, skip_optimizer=skip_optimizer
        )
    compile_kwargs = payload["model"].get("compile")
    if compile_kwargs is not None:
        with _section(path, "model.compile"):
            h.compile_model(**compile_kwargs)
    with _section(path, "rng"):
        restore_rng(payload["rng"])
    h._resume = None if resume is None else {**resume, "source": path}
    for message in resolved.messages:
        _report(h, message)


def _restore_loader(h: NNHandler, which: str, record: dict[str, Any] | None) -> None:
    if record is None:
        return
    kwargs = dict(record.get("loader_kwargs", {}))
    if "generator_state" in record:
        g = torch.Generator()
        g.set_state(record["generator_state"])
        kwargs["generator"] = g
    if "tensors" in record:
        dataset: Any = TensorDataset(*record["tensors"])
        if "indices" in record:
            dataset = Subset(dataset, record["indices"].tolist())
        getattr(h, f"set_{which}_loader")(dataset, **kwargs)
    else:
        h._log(
            f"the {which} dataset ({record.get('dataset_class')}) is not stored in checkpoints: "
            f"call set_{which}_loader again",
            logging.INFO,
        )


def _restore_train_state(
    h: NNHandler, rec: dict[str, Any] | None, *, skip_ema: bool, skip_optimizer: bool
) -> None:
    if rec is None or h._adapter is None:
        return
    from nnh.core import TrainState, init_train_state

    state = init_train_state(h.module, h._adapter)
    known = {f.name for f in attrs.fields(TrainState) if f.type in ("int", int)}
    counters = {k: v for k, v in (rec.get("counters") or {}).items() if k in known}
    if skip_optimizer:
        counters = {k: v for k, v in counters.items() if k == "epoch"}
    device = h.device

    def td(tensors: dict[str, Any] | None) -> Any:
        return None if tensors is None else flat_td({k: v.to(device) for k, v in tensors.items()})

    state = attrs.evolve(
        state,
        ema=None if skip_ema else td(rec.get("ema")),
        scaler=td(rec.get("scaler")),
        grads=None if skip_optimizer else td(rec.get("grads")),
        **counters,
    )
    h._state = state  # the first step binds it, installing an open window's gradients
