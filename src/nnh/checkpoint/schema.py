"""The shape of a handler checkpoint, checked before any of it is used.

A file can be damaged or crafted so that a section is missing or holds the wrong type.
:func:`check_handler_payload` walks the sections :meth:`NNHandler.save` writes and raises
:class:`CheckpointError` (kind ``"damaged"``) naming the file and the first section that
does not have the expected shape, instead of a bare ``KeyError`` half-way through a load.

Example:
    >>> try:
    ...     check_handler_payload({"model": {"class": "m.Net"}}, "run.pth")
    ... except CheckpointError as err:
    ...     print(err.kind, "model" in str(err))
    damaged True
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from nnh.checkpoint.errors import CheckpointError

__all__ = ["check_handler_payload"]

Check = Callable[[Any], bool]


def _is(*types: type) -> Check:
    return lambda v: isinstance(v, types) and not (isinstance(v, bool) and bool not in types)


def _optional(check: Check) -> Check:
    return lambda v: v is None or check(v)


def _dict_of(keys: Check, values: Check) -> Check:
    return lambda v: isinstance(v, Mapping) and all(keys(k) and values(x) for k, x in v.items())


def _list_of(items: Check) -> Check:
    return lambda v: isinstance(v, (list, tuple)) and all(items(x) for x in v)


def _record(**fields: Check) -> Check:
    """A dict whose listed fields pass their checks (absent fields count as ``None``)."""
    return lambda v: isinstance(v, Mapping) and all(c(v.get(k)) for k, c in fields.items())


_str = _is(str)
_int = _is(int)
_dict = _is(dict)
_tensor = _is(torch.Tensor)
_tensors = _dict_of(_str, _tensor)
_name = _optional(_str)
_callable = _optional(lambda v: isinstance(v, (str, dict)))
_component = _optional(_record(**{"class": _name, "config": _dict}))

# section -> (required, check, what it should be)
_SECTIONS: dict[str, tuple[bool, Check, str]] = {
    "model": (
        True,
        _record(
            **{"class": _str, "kwargs": _dict, "type": _str},
            source=_optional(_dict),
            frozen=_optional(_list_of(_str)),
            keep_eval=_optional(_list_of(_str)),
            compile=_optional(_dict),
        ),
        "a dict with 'class' (str), 'kwargs' (dict) and 'type' (str)",
    ),
    "model_state_dict": (True, _tensors, "a dict of parameter names to tensors"),
    "rng": (
        True,
        _record(torch=_tensor, python=_is(list, tuple)),
        "a dict with the 'torch' (tensor) and 'python' RNG states",
    ),
    "train_state": (
        False,
        _optional(
            _record(
                counters=_dict_of(_str, _int),
                ema=_optional(_tensors),
                scaler=_optional(_tensors),
                grads=_optional(_tensors),
            )
        ),
        "a dict of integer 'counters' and optional tensor dicts 'ema', 'scaler', 'grads'",
    ),
    "optimizer": (
        False,
        _optional(_record(**{"class": _str, "kwargs": _dict, "state_dict": _dict})),
        "a dict with 'class' (str), 'kwargs' and 'state_dict' (dicts)",
    ),
    "scheduler": (
        False,
        _optional(_record(**{"class": _name, "kwargs": _dict, "state_dict": _dict})),
        "a dict with 'class', 'kwargs' and 'state_dict'",
    ),
    "loss": (
        False,
        _optional(_record(fn=_callable, kwargs=_dict, pass_epoch=_is(bool))),
        "a dict with 'fn', 'kwargs' (dict) and 'pass_epoch' (bool)",
    ),
    "metrics": (False, _optional(_dict_of(_str, _callable)), "a dict of metric names to records"),
    "callbacks": (
        False,
        _optional(_list_of(_record(**{"class": _name, "config": _dict}))),
        "a list of dicts with 'class' and 'config'",
    ),
    "history": (False, _optional(_dict), "a dict"),
    "auto_saver": (False, _optional(_dict), "a dict"),
    "seed": (False, _optional(_int), "an int or None"),
    "loss_scaler": (False, _optional(_dict), "a dict"),
    "data": (False, _optional(_dict_of(_str, _optional(_dict))), "a dict of loader records"),
    "sde": (False, _component, "a dict with 'class' and 'config'"),
    "sampler": (False, _component, "a dict with 'class' and 'config'"),
    "last_train_kwargs": (False, _optional(_dict), "a dict or None"),
    "target_epoch": (False, _optional(_int), "an int or None"),
    "logging": (
        False,
        _optional(_record(mode=_name, filename=_name, level=_int)),
        "a dict with 'mode' and 'filename' (str or None) and 'level' (int)",
    ),
    "resume": (
        False,
        _optional(
            _record(
                epoch=_int, batch_offset=_int, epoch_start_rng=_dict, step_rng=_dict, sums=_dict
            )
        ),
        "a dict with the mid-epoch position",
    ),
    "run": (False, _optional(_record(id=_str)), "a dict with the run 'id' (str)"),
    "ensemble": (
        False,
        _optional(_record(size=lambda v: _int(v) and v >= 1, member_history=_optional(_dict))),
        "None, or a dict with the member count 'size' (an int >= 1) and 'member_history'",
    ),
}


def check_handler_payload(payload: Mapping[str, Any], path: str | os.PathLike[str] | None) -> None:
    """Raise :class:`CheckpointError` naming the first section that is missing or malformed.

    Example:
        >>> check_handler_payload({"model": {}}, None)
        Traceback (most recent call last):
            ...
        nnh.checkpoint.errors.CheckpointError: checkpoint: section 'model' is damaged: expected a dict with 'class' (str), 'kwargs' (dict) and 'type' (str), found a dict. The file was damaged or edited; nnh used none of it. What to do: use an intact copy or an earlier checkpoint.
    """
    where = "checkpoint" if path is None else f"checkpoint {os.fspath(path)!r}"
    for section, (required, check, expected) in _SECTIONS.items():
        if section not in payload:
            if required:
                raise CheckpointError(
                    f"{where}: section {section!r} is missing (expected {expected}). The file "
                    "was damaged or edited; nnh used none of it. What to do: use an intact "
                    "copy or an earlier checkpoint.",
                    path=path,
                    kind="damaged",
                )
            continue
        value = payload[section]
        if not check(value):
            raise CheckpointError(
                f"{where}: section {section!r} is damaged: expected {expected}, found a "
                f"{type(value).__name__}. The file was damaged or edited; nnh used none of it. "
                "What to do: use an intact copy or an earlier checkpoint.",
                path=path,
                kind="damaged",
            )
