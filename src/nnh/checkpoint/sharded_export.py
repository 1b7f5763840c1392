"""Converting a sharded checkpoint folder into one ordinary nnh checkpoint file, offline.

The equivalent of torch's ``dcp_to_torch_save`` with nnh's guarantees: the folder is
verified first (metadata, signature, every shard's SHA-256), the shards are read in one
process without a process group and without running anything stored in them
(:mod:`nnh.checkpoint.dcp_safe`), and the result is a normal single-file checkpoint (header,
checksums, written atomically) that ``NNHandler.load`` and ``initialize_from_checkpoint``
read. The file is signed only when the folder was the user's own: converting never turns a
stranger's folder into a file nnh would trust.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from nnh.checkpoint.errors import CheckpointError

__all__ = ["read_shards", "sharded_to_file"]

_HEADER = ("nnh_format", "versions", "integrity")


def read_shards(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Every tensor group of a VERIFIED folder, gathered in full on the CPU (one process).

    Returns ``{"model": {name: tensor}, "optim": {...}, "ema": ..., "grads": ...}`` as saved
    (the groups the folder holds). Call :func:`nnh.checkpoint.sharded.read_metadata` first.
    """
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from nnh.checkpoint.dcp_safe import SafeEmptyPlanner, SafeReader

    reader = SafeReader(str(folder))
    reader.read_metadata()  # a planted index is refused here, naming the file
    state: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _load_state_dict(state, storage_reader=reader, planner=SafeEmptyPlanner(), no_dist=True)
    return state


def _optimizer_state(meta_groups: list[Any], saved: dict[str, Any], where: str) -> dict[str, Any]:
    """Torch's index-keyed optimizer state from DCP's name-keyed one (same group order)."""
    groups = saved.get("param_groups")
    state = saved.get("state") or {}
    if not isinstance(groups, list) or len(groups) != len(meta_groups):
        raise CheckpointError(
            f"sharded checkpoint {where!r}: its optimizer shards do not match its metadata's "
            "parameter groups",
            path=where,
            kind="damaged",
        )
    out: dict[Any, Any] = {}
    for meta_group, group in zip(meta_groups, groups, strict=True):
        for index, name in zip(meta_group["params"], group["params"], strict=True):
            if name in state:
                out[index] = state[name]
    return {"state": out, "param_groups": meta_groups}


def sharded_to_file(folder: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Write the sharded checkpoint ``folder`` as one nnh checkpoint file at ``path``.

    Raises :class:`CheckpointError` as loading the folder would (a damaged or missing shard
    is named), and for a mid-epoch step checkpoint of several ranks (its position exists
    only per rank: convert an epoch checkpoint). Returns the written path.

    Example (a folder written by ``NNHandler.save`` under FSDP)::

        nnh.checkpoint.sharded_to_file("run/e2.pth", "e2-full.pth")
        handler = NNHandler.load("e2-full.pth")          # one process, one file
    """
    from nnh.checkpoint import save_checkpoint
    from nnh.checkpoint.sharded import SHARDED_KEY, read_metadata, sharded_record
    from nnh.checkpoint.signing import is_own

    where = os.fspath(folder)
    payload = read_metadata(folder)
    record = sharded_record(payload, folder)
    if payload.get("resume") is not None and record["world_size"] > 1:
        raise CheckpointError(
            f"sharded checkpoint {where!r} is a mid-epoch step checkpoint of {record['world_size']} "
            "ranks; its position exists only per rank and has no single-file form. What to do: "
            "convert an epoch checkpoint, or resume this one on as many ranks.",
            path=where,
            kind="world_size",
        )
    own = is_own(payload.get("integrity"))
    tensors = read_shards(folder)
    out = {k: v for k, v in payload.items() if k not in (*_HEADER, SHARDED_KEY)}
    out["model_state_dict"] = dict(tensors["model"])
    optimizer = out.get("optimizer")
    if optimizer is not None and "optim" in tensors:
        groups = optimizer["state_dict"].get("param_groups") or []
        optimizer["state_dict"] = _optimizer_state(groups, tensors["optim"], where)
    train_state = out.get("train_state")
    if train_state is not None:
        for key in ("ema", "grads"):
            if key in tensors:
                train_state[key] = dict(tensors[key])
    return save_checkpoint(out, path, sign=own)
