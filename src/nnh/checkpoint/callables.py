"""Saving and restoring losses and metrics: functions, ``functools.partial`` and modules.

A loss or metric is one of

* a top-level function: stored by import path;
* a ``functools.partial`` of one, with plain positional and keyword arguments;
* an ``nn.Module`` object (every loss of ``torch.nn`` with its options and ``weight``
  tensors, a ``torchmetrics`` metric, a user's own module): stored by its class's import
  path, its plain attributes (the constructor options) and its ``state_dict``.

:func:`callable_record` describes one as plain data; :func:`restore_callable` rebuilds it,
checking every name with :mod:`nnh.checkpoint.trust` first. A module is rebuilt by calling
its verified class with those of its recorded attributes that the constructor accepts, then
setting the remaining recorded plain attributes and loading its ``state_dict``: nothing runs
but the verified class's own construction path.

Example:
    >>> from torch import nn
    >>> loss = nn.CrossEntropyLoss(label_smoothing=0.2)
    >>> again = restore_callable(callable_record(loss), record="loss")
    >>> type(again).__name__, again.label_smoothing
    ('CrossEntropyLoss', 0.2)
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

import torch
from torch import nn

from nnh.checkpoint.errors import CheckpointError
from nnh.checkpoint.imports import import_path, is_importable
from nnh.checkpoint.policy import TrustPolicy
from nnh.checkpoint.registry import check_arguments, lookup

__all__ = ["NotRecordable", "callable_record", "is_plain", "restore_callable"]

PathLike = str | os.PathLike[str]

# nn.Module's own bookkeeping, never a constructor option.
_MODULE_INTERNALS = frozenset({"training", "call_super_init", "dump_patches"})


class NotRecordable(ValueError):
    """The object cannot be stored by import path (a lambda, a local function, ...)."""


def is_plain(value: Any) -> bool:
    """Whether ``value`` is storable under ``weights_only`` (recursively).

    Example:
        >>> is_plain({"a": [1, 2.0, "x", None]}), is_plain(object())
        (True, False)
    """
    if value is None or isinstance(
        value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.Size)
    ):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and is_plain(v) for k, v in value.items())
    return False


def _path(obj: Any) -> str:
    ok, reason = is_importable(obj)
    if not ok and not (
        getattr(obj, "__module__", None) == "__main__" and "<" not in obj.__qualname__
    ):
        raise NotRecordable(reason)
    return import_path(obj)


def _module_options(module: nn.Module) -> dict[str, Any]:
    public = {
        k: v
        for k, v in vars(module).items()
        if not k.startswith("_") and k not in _MODULE_INTERNALS
    }
    bad = sorted(k for k, v in public.items() if not is_plain(v))
    if bad:
        raise NotRecordable(
            f"its option(s) {bad} are not plain values (numbers, strings, lists, dicts, tensors)"
        )
    return public


def callable_record(fn: Any) -> dict[str, Any]:
    """Describe a loss or metric as plain data; raise :class:`NotRecordable` saying why not.

    Example:
        >>> import functools, torch
        >>> rec = callable_record(functools.partial(torch.nn.functional.huber_loss, delta=0.5))
        >>> rec["kind"], rec["function"], rec["keywords"]
        ('partial', 'torch.nn.functional.huber_loss', {'delta': 0.5})
    """
    if isinstance(fn, functools.partial):
        if not (is_plain(list(fn.args)) and is_plain(dict(fn.keywords))):
            raise NotRecordable(
                "its bound arguments are not plain values (numbers, strings, lists, dicts, tensors)"
            )
        return {
            "kind": "partial",
            "function": _path(fn.func),
            "args": list(fn.args),
            "keywords": dict(fn.keywords),
        }
    if isinstance(fn, nn.Module):
        return {
            "kind": "module",
            "class": _path(type(fn)),
            "options": _module_options(fn),
            "state_dict": {k: v.detach().cpu() for k, v in fn.state_dict().items()},
        }
    return {"kind": "function", "function": _path(fn)}


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return type(a) is type(b) and a == b


def _accepted(cls: type, options: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return {}
    kwargs = {}
    for name, p in params.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name in options:
            kwargs[name] = options[name]
        elif name in state:  # e.g. CrossEntropyLoss(weight=...) kept as a buffer
            kwargs[name] = state[name]
    return kwargs


def _registry_module(
    cls: type, options: dict[str, Any], state: dict[str, Any], record: str, path: PathLike | None
) -> nn.Module:
    """Build a registry class from a file: only constructor options, schema-checked; the
    state must fit the fresh module's own tensors."""
    accepted = _accepted(cls, options, state)
    kwargs = check_arguments(cls, accepted, record=f"{record}.options", source=path)
    obj = cls(**kwargs)
    if state:
        own = obj.state_dict()
        bad = [
            k
            for k, v in state.items()
            if k not in own
            or not isinstance(v, torch.Tensor)
            or v.shape != own[k].shape
            or (v.is_floating_point() and not bool(torch.isfinite(v).all()))
        ]
        if bad:
            raise CheckpointError(
                f"{_where(path)}: record {record!r} is damaged: state {sorted(map(str, bad))[:5]} does not fit "
                f"{cls.__name__} (unknown name, wrong shape or non-finite values)",
                path=path,
                kind="damaged",
            )
        obj.load_state_dict(state, strict=False)
    return obj


def _restore_module(
    rec: dict[str, Any], record: str, path: PathLike | None, policy: TrustPolicy
) -> nn.Module | None:
    cls = policy.resolve(rec.get("class"), _slot(record), record=f"{record}.class")
    if cls is None:
        return None
    if not isinstance(cls, type):
        raise CheckpointError(
            f"{_where(path)}: record {record!r}: {rec.get('class')!r} is a function, not a module class",
            path=path,
            kind="untrusted",
        )
    options = rec.get("options") or {}
    state = rec.get("state_dict") or {}
    if not isinstance(options, dict) or not isinstance(state, dict):
        raise CheckpointError(
            f"{_where(path)}: record {record!r} is damaged: 'options' and 'state_dict' must be dicts",
            path=path,
            kind="damaged",
        )
    registered = lookup(rec.get("class"), _slot(record)) is not None
    try:
        if registered:
            return _registry_module(cls, options, state, record, path)
        obj = cls(**_accepted(cls, options, state))
        for key, value in options.items():  # user code the user vouched for
            if (
                isinstance(key, str)
                and not key.startswith("__")
                and not _same(getattr(obj, key, _MISSING), value)
            ):
                setattr(obj, key, value)
        if state:
            obj.load_state_dict(state, strict=False)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(
            f"{_where(path)}: record {record!r}: rebuilding {cls.__module__}.{cls.__qualname__} from its saved "
            f"options failed ({type(err).__name__}: {str(err)[:200]}). What to do: set it again "
            "after loading.",
            path=path,
            kind="mismatch",
        ) from err
    return obj


def _where(path: PathLike | None) -> str:
    return "checkpoint" if path is None else f"checkpoint {os.fspath(path)!r}"


def _slot(record: str) -> str:
    return "metric" if record.startswith("metric") else "loss"


def _function(name: Any, record: str, path: PathLike | None, policy: TrustPolicy) -> Any:
    fn = policy.resolve(name, _slot(record), record=f"{record}.function")
    if fn is not None and isinstance(fn, type):
        raise CheckpointError(
            f"{_where(path)}: record {record!r}: {name!r} is a class; a function record must name a function",
            path=path,
            kind="untrusted",
        )
    return fn


def restore_callable(
    rec: Any,
    *,
    record: str,
    path: PathLike | None = None,
    policy: TrustPolicy | None = None,
) -> Any:
    """Rebuild a loss or metric from :func:`callable_record`'s data; ``None`` when the
    policy drops it (user code nobody vouched for).

    Registry entries (:mod:`nnh.checkpoint.registry`) are rebuilt with schema-checked
    arguments only (a ``partial`` takes keywords of the function's own, plain data); user
    code only when ``policy`` vouches for it. The default policy is a foreign file's:
    the registry only. A bare string (what nnh 0.1 stored) is read as a function's import
    path.

    Example:
        >>> restore_callable({"kind": "function", "function": "torch.nn.functional.l1_loss"},
        ...                  record="loss").__name__
        'l1_loss'
        >>> restore_callable({"kind": "function", "function": "numpy.load"}, record="loss") is None
        True
    """
    policy = TrustPolicy.build(source=path) if policy is None else policy
    if isinstance(rec, str):
        rec = {"kind": "function", "function": rec}
    kind = rec.get("kind") if isinstance(rec, dict) else None
    if kind == "function":
        return _function(rec.get("function"), record, path, policy)
    if kind == "partial":
        fn = _function(rec.get("function"), record, path, policy)
        if fn is None:
            return None
        args, keywords = rec.get("args", []), rec.get("keywords", {})
        if not isinstance(args, list) or not isinstance(keywords, dict):
            raise CheckpointError(
                f"{_where(path)}: record {record!r} is damaged: a partial needs a list of args and a dict of "
                "keywords",
                path=path,
                kind="damaged",
            )
        if lookup(rec.get("function"), _slot(record)) is not None:
            if args:
                raise CheckpointError(
                    f"{_where(path)}: record {record!r} is damaged: a partial of a registry function takes "
                    "keyword arguments only",
                    path=path,
                    kind="damaged",
                )
            keywords = check_arguments(
                fn, keywords, record=f"{record}.keywords", source=path, skip=2
            )
        elif not (is_plain(args) and is_plain(keywords)):
            raise CheckpointError(
                f"{_where(path)}: record {record!r} is damaged: partial arguments must be plain data",
                path=path,
                kind="damaged",
            )
        return functools.partial(fn, *args, **keywords)
    if kind == "module":
        return _restore_module(rec, record, path, policy)
    raise CheckpointError(
        f"{_where(path)}: record {record!r} is damaged: expected a function, partial or module record, got "
        f"{str(rec)[:80]!r}. What to do: set it again after loading.",
        path=path,
        kind="damaged",
    )
