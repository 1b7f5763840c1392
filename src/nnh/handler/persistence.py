"""What a handler checkpoint holds (the save side; :mod:`nnh.handler.loading` rebuilds a handler).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (it loads with
``torch.load(weights_only=True)``). Classes and functions are recorded by import path and
resolved on load, type-checked against their slot; nothing stored executes unless the user
opts in to stored model code.

Layout (format version 2)::

    nnh_format, versions                 header (nnh.checkpoint.format)
    integrity    {algorithm, tensors, digest}            checksums (nnh.checkpoint.integrity)
    run          {id}                                    the run that wrote the file
    model        {class, kwargs, type, source?, frozen, keep_eval, compile}
    model_state_dict                     plain-module keys (an ensemble's: stacked [E, ...])
    ensemble     {size, member_history} or None        a vectorised ensemble (nnh.handler.ensemble)
    train_state  {counters, ema?, scaler?, grads?}      the core record (less params/opt)
    optimizer    {class, kwargs, state_dict}             torch's own optimizer state dict
    scheduler    {class, kwargs, state_dict}
    loss         {fn, kwargs, pass_epoch}                fn: a callable record or None
    metrics      {name: callable record or None}         (nnh.checkpoint.callables)
    callbacks    [{class, config, state}]
    history, auto_saver, seed, rng, loss_scaler
    last_train_kwargs, target_epoch       the options and end epoch of the train() call
    logging      {mode, filename, level}                 the logger configuration
    data         {train|val: {dataset?, loader_kwargs, generator_state?}}
    sde, sampler                         {class, config}
    resume       mid-epoch position (step checkpoints only)
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from nnh.checkpoint import (
    CheckpointError,
    capture_model_source,
    import_path,
    is_importable,
)
from nnh.checkpoint.callables import NotRecordable, callable_record, is_plain
from nnh.core import TrainState
from nnh.warn import warn as nnh_warn

if TYPE_CHECKING:  # pragma: no cover
    from nnh.handler import NNHandler

__all__ = ["capture_rng", "handler_payload", "restore_rng"]

log = logging.getLogger("nnh.checkpoint")

_LOADER_KEYS = (
    "batch_size",
    "shuffle",
    "drop_last",
    "num_workers",
    "pin_memory",
    "timeout",
    "prefetch_factor",
    "persistent_workers",
)
# Above this many bytes a TensorDataset is not embedded in checkpoints.
DATASET_EMBED_LIMIT = 256 * 2**20


# ----------------------------------------------------------------------------- helpers
def _path_or_none(obj: Any, what: str, warn: bool = True, h: NNHandler | None = None) -> str | None:
    """The import path of ``obj``; warns (once per object and handler when ``h`` is given,
    so automatic saves do not repeat it) when it is only loadable from this script or not
    at all."""

    def say(message: str) -> None:
        if h is not None:
            _warn_once(h, obj, message)
        else:
            nnh_warn(message)

    ok, reason = is_importable(obj)
    if ok:
        return import_path(obj)
    qualname = getattr(obj, "__qualname__", "")
    if getattr(obj, "__module__", None) == "__main__" and "<" not in qualname:
        if warn:
            say(
                f"{what} is defined in the script being run (__main__.{qualname}), so the "
                "checkpoint loads only from this script. What to do: move it into a module you "
                "import (e.g. models.py)."
            )
        return f"__main__.{qualname}"
    if warn:
        say(f"{what} cannot be saved by import path ({reason}); after loading, set it again")
    return None


_plain = is_plain


def _callable_or_none(h: NNHandler, fn: Any, what: str) -> dict[str, Any] | None:
    """The checkpoint record of a loss or metric; warn (once per object) when it has none."""
    try:
        record = callable_record(fn)
    except NotRecordable as err:
        _warn_once(
            h, fn, f"{what} cannot be saved by import path ({err}); after loading, set it again"
        )
        return None
    if record.get("function", record.get("class", "")).startswith("__main__."):
        _warn_once(
            h,
            fn,
            f"{what} is defined in the script being run "
            f"({record.get('function') or record.get('class')}), so the checkpoint restores it "
            "only from this script. What to do: move it into a module you import "
            "(e.g. models.py).",
        )
    return record


def _warn_once(h: NNHandler, obj: Any, message: str) -> None:
    seen = h.__dict__.setdefault("_nnh_save_warnings", set())
    key = (id(obj), message)
    if key not in seen:
        seen.add(key)
        nnh_warn(message)


def _plain_kwargs(kwargs: dict[str, Any], what: str) -> dict[str, Any]:
    bad = sorted(k for k, v in kwargs.items() if not _plain(v))
    if bad:
        raise CheckpointError(
            f"cannot save {what}: keyword argument(s) {bad} are not plain values (numbers, strings, "
            "lists, dicts, tensors); pass plain values so the checkpoint can rebuild it"
        )
    return dict(kwargs)


def capture_rng() -> dict[str, Any]:
    """Every global RNG state the training loop draws from (torch CPU, CUDA, Python, NumPy).

    Example:
        >>> state = capture_rng(); a = torch.rand(1); restore_rng(state); bool(torch.rand(1) == a)
        True
    """
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        out["numpy"] = {
            "name": name,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        }
    except ImportError:  # pragma: no cover - numpy ships with matplotlib
        pass
    return out


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` captured."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_as_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state(
            (s["name"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["cached"])
        )


def _as_python_state(value: Any) -> tuple:
    version, internal, gauss = value
    return (int(version), tuple(int(v) for v in internal), gauss)


def _dataset_record(
    loader: DataLoader | None, kwargs: dict[str, Any], embed: bool
) -> dict[str, Any] | None:
    if loader is None:
        return None
    record: dict[str, Any] = {
        "loader_kwargs": {k: v for k, v in kwargs.items() if k in _LOADER_KEYS and _plain(v)}
    }
    generator = kwargs.get("generator")
    if isinstance(generator, torch.Generator):
        record["generator_state"] = generator.get_state()
    dataset = loader.dataset
    if embed and isinstance(dataset, (TensorDataset, Subset)):
        base, indices = dataset, None
        if isinstance(base, Subset) and isinstance(base.dataset, TensorDataset):
            indices, base = torch.as_tensor(base.indices), base.dataset
        if isinstance(base, TensorDataset):
            size = sum(t.numel() * t.element_size() for t in base.tensors)
            if size <= DATASET_EMBED_LIMIT:
                record["tensors"] = list(base.tensors)
                if indices is not None:
                    record["indices"] = indices
    if "tensors" not in record:
        record["dataset_class"] = _path_or_none(type(dataset), "dataset class", warn=False)
    return record


# ----------------------------------------------------------------------------- save
def handler_payload(
    handler: NNHandler, *, include_datasets: bool = True, resume: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The complete, weights_only-safe state of ``handler``."""
    h = handler
    module = h.module
    model_class = type(module) if h._ensemble is None else module.member_class
    if getattr(module, "_nnh_fsdp", False):  # fully_shard swapped in a generated subclass
        model_class = h._model_class or model_class
    model_path = _path_or_none(model_class, f"model class {model_class.__name__}", h=h)
    if model_path is None and not h._save_model_code:
        raise CheckpointError(
            f"the model class {model_class.__qualname__} cannot be recorded by import path; define it at "
            "module level in an importable module, or construct the handler with save_model_code=True"
        )
    names = {id(m): n for n, m in module.named_modules()}
    payload: dict[str, Any] = {
        "run": {
            "id": str(h._run_id),
            "lineage": sorted(getattr(h._run_id, "lineage", ()))[:64],
            "resumed_at": list(h._history.resumed_at),
        }
    }
    payload["model"] = {
        "class": model_path or f"{model_class.__module__}.{model_class.__qualname__}",
        "kwargs": _plain_kwargs(h._model_kwargs, f"model {model_class.__name__}"),
        "type": h._model_type.value,
        "source": capture_model_source(model_class) if h._save_model_code else None,
        "frozen": [n for n, p in module.named_parameters() if not p.requires_grad],
        "keep_eval": [names[id(m)] for m in h._keep_eval if id(m) in names],
        "compile": h._compile_kwargs,
    }
    payload["model_state_dict"] = module.state_dict()
    payload["ensemble"] = None if h._ensemble is None else h._ensemble.state_dict()
    state = h._state
    if state is not None:
        payload["train_state"] = {
            "counters": {
                f.name: getattr(state, f.name)
                for f in attrs.fields(TrainState)
                if f.type in ("int", int)
            },
            "ema": None if state.ema is None else dict(state.ema.items()),
            "scaler": None if state.scaler is None else dict(state.scaler.items()),
            "grads": None if state.grads is None else dict(state.grads.items()),
        }
    if h._adapter is not None and h._optimizer_spec is not None:
        cls, kwargs = h._optimizer_spec
        payload["optimizer"] = {
            "class": import_path(cls),
            "kwargs": _plain_kwargs(_named_groups(kwargs, module), f"optimizer {cls.__name__}"),
            "state_dict": h._adapter.optimizer.state_dict(),
        }
    if h._scheduler is not None and h._scheduler_spec is not None:
        cls, kwargs = h._scheduler_spec
        payload["scheduler"] = {
            "class": _path_or_none(cls, f"scheduler {cls.__name__}", h=h),
            "kwargs": {k: v for k, v in kwargs.items() if _plain(v)},
            "state_dict": {k: v for k, v in h._scheduler.state_dict().items() if _plain(v)},
        }
    if h._loss_fn is not None:
        payload["loss"] = {
            "fn": _callable_or_none(
                h,
                h._loss_fn,
                f"loss function {getattr(h._loss_fn, '__name__', type(h._loss_fn).__name__)!r}",
            ),
            "kwargs": {k: v for k, v in h._loss_fn_kwargs.items() if _plain(v)},
            "pass_epoch": h._pass_epoch_to_loss,
        }
    payload["metrics"] = {
        name: _callable_or_none(h, fn, f"metric {name!r}") for name, fn in h._metrics.items()
    }
    payload["callbacks"] = [_callback_record(h, cb) for cb in h._callbacks]
    payload["history"] = h._history.state_dict()
    payload["auto_saver"] = h._auto_saver.state_dict()
    payload["seed"] = h._seed
    payload["rng"] = capture_rng()
    payload["loss_scaler"] = attrs.asdict(h._loss_scaler_config)
    payload["data"] = {
        "train": _dataset_record(
            h._train_loader, h._loader_kwargs.get("train", {}), include_datasets
        ),
        "val": _dataset_record(h._val_loader, h._loader_kwargs.get("val", {}), include_datasets),
    }
    payload["sde"] = _component_record(h, h._sde, "SDE")
    payload["sampler"] = _component_record(h, h._sampler, "sampler")
    payload["last_train_kwargs"] = dict(h._last_train_kwargs) if h._last_train_kwargs else None
    payload["target_epoch"] = int(h._target_epoch)  # the epoch the train() under way ends at
    payload["logging"] = dict(h._logger_config)
    payload["resume"] = resume
    return payload


def _named_groups(kwargs: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """Replace parameter objects in ``params=[...]`` groups with their names."""
    if "params" not in kwargs:
        return kwargs
    names = {id(p): n for n, p in module.named_parameters()}
    groups = []
    for g in kwargs["params"]:
        g = dict(g)
        g["params"] = [p if isinstance(p, str) else names[id(p)] for p in g["params"]]
        groups.append(g)
    return {**kwargs, "params": groups}


def _callback_record(h: NNHandler, cb: Any) -> dict[str, Any]:
    config = cb.config()
    plain = {k: v for k, v in config.items() if _plain(v)}
    dropped = sorted(set(config) - set(plain))
    if dropped:
        _warn_once(
            h,
            cb,
            f"callback {type(cb).__name__}: options {dropped} are not plain values and are not saved",
        )
    return {
        "class": _path_or_none(type(cb), f"callback {type(cb).__name__}", h=h),
        "config": plain,
        "state": cb.state_dict(),
    }


def _component_record(h: NNHandler, obj: Any, what: str) -> dict[str, Any] | None:
    if obj is None:
        return None
    config = obj.config() if hasattr(obj, "config") else {}
    plain = {k: v for k, v in config.items() if _plain(v)}
    dropped = sorted(set(config) - set(plain))
    if dropped:
        _warn_once(
            h,
            obj,
            f"{what} {type(obj).__name__}: options {dropped} are not plain values and are not saved; "
            "loading rebuilds it without them",
        )
    state = obj.state_dict() if hasattr(obj, "state_dict") else None
    return {
        "class": _path_or_none(type(obj), f"{what} {type(obj).__name__}", h=h),
        "config": plain,
        "state": state,
    }
