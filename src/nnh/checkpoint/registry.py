"""The closed registry a checkpoint may select from, and the schemas of its arguments.

A file is data: it may *name* an entry of this registry and give it plain arguments, but it
never supplies code and never makes nnh import anything else (the model class is the one
exception, see :mod:`nnh.checkpoint.policy`). The registry holds

* **optimizers**: every optimizer class of ``torch.optim``;
* **schedulers**: the schedulers of ``torch.optim.lr_scheduler`` that take no callables
  (``LambdaLR``, ``MultiplicativeLR``, ``SequentialLR`` and ``ChainedScheduler`` are not in
  it; ``CyclicLR`` only without ``scale_fn``);
* **losses and metrics**: the loss modules of ``torch.nn``, an explicit list of torch maths
  functions (:data:`TORCH_FUNCTIONS`) and nnh's own, and ``torchmetrics`` metric classes
  when that package is installed;
* **callbacks, SDEs**: nnh's own (``nnh.callbacks``, ``nnh.generative``).

Each entry is found by its import path (the one ``NNHandler.save`` records, or the public
alias such as ``torch.optim.Adam``) with a dictionary look-up: nothing is imported because a
file named it. :func:`check_arguments` checks every constructor or call argument against the
entry's signature: only parameters the callable declares, of the type its default has,
finite, and in range (:data:`RANGES`); callables are never accepted as arguments.

Example:
    >>> lookup("torch.optim.adam.Adam", "optimizer").__name__
    'Adam'
    >>> lookup("os.system", "loss") is None
    True
    >>> check_arguments(lookup("torch.optim.Adam", "optimizer"), {"lr": 1e-3}, record="optimizer",
    ...                 skip=1)
    {'lr': 0.001}
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import string
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from nnh.checkpoint.errors import CheckpointError

__all__ = [
    "RANGES",
    "SLOTS",
    "TORCH_FUNCTIONS",
    "check_arguments",
    "check_like",
    "check_name_pattern",
    "entries",
    "lookup",
    "registry_path",
]

PathLike = str | os.PathLike[str]
SLOTS = ("optimizer", "scheduler", "loss", "metric", "callback", "sde", "sampler")

#: torch maths functions a loss or metric may be (``torch.nn.functional`` losses and
#: distances). Nothing that reads or writes files, compiles, or changes global settings.
TORCH_FUNCTIONS = (
    "binary_cross_entropy", "binary_cross_entropy_with_logits", "cosine_embedding_loss",
    "cross_entropy", "ctc_loss", "gaussian_nll_loss", "hinge_embedding_loss", "huber_loss",
    "kl_div", "l1_loss", "margin_ranking_loss", "mse_loss", "multi_margin_loss",
    "multilabel_margin_loss", "multilabel_soft_margin_loss", "nll_loss", "poisson_nll_loss",
    "smooth_l1_loss", "soft_margin_loss", "triplet_margin_loss", "cosine_similarity",
    "pairwise_distance",
)  # fmt: skip

_EXCLUDED_SCHEDULERS = frozenset(
    {"LambdaLR", "MultiplicativeLR", "SequentialLR", "ChainedScheduler", "LRScheduler"}
)
_CALLABLE_PARAMS = frozenset(
    {"lr_lambda", "scale_fn", "distance_function", "collate_fn", "dist_sync_fn",
     "distributed_available_fn", "process_group", "params"}
)  # fmt: skip

_INT_LIMIT = 10**6
_FLOAT_LIMIT = 1e6
_MAX_STR = 256
_MAX_SEQ = 10_000
_MAX_TENSOR = 10**7


def _real(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Any:
    def check(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if not math.isfinite(v):
            return False
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    check.__doc__ = (
        f"a finite number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    )
    return check


def _int(low: int, high: int) -> Any:
    def check(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

    check.__doc__ = f"an int in [{low}, {high}]"
    return check


def _one_of(*options: Any) -> Any:
    def check(v: Any) -> bool:
        return any(v is o or (type(v) is type(o) and v == o) for o in options)

    check.__doc__ = f"one of {options!r}"
    return check


def _pair(low: float, high: float) -> Any:
    item = _real(low, high, high_open=True)

    def check(v: Any) -> bool:
        return isinstance(v, (tuple, list)) and len(v) == 2 and all(item(x) for x in v)

    check.__doc__ = f"two finite numbers in [{low}, {high})"
    return check


def _flag(v: Any) -> bool:
    """a bool or None"""
    return v is None or isinstance(v, bool)


#: Per-name rules that take precedence over the type of a parameter's default.
RANGES: dict[str, Any] = {
    "lr": _real(0.0, 1e3),
    "max_lr": _real(0.0, 1e3),
    "base_lr": _real(0.0, 1e3),
    "eta_min": _real(0.0, 1e3),
    "min_lr": _real(0.0, 1e3),
    "betas": _pair(0.0, 1.0),
    "eps": _real(0.0, 1.0),
    "weight_decay": _real(0.0, 1e3),
    "momentum": _real(0.0, 1.0),
    "dampening": _real(0.0, 1.0),
    "rho": _real(0.0, 1.0),
    "alpha": _real(0.0, 1e3),
    "gamma": _real(0.0, 1e3),
    "label_smoothing": _real(0.0, 1.0),
    "reduction": _one_of("mean", "sum", "none", "batchmean"),
    "line_search_fn": _one_of(None, "strong_wolfe"),
    "foreach": _flag,
    "fused": _flag,
    "capturable": _flag,
    "differentiable": _flag,
    "maximize": _flag,
    "num_classes": _int(1, 100_000),
    "num_labels": _int(1, 100_000),
    "num_outputs": _int(1, 100_000),
    "top_k": _int(1, 1000),
    "step_size": _int(1, 10**9),
    "T_max": _int(1, 10**9),
    "T_0": _int(1, 10**9),
    "T_mult": _int(1, 1000),
    "total_iters": _int(0, 10**9),
    "total_steps": _int(1, 10**9),
    "epochs": _int(1, 10**9),
    "steps_per_epoch": _int(1, 10**9),
    "last_epoch": _int(-1, 10**9),
    "patience": _int(0, 10**9),
    "cooldown": _int(0, 10**9),
    "milestones": lambda v: (
        isinstance(v, (list, tuple)) and len(v) <= 10_000 and all(_int(0, 10**9)(x) for x in v)
    ),
    "sigma_min": _real(0.0, 1e6, low_open=True),
    "sigma_max": _real(0.0, 1e6, low_open=True),
    "beta_min": _real(0.0, 1e6, low_open=True),
    "beta_max": _real(0.0, 1e6, low_open=True),
    "T": _real(0.0, 1e6, low_open=True),
    "epsilon": _real(0.0, 1.0, low_open=True),
}


def _plain_scalar(v: Any) -> bool:
    if v is None or isinstance(v, bool):
        return True
    if isinstance(v, int):
        return abs(v) <= _INT_LIMIT
    if isinstance(v, float):
        return math.isfinite(v) and abs(v) <= _FLOAT_LIMIT
    if isinstance(v, str):
        return len(v) <= _MAX_STR and v.isprintable()
    return False


def _small_tensor(v: Any) -> bool:
    return (
        isinstance(v, torch.Tensor)
        and v.layout is torch.strided
        and v.numel() <= _MAX_TENSOR
        and v.numel() * v.element_size() <= v.untyped_storage().nbytes()
        and (not (v.is_floating_point() or v.is_complex()) or bool(torch.isfinite(v).all()))
    )


def _like_default(value: Any, default: Any) -> bool:
    """Whether ``value`` may stand where the parameter's ``default`` stands (``None``
    always may: the constructor refuses it where it means nothing)."""
    if value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= _INT_LIMIT
    if isinstance(default, float):
        return (
            _plain_scalar(value) and isinstance(value, (int, float)) and not isinstance(value, bool)
        )
    if isinstance(default, str):
        return isinstance(value, str) and _plain_scalar(value)
    if isinstance(default, (tuple, list)):
        return (
            isinstance(value, (tuple, list))
            and len(value) == len(default)
            and all(_plain_scalar(x) and not isinstance(x, str) for x in value)
        )
    # no default, or None: any small plain value (the constructor checks the rest)
    if isinstance(value, (list, tuple)):
        return len(value) <= _MAX_SEQ and all(_plain_scalar(x) for x in value)
    return _plain_scalar(value) or _small_tensor(value)


def _where(source: PathLike | None) -> str:
    return "checkpoint" if source is None else f"checkpoint {os.fspath(source)!r}"


def _bad(source: PathLike | None, record: str, message: str) -> CheckpointError:
    return CheckpointError(
        f"{_where(source)}: record {record!r} {message}. The file was damaged or crafted; "
        "nnh called nothing with it. What to do: use an intact checkpoint, or load with the "
        "matching skip_* flag and set that part again.",
        path=source,
        kind="damaged",
    )


def _signature(obj: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(obj.__init__ if isinstance(obj, type) else obj)
    except (TypeError, ValueError):
        return None


def check_arguments(
    obj: Any,
    kwargs: Any,
    *,
    record: str,
    source: PathLike | None = None,
    skip: int = 0,
) -> dict[str, Any]:
    """Check keyword arguments from a file for the registry entry ``obj``; return them.

    Every key must be a parameter ``obj`` declares by name (not ``*args``/``**kwargs``, not
    one of the first ``skip`` data parameters such as an optimizer's ``params`` or a loss's
    ``input, target``), never a callable parameter, and its value must pass
    :data:`RANGES` or, failing a rule, be of its default's type (finite numbers, short
    printable strings, small finite tensors). Raises :class:`CheckpointError` (kind
    ``"damaged"``) naming the record and the argument.

    Example:
        >>> check_arguments(nn.CrossEntropyLoss, {"label_smoothing": 0.1}, record="loss")
        {'label_smoothing': 0.1}
        >>> try:
        ...     check_arguments(nn.CrossEntropyLoss, {"__class__": 1}, record="loss")
        ... except CheckpointError as err:
        ...     print(err.kind)
        damaged
    """
    if not isinstance(kwargs, Mapping):
        raise _bad(
            source, record, f"should hold a dict of arguments, found {type(kwargs).__name__}"
        )
    sig = _signature(obj)
    if sig is None:
        if kwargs:
            raise _bad(source, record, "gives arguments to a callable that takes none from files")
        return {}
    params = [p for p in sig.parameters.values() if p.name != "self"]
    named = {
        p.name: p
        for p in params[skip:]
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY)
    }
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if not isinstance(key, str) or key not in named or key in _CALLABLE_PARAMS:
            if key in _CALLABLE_PARAMS and value is None:
                continue
            raise _bad(
                source, record, f"gives the argument {str(key)[:60]!r}, which is not accepted"
            )
        rule = RANGES.get(key)
        default = named[key].default
        ok = (
            rule(value)
            if rule is not None
            else _like_default(value, None if default is inspect.Parameter.empty else default)
        )
        if not ok:
            what = (rule.__doc__ if rule is not None else None) or "a plain value like its default"
            raise _bad(source, record, f"gives {key}={_show(value)}, which is not {what}")
        out[key] = value
    return out


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, torch.Tensor) else f"tensor{tuple(value.shape)}"
    text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= 60 else text[:57] + "..."


def check_like(value: Any, template: Any, *, depth: int = 0) -> bool:
    """Whether ``value`` (from a file) has the structure and types of ``template`` (from a
    freshly built object): same keys (a subset), same scalar types, finite numbers (or the
    same non-finite value), lists of the same length, equal strings.

    Used for state dicts that the object applies with ``__dict__.update`` (schedulers).

    Example:
        >>> check_like({"last_epoch": 3, "base_lrs": [0.1]}, {"last_epoch": 0, "base_lrs": [0.1]})
        True
        >>> check_like({"optimizer": "x"}, {"last_epoch": 0})
        False
    """
    if depth > 8:
        return False
    if isinstance(template, bool) or template is None:
        return (
            value is None or isinstance(value, bool)
            if template is None
            else isinstance(value, bool)
        )
    if isinstance(template, int):
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= 2**62
    if isinstance(template, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return (
            math.isfinite(value)
            or (value == template)
            or (math.isinf(value) and math.isinf(template))
        )
    if isinstance(template, str):
        return value == template
    if isinstance(template, Mapping):
        return isinstance(value, Mapping) and all(
            k in template and check_like(v, template[k], depth=depth + 1) for k, v in value.items()
        )
    if isinstance(template, (list, tuple)):
        return (
            isinstance(value, (list, tuple))
            and len(value) == len(template)
            and all(check_like(v, t, depth=depth + 1) for v, t in zip(value, template))
        )
    if isinstance(template, torch.Tensor):
        return (
            _small_tensor(value) and value.shape == template.shape and value.dtype == template.dtype
        )
    return False


_SPEC_CHARS = set(string.ascii_letters + string.digits + "<>^=+- #0,_.%")


def check_name_pattern(pattern: Any) -> bool:
    """Whether ``pattern`` is a safe file-name pattern: no folders, printable, and only
    plain ``{field}`` / ``{field:spec}`` replacement fields (no attribute or index access,
    no conversions, no nested fields).

    Example:
        >>> check_name_pattern("best_{epoch:03d}_{val_loss:.4f}")
        True
        >>> check_name_pattern("{epoch.__class__}"), check_name_pattern("../x")
        (False, False)
    """
    if not isinstance(pattern, str) or not pattern or len(pattern) > _MAX_STR:
        return False
    if not pattern.isprintable() or "/" in pattern or "\\" in pattern or pattern in (".", ".."):
        return False
    try:
        fields = list(string.Formatter().parse(pattern))
    except ValueError:
        return False
    for _text, name, spec, conversion in fields:
        if name is None:
            continue
        if not name.isidentifier() or conversion is not None:
            return False
        if spec and not set(spec) <= _SPEC_CHARS:
            return False
    return True


# ------------------------------------------------------------------------- the registry
def _public_classes(module: Any, base: type) -> list[tuple[str, type]]:
    out = []
    for name in dir(module):
        obj = getattr(module, name, None)
        if isinstance(obj, type) and issubclass(obj, base) and not name.startswith("_"):
            out.append((f"{module.__name__}.{name}", obj))
    return out


def _torchmetrics_classes() -> list[tuple[str, type]]:
    try:
        import torchmetrics
    except ImportError:
        return []
    found: list[tuple[str, type]] = []
    for module_name in ("torchmetrics", "torchmetrics.classification", "torchmetrics.regression"):
        try:
            module = __import__(module_name, fromlist=["_"])
        except ImportError:  # pragma: no cover
            continue
        found += _public_classes(module, torchmetrics.Metric)
    return found


@functools.lru_cache(maxsize=1)
def entries() -> dict[str, dict[str, Any]]:
    """Every registry entry by slot: ``{slot: {import path: object}}`` (public aliases and
    the defining module's path both).

    Example:
        >>> "torch.nn.modules.loss.MSELoss" in entries()["loss"]
        True
    """
    from nnh import callbacks as nnh_callbacks
    from nnh.generative import sde as nnh_sde
    from nnh.generative.score_matching import denoising_score_matching_loss

    slots: dict[str, dict[str, Any]] = {s: {} for s in SLOTS}

    def add(slot: str, alias: str, obj: Any) -> None:
        slots[slot][alias] = obj
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if module and qualname:
            slots[slot][f"{module}.{qualname}"] = obj

    for alias, cls in _public_classes(torch.optim, torch.optim.Optimizer):
        if cls is not torch.optim.Optimizer:
            add("optimizer", alias, cls)
    sched = torch.optim.lr_scheduler
    bases = (sched.LRScheduler, sched.ReduceLROnPlateau)
    for alias, cls in _public_classes(sched, bases):
        if cls.__name__ not in _EXCLUDED_SCHEDULERS:
            add("scheduler", alias, cls)
    loss_classes = [
        (a, c)
        for a, c in _public_classes(nn, nn.Module)
        if issubclass(c, nn.modules.loss._Loss) and c.__name__ != "_Loss"
    ]
    for alias, cls in loss_classes:
        add("loss", alias, cls)
        add("metric", alias, cls)
    for name in TORCH_FUNCTIONS:
        fn = getattr(nn.functional, name)
        for slot in ("loss", "metric"):
            add(slot, f"torch.nn.functional.{name}", fn)
    for slot in ("loss", "metric"):
        add(slot, "nnh.generative.denoising_score_matching_loss", denoising_score_matching_loss)
    for alias, cls in _torchmetrics_classes():
        add("metric", alias, cls)
    for name in nnh_callbacks.__all__:
        obj = getattr(nnh_callbacks, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, nnh_callbacks.Callback)
            and obj is not nnh_callbacks.Callback
            and name not in NETWORK_CALLBACKS
        ):
            add("callback", f"nnh.callbacks.{name}", obj)
    for cls in (nnh_sde.VESDE, nnh_sde.VPSDE, nnh_sde.SubVPSDE):
        add("sde", f"nnh.generative.{cls.__name__}", cls)
    return slots


#: Callbacks that send data to a server or write where their arguments say (a tracking URI,
#: a run folder): a file that is not yours cannot bring them, since that would let it point
#: your run's settings and metrics anywhere. Your own signed files restore them.
NETWORK_CALLBACKS = frozenset({"MLflowLogger", "WandbLogger"})


def lookup(name: Any, slot: str) -> Any:
    """The registry entry ``name`` names in ``slot``, or ``None``; never imports anything
    because of ``name``.

    Example:
        >>> lookup("torch.nn.functional.mse_loss", "loss").__name__
        'mse_loss'
        >>> lookup("torch.save", "loss"), lookup(3, "loss")
        (None, None)
    """
    if not isinstance(name, str):
        return None
    return entries()[slot].get(name)


def registry_path(obj: Any, slot: str) -> str | None:
    """The registry path of ``obj`` in ``slot`` (``None`` when it is not an entry).

    Example:
        >>> registry_path(torch.optim.SGD, "optimizer")
        'torch.optim.sgd.SGD'
    """
    found = [k for k, v in entries()[slot].items() if v is obj]
    return max(found, key=len) if found else None
