"""Range and structure checks of the values a handler checkpoint holds, before any is used.

:mod:`nnh.checkpoint.schema` checks that each section has the right container types; the
functions here check what is inside: counters and offsets in range, RNG states of the right
form, tensors dense, finite and of the model's shapes, optimizer and scheduler state dicts
with only the keys and types a fresh object has, ``train()`` options from an allowlist.
Each raises :class:`CheckpointError` (kind ``"damaged"``) naming the file and the record,
or returns a cleaned value with warnings for what it reset.

Example:
    >>> import torch
    >>> check_counters({"step": 3, "epoch": 1}, "run.pth")
    {'step': 3, 'epoch': 1}
    >>> try:
    ...     check_counters({"step": -3}, "run.pth")
    ... except CheckpointError as err:
    ...     print(err.kind)
    damaged
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping
from typing import Any

import torch

from nnh.checkpoint.errors import CheckpointError
from nnh.checkpoint.registry import RANGES, check_like

__all__ = [
    "check_counters",
    "check_dense",
    "check_optimizer_state",
    "check_resume",
    "check_rng_state",
    "check_scheduler_state",
    "check_tensor_dict",
    "clean_train_options",
    "ensemble_size_from_weights",
]

PathLike = str | os.PathLike[str]
_MAX_COUNTER = 2**62


def _damaged(source: PathLike | None, record: str, what: str) -> CheckpointError:
    where = "checkpoint" if source is None else f"checkpoint {os.fspath(source)!r}"
    return CheckpointError(
        f"{where}: record {record!r} {what}. The file was damaged or crafted; nnh used none of "
        "it. What to do: use an intact checkpoint, or load with the matching skip_* flag.",
        path=source,
        kind="damaged",
    )


def _is_int(v: Any, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def check_counters(counters: Mapping[str, Any], source: PathLike | None) -> dict[str, Any]:
    """Every core counter is an int in ``[0, 2**62]``.

    Example:
        >>> check_counters({}, None)
        {}
    """
    for key, value in counters.items():
        if not _is_int(value, 0, _MAX_COUNTER):
            raise _damaged(source, f"train_state.counters.{key}", f"is {value!r:.40}, not a count")
    if counters.get("micro_step", 0) and not (
        1 <= counters.get("window_first", 0) <= counters.get("window_samples", 0)
    ):
        raise _damaged(
            source, "train_state.counters", "has an open accumulation window without its sizes"
        )
    return dict(counters)


def check_dense(tensors: Mapping[str, Any], source: PathLike | None, record: str) -> None:
    """Every tensor is strided and backed by as many bytes as it covers (a crafted zero
    stride cannot make a few bytes look like a huge tensor).

    Example:
        >>> check_dense({"w": torch.zeros(3)}, None, "model_state_dict")
        >>> try:
        ...     check_dense({"w": torch.zeros(1).expand(10**6)}, None, "model_state_dict")
        ... except CheckpointError as err:
        ...     print(err.kind)
        damaged
    """
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.layout is not torch.strided or (
            t.numel() > 1 and t.numel() * t.element_size() > t.untyped_storage().nbytes()
        ):
            raise _damaged(
                source, f"{record}.{key}", "is a tensor larger than the data stored for it"
            )


def check_tensor_dict(
    tensors: Mapping[str, Any] | None,
    shapes: Mapping[str, torch.Size],
    source: PathLike | None,
    record: str,
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> None:
    """Tensors (EMA weights, open-window gradients) match ``shapes`` by name and are finite.

    Example:
        >>> check_tensor_dict({"w": torch.ones(2)}, {"w": torch.Size([2])}, None, "ema")
        >>> try:
        ...     check_tensor_dict({"w": torch.ones(3)}, {"w": torch.Size([2])}, None, "ema")
        ... except CheckpointError as err:
        ...     print(err.kind)
        damaged
    """
    if tensors is None:
        return
    for key, t in tensors.items():
        if key not in shapes or not isinstance(t, torch.Tensor) or t.shape != shapes[key]:
            raise _damaged(source, f"{record}.{key}", "does not match the model's tensors")
        if dtypes is not None and key in dtypes and t.dtype != dtypes[key]:
            raise _damaged(
                source, f"{record}.{key}", f"is {t.dtype}, not the model's {dtypes[key]}"
            )
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise _damaged(source, f"{record}.{key}", "holds NaN or inf")


def ensemble_size_from_weights(
    weights: Mapping[str, torch.Tensor], record: Any, source: PathLike | None
) -> int | None:
    """An ensemble's member count, from the stacked weights (every tensor ``[E, ...]``);
    the ``ensemble.size`` field must agree. ``None`` for a single model.

    Example:
        >>> ensemble_size_from_weights({"w": torch.zeros(4, 3)}, {"size": 4}, None)
        4
        >>> ensemble_size_from_weights({"w": torch.zeros(4, 3)}, None, None) is None
        True
    """
    if record is None:
        return None
    leading = {int(t.shape[0]) if t.ndim else 0 for t in weights.values()}
    if len(leading) != 1 or 0 in leading:
        raise _damaged(
            source, "ensemble.size", "names an ensemble, but the weights are not stacked [E, ...]"
        )
    size = leading.pop()
    if record.get("size") != size:
        raise _damaged(
            source,
            "ensemble.size",
            f"is {record.get('size')!r:.40}, but the weights hold {size} members",
        )
    return size


def check_rng_state(state: Any) -> bool:
    """Whether ``state`` is a global RNG state as :func:`capture_rng` writes it.

    Example:
        >>> from nnh.handler.persistence import capture_rng
        >>> check_rng_state(capture_rng()), check_rng_state({"torch": "x"})
        (True, False)
    """
    if not isinstance(state, Mapping):
        return False
    t = state.get("torch")
    ref = torch.get_rng_state()
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.shape == ref.shape):
        return False
    py = state.get("python")
    if not (isinstance(py, (list, tuple)) and len(py) == 3):
        return False
    version, internal, gauss = py
    if not (
        _is_int(version, 0, 10)
        and isinstance(internal, (list, tuple))
        and len(internal) == len(random.getstate()[1])
        and all(_is_int(v, 0, 2**32) for v in internal)
        and (gauss is None or (isinstance(gauss, float) and math.isfinite(gauss)))
    ):
        return False
    try:
        random.Random().setstate((int(version), tuple(internal), gauss))
    except (ValueError, TypeError, OverflowError):
        return False
    numpy = state.get("numpy")
    if numpy is not None:
        if not isinstance(numpy, Mapping) or numpy.get("name") != "MT19937":
            return False
        keys = numpy.get("keys")
        if not (isinstance(keys, torch.Tensor) and keys.shape == (624,)):
            return False
        if not (_is_int(numpy.get("pos"), 0, 624) and _is_int(numpy.get("has_gauss"), 0, 1)):
            return False
        cached = numpy.get("cached")
        if not (isinstance(cached, (int, float)) and math.isfinite(cached)):
            return False
    cuda = state.get("cuda")
    return cuda is None or (
        isinstance(cuda, (list, tuple)) and all(isinstance(c, torch.Tensor) for c in cuda)
    )


def check_resume(
    resume: Any, batches_per_epoch: int | None, source: PathLike | None
) -> dict[str, Any] | None:
    """A step checkpoint's mid-epoch position: epoch and batch offset in range (the offset
    inside the train loader's epoch when it is known), RNG states well formed, partial sums
    finite.

    Example:
        >>> try:
        ...     check_resume({"epoch": 1, "batch_offset": -3}, 10, None)
        ... except CheckpointError as err:
        ...     print(err.kind)
        damaged
    """
    if resume is None:
        return None
    high = batches_per_epoch if batches_per_epoch is not None else 2**31
    if not _is_int(resume.get("epoch"), 1, 10**9):
        raise _damaged(source, "resume.epoch", "is not an epoch number")
    if not _is_int(resume.get("batch_offset"), 1, max(high, 1)):
        raise _damaged(
            source,
            "resume.batch_offset",
            f"is {resume.get('batch_offset')!r:.40}, outside the epoch's {high} batches",
        )
    if resume.get("batch_size") is not None and not _is_int(resume["batch_size"], 1, 2**31):
        raise _damaged(source, "resume.batch_size", "is not a batch size")
    for key in ("epoch_start_rng", "step_rng"):
        if not check_rng_state(resume.get(key)):
            raise _damaged(source, f"resume.{key}", "is not an RNG state")
    sums = resume.get("sums")
    if (
        not isinstance(sums, Mapping)
        or not {"loss", "count"} <= set(sums)
        or not isinstance(sums.get("metrics", {}), Mapping)
    ):
        raise _damaged(source, "resume.sums", "is not the epoch's partial sums")
    values = [sums.get("loss"), sums.get("count"), *sums.get("metrics", {}).values()]
    for v in values:
        if isinstance(v, torch.Tensor):
            ok = v.numel() <= 2**20 and bool(torch.isfinite(v.double()).all())  # per member
        else:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok:
            raise _damaged(source, "resume.sums", "holds a value that is not a finite number")
    target = resume.get("target_epoch")
    if target is not None and not _is_int(target, 0, 10**9):
        raise _damaged(source, "resume.target_epoch", "is not an epoch number")
    return dict(resume)


_GROUP_EXTRAS = {"params", "param_names", "initial_lr"}


_PER_PARAMETER = frozenset(
    {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta",
     "sum", "exp_inf", "ax", "prev", "step_size", "grad_avg"}
)  # fmt: skip


#: Largest magnitude an optimizer state value may have (a genuine one stays far below).
MAX_STATE_MAGNITUDE = 1e30
_NO_PROBE = frozenset({"LBFGS", "SparseAdam"})  # need a closure / sparse gradients


def _probe_state(cls: type, group: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The state one step of ``cls`` with ``group``'s settings creates for a 2x3 parameter
    (the keys and which tensors are per-parameter); raises what that step raises."""
    settings = {k: v for k, v in group.items() if k not in _GROUP_EXTRAS}
    probe = torch.zeros(2, 3, device=device, requires_grad=True)
    optimizer = cls([probe])  # then the group's settings, as load_state_dict applies them
    optimizer.param_groups[0].update(settings)
    probe.grad = torch.zeros_like(probe)
    optimizer.step()
    return dict(optimizer.state[probe])


def check_optimizer_state(
    state_dict: Any,
    fresh: Mapping[str, Any],
    source: PathLike | None,
    params: list[torch.Tensor] | None = None,
    optimizer_class: type | None = None,
) -> None:
    """An optimizer state dict from a file has a fresh optimizer's structure: the same
    groups and parameter ids, only the hyper-parameters a fresh group has (finite, in
    range), and per-parameter state of finite tensors and numbers.

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
        >>> check_optimizer_state(opt.state_dict(), opt.state_dict(), None)
        >>> bad = opt.state_dict(); bad["param_groups"][0]["lr"] = float("nan")
        >>> try:
        ...     check_optimizer_state(bad, opt.state_dict(), None)
        ... except CheckpointError as err:
        ...     print(err.kind)
        damaged
    """
    record = "optimizer.state_dict"
    if not isinstance(state_dict, Mapping) or set(state_dict) - {"state", "param_groups"}:
        raise _damaged(source, record, "is not an optimizer state dict")
    groups, fresh_groups = state_dict.get("param_groups"), fresh["param_groups"]
    if not isinstance(groups, (list, tuple)) or len(groups) != len(fresh_groups):
        raise _damaged(source, f"{record}.param_groups", "does not have the model's groups")
    ids: set[int] = set()
    for i, (group, ref) in enumerate(zip(groups, fresh_groups)):
        where = f"{record}.param_groups[{i}]"
        if not isinstance(group, Mapping):
            raise _damaged(source, where, "is not a dict")
        if group.get("params") != ref["params"]:
            raise _damaged(source, f"{where}.params", "does not list the model's parameters")
        missing = set(ref) - _GROUP_EXTRAS - set(group)
        if missing:
            raise _damaged(source, where, f"lacks the settings {sorted(missing)[:5]}")
        ids.update(ref["params"])
        for key, value in group.items():
            if key in ("params", "param_names"):
                continue
            rule = RANGES.get(key)
            if key == "initial_lr":
                ok = RANGES["lr"](value)
            elif key not in ref:
                raise _damaged(source, f"{where}.{key}", "is not a setting of this optimizer")
            else:
                ok = check_like(value, ref[key]) or (
                    isinstance(ref[key], float) and isinstance(value, (int, float))
                    and not isinstance(value, bool) and math.isfinite(value)
                )  # fmt: skip
                if ok and rule is not None and value is not None:
                    ok = rule(value)
            if not ok:
                raise _damaged(source, f"{where}.{key}", f"is {value!r:.40}, out of range")
    state = state_dict.get("state", {})
    if not isinstance(state, Mapping):
        raise _damaged(source, f"{record}.state", "is not a dict")
    probes: dict[int, dict[str, Any]] = {}
    if optimizer_class is not None and optimizer_class.__name__ not in _NO_PROBE and state:
        device = params[0].device if params else torch.device("cpu")
        for group, ref in zip(groups, fresh_groups):
            try:
                probe = _probe_state(optimizer_class, group, device)
            except Exception as err:
                raise _damaged(
                    source,
                    f"{record}.param_groups",
                    f"has settings its optimizer cannot step with ({type(err).__name__})",
                ) from None
            probes.update(dict.fromkeys(ref["params"], probe))
    order = [i for ref in fresh_groups for i in ref["params"]]
    by_id = dict(zip(order, params)) if params is not None else {}
    for pid, entry in state.items():
        if pid not in ids or not isinstance(entry, Mapping):
            raise _damaged(
                source, f"{record}.state", f"holds state for unknown parameter {pid!r:.20}"
            )
        param = by_id.get(pid)
        probe = probes.get(pid)
        if probe is not None and set(entry) != set(probe):
            raise _damaged(
                source,
                f"{record}.state[{pid}]",
                f"holds {sorted(map(str, entry))[:6]}, not the optimizer's {sorted(probe)}",
            )
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                ok = value.layout is torch.strided and (
                    not value.is_floating_point() or bool(torch.isfinite(value).all())
                )
                ok = ok and (
                    not value.is_floating_point()
                    or value.numel() == 0
                    or float(value.abs().max()) <= MAX_STATE_MAGNITUDE
                )
                expected = probe.get(key) if probe is not None else None
                if key == "step":
                    ok = ok and value.numel() == 1
                elif param is not None and (
                    key in _PER_PARAMETER
                    or (isinstance(expected, torch.Tensor) and expected.shape == (2, 3))
                ):
                    ok = ok and value.shape == param.shape and value.dtype == param.dtype
                elif isinstance(expected, torch.Tensor) and expected.ndim == 0:
                    ok = ok and value.numel() == 1
            else:
                ok = (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and math.isfinite(value)
                    and abs(value) <= MAX_STATE_MAGNITUDE
                )
            if not isinstance(key, str) or not ok:
                raise _damaged(
                    source, f"{record}.state[{pid}]", "holds a non-finite or foreign value"
                )


def check_scheduler_state(state: Any, fresh: Mapping[str, Any], source: PathLike | None) -> None:
    """A scheduler state dict (applied with ``__dict__.update``) may only hold the keys a
    fresh scheduler has, with values of the same structure (:func:`check_like`).

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
        >>> s = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
        >>> try:
        ...     check_scheduler_state({"optimizer": "x"}, s.state_dict(), None)
        ... except CheckpointError as err:
        ...     print(err.kind)
        damaged
    """
    if not isinstance(state, Mapping):
        raise _damaged(source, "scheduler.state_dict", "is not a dict")
    for key, value in state.items():
        if key not in fresh or not check_like(value, fresh[key]):
            raise _damaged(
                source,
                f"scheduler.state_dict.{str(key)[:40]}",
                "is not a setting of this scheduler",
            )


def _opt_real(low: float, high: float) -> Any:
    def check(v: Any) -> bool:
        return v is None or (
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
            and low <= v <= high
        )

    return check


_TRAIN_OPTION_RULES: dict[str, Any] = {
    "validate_every": lambda v: _is_int(v, 1, 10**6),
    "gradient_accumulation_steps": lambda v: _is_int(v, 1, 10_000),
    "use_amp": lambda v: (
        isinstance(v, bool)
        or (isinstance(v, str) and v.lower() in ("bf16", "bfloat16", "fp16", "float16"))
    ),
    "gradient_clipping_norm": _opt_real(1e-12, 1e6),
    "ema_decay": lambda v: v is None or (_opt_real(0.0, 1.0)(v) and v < 1.0),
    "progress_bar": lambda v: isinstance(v, bool),
    "debug_print_interval": lambda v: v is None or _is_int(v, 1, 10**6),
    "save_on_last_epoch": lambda v: isinstance(v, bool),
    "epoch_train_and_val_pbar": lambda v: isinstance(v, bool),
}


def clean_train_options(
    options: Any, source: PathLike | None
) -> tuple[dict[str, Any] | None, list[str]]:
    """The ``train()`` options a file recorded, from an allowlist with ranges; anything else
    is dropped with a warning (the option then takes its default).

    Example:
        >>> clean_train_options({"use_amp": True, "gradient_accumulation_steps": 10**12}, None)[0]
        {'use_amp': True}
    """
    if options is None:
        return None, []
    where = "checkpoint" if source is None else f"checkpoint {os.fspath(source)!r}"
    kept, dropped = {}, []
    for key, value in options.items():
        rule = _TRAIN_OPTION_RULES.get(key)
        if rule is not None and rule(value):
            kept[key] = value
        else:
            dropped.append(str(key)[:40])
    warnings = (
        [f"{where}: train() options {sorted(dropped)} were unknown or out of range and take "
         "their defaults; pass them to train() to set them"]
        if dropped else []
    )  # fmt: skip
    return kept, warnings
