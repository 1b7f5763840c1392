"""Only finite states are saved: the checks behind every checkpoint write.

A recovery file is never replaced by a diverged state. :func:`non_finite_state` checks a
handler's live state (a blocking save, before a byte is written); :func:`non_finite_snapshot`
checks the copy a background save writes, on the writer thread, so training does not wait for
the check. Both look at the same values: parameters and buffers, optimizer state and the
optimizer's hyper-parameters (every float of ``param_groups``: ``lr``, ``betas``, ``eps``,
...), EMA weights, the loss-scaler state, the gradients of an open accumulation window
(unless a loss scaler is on: it skips such a window's update by design, so a non-finite
gradient there is part of a correct state), and for a mid-epoch checkpoint the running loss
of the epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from nnh.checkpoint import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    from nnh.handler import NNHandler

__all__ = [
    "NonFiniteStateError",
    "non_finite_error",
    "non_finite_snapshot",
    "non_finite_state",
    "optimizer_param_names",
]


class NonFiniteStateError(CheckpointError):
    """Refused to save: the state holds NaN or infinite values."""


# a name, or a function that makes it (names that cost work are made only when needed)
Named = tuple[str | Callable[[], str], torch.Tensor]


def _sum(t: torch.Tensor) -> torch.Tensor:
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.element_size() < 4:  # float16/bfloat16 would overflow at 65504 / sum in float32
        return t.sum(dtype=torch.float32)
    return t.sum()


def _non_finite(named: list[Named]) -> list[str]:
    # an FSDP DTensor is checked on this rank's shard (sharded saves combine the ranks' answers)
    named = [(n, t.to_local() if hasattr(t, "to_local") else t) for n, t in named]
    named = [(n, t) for n, t in named if t.is_floating_point() or t.is_complex()]
    if not named:
        return []
    # A sum is finite when every element is (one fast pass, no bool copy of the state); a
    # non-finite sum may also be an overflow of large finite values, so those few tensors
    # are confirmed element by element.
    device = named[0][1].device  # one transfer (one sync) for the whole state
    sums = torch.stack([_sum(t).float().to(device) for _, t in named]).cpu()
    suspects = (~torch.isfinite(sums)).nonzero().flatten().tolist()
    bad = [named[i] for i in suspects if not bool(torch.isfinite(named[i][1]).all())]
    return [n if isinstance(n, str) else n() for n, _ in bad]


def _loss_is_finite(resume: Mapping[str, Any] | None) -> bool:
    if resume is None:
        return True
    loss = resume.get("sums", {}).get("loss")
    # one running loss, or one per ensemble member
    return loss is None or bool(torch.isfinite(torch.as_tensor(loss)).all())


def _hyper_parameters(groups: Iterable[Mapping[str, Any]]) -> tuple[list[str], list[Named]]:
    """The non-finite float hyper-parameters of optimizer ``groups`` (by name), and their
    tensor-valued ones (for :func:`_non_finite`). ``params`` and ``param_names`` are skipped.

    Example:
        >>> _hyper_parameters([{"params": [0], "lr": float("nan"), "betas": (0.9, float("inf"))}])
        (['optimizer lr (group 0)', 'optimizer betas (group 0)'], [])
    """
    bad: list[str] = []
    tensors: list[Named] = []
    for index, group in enumerate(groups):
        for key, value in group.items():
            if key in ("params", "param_names"):
                continue
            name = f"optimizer {key} (group {index})"
            values = value if isinstance(value, (tuple, list)) else (value,)
            for v in values:
                if isinstance(v, torch.Tensor):
                    tensors.append((name, v))
                elif isinstance(v, float) and not math.isfinite(v):
                    bad.append(name)
                    break
    return bad, tensors


def _tensors(prefix: str, section: Any) -> list[Named]:
    """The tensors of ``section`` (a dict or a TensorDict; ``None``: none), named."""
    if section is None:
        return []
    return [(f"{prefix} {k}", v) for k, v in section.items() if isinstance(v, torch.Tensor)]


def _window_grads(train_state: Mapping[str, Any] | Any, scaler: Any) -> list[Named]:
    """The open accumulation window's gradients to check: none under a loss scaler (a
    non-finite gradient there only makes the scaler skip the window's update)."""
    if scaler is not None or train_state is None:
        return []
    return _tensors("accumulated gradient of", train_state)


def non_finite_state(handler: NNHandler, resume: dict[str, Any] | None = None) -> list[str]:
    """Names of the state's tensors, hyper-parameters (and mid-epoch sums) holding NaN or
    inf; empty when good.

    One device sync for the whole state.

    Example:
        >>> from torch import nn
        >>> from nnh import NNHandler
        >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
        >>> non_finite_state(h)
        []
        >>> with torch.no_grad():
        ...     _ = h.module.bias.fill_(float("nan"))
        >>> non_finite_state(h)
        ['model bias']
        >>> with torch.no_grad():  # sums overflow, but every value is finite
        ...     _ = h.module.bias.fill_(3e38); _ = h.module.weight.fill_(3e38)
        >>> non_finite_state(h)
        []
        >>> h.set_optimizer(torch.optim.Adam, lr=0.1)
        >>> h.optimizer.param_groups[0]["betas"] = (0.9, float("nan"))
        >>> non_finite_state(h)
        ['optimizer betas (group 0)']
    """
    named: list[Named] = [(f"model {k}", v) for k, v in handler.module.state_dict().items()]
    bad_hyper: list[str] = []
    optimizer = handler.optimizer
    if optimizer is not None:
        names = {id(p): n for n, p in handler.module.named_parameters()}
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    named.append((f"optimizer {key} of {names.get(id(param), '?')}", value))
        bad_hyper, tensors = _hyper_parameters(optimizer.param_groups)
        named += tensors
    state = handler._state
    if state is not None:
        named += _tensors("EMA", state.ema)
        named += _tensors("loss scaler", state.scaler)
        named += _window_grads(state.grads, state.scaler)
    bad = bad_hyper + _non_finite(named)
    if not _loss_is_finite(resume):
        bad.append("the epoch's running loss")
    return bad


def optimizer_param_names(handler: NNHandler) -> Callable[[int], str]:
    """A function from a parameter's index in the optimizer's ``state_dict()`` to its name
    (read when called: used for error messages only).

    Example:
        >>> from torch import nn
        >>> from nnh import NNHandler
        >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
        >>> h.set_optimizer(torch.optim.SGD, lr=0.1)
        >>> name = optimizer_param_names(h); name(0), name(1), name(7)
        ('weight', 'bias', 'parameter 7')
    """

    def name(index: int) -> str:
        optimizer = handler.optimizer
        if optimizer is not None:
            names = {id(p): n for n, p in handler.module.named_parameters()}
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if 0 <= index < len(params) and id(params[index]) in names:
                return names[id(params[index])]
        return f"parameter {index}"

    return name


def non_finite_snapshot(
    payload: Mapping[str, Any], param_name: Callable[[int], str] = lambda i: f"parameter {i}"
) -> list[str]:
    """:func:`non_finite_state` for a handler checkpoint payload (what a background save
    writes): the same tensors, the same names (``param_name`` names the optimizer's indices).

    Example:
        >>> payload = {"model_state_dict": {"w": torch.ones(2)},
        ...            "optimizer": {"state_dict": {"state": {0: {"exp_avg": torch.tensor([float("nan")])}}}},
        ...            "train_state": {"ema": {"w": torch.ones(2)}}}
        >>> non_finite_snapshot(payload, {0: "w"}.get)
        ['optimizer exp_avg of w']
    """
    named: list[Named] = [
        (f"model {k}", v)
        for k, v in (payload.get("model_state_dict") or {}).items()
        if isinstance(v, torch.Tensor)
    ]
    optimizer = (payload.get("optimizer") or {}).get("state_dict") or {}
    for index, state in (optimizer.get("state") or {}).items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                named.append((_optimizer_name(key, index, param_name), value))
    bad_hyper, tensors = _hyper_parameters(optimizer.get("param_groups") or [])
    named += tensors
    train_state = payload.get("train_state") or {}
    named += _tensors("EMA", train_state.get("ema"))
    named += _tensors("loss scaler", train_state.get("scaler"))
    named += _window_grads(train_state.get("grads"), train_state.get("scaler"))
    bad = bad_hyper + _non_finite(named)
    if not _loss_is_finite(payload.get("resume")):
        bad.append("the epoch's running loss")
    return bad


def _optimizer_name(key: str, index: int, param_name: Callable[[int], str]) -> Callable[[], str]:
    return lambda: f"optimizer {key} of {param_name(index)}"


def non_finite_error(path: str, bad: list[str]) -> NonFiniteStateError:
    """The error that refuses to save a state whose ``bad`` tensors are not finite.

    Example:
        >>> non_finite_error("run.pth", ["model bias"]).kind
        'non_finite'
    """
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return NonFiniteStateError(
        f"did not write checkpoint {path!r}: the state is not finite ({shown} hold NaN or "
        "inf). A diverged state is never saved, so the last good checkpoint stays. What "
        "to do: lower the learning rate, clip gradients (gradient_clipping_norm=...), or "
        "check the data and the loss; then resume from the last good checkpoint.",
        path=path,
        kind="non_finite",
    )
