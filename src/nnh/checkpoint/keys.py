"""State-dict key normalisation across model wrappers.

``DistributedDataParallel`` and ``DataParallel`` prefix every key with ``module.``;
``torch.compile`` prefixes them with ``_orig_mod.`` (and a compiled *submodule* puts
``_orig_mod.`` in the middle of its keys). Weights saved from any of these forms load into
any other: keys are compared in a canonical form without the wrapper parts and then written
in the form the target model expects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from nnh.checkpoint.errors import CheckpointError
from nnh.warn import warn as nnh_warn

__all__ = [
    "KeyMismatchWarning",
    "KeyReport",
    "canonical_key",
    "compare_state_dict",
    "load_model_state",
    "match_state_dict",
    "strip_wrapper_prefixes",
]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_COMPILED_INFIX = "._orig_mod."
_MAX_LISTED = 20


def canonical_key(key: str) -> str:
    """Drop leading ``module.`` / ``_orig_mod.`` parts (any order) and inner ``._orig_mod.``.

    Example:
        >>> canonical_key("_orig_mod.module.encoder._orig_mod.fc.weight")
        'encoder.fc.weight'
    """
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    while _COMPILED_INFIX in key:
        key = key.replace(_COMPILED_INFIX, ".")
    return key


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``state_dict`` with DDP/DataParallel (``module.``) and compile (``_orig_mod.``) parts removed.

    Raises :class:`CheckpointError` when two keys collapse onto one name.

    Example:
        >>> import torch
        >>> sd = {"module._orig_mod.fc.weight": torch.zeros(1), "module.fc.bias": torch.zeros(1)}
        >>> sorted(strip_wrapper_prefixes(sd))
        ['fc.bias', 'fc.weight']
    """
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        plain = canonical_key(key)
        if plain in out:
            raise CheckpointError(
                f"state_dict keys {origin[plain]!r} and {key!r} both mean {plain!r} once the "
                "wrapper prefixes are removed. What to do: save the weights of one model only.",
                kind="mismatch",
            )
        out[plain], origin[plain] = value, key
    return out


def _adapt_keys(target_keys: list[str], state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename ``state_dict``'s keys to the target's form; unmatched keys keep their names."""
    wanted = set(target_keys)
    by_plain: dict[str, str | None] = {}
    for key in target_keys:
        plain = canonical_key(key)
        by_plain[plain] = None if plain in by_plain else key  # None: ambiguous
    adapted: dict[str, Any] = {k: v for k, v in state_dict.items() if k in wanted}
    leftovers: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key in wanted:
            continue
        target = by_plain.get(canonical_key(key))
        if target is not None and target not in adapted:
            adapted[target] = value
        else:
            leftovers[key] = value
    for key, value in leftovers.items():
        adapted.setdefault(key, value)
    return adapted


class KeyReport(NamedTuple):
    """How a (key-adapted) state_dict fits a model.

    ``shape_mismatches`` holds ``(key, checkpoint_shape, model_shape)`` triples.

    Example:
        >>> KeyReport([], [], []).fits
        True
    """

    missing: list[str]
    unexpected: list[str]
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    @property
    def fits(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatches)


def _compare(target: Mapping[str, Any], adapted: Mapping[str, Any]) -> KeyReport:
    missing = [k for k in target if k not in adapted]
    unexpected = [k for k in adapted if k not in target]
    shapes = []
    for key, value in adapted.items():
        expected = target.get(key)
        if not (isinstance(value, torch.Tensor) and isinstance(expected, torch.Tensor)):
            continue
        if nn.parameter.is_lazy(expected):
            continue
        if value.shape != expected.shape:
            shapes.append((key, tuple(value.shape), tuple(expected.shape)))
    return KeyReport(missing, unexpected, shapes)


def compare_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> KeyReport:
    """Report missing keys, unexpected keys and shape mismatches after adapting the keys.

    Example:
        >>> from torch import nn
        >>> sd = {"module.weight": torch.zeros(3, 2), "module.bias": torch.zeros(1)}
        >>> compare_state_dict(nn.Linear(2, 1), sd).shape_mismatches
        [('weight', (3, 2), (1, 2))]
    """
    target = model.state_dict()
    return _compare(target, _adapt_keys(list(target), state_dict))


def _listing(title: str, items: list[str]) -> str:
    if not items:
        return ""
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(shown) + more


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _mismatch_error(
    model: nn.Module, report: KeyReport, strict: bool, source: str | os.PathLike[str] | None
) -> CheckpointError:
    where = "the weights" if source is None else f"the weights in {os.fspath(source)!r}"
    shapes = [
        f"{k}: checkpoint {_fmt_shape(a)} vs model {_fmt_shape(b)}"
        for k, a, b in report.shape_mismatches
    ]
    body = _listing("shape mismatches", shapes)
    if strict:
        body = (
            _listing("missing keys (in the model, not in the checkpoint)", report.missing)
            + _listing("unexpected keys (in the checkpoint, not in the model)", report.unexpected)
            + body
        )
    if report.shape_mismatches:
        todo = (
            "build the model with the same constructor arguments (layer sizes) it had when the "
            "checkpoint was saved"
        )
    else:
        todo = (
            "check that this is the same model class, or pass strict_load=False to load only "
            "the matching keys"
        )
    return CheckpointError(
        f"{where} do not fit the model {type(model).__name__}:{body}\nWhat to do: {todo}.",
        path=source,
        kind="mismatch",
    )


def match_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    strict: bool = True,
    *,
    source: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Rename ``state_dict``'s keys into ``model``'s key form and check that it fits.

    Keys saved from a plain, DDP/DataParallel-wrapped or compiled model map onto a plain,
    wrapped or compiled ``model``. Shape mismatches always raise :class:`CheckpointError`;
    missing and unexpected keys raise only when ``strict``. ``source`` (a file path) is named
    in the error.

    Example:
        >>> from torch import nn
        >>> saved = {"module.weight": torch.zeros(1, 2), "module.bias": torch.zeros(1)}
        >>> sorted(match_state_dict(torch.compile(nn.Linear(2, 1)), saved))
        ['_orig_mod.bias', '_orig_mod.weight']
    """
    target = model.state_dict()
    adapted = _adapt_keys(list(target), state_dict)
    report = _compare(target, adapted)
    if report.shape_mismatches or (strict and not report.fits):
        raise _mismatch_error(model, report, strict, source)
    return adapted


class KeyMismatchWarning(UserWarning):
    """A non-strict load skipped keys: model tensors left as they were, or checkpoint tensors unused."""


def _warn_partial(
    model: nn.Module, report: KeyReport, source: str | os.PathLike[str] | None
) -> None:
    where = "the weights" if source is None else f"the weights in {os.fspath(source)!r}"
    body = _listing(
        "missing keys (in the model, not in the checkpoint; left as initialised)", report.missing
    ) + _listing(
        "unexpected keys (in the checkpoint, not in the model; ignored)", report.unexpected
    )
    nnh_warn(
        f"{where} do not cover the model {type(model).__name__} exactly (strict_load=False):"
        f"{body}\nPass strict_load=True to make this an error.",
        KeyMismatchWarning,
    )


def load_model_state(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    strict: bool = True,
    *,
    source: str | os.PathLike[str] | None = None,
    assign: bool = False,
) -> Any:
    """Load ``state_dict`` into ``model`` whatever wrapper either side had; explain mismatches.

    Returns torch's ``_IncompatibleKeys`` (``missing_keys``, ``unexpected_keys``), which are
    empty when ``strict``. Raises :class:`CheckpointError` listing missing keys, unexpected
    keys and shape mismatches (``name: checkpoint [a, b] vs model [c, d]``); with
    ``strict=False`` only shape mismatches raise, and every missing or unexpected key is
    listed in a :class:`KeyMismatchWarning`. ``assign=True`` takes the checkpoint's tensors
    as the model's (for a model built on the meta device).

    Example:
        >>> from torch import nn
        >>> src = nn.DataParallel(nn.Linear(2, 1))
        >>> dst = nn.Linear(2, 1)
        >>> load_model_state(dst, src.state_dict()).missing_keys
        []
        >>> torch.equal(dst.weight, src.module.weight)
        True
    """
    target = model.state_dict()
    adapted = _adapt_keys(list(target), state_dict)
    report = _compare(target, adapted)
    if report.shape_mismatches or (strict and not report.fits):
        raise _mismatch_error(model, report, strict, source)
    if report.missing or report.unexpected:
        _warn_partial(model, report, source)
    try:
        return model.load_state_dict(adapted, strict=strict, assign=assign)
    except RuntimeError as err:
        where = "the weights" if source is None else f"the weights in {os.fspath(source)!r}"
        raise CheckpointError(
            f"loading {where} into {type(model).__name__} failed: {err}",
            path=source,
            kind="mismatch",
        ) from err
