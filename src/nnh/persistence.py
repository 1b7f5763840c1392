"""What a handler checkpoint holds, and how a handler is rebuilt from one.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (it loads with
``torch.load(weights_only=True)``). Classes and functions are recorded by import path and
resolved on load; nothing stored executes unless the user opts in to stored model code.

Layout (format version 1)::

    nnh_format, versions                 header (nnh.checkpoint.format)
    model        {class, kwargs, type, source?, frozen, keep_eval, compile}
    model_state_dict                     plain-module keys
    train_state  {counters, ema?, scaler?, grads?}      the core record (less params/opt)
    optimizer    {class, kwargs, state_dict}             torch's own optimizer state dict
    scheduler    {class, kwargs, state_dict}
    loss         {fn, kwargs, pass_epoch}                fn: import path or None
    metrics      {name: import path or None}
    callbacks    [{class, config, state}]
    history, auto_saver, seed, rng, loss_scaler
    data         {train|val: {dataset?, loader_kwargs, generator_state?}}
    sde, sampler                         {class, config}
    resume       mid-epoch position (step checkpoints only)
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Callable
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
    load_model_state,
    make_header,
    rebuild_class_from_source,
    resolve_import_path,
    strip_wrapper_prefixes,
)
from nnh.core import TrainState
from nnh.core.tree import flat_td

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
def _path_or_none(obj: Any, what: str, warn: bool = True) -> str | None:
    ok, reason = is_importable(obj)
    if ok:
        return import_path(obj)
    qualname = getattr(obj, "__qualname__", "")
    if getattr(obj, "__module__", None) == "__main__" and "<" not in qualname:
        if warn:
            warnings.warn(
                f"{what} is defined in the script being run (__main__.{qualname}): the checkpoint "
                "loads from that same script only; move it into an importable module to load it "
                "anywhere",
                stacklevel=4,
            )
        return f"__main__.{qualname}"
    if warn:
        warnings.warn(
            f"{what} cannot be saved by import path ({reason}); after loading, set it again",
            stacklevel=4,
        )
    return None


def _plain(value: Any) -> bool:
    """Whether ``value`` is storable under weights_only (recursively)."""
    if value is None or isinstance(
        value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.Size)
    ):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return False


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
    model_class = type(module)
    model_path = _path_or_none(model_class, f"model class {model_class.__name__}")
    if model_path is None and not h._save_model_code:
        raise CheckpointError(
            f"the model class {model_class.__qualname__} cannot be recorded by import path; define it at "
            "module level in an importable module, or construct the handler with save_model_code=True"
        )
    names = {id(m): n for n, m in module.named_modules()}
    payload: dict[str, Any] = dict(make_header())
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
            "class": _path_or_none(cls, f"scheduler {cls.__name__}"),
            "kwargs": {k: v for k, v in kwargs.items() if _plain(v)},
            "state_dict": {k: v for k, v in h._scheduler.state_dict().items() if _plain(v)},
        }
    if h._loss_fn is not None:
        payload["loss"] = {
            "fn": _path_or_none(
                h._loss_fn, f"loss function {getattr(h._loss_fn, '__name__', h._loss_fn)!r}"
            ),
            "kwargs": {k: v for k, v in h._loss_fn_kwargs.items() if _plain(v)},
            "pass_epoch": h._pass_epoch_to_loss,
        }
    payload["metrics"] = {
        name: _path_or_none(fn, f"metric {name!r}") for name, fn in h._metrics.items()
    }
    payload["callbacks"] = [_callback_record(cb) for cb in h._callbacks]
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
    payload["sde"] = _component_record(h._sde, "SDE")
    payload["sampler"] = _component_record(h._sampler, "sampler")
    payload["last_train_kwargs"] = dict(h._last_train_kwargs) if h._last_train_kwargs else None
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


def _callback_record(cb: Any) -> dict[str, Any]:
    config = cb.config()
    plain = {k: v for k, v in config.items() if _plain(v)}
    dropped = sorted(set(config) - set(plain))
    if dropped:
        warnings.warn(
            f"callback {type(cb).__name__}: options {dropped} are not plain values and are not saved",
            stacklevel=4,
        )
    return {
        "class": _path_or_none(type(cb), f"callback {type(cb).__name__}"),
        "config": plain,
        "state": cb.state_dict(),
    }


def _component_record(obj: Any, what: str) -> dict[str, Any] | None:
    if obj is None:
        return None
    config = obj.config() if hasattr(obj, "config") else {}
    plain = {k: v for k, v in config.items() if _plain(v)}
    dropped = sorted(set(config) - set(plain))
    if dropped:
        warnings.warn(
            f"{what} {type(obj).__name__}: options {dropped} are not plain values and are not saved; "
            "loading rebuilds it without them",
            stacklevel=4,
        )
    state = obj.state_dict() if hasattr(obj, "state_dict") else None
    return {
        "class": _path_or_none(type(obj), f"{what} {type(obj).__name__}"),
        "config": plain,
        "state": state,
    }


# ----------------------------------------------------------------------------- load
def resolve_model_class(
    record: dict[str, Any], path: str, trust_model_code: bool
) -> type[nn.Module]:
    """The model class of a checkpoint: by import path, else (opt-in) from stored source."""
    try:
        return resolve_import_path(record["class"])
    except (ImportError, AttributeError, CheckpointError, ValueError) as err:
        if record.get("source") is None:
            raise CheckpointError(
                f"{path}: the model class {record['class']!r} cannot be imported ({err}); make its module "
                "importable (install the package or add it to sys.path), or pass it explicitly with "
                "NNHandler.initialize_from_checkpoint(path, model_class=...)"
            ) from err
        return rebuild_class_from_source(record["source"], trust_code=trust_model_code)


def _resolve_optional(path_: str | None, what: str, handler_log: Callable[[str], None]) -> Any:
    if path_ is None:
        message = f"{what} was not saved (not importable): set it again after loading"
        warnings.warn(message, stacklevel=4)
        handler_log(message)
        return None
    try:
        return resolve_import_path(path_)
    except Exception as err:  # any failure means "set it again"
        message = f"{what} {path_!r} cannot be imported ({err}): set it again after loading"
        warnings.warn(message, stacklevel=4)
        handler_log(message)
        return None


def apply_payload(
    handler: NNHandler,
    payload: dict[str, Any],
    path: str,
    *,
    strict_load: bool,
    skip_optimizer: bool,
    skip_scheduler: bool,
    skip_history: bool,
    skip_callbacks: bool,
    skip_sampler_sde: bool,
    skip_ema: bool,
) -> None:
    """Restore a checkpoint's state into a handler built with its model."""
    h = handler
    model = payload["model"]
    module = h.module
    weights = strip_wrapper_prefixes(payload["model_state_dict"])
    if getattr(module, "_nnh_meta_init", False):
        # built on the meta device because the checkpoint supplies every tensor: take them as they are
        try:
            module.load_state_dict(weights, strict=strict_load, assign=True)
        except RuntimeError as err:
            raise CheckpointError(
                f"{path}: the model weights do not fit {type(module).__name__}: {err}"
            ) from err
        del module._nnh_meta_init
        module.to(h.device)
        h._model = h._wrap(module)
    else:
        load_model_state(module, weights, strict=strict_load, source=path)
    params = dict(module.named_parameters())
    for name in model.get("frozen", []):
        if name in params:
            params[name].requires_grad_(False)
    submodules = dict(module.named_modules())
    for name in model.get("keep_eval", []):
        if name in submodules:
            h.keep_eval_on_module(submodules[name])
    data = payload.get("data") or {}
    for which in ("train", "val"):
        _restore_loader(h, which, data.get(which))
    if payload.get("loss"):
        fn = _resolve_optional(payload["loss"]["fn"], "the loss function", h._log)
        if fn is not None:
            h.set_loss_fn(
                fn, pass_epoch_to_loss=payload["loss"]["pass_epoch"], **payload["loss"]["kwargs"]
            )
    for name, fn_path in (payload.get("metrics") or {}).items():
        fn = _resolve_optional(fn_path, f"metric {name!r}", h._log)
        if fn is not None:
            h.add_metric(name, fn)
    if payload.get("optimizer"):
        rec = payload["optimizer"]
        h.set_optimizer(resolve_import_path(rec["class"]), **rec["kwargs"])  # fresh when skipped
    if payload.get("optimizer") and not skip_optimizer:
        try:
            h._adapter.optimizer.load_state_dict(rec["state_dict"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(
                f"{path}: the optimizer state does not fit the model ({err}); "
                "load with skip_optimizer=True to start the optimizer afresh"
            ) from err
    if payload.get("scheduler") and not skip_scheduler and h._adapter is not None:
        rec = payload["scheduler"]
        cls = _resolve_optional(rec["class"], "the scheduler", h._log)
        if cls is not None:
            h.set_scheduler(cls, **rec["kwargs"])
            h._scheduler.load_state_dict(rec["state_dict"])
    if not skip_history:
        h._history.load_state_dict(payload.get("history") or {})
    if not skip_callbacks:
        for rec in payload.get("callbacks") or []:
            cls = _resolve_optional(rec["class"], "a callback", h._log)
            if cls is None:
                continue
            try:
                cb = cls(**rec["config"])
            except ImportError as err:  # e.g. TensorBoardLogger without tensorboard installed
                warnings.warn(f"callback {rec['class']} skipped: {err}", stacklevel=3)
                continue
            cb.load_state_dict(rec["state"])
            h.add_callback(cb)
    if not skip_sampler_sde:
        h.sde = _rebuild_component(payload.get("sde"), "SDE", h._log)
        h.sampler = _rebuild_component(payload.get("sampler"), "sampler", h._log)  # attaches it
    from nnh.autosaver import AutoSaver
    from nnh.core import LossScaler

    h._auto_saver = AutoSaver.from_state_dict(payload.get("auto_saver") or {})
    h._loss_scaler_config = LossScaler(**(payload.get("loss_scaler") or {}))
    h._seed = payload.get("seed")
    h._last_train_kwargs = payload.get("last_train_kwargs")
    _restore_train_state(
        h, payload.get("train_state"), skip_ema=skip_ema, skip_optimizer=skip_optimizer
    )
    if model.get("compile") is not None:
        h.compile_model(**model["compile"])
    restore_rng(payload["rng"])
    h._resume = payload.get("resume")


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


def _rebuild_component(
    rec: dict[str, Any] | None, what: str, handler_log: Callable[[str], None]
) -> Any:
    if rec is None:
        return None
    cls = _resolve_optional(rec["class"], f"the {what}", handler_log)
    if cls is None:
        return None
    obj = cls.from_config(rec["config"]) if hasattr(cls, "from_config") else cls(**rec["config"])
    if rec.get("state") is not None and hasattr(obj, "load_state_dict"):
        obj.load_state_dict(rec["state"])
    return obj


def _restore_train_state(
    h: NNHandler, rec: dict[str, Any] | None, *, skip_ema: bool, skip_optimizer: bool
) -> None:
    if rec is None or h._adapter is None:
        return
    from nnh.core import init_train_state

    state = init_train_state(h.module, h._adapter)
    counters = dict(rec.get("counters", {}))
    if skip_optimizer:
        counters = {k: v for k, v in counters.items() if k == "epoch"}
    device = h.device
    ema = rec.get("ema")
    grads = rec.get("grads")
    scaler = rec.get("scaler")
    state = attrs.evolve(
        state,
        ema=None
        if (ema is None or skip_ema)
        else flat_td({k: v.to(device) for k, v in ema.items()}),
        scaler=None if scaler is None else flat_td({k: v.to(device) for k, v in scaler.items()}),
        grads=None
        if (grads is None or skip_optimizer)
        else flat_td({k: v.to(device) for k, v in grads.items()}),
        **counters,
    )
    h._state = state  # the first step binds it, installing an open window's gradients
