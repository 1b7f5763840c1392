"""One ordinary checkpoint file for an FSDP run, and ordinary files loaded into one.

``save(path, full=True)`` under ``strategy="fsdp"`` writes the same single file a
single-process run writes (same header, checksums, signing; loads with
``weights_only=True``): :func:`gather_payload` gathers the sharded state to rank 0 one tensor
at a time, each moved to the CPU as soon as it is gathered, so no device ever holds more than
one full parameter (or one optimizer moment) beyond its own shards. Every rank must call it
(the gathers are collectives); only rank 0 writes.

The model weights come from ``torch.distributed.checkpoint.state_dict.get_model_state_dict``
(``full_state_dict=True, cpu_offload=True``). The optimizer state, the EMA weights and an
open accumulation window's gradients are gathered by parameter here rather than with
``get_optimizer_state_dict``: that helper first *initialises* an empty optimizer state by
stepping the optimizer (a save would change the run), and keys the result by parameter name,
while an ordinary nnh file holds torch's own ``optimizer.state_dict()`` (keys by position).

The reverse direction (:func:`load_full_weights`, :func:`shard_optimizer_state`,
:func:`shard_like_params`): an ordinary file's full tensors become this rank's shards with
``set_model_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)`` for the
weights and ``distribute_tensor`` (scattered from rank 0) for the rest, so every rank ends
with exactly the shards it would have had, had the run been sharded from the start.

Example:
    >>> from torch import nn
    >>> is_sharded(nn.Linear(2, 1))
    False
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from nnh.handler import NNHandler

__all__ = [
    "check_sharding",
    "gather_payload",
    "gather_tensor",
    "is_sharded",
    "load_full_weights",
    "shard_like_params",
    "shard_optimizer_state",
    "write_full_checkpoint",
]


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` was sharded by the handler (FSDP2, ``strategy="fsdp"`` under torchrun).

    Example:
        >>> is_sharded(torch.nn.Linear(2, 1))
        False
    """
    return bool(getattr(module, "_nnh_fsdp", False))


def gather_tensor(value: Any, keep: bool) -> Any:
    """The full CPU copy of ``value`` (a DTensor: all-gathered, a collective every rank
    must join); plain tensors are copied to the CPU. Returns ``None`` when not ``keep``
    (the gathered copy is dropped at once), and non-tensors unchanged.

    Example:
        >>> gather_tensor(torch.ones(2), keep=True)
        tensor([1., 1.])
        >>> gather_tensor(3, keep=True)
        3
    """
    if not isinstance(value, torch.Tensor):
        return value
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        full = value.full_tensor()
        out = full.detach().to("cpu", copy=True) if keep else None
        del full
        return out
    return value.detach().to("cpu", copy=True) if keep else None


def _gather_section(section: Any, keep: bool) -> dict[str, Any] | None:
    """Every tensor of a flat dict / TensorDict gathered, in key order (the same on every rank)."""
    if section is None:
        return None
    out = {k: gather_tensor(v, keep) for k, v in sorted(section.items())}
    return out if keep else None


def _gather_optimizer(optimizer: torch.optim.Optimizer, keep: bool) -> dict[str, Any] | None:
    """torch's ``optimizer.state_dict()`` with every sharded state tensor gathered, parameter
    by parameter (the unsharded optimizer's own format: state keyed by position)."""
    native = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for index in sorted(native["state"]):
        entry = native["state"][index]
        gathered = {k: gather_tensor(v, keep) for k, v in entry.items()}
        if keep:
            state[index] = gathered
    if not keep:
        return None
    return {"state": state, "param_groups": native["param_groups"]}


def gather_payload(
    handler: NNHandler, *, include_datasets: bool = True, resume: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The checkpoint payload of a sharded handler, as one unsharded process would write it,
    on rank 0 (``None`` on the other ranks). Every rank must call it.

    Example (single process, nothing sharded: the ordinary payload):
        >>> from nnh import NNHandler
        >>> h = NNHandler(torch.nn.Linear, in_features=2, out_features=1, model_type="regression")
        >>> sorted(gather_payload(h)["model_state_dict"])
        ['bias', 'weight']
    """
    from nnh.handler.persistence import handler_payload

    keep = handler._dist.is_main
    if not is_sharded(handler.module):
        return (
            handler_payload(handler, include_datasets=include_datasets, resume=resume)
            if keep
            else None
        )
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(handler.module, options=options)  # rank 0 only, on CPU
    optimizer = None if handler._adapter is None else handler._adapter.optimizer
    optimizer_state = None if optimizer is None else _gather_optimizer(optimizer, keep)
    state = handler._state
    ema = grads = None
    if state is not None:
        ema, grads = _gather_section(state.ema, keep), _gather_section(state.grads, keep)
    if not keep:
        return None
    payload = handler_payload(handler, include_datasets=include_datasets, resume=resume)
    payload["model_state_dict"] = {k: weights[k] for k in handler.module.state_dict()}
    if "optimizer" in payload and optimizer_state is not None:
        payload["optimizer"]["state_dict"] = optimizer_state
    if state is not None:
        payload["train_state"]["ema"] = ema
        payload["train_state"]["grads"] = grads
    return payload


def write_full_checkpoint(
    handler: NNHandler,
    path: str,
    *,
    include_datasets: bool = True,
    resume: dict[str, Any] | None = None,
    guard_replace: bool = False,
) -> None:
    """Gather a sharded handler's state and write it to ``path`` as one ordinary nnh file
    (rank 0 writes; every rank must call it, and every rank returns or raises together).

    The finite check runs on the gathered state before a byte is written (a non-finite state
    raises :class:`~nnh.handler.finite.NonFiniteStateError` and the previous file stays).
    """
    from nnh.handler.finite import non_finite_error, non_finite_snapshot, optimizer_param_names
    from nnh.handler.saving import _check_replace, _writer

    dist = handler._dist
    error: BaseException | None = None
    try:
        payload = gather_payload(handler, include_datasets=include_datasets, resume=resume)
    except BaseException as err:  # every rank must learn of it
        payload, error = None, err
    if dist.is_main and error is None:
        try:
            bad = non_finite_snapshot(payload, optimizer_param_names(handler))
            if bad:
                raise non_finite_error(path, bad)
            _check_replace(handler, path, guard_replace)
            _writer(handler, path, guard_replace)(payload, Path(path))
            handler._log(f"saved {path} (one file, gathered from {dist.world_size} ranks)")
        except BaseException as err:
            error = err
    del payload
    failed = dist.any_true(error is not None, handler.device)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"saving {path} failed on rank 0; see its error")


# ----------------------------------------------------------------------------- loading
def check_sharding(strategy: str | None, fsdp: Any) -> dict[str, Any]:
    """The checked ``strategy=`` / ``fsdp=`` overrides of a load (before the file is read).

    Example:
        >>> check_sharding("fsdp", {"min_params": 10})["strategy"]
        'fsdp'
        >>> check_sharding("zero", None)
        Traceback (most recent call last):
        ...
        ValueError: strategy must be one of ['ddp', 'fsdp'], got 'zero'
    """
    from nnh.distributed.fsdp import FSDPOptions, check_strategy

    strategy = check_strategy("ddp" if strategy is None else strategy, fsdp)
    if fsdp is not None:
        FSDPOptions.from_dict(fsdp)
    return {"strategy": strategy, "fsdp": fsdp}


def load_full_weights(
    module: nn.Module, weights: dict[str, Any], *, strict: bool, source: str | None
) -> None:
    """Load full (unsharded) ``weights`` into the sharded ``module``: keys and global shapes
    are checked as for an unsharded load (mismatches named), then every rank takes its shard
    of rank 0's tensors (``set_model_state_dict`` with ``broadcast_from_rank0=True``).

    Example (an unsharded module: the ordinary load):
        >>> m = torch.nn.Linear(2, 1)
        >>> load_full_weights(m, {k: torch.zeros_like(v) for k, v in m.state_dict().items()},
        ...                   strict=True, source=None)
        >>> float(m.weight.detach().abs().sum())
        0.0
    """
    from nnh.checkpoint import load_model_state

    if not is_sharded(module):
        load_model_state(module, weights, strict=strict, source=source)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from nnh.checkpoint.keys import _adapt_keys, _compare, _mismatch_error, _warn_partial

    target = module.state_dict()  # DTensor shapes are the global shapes
    adapted = _adapt_keys(list(target), weights)
    report = _compare(target, adapted)
    if report.shape_mismatches or (strict and not report.fits):
        raise _mismatch_error(module, report, strict, source)
    if report.missing or report.unexpected:
        _warn_partial(module, report, source)
    adapted = {k: v for k, v in adapted.items() if k in target}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(module, adapted, options=options)


def _shard(value: torch.Tensor, like: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor) and value.shape == like.shape:
        local = value.to(device=like.device_mesh.device_type, dtype=like.dtype)
        return distribute_tensor(local, like.device_mesh, like.placements)
    return value


def shard_like_params(
    module: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Full tensors named like ``module``'s parameters (EMA weights, accumulated gradients)
    as this rank's shards of them (DTensors placed like the parameters); unsharded modules:
    moved to ``device``.

    Example:
        >>> m = torch.nn.Linear(2, 1)
        >>> shard_like_params(m, {"bias": torch.zeros(1)}, torch.device("cpu"))["bias"]
        tensor([0.])
    """
    if not is_sharded(module):
        return {k: v.to(device) for k, v in tensors.items()}
    params = dict(module.named_parameters())
    return {k: _shard(v, params[k]) if k in params else v.to(device) for k, v in tensors.items()}


def shard_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
) -> dict[str, Any]:
    """An unsharded ``optimizer.state_dict()`` (keys by position) with every state tensor
    shaped like its parameter turned into this rank's shard of it (scattered from rank 0),
    ready for ``optimizer.load_state_dict``; unchanged for an unsharded module.

    Example:
        >>> m = torch.nn.Linear(2, 1); opt = torch.optim.SGD(m.parameters(), lr=0.1)
        >>> shard_optimizer_state(m, opt, opt.state_dict())["param_groups"][0]["lr"]
        0.1
    """
    if not is_sharded(module):
        return state_dict
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in sorted(state_dict["state"].items()):  # the same order on every rank
        like = params[index]
        state[index] = {
            k: _shard(v, like) if isinstance(v, torch.Tensor) else v for k, v in entry.items()
        }
    return {"state": state, "param_groups": state_dict["param_groups"]}
