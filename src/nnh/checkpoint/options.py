"""Allowlists for option values a checkpoint passes to torch: a file selects, never supplies.

A checkpoint records the options of ``torch.compile`` and of the data loaders. Read from a
stranger's file, such a dict could carry what torch would treat as code or authority
(``torch.compile(options={...})`` reaches inductor's configuration, a loader's
``collate_fn``/``worker_init_fn``/``multiprocessing_context``, 100000 worker processes).
:func:`compile_options` and :func:`loader_options` keep only the options and value types
listed here and say what they dropped; :func:`counter` and :func:`finite_number` check single
numbers and raise :class:`~nnh.checkpoint.CheckpointError` (kind ``"damaged"``).

Example:
    >>> compile_options({"mode": "default", "options": {"trace.enabled": True}}, source="a.pth")[0]
    {'mode': 'default'}
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

from nnh.checkpoint.confine import safe_repr
from nnh.checkpoint.errors import CheckpointError

__all__ = [
    "COMPILE_BACKENDS",
    "COMPILE_MODES",
    "compile_options",
    "counter",
    "finite_number",
    "loader_options",
]

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "eager", "aot_eager", "cudagraphs")


def _source(source: str | None) -> str:
    return f"checkpoint {safe_repr(source or '<unnamed>')}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def counter(
    value: object, *, record: str, source: str | None, low: int = 0, high: int = 2**62
) -> int:
    """``value`` if it is an ``int`` in ``[low, high]`` (a ``bool`` is not), else raise
    :class:`~nnh.checkpoint.CheckpointError` (kind ``"damaged"``) naming ``record``.

    Example:
        >>> counter(3, record="train_state.counters.epoch", source="a.pth")
        3
        >>> counter(True, record="train_state.counters.epoch", source="a.pth")
        Traceback (most recent call last):
        ...
        nnh.checkpoint.errors.CheckpointError: checkpoint 'a.pth': train_state.counters.epoch = True is not an integer in [0, 4611686018427387904]. The file was damaged or edited. What to do: use an intact copy, or load with the matching skip_* flag and set that part again.
    """
    if not _is_int(value) or not low <= value <= high:  # type: ignore[operator]
        raise CheckpointError(
            f"{_source(source)}: {record} = {safe_repr(value)} is not an integer in "
            f"[{low}, {high}]. The file was damaged or edited. What to do: use an intact copy, "
            "or load with the matching skip_* flag and set that part again.",
            path=source,
            kind="damaged",
        )
    return int(value)  # type: ignore[arg-type]


def finite_number(
    value: object,
    *,
    record: str,
    source: str | None,
    low: float = -math.inf,
    high: float = math.inf,
) -> float:
    """``float(value)`` if ``value`` is an ``int`` or ``float`` (not a ``bool``), finite and in
    ``[low, high]``, else raise :class:`~nnh.checkpoint.CheckpointError` (kind ``"damaged"``).

    Example:
        >>> finite_number(2, record="optimizer.kwargs.lr", source="a.pth")
        2.0
        >>> finite_number(float("nan"), record="optimizer.kwargs.lr", source="a.pth")
        Traceback (most recent call last):
        ...
        nnh.checkpoint.errors.CheckpointError: checkpoint 'a.pth': optimizer.kwargs.lr = nan is not a finite number in [-inf, inf]. The file was damaged or edited. What to do: use an intact copy, or load with the matching skip_* flag and set that part again.
    """
    if not _is_real(value) or not math.isfinite(value) or not low <= value <= high:  # type: ignore[arg-type, operator]
        raise CheckpointError(
            f"{_source(source)}: {record} = {safe_repr(value)} is not a finite number in "
            f"[{low}, {high}]. The file was damaged or edited. What to do: use an intact copy, "
            "or load with the matching skip_* flag and set that part again.",
            path=source,
            kind="damaged",
        )
    return float(value)  # type: ignore[arg-type]


def _check_all(
    value: Mapping[Any, Any],
    rules: Mapping[str, tuple[Callable[[Any], bool], str]],
    *,
    prefix: str,
    source: str | None,
    fix: str,
) -> tuple[dict[str, Any], list[str]]:
    kept: dict[str, Any] = {}
    warnings: list[str] = []
    for key, item in value.items():
        rule = rules.get(key) if isinstance(key, str) else None
        name = (
            f"{prefix}.{key}"
            if isinstance(key, str) and key.isidentifier()
            else f"{prefix}[{safe_repr(key)}]"
        )
        if rule is None:
            warnings.append(
                f"{_source(source)}: {name} is not an option nnh takes from a file (allowed: "
                f"{', '.join(rules)}); dropped, never passed on. What to do: {fix}"
            )
        elif not rule[0](item):
            warnings.append(
                f"{_source(source)}: {name} = {safe_repr(item)} is not {rule[1]}; dropped. "
                f"What to do: {fix}"
            )
        else:
            kept[key] = item
    return kept, warnings


_COMPILE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "mode": (
        lambda v: v is None or (isinstance(v, str) and v in COMPILE_MODES),
        f"one of {list(COMPILE_MODES)}",
    ),
    "fullgraph": (lambda v: isinstance(v, bool), "a bool"),
    "dynamic": (lambda v: v is None or isinstance(v, bool), "a bool or None"),
    "backend": (
        lambda v: isinstance(v, str) and v in COMPILE_BACKENDS,
        f"one of {list(COMPILE_BACKENDS)}",
    ),
}


def compile_options(value: object, *, source: str | None) -> tuple[dict | None, list[str]]:
    """The ``torch.compile`` options of a checkpoint (``model.compile``), allowlisted.

    Kept: ``mode`` (one of :data:`COMPILE_MODES`), ``fullgraph`` (bool), ``dynamic`` (bool or
    None), ``backend`` (one of :data:`COMPILE_BACKENDS`). Any other key (``options``, which
    reaches inductor's configuration, ``disable``, ...) and any value of the wrong type is
    dropped with a warning naming it. ``None`` (the model was not compiled) gives
    ``(None, [])``; anything else that is not a dict gives ``(None, [warning])``: do not
    compile. An empty result ``{}`` means: compile with torch's defaults.

    Example:
        >>> compile_options({"mode": "max-autotune", "fullgraph": True}, source="a.pth")
        ({'mode': 'max-autotune', 'fullgraph': True}, [])
        >>> kept, warnings = compile_options({"backend": "os.system"}, source="a.pth")
        >>> kept, warnings[0].split(":")[1].strip()
        ({}, "model.compile.backend = 'os.system' is not one of ['inductor', 'eager', 'aot_eager', 'cudagraphs']; dropped. What to do")
        >>> compile_options(None, source="a.pth")
        (None, [])
    """
    fix = "if you trust this file, call handler.compile_model(...) yourself after loading"
    if value is None:
        return None, []
    if not isinstance(value, Mapping):
        return None, [
            f"{_source(source)}: model.compile = {safe_repr(value)} is not a dict of options; "
            f"the model is not compiled. What to do: {fix}"
        ]
    return _check_all(value, _COMPILE_RULES, prefix="model.compile", source=source, fix=fix)


def _max_workers() -> int:
    return min(32, os.cpu_count() or 1)


def _loader_rules() -> dict[str, tuple[Callable[[Any], bool], str]]:
    workers = _max_workers()
    boolean = (lambda v: isinstance(v, bool), "a bool")
    return {
        "batch_size": (lambda v: _is_int(v) and 1 <= v <= 2**31 - 1, "an int in [1, 2**31-1]"),
        "shuffle": boolean,
        "drop_last": boolean,
        "pin_memory": boolean,
        "persistent_workers": boolean,
        "num_workers": (
            lambda v: _is_int(v) and 0 <= v <= workers,
            f"an int in [0, {workers}] (at most 32 and the CPU count here)",
        ),
        "timeout": (
            lambda v: _is_real(v) and math.isfinite(v) and 0 <= v <= 3600,
            "a finite number of seconds in [0, 3600]",
        ),
        "prefetch_factor": (
            lambda v: v is None or (_is_int(v) and 1 <= v <= 64),
            "an int in [1, 64] or None",
        ),
    }


def loader_options(value: object, *, which: str, source: str | None) -> tuple[dict, list[str]]:
    """The ``DataLoader`` options of a checkpoint (``data.<which>.loader_kwargs``), allowlisted.

    Kept: ``batch_size`` (int in ``[1, 2**31-1]``), ``shuffle``, ``drop_last``,
    ``pin_memory``, ``persistent_workers`` (bool), ``num_workers`` (int in ``[0,
    min(32, os.cpu_count())]``), ``timeout`` (finite, ``[0, 3600]`` seconds) and
    ``prefetch_factor`` (int in ``[1, 64]`` or None). Everything else (``collate_fn``,
    ``worker_init_fn``, ``sampler``, ``generator``, ``multiprocessing_context`` ...) and every
    value of the wrong type or range is dropped with a warning naming
    ``data.<which>.loader_kwargs.<key>``. Without worker processes (``num_workers`` 0 or
    dropped) ``prefetch_factor`` and ``persistent_workers=True`` are dropped too, as
    ``DataLoader`` refuses them then. A non-dict gives ``({}, [warning])``.

    Example:
        >>> kept, warnings = loader_options(
        ...     {"batch_size": 32, "shuffle": True, "collate_fn": "os.system"},
        ...     which="train", source="a.pth")
        >>> kept, len(warnings), "data.train.loader_kwargs.collate_fn" in warnings[0]
        ({'batch_size': 32, 'shuffle': True}, 1, True)
    """
    prefix = f"data.{which}.loader_kwargs"
    fix = f"if you trust this file, call handler.set_{which}_loader(dataset, ...) with the options yourself"
    if not isinstance(value, Mapping):
        return {}, [
            f"{_source(source)}: {prefix} = {safe_repr(value)} is not a dict of options; "
            f"the loader is built with the defaults. What to do: {fix}"
        ]
    kept, warnings = _check_all(value, _loader_rules(), prefix=prefix, source=source, fix=fix)
    if not kept.get("num_workers"):
        for key, bad in (("prefetch_factor", None), ("persistent_workers", False)):
            if key in kept and kept[key] is not bad:
                warnings.append(
                    f"{_source(source)}: {prefix}.{key} = {safe_repr(kept.pop(key))} needs "
                    f"worker processes (num_workers > 0); dropped. What to do: {fix}"
                )
    return kept, warnings
