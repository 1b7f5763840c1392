"""Rebuilding a handler from a checkpoint: a file selects, it never supplies code or authority.

:func:`load_handler` is what ``NNHandler.load`` runs. In order, before anything named in the
file is called:

1. the file is read with ``weights_only=True``, its nesting depth bounded and its checksums
   verified (:func:`nnh.checkpoint.load_checkpoint`); its MAC tells whether it is the user's
   own (:mod:`nnh.checkpoint.signing`);
2. every section is checked for its expected shape (:mod:`nnh.checkpoint.schema`) and its
   values for range (:mod:`nnh.checkpoint.sections`);
3. every class and function the file names is looked up in nnh's closed registry or, when
   the user vouches for it (own file, ``trusted=[...]``, ``trust_modules=(...)``), imported
   and type-checked (:mod:`nnh.checkpoint.policy`); anything else is dropped with one
   warning. Arguments of registry entries are checked against their schema
   (:mod:`nnh.checkpoint.registry`);
4. paths the file stores (loggers, checkpoint folders, the log file) are confined to the
   working folder unless the file is the user's own (:mod:`nnh.checkpoint.confine`);
   ``torch.compile`` and loader options come from allowlists (:mod:`nnh.checkpoint.options`);
5. the model is built on the meta device and checked against the weights' shapes before any
   allocation (:mod:`nnh.checkpoint.shapes`).

Only then is the handler constructed and its state restored. The loaded handler gets a run
id of its own; only an own file hands it the authority to replace its run's earlier files
(:mod:`nnh.checkpoint.ownership`). Every failure is a :class:`CheckpointError` naming the
file and the record.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from nnh.checkpoint import (
    CheckpointError,
    ImportPathError,
    load_checkpoint,
    load_model_state,
    rebuild_class_from_source,
    strip_wrapper_prefixes,
)
from nnh.checkpoint.callables import restore_callable
from nnh.checkpoint.confine import confine_auto_saver, confine_callback_config
from nnh.checkpoint.integrity import INTEGRITY_KEY
from nnh.checkpoint.options import compile_options, loader_options
from nnh.checkpoint.ownership import RunId, new_run_id
from nnh.checkpoint.policy import TrustPolicy
from nnh.checkpoint.registry import check_arguments, check_name_pattern, registry_path
from nnh.checkpoint.schema import check_handler_payload
from nnh.checkpoint.sections import (
    check_counters,
    check_dense,
    check_optimizer_state,
    check_resume,
    check_rng_state,
    check_scheduler_state,
    check_tensor_dict,
    clean_train_options,
    ensemble_size_from_weights,
)
from nnh.checkpoint.signing import is_own
from nnh.core.tree import flat_td
from nnh.handler.building import wrap_module
from nnh.handler.full_state import (
    check_sharding,
    load_full_weights,
    shard_like_params,
    shard_optimizer_state,
)
from nnh.handler.logs import logging_options
from nnh.handler.persistence import restore_rng
from nnh.warn import warn as nnh_warn

if TYPE_CHECKING:  # pragma: no cover
    from nnh.handler import NNHandler

__all__ = ["SCHEDULER_BASES", "apply_payload", "load_handler", "resolve_model_class"]

SCHEDULER_BASES: tuple[type, ...] = (
    torch.optim.lr_scheduler.LRScheduler,
    torch.optim.lr_scheduler.ReduceLROnPlateau,
)


@attrs.define
class _Resolved:
    """Everything a checkpoint names, resolved and checked; ``None`` = set it again."""

    model: type[nn.Module]
    optimizer: type[torch.optim.Optimizer] | None = None
    scheduler: type | None = None
    loss: Any = None
    metrics: dict[str, Any] = attrs.Factory(dict)
    callbacks: list[tuple[type, dict[str, Any]]] = attrs.Factory(list)
    sde: tuple[type, dict[str, Any]] | None = None
    sampler: tuple[type, dict[str, Any]] | None = None
    messages: list[str] = attrs.Factory(list)
    own: bool = False


def resolve_model_class(
    record: dict[str, Any], path: str, trust_model_code: bool, policy: TrustPolicy | None = None
) -> type[nn.Module]:
    """The model class of a checkpoint: by import path under the policy's rules (an
    ``nn.Module`` subclass, no standard-library, private or ``__main__``-segment path), else
    (opt-in) from stored source.

    Example:
        >>> resolve_model_class({"class": "torch.nn.Linear"}, "run.pth", False).__name__
        'Linear'
    """
    policy = TrustPolicy.build(source=path) if policy is None else policy
    try:
        return policy.model_class(record["class"])
    except ImportPathError as err:
        if record.get("source") is None:
            raise CheckpointError(
                f"{path}: the model class {str(record['class'])[:100]!r} cannot be imported "
                f"({err}); make its module importable (install the package or add it to "
                "sys.path), or pass it explicitly with "
                "NNHandler.initialize_from_checkpoint(path, model_class=...)",
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
    resolved: _Resolved, policy: TrustPolicy, name: Any, slot: str, record: str, what: str
) -> type | None:
    """Resolve an optional part; ``None`` (set it again) when not saved, dropped or gone."""
    if name is None:
        resolved.messages.append(
            f"{what} was not saved (not importable): set it again after loading"
        )
        return None
    try:
        return policy.resolve(name, slot, record=record)
    except ImportPathError as err:
        resolved.messages.append(
            f"{what} {str(name)[:100]!r} cannot be imported ({err}): set it again after loading"
        )
        return None


def _optional_callable(
    resolved: _Resolved, policy: TrustPolicy, rec: Any, record: str, what: str, path: str
) -> Any:
    if rec is None:
        resolved.messages.append(
            f"{what} was not saved (not importable): set it again after loading"
        )
        return None
    try:
        return restore_callable(rec, record=record, path=path, policy=policy)
    except ImportPathError as err:
        resolved.messages.append(f"{what} cannot be imported ({err}): set it again after loading")
        return None
    except CheckpointError as err:
        if err.kind in ("untrusted", "damaged"):
            raise
        resolved.messages.append(f"{what}: {err}")
        return None


def _safe_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and 0 < len(name) <= 64
        and name.replace("_", "a").replace("-", "a").replace(".", "a").isalnum()
    )


def resolve_payload(
    payload: dict[str, Any],
    path: str,
    *,
    trust_model_code: bool,
    skip: dict[str, bool],
    policy: TrustPolicy | None = None,
) -> _Resolved:
    """Resolve and check every name the checkpoint holds, calling none of them."""
    policy = TrustPolicy.build(source=path) if policy is None else policy
    r = _Resolved(
        model=resolve_model_class(payload["model"], path, trust_model_code, policy),
        own=policy.own,
    )
    if payload.get("optimizer"):
        r.optimizer = policy.resolve(
            payload["optimizer"]["class"], "optimizer", record="optimizer.class"
        )
    if payload.get("scheduler") and not skip["scheduler"]:
        r.scheduler = _optional_class(
            r,
            policy,
            payload["scheduler"].get("class"),
            "scheduler",
            "scheduler.class",
            "the scheduler",
        )
    if payload.get("loss"):
        r.loss = _optional_callable(
            r, policy, payload["loss"].get("fn"), "loss.fn", "the loss function", path
        )
    for name, rec in (payload.get("metrics") or {}).items():
        if not _safe_name(name):
            raise CheckpointError(
                f"checkpoint {path!r}: a metric name {str(name)[:40]!r} is not a short name of "
                "letters, digits, '_', '-' and '.'. The file was crafted; nnh used none of it.",
                path=path,
                kind="damaged",
            )
        fn = _optional_callable(r, policy, rec, f"metrics[{name!r}]", f"metric {name!r}", path)
        if fn is not None:
            r.metrics[name] = fn
    if not skip["callbacks"]:
        for i, rec in enumerate(payload.get("callbacks") or []):
            cls = _optional_class(
                r, policy, rec.get("class"), "callback", f"callbacks[{i}].class", "a callback"
            )
            if cls is not None:
                r.callbacks.append((cls, rec))
    if not skip["sampler_sde"]:
        for key in ("sde", "sampler"):
            rec = payload.get(key)
            if rec:
                cls = _optional_class(
                    r, policy, rec.get("class"), key, f"{key}.class", f"the {key}"
                )
                if cls is not None:
                    setattr(r, key, (cls, rec))
    dropped = policy.dropped_message()
    if dropped:
        r.messages.append(dropped)
    return r


def _sanitize(payload: dict[str, Any], path: str, own: bool, messages: list[str]) -> None:
    """Confine paths (unless ``own``), apply option allowlists and range checks, in place."""
    model = payload["model"]
    if model.get("compile") is not None and not own:
        messages.append(
            f"checkpoint {path!r} is not your own, so its model is not compiled (compiling runs "
            "a code generator and a C++ toolchain); call handler.compile_model(...) to compile it"
        )
        model["compile"] = None
    elif model.get("compile") is not None:
        model["compile"], notes = compile_options(model["compile"], source=path)
        messages.extend(notes)
    data = payload.get("data") or {}
    for which in ("train", "val"):
        rec = data.get(which)
        if rec is not None:
            rec["loader_kwargs"], notes = loader_options(
                rec.get("loader_kwargs", {}), which=which, source=path
            )
            messages.extend(notes)
    saver = payload.get("auto_saver")
    if saver:
        if not own:
            saver, notes = confine_auto_saver(saver, source=path)
            messages.extend(notes)
        if saver.get("name") is not None and not check_name_pattern(saver["name"]):
            raise CheckpointError(
                f"checkpoint {path!r}: record 'auto_saver.name' is not a file-name pattern of "
                "plain {field} or {field:spec} fields. The file was crafted; nnh used none of it.",
                path=path,
                kind="damaged",
            )
        payload["auto_saver"] = saver
    payload["last_train_kwargs"], notes = clean_train_options(
        payload.get("last_train_kwargs"), path
    )
    messages.extend(notes)
    state = payload.get("train_state")
    if state is not None:
        check_counters(state.get("counters") or {}, path)
    for key in ("seed", "target_epoch"):
        value = payload.get(key)
        if value is not None and not (0 <= value <= 2**63 - 1):
            raise CheckpointError(
                f"checkpoint {path!r}: record {key!r} is {value!r:.30}, out of range",
                path=path,
                kind="damaged",
            )
    if not check_rng_state(payload["rng"]):
        raise CheckpointError(
            f"checkpoint {path!r}: record 'rng' is not an RNG state. The file was damaged or "
            "crafted; nnh used none of it.",
            path=path,
            kind="damaged",
        )


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
    trusted: Any = None,
    trust_modules: Any = None,
    strategy: str | None = None,
    fsdp: dict[str, Any] | None = None,
) -> NNHandler:
    """What :meth:`NNHandler.load` does (see the module docstring for the order of checks)."""
    options = _options(locals())
    sharding = {} if strategy is None and fsdp is None else check_sharding(strategy, fsdp)
    from nnh.checkpoint.sharded import looks_sharded
    from nnh.handler.building import CHECKPOINT_TENSORS

    if looks_sharded(path):  # a folder written under FSDP
        from nnh.handler.sharded_io import load_sharded

        return load_sharded(handler_class, path, **options)
    payload = load_checkpoint(path, map_location="cpu")
    check_handler_payload(payload, path)
    own = is_own(payload.get(INTEGRITY_KEY))
    policy = TrustPolicy.build(
        source=str(path), own=own, trusted=trusted, trust_modules=trust_modules
    )
    skip = {
        "scheduler": skip_scheduler,
        "callbacks": skip_callbacks,
        "sampler_sde": skip_sampler_sde,
    }
    resolved = resolve_payload(
        payload, str(path), trust_model_code=trust_model_code, skip=skip, policy=policy
    )
    _sanitize(payload, str(path), own, resolved.messages)
    model = payload["model"]
    weights = strip_wrapper_prefixes(payload["model_state_dict"])
    check_dense(weights, str(path), "model_state_dict")
    payload["model_state_dict"] = weights
    ensemble_size = ensemble_size_from_weights(weights, payload.get("ensemble"), str(path))
    with _section(str(path), "logging"):
        log_options = logging_options(payload.get("logging"), str(path), confine=not own)
    token = CHECKPOINT_TENSORS.set((weights, str(path)))
    try:
        with _section(str(path), "model"):
            handler = handler_class(
                resolved.model,
                device=torch.device(device) if device is not None else "cpu",
                model_type=model["type"],
                save_model_code=model.get("source") is not None,
                ensemble_size=ensemble_size,
                **sharding,
                **log_options,
                **model["kwargs"],
            )
    finally:
        CHECKPOINT_TENSORS.reset(token)
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
    handler._log(f"loaded {path!r} (epoch {handler._state.epoch if handler._state else 0})")
    return handler


def _options(names: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in names.items() if k not in ("handler_class", "path")}


@contextlib.contextmanager
def _section(path: str, name: str) -> Iterator[None]:
    """Turn a bad value inside a checked section into a CheckpointError naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except (Exception, RecursionError) as err:
        raise CheckpointError(
            f"checkpoint {path!r}: section {name!r} could not be restored ({type(err).__name__}: "
            f"{str(err)[:300]}). The file was damaged or edited, or written by incompatible "
            "code. What to do: use an intact copy, or load with the matching skip_* flag and "
            "set that part again.",
            path=path,
            kind="damaged",
        ) from err


def _report(h: NNHandler, message: str) -> None:
    nnh_warn(message)
    h._log(message, logging.WARNING)


def _load_weights(h: NNHandler, weights: dict[str, Any], path: str, strict_load: bool) -> None:
    module = h.module
    if getattr(module, "_nnh_meta_init", False):
        # built on the meta device because the checkpoint supplies every tensor: take them as they are
        load_model_state(module, weights, strict=strict_load, source=path, assign=True)
        del module._nnh_meta_init
        module.to(h.device)
        h._model = wrap_module(h, module)
    else:  # an FSDP module takes its shards of the full weights
        load_full_weights(module, weights, strict=strict_load, source=path)


def _restore_model(
    h: NNHandler, payload: dict[str, Any], path: str, strict_load: bool, load_weights: bool = True
) -> None:
    model = payload["model"]
    if load_weights:  # False: a sharded folder's weights come from its shards (sharded_io)
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


def _restore_objective(
    h: NNHandler, payload: dict[str, Any], path: str, resolved: _Resolved
) -> None:
    if payload.get("loss") and resolved.loss is not None:
        kwargs = payload["loss"]["kwargs"]
        fn = resolved.loss
        base = getattr(fn, "func", fn)  # a partial's function
        if kwargs and base in _registry_functions():
            kwargs = check_arguments(base, kwargs, record="loss.kwargs", source=path, skip=2)
        elif kwargs and registry_path(type(fn), "loss") is not None:
            raise CheckpointError(
                f"checkpoint {path!r}: record 'loss.kwargs' gives call arguments to the loss "
                f"module {type(fn).__name__}, which takes none; nnh used none of it.",
                path=path,
                kind="damaged",
            )
        with _section(path, "loss"):
            h.set_loss_fn(fn, pass_epoch_to_loss=payload["loss"]["pass_epoch"], **kwargs)
    for name, fn in resolved.metrics.items():
        with _section(path, f"metrics[{name!r}]"):
            h.add_metric(name, fn)


def _registry_functions() -> set[Any]:
    from nnh.checkpoint.registry import entries

    return {v for v in entries()["loss"].values() if not isinstance(v, type)}


def _optimizer_kwargs(cls: type, kwargs: dict[str, Any], path: str) -> dict[str, Any]:
    """Schema-check a registry optimizer's options, including named parameter groups."""
    if registry_path(cls, "optimizer") is None:
        return kwargs
    kwargs = dict(kwargs)
    groups = kwargs.pop("params", None)
    out = check_arguments(cls, kwargs, record="optimizer.kwargs", source=path, skip=1)
    if groups is not None:
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise CheckpointError(
                f"checkpoint {path!r}: record 'optimizer.kwargs.params' is not a list of groups",
                path=path,
                kind="damaged",
            )
        checked = []
        for i, group in enumerate(groups):
            group = dict(group)
            names = group.pop("params", [])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise CheckpointError(
                    f"checkpoint {path!r}: record 'optimizer.kwargs.params[{i}]' does not list "
                    "parameter names",
                    path=path,
                    kind="damaged",
                )
            group = check_arguments(
                cls, group, record=f"optimizer.kwargs.params[{i}]", source=path, skip=1
            )
            checked.append({"params": names, **group})
        out["params"] = checked
    return out


def _restore_optimization(
    h: NNHandler, payload: dict[str, Any], path: str, resolved: _Resolved, skip_optimizer: bool
) -> None:
    if resolved.optimizer is not None:
        rec = payload["optimizer"]
        kwargs = _optimizer_kwargs(resolved.optimizer, rec["kwargs"], path)
        with _section(path, "optimizer"):
            h.set_optimizer(resolved.optimizer, **kwargs)  # fresh when skipped
        if not skip_optimizer:
            optimizer = h._adapter.optimizer
            params = [p for group in optimizer.param_groups for p in group["params"]]
            registered = registry_path(type(optimizer), "optimizer") is not None
            check_optimizer_state(
                rec["state_dict"],
                optimizer.state_dict(),
                path,
                params,
                type(optimizer) if registered else None,  # probe only registry optimizers
            )
            try:
                optimizer.load_state_dict(
                    shard_optimizer_state(h.module, optimizer, rec["state_dict"])
                )
            except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as err:
                raise CheckpointError(
                    f"{path}: the optimizer state does not fit the model ({str(err)[:200]}); "
                    "load with skip_optimizer=True to start the optimizer afresh",
                    path=path,
                    kind="mismatch",
                ) from err
    if resolved.scheduler is not None and h._adapter is not None:
        rec = payload["scheduler"]
        kwargs = rec["kwargs"]
        if registry_path(resolved.scheduler, "scheduler") is not None:
            kwargs = check_arguments(
                resolved.scheduler, kwargs, record="scheduler.kwargs", source=path, skip=1
            )
        with _section(path, "scheduler"):
            h.set_scheduler(resolved.scheduler, **kwargs)
        check_scheduler_state(rec["state_dict"], h._scheduler.state_dict(), path)
        with _section(path, "scheduler"):
            h._scheduler.load_state_dict(rec["state_dict"])


def _restore_components(h: NNHandler, path: str, resolved: _Resolved) -> None:
    for i, (cls, rec) in enumerate(resolved.callbacks):
        config = rec["config"]
        if registry_path(cls, "callback") is not None:
            if not resolved.own:
                config, notes = confine_callback_config(
                    cls, config, record=f"callbacks[{i}].config", source=path
                )
                resolved.messages.extend(notes)
                if config is None:
                    continue
            config = check_arguments(cls, config, record=f"callbacks[{i}].config", source=path)
        with _section(path, f"callbacks[{i}]"):
            try:
                cb = cls(**config)
            except ImportError as err:  # e.g. TensorBoardLogger without tensorboard installed
                resolved.messages.append(f"callback {cls.__name__} skipped: {err}")
                continue
            state = rec.get("state") or {}
            _check_callback_state(state, path, i)
            cb.load_state_dict(state)
            h.add_callback(cb)
    for key in ("sde", "sampler"):
        found = getattr(resolved, key)
        if found is not None:
            cls, rec = found
            kwargs = _component_kwargs(rec)
            if registry_path(cls, key) is not None:
                kwargs = check_arguments(cls, kwargs, record=f"{key}.config", source=path)
            with _section(path, key):
                obj = cls(**kwargs)
                if rec.get("state") is not None and hasattr(obj, "load_state_dict"):
                    obj.load_state_dict(rec["state"])
                setattr(h, key, obj)  # the sampler setter attaches it to the handler


def _component_kwargs(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec["config"].items() if k != "class"}


def _check_callback_state(state: Any, path: str, i: int) -> None:
    """A callback's state holds plain values and finite tensors (e.g. EarlyStopping's best
    weights, which it would put back into the model)."""
    stack = [state]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and not bool(torch.isfinite(value).all())
        ):
            raise CheckpointError(
                f"checkpoint {path!r}: record 'callbacks[{i}].state' holds NaN or inf "
                "tensors; nnh used none of it.",
                path=path,
                kind="damaged",
            )


def _model_shapes(h: NNHandler) -> dict[str, torch.Size]:
    module = h.module
    shapes = {n: p.shape for n, p in module.named_parameters()}
    shapes.update({n: b.shape for n, b in module.named_buffers()})
    return shapes


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
    load_weights: bool = True,
) -> None:
    """Restore a checked checkpoint's state into a handler built with its model."""
    from nnh.core import LossScaler
    from nnh.handler.autosaver import AutoSaver

    h = handler
    _restore_model(h, payload, path, strict_load, load_weights)
    data = payload.get("data") or {}
    for which in ("train", "val"):
        with _section(path, f"data.{which}"):
            _restore_loader(h, which, data.get(which))
    _restore_objective(h, payload, path, resolved)
    _restore_optimization(h, payload, path, resolved, skip_optimizer)
    if not skip_history:
        with _section(path, "history"):
            h._history.load_state_dict(payload.get("history") or {})
            if h._ensemble is not None:
                h._ensemble.load_state_dict(payload.get("ensemble") or {})
    _restore_components(h, path, resolved)
    with _section(path, "auto_saver"):
        h._auto_saver = AutoSaver.from_state_dict(payload.get("auto_saver") or {})
    try:
        h._auto_saver.check_name(h._log_keys())
    except ValueError as err:  # e.g. a val_* field without a stored validation set
        h._auto_saver = attrs.evolve(
            h._auto_saver,
            interval=None,
            every_n_steps=None,
            name=attrs.fields(AutoSaver).name.default,
        )
        resolved.messages.append(
            f"checkpoint {path!r}: automatic saving is off: {err}. What to do: call "
            "handler.auto_save(...) again"
        )
    with _section(path, "loss_scaler"):
        scaler = check_arguments(
            LossScaler, payload.get("loss_scaler") or {}, record="loss_scaler", source=path
        )
        h._loss_scaler_config = LossScaler(**scaler)
    h._seed = payload.get("seed")
    h._last_train_kwargs = payload.get("last_train_kwargs")
    loader = h._train_loader
    with _section(path, "resume"):
        batches = len(loader) if loader is not None else None
    resume = check_resume(payload.get("resume"), batches, path)
    h._target_epoch = payload.get("target_epoch") or (resume or {}).get("target_epoch") or 0
    run = payload.get("run") or {}
    # every process gets a run id of its own; only the user's own file hands over the
    # authority to manage its run's earlier files
    lineage: list[Any] = []
    if resolved.own and isinstance(run.get("id"), str):
        lineage = [run["id"], *[x for x in run.get("lineage") or [] if isinstance(x, str)]]
    h._run_id = RunId(new_run_id(), lineage=lineage[:64])
    if not skip_history and h._history.train_losses:
        with _section(path, "run.resumed_at"):
            earlier = [int(e) for e in run.get("resumed_at") or []][:10_000]
            h._history.resumed_at = [*earlier, len(h._history.train_losses)]
    with _section(path, "train_state"):
        _restore_train_state(
            h,
            payload.get("train_state"),
            path,
            skip_ema=skip_ema,
            skip_optimizer=skip_optimizer,
        )
    compile_kwargs = payload["model"].get("compile")
    if compile_kwargs is not None:
        with _section(path, "model.compile"):
            h.compile_model(**compile_kwargs)
    with _section(path, "rng"):
        restore_rng(payload["rng"])
    h._resume = None if resume is None else {**resume, "source": path}
    if not resolved.own and data:  # errors on a stranger's data are named as such
        h._restored_data = (path, h._train_loader, h._val_loader)
    for message in resolved.messages:
        _report(h, message)


_MAX_DATA_TENSORS = 16


def _restore_loader(h: NNHandler, which: str, record: dict[str, Any] | None) -> None:
    if record is None:
        return
    kwargs = dict(record.get("loader_kwargs", {}))
    if "generator_state" in record:
        g = torch.Generator()
        g.set_state(record["generator_state"])
        kwargs["generator"] = g
    if "tensors" in record:
        tensors = record["tensors"]
        if not isinstance(kwargs.get("batch_size"), int):
            raise ValueError("the loader record has no batch_size")
        if (
            not isinstance(tensors, (list, tuple))
            or not 1 <= len(tensors) <= _MAX_DATA_TENSORS
            or not all(isinstance(t, torch.Tensor) and t.ndim >= 1 for t in tensors)
            or len({t.shape[0] for t in tensors}) != 1
            or tensors[0].shape[0] == 0
        ):
            raise ValueError("the embedded dataset is not 1 to 16 tensors of one non-zero length")
        check_dense({str(i): t for i, t in enumerate(tensors)}, None, f"data.{which}.tensors")
        if h.model_type.value == "score_based" and not tensors[0].is_floating_point():
            raise ValueError("a score model's embedded samples must be floating-point tensors")
        dataset: Any = TensorDataset(*tensors)
        if "indices" in record:
            indices = record["indices"]
            n = tensors[0].shape[0]
            if (
                not isinstance(indices, torch.Tensor)
                or indices.is_floating_point()
                or indices.ndim != 1
                or indices.numel() == 0
                or int(indices.min()) < 0
                or int(indices.max()) >= n
            ):
                raise ValueError(f"the embedded subset's indices are not positions in 0..{n - 1}")
            dataset = Subset(dataset, indices.tolist())
        getattr(h, f"set_{which}_loader")(dataset, **kwargs)
    else:
        h._log(
            f"the {which} dataset ({str(record.get('dataset_class'))[:100]!r}) is not stored in "
            f"checkpoints: call set_{which}_loader again",
            logging.INFO,
        )


def _restore_train_state(
    h: NNHandler, rec: dict[str, Any] | None, path: str, *, skip_ema: bool, skip_optimizer: bool
) -> None:
    if rec is None or h._adapter is None:
        return
    from nnh.core import TrainState, init_train_state

    shapes = _model_shapes(h)
    params = {n: p.shape for n, p in h.module.named_parameters()}
    dtypes = {n: p.dtype for n, p in h.module.named_parameters()}
    dtypes.update({n: b.dtype for n, b in h.module.named_buffers()})
    check_tensor_dict(rec.get("ema"), shapes, path, "train_state.ema", dtypes)
    check_tensor_dict(rec.get("grads"), params, path, "train_state.grads", dtypes)
    scaler = rec.get("scaler")
    if scaler is not None:
        check_tensor_dict(
            scaler, {k: v.shape for k, v in scaler.items()}, path, "train_state.scaler"
        )
        if any(v.numel() > 1 for v in scaler.values()):
            raise CheckpointError(
                f"checkpoint {path!r}: record 'train_state.scaler' is not a loss-scaler state",
                path=path,
                kind="damaged",
            )

    state = init_train_state(h.module, h._adapter)
    known = {f.name for f in attrs.fields(TrainState) if f.type in ("int", int)}
    counters = {k: v for k, v in (rec.get("counters") or {}).items() if k in known}
    if skip_optimizer:
        counters = {k: v for k, v in counters.items() if k == "epoch"}
    device = h.device

    def td(tensors: dict[str, Any] | None) -> Any:
        return None if tensors is None else flat_td(shard_like_params(h.module, tensors, device))

    state = attrs.evolve(
        state,
        ema=None if skip_ema else td(rec.get("ema")),
        scaler=td(rec.get("scaler")),
        grads=None if skip_optimizer else td(rec.get("grads")),
        **counters,
    )
    h._state = state  # the first step binds it, installing an open window's gradients


def initialize_handler(
    cls: type[NNHandler],
    checkpoint_path: str,
    model_class: type[nn.Module],
    model_type: Any,
    device: torch.device | str | None,
    strict_load: bool,
    model_kwargs: dict[str, Any],
) -> NNHandler:
    """The body of :meth:`NNHandler.initialize_from_checkpoint`: a fresh handler holding only
    the weights of ``checkpoint_path`` (a bare ``state_dict`` or a full nnh checkpoint).

    Example:
        >>> import os, tempfile
        >>> from nnh import NNHandler
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pth")
        >>> torch.save(torch.nn.Linear(2, 1).state_dict(), path)
        >>> h = initialize_handler(NNHandler, path, torch.nn.Linear, None, None, True,
        ...                        {"in_features": 2, "out_features": 1})
        >>> h.module.out_features
        1
    """
    from nnh.checkpoint import load_weights_file, strip_wrapper_prefixes
    from nnh.checkpoint.sharded import looks_sharded
    from nnh.handler.enums import ModelType

    if looks_sharded(checkpoint_path):  # a folder written under FSDP: its model shards, verified
        from nnh.checkpoint.sharded import read_metadata
        from nnh.checkpoint.sharded_export import read_shards

        read_metadata(checkpoint_path)
        weights = dict(read_shards(checkpoint_path)["model"])
    else:
        weights = load_weights_file(checkpoint_path, map_location="cpu")
    handler = cls(
        model_class,
        device=device if device is not None else "cpu",
        model_type=model_type if model_type is not None else ModelType.CLASSIFICATION,
        **model_kwargs,
    )
    load_full_weights(  # under FSDP: each rank takes its shards
        handler.module,
        strip_wrapper_prefixes(weights),
        strict=strict_load,
        source=str(checkpoint_path),
    )
    handler._dist.barrier()
    return handler
