"""Sharded checkpoint folders for FSDP handlers: writing them, and rebuilding a handler.

Under FSDP, :func:`write_sharded` is what ``NNHandler.save`` and every automatic save run
(:func:`nnh.handler.saving.write_checkpoint` dispatches here). In order:

1. every rank checks its shards for NaN/inf; if any rank finds one, nothing is written and
   every rank raises the same :class:`~nnh.handler.finite.NonFiniteStateError` as for a file;
2. rank 0 checks ownership (automatic saves configured by a file), creates a hidden
   temporary folder next to ``path`` (:func:`nnh.checkpoint.folder_commit.temp_folder_for`)
   and tells the other ranks its name;
3. every rank writes its shards of the model, optimizer, EMA weights and open accumulation
   window with ``torch.distributed.checkpoint.save`` (FileSystemWriter);
4. every rank hashes the shard files it wrote (SHA-256, in parallel); the sums and the RNG
   states of every rank (global, and a step checkpoint's position and running sums) are
   gathered to rank 0, which writes the nnh metadata file (the non-tensor state, every
   file's SHA-256, signed: :mod:`nnh.checkpoint.sharded`) and commits the folder
   (:func:`nnh.checkpoint.folder_commit.commit_folder`). A rank killed at any point leaves
   only the temporary folder: ``path`` still holds the previous checkpoint.

:func:`load_sharded` is what ``NNHandler.load(folder)`` runs: the metadata and every shard
are verified first (:func:`nnh.checkpoint.sharded.read_metadata`), the names in it are
resolved under the same trust rules as a file's, the handler is built with the strategy and
FSDP options the folder records, and the tensors are read with ``torch.distributed.checkpoint
.load`` into this run's layout (any number of ranks, or one process without a process group:
DCP reshards).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch
import torch.distributed as dist

from nnh.checkpoint import CheckpointError
from nnh.checkpoint.dcp_safe import SafeLoadPlanner, SafeReader
from nnh.checkpoint.folder_commit import commit_folder, temp_folder_for
from nnh.checkpoint.sharded import read_metadata, sharded_record, write_metadata
from nnh.handler.finite import non_finite_error, non_finite_state
from nnh.handler.persistence import capture_rng, handler_payload, restore_rng

if TYPE_CHECKING:  # pragma: no cover
    from nnh.handler import NNHandler

__all__ = [
    "any_rank",
    "begin_sharded",
    "finish_sharded",
    "is_sharded",
    "load_sharded",
    "sharded_details",
    "write_sharded",
]

# per rank in a step checkpoint: where this rank's data stream and epoch sums stand
_PER_RANK = ("epoch_start_rng", "step_rng", "sums")
# tests only: seconds each rank sleeps after writing its shards (a window for kill -9)
_TEST_DELAY_ENV = "NNH_TEST_SHARDED_SAVE_DELAY"


def is_sharded(handler: NNHandler) -> bool:
    """Whether ``handler``'s module is FSDP-sharded across ranks (its saves are folders).

    Example:
        >>> from torch import nn
        >>> from nnh import NNHandler
        >>> is_sharded(NNHandler(nn.Linear, in_features=2, out_features=1))
        False
    """
    return handler._dist.enabled and getattr(handler.module, "_nnh_fsdp", False)


def _fsdp_record(handler: NNHandler) -> dict[str, Any]:
    """The handler's FSDP options as plain values (classes by name; names select nothing)."""
    opts = handler._fsdp
    if opts is None:
        return {}
    out = attrs.asdict(opts)
    out["wrap_classes"] = [c if isinstance(c, str) else c.__name__ for c in opts.wrap_classes]
    for key in ("param_dtype", "reduce_dtype"):
        value = out[key]
        out[key] = None if value is None else str(value).replace("torch.", "")
    return out


def _tensor_state(
    handler: NNHandler, *, for_load: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """What DCP saves, or (``for_load``: the saved EMA and grads names) loads into: model,
    optimizer (FQN keys), EMA weights and an open accumulation window's gradients."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    module = handler.module
    state: dict[str, Any] = {"model": get_model_state_dict(module)}
    optimizer = handler.optimizer
    if optimizer is not None and (optimizer.state or for_load is not None):
        # at save only when there is state: the helper would otherwise initialise it with a
        # zero-gradient step (lr 0), changing the optimizer the save should leave alone
        state["optim"] = get_optimizer_state_dict(module, optimizer)
    ts = handler._state
    live = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    for key in ("ema", "grads"):
        if for_load is not None:
            names = for_load.get(key)
            if names is not None:  # shaped and sharded like this run's parameters
                state[key] = {n: torch.empty_like(live[n]) for n in names if n in live}
            continue
        tensors = None if ts is None else getattr(ts, key)
        if tensors is not None:
            state[key] = dict(tensors.items())
    return state


def _refuse_non_finite(handler: NNHandler, path: str, resume: dict[str, Any] | None) -> None:
    bad = non_finite_state(handler, resume)  # this rank's shards
    if not handler._dist.any_true(bool(bad), handler.device):
        return
    everyone: list[Any] = [None] * handler._dist.world_size
    dist.all_gather_object(everyone, bad)
    names = list(dict.fromkeys(n for names in everyone for n in (names or [])))
    raise non_finite_error(path, names)


def _check_owner(handler: NNHandler, path: str, guard_replace: bool) -> None:
    """Automatic saves configured by a file replace only this run's checkpoint folders."""
    if not guard_replace:
        return
    from nnh.checkpoint.ownership import owner_ids, read_run_id
    from nnh.handler.saving import _check_replace, _not_owned

    target = Path(path)
    if target.exists() and read_run_id(target) not in owner_ids(handler._run_id):
        raise _not_owned(path)
    if not target.exists():
        _check_replace(handler, path, guard_replace)  # the folder may receive this run's saves


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def write_sharded(
    handler: NNHandler,
    path: str,
    *,
    resume: dict[str, Any] | None = None,
    include_datasets: bool = True,
    guard_replace: bool = False,
) -> None:
    """Write ``handler``'s sharded checkpoint folder at ``path`` (every rank calls it; see
    the module docstring). Raises on every rank together."""
    import torch.distributed.checkpoint as dcp

    h = handler
    name = begin_sharded(h, path, resume=resume, guard_replace=guard_replace)
    tensors = _tensor_state(h)
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(name))
    details = sharded_details(h, tensors, resume=resume, include_datasets=include_datasets)
    finish_sharded(h, name, path, details, guard_replace=guard_replace)


def begin_sharded(
    h: NNHandler, path: str, *, resume: dict[str, Any] | None, guard_replace: bool
) -> str:
    """Steps 1 and 2 (on the default group, every rank at the call): the NaN check, then
    rank 0's ownership check and temporary folder, whose name every rank returns."""
    _refuse_non_finite(h, path, resume)
    tmp: Path | None = None
    error: BaseException | None = None
    if h._dist.is_main:
        try:
            _check_owner(h, path, guard_replace)
            tmp = temp_folder_for(path)
        except BaseException as err:
            error = err
    name = _broadcast(None if tmp is None else str(tmp))
    if name is None:
        if error is not None:
            raise error
        raise RuntimeError(f"saving {path} failed on rank 0; see its error")
    return name


def sharded_details(
    h: NNHandler,
    tensors: dict[str, Any],
    *,
    resume: dict[str, Any] | None,
    include_datasets: bool,
) -> dict[str, Any]:
    """What the metadata records besides the shards, taken at the call: this rank's RNG
    states and position, the saved tensor names and (rank 0) the non-tensor payload."""
    mine: dict[str, Any] = {"global": capture_rng()}
    if resume is not None:
        mine["position"] = {k: resume.get(k) for k in _PER_RANK}  # this rank's position
    out: dict[str, Any] = {"rank": mine, "tensors": {k: sorted(v) for k, v in tensors.items()}}
    if h._dist.is_main:
        out["payload"] = _metadata_payload(h, include_datasets, resume)
    return out


def finish_sharded(
    h: NNHandler,
    name: str,
    path: str,
    details: dict[str, Any],
    *,
    guard_replace: bool,
    group: Any = None,
) -> None:
    """Steps 3-4 after the shards are written: hash them, gather the sums and RNG states
    over ``group`` (default: the default group), rank 0 writes the metadata and commits.
    Raises on every rank together."""
    import os
    import time

    delay = os.environ.get(_TEST_DELAY_ENV)
    if delay:
        time.sleep(float(delay))
    world = dist.get_world_size(group)
    rngs: list[Any] = [None] * world
    mine = {**details["rank"], "sums": _own_file_sums(Path(name), dist.get_rank(group))}
    dist.all_gather_object(rngs, mine, group=group)
    known = {f: d for r in rngs for f, d in r.pop("sums").items()}  # hashed where written
    for r in rngs:
        r.update(r.pop("position", None) or {})
    error: BaseException | None = None
    if h._dist.is_main:
        try:
            record = {"world_size": world, "fsdp": _fsdp_record(h), "rng": rngs,
                      "tensors": details["tensors"]}  # fmt: skip
            write_metadata(details["payload"], name, record=record, known=known)
            _check_owner(h, path, guard_replace)  # again, just before the commit
            commit_folder(name, path)
            h._log(f"saved {path}")
        except BaseException as err:
            error = err
    flag = error is not None
    failed = h._dist.any_true(flag, h.device) if group is None else any_rank(flag, group)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"saving {path} failed on rank 0; see its error")


def any_rank(flag: bool, group: Any) -> bool:
    """Whether ``flag`` holds on any rank of the gloo ``group`` (every rank gets the answer)."""
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item() > 0)


def _own_file_sums(folder: Path, rank: int) -> dict[str, str]:
    """SHA-256 of the shard files this rank wrote (DCP names them ``__{rank}_{i}.distcp``),
    and of DCP's ``.metadata`` on rank 0: the ranks hash in parallel."""
    from nnh.checkpoint.sharded_files import sha256_file

    names = [p for p in folder.glob(f"__{rank}_*.distcp") if p.is_file()]
    if rank == 0 and (folder / ".metadata").is_file():
        names.append(folder / ".metadata")
    return {p.name: sha256_file(p) for p in names}


def _metadata_payload(
    h: NNHandler, include_datasets: bool, resume: dict[str, Any] | None
) -> dict[str, Any]:
    """The single-file payload without its sharded tensors (they are in the DCP files)."""
    payload = handler_payload(h, include_datasets=include_datasets, resume=resume)
    payload["model_state_dict"] = {}
    optimizer = payload.get("optimizer")
    if optimizer is not None:
        groups = optimizer["state_dict"].get("param_groups", [])
        optimizer["state_dict"] = {"state": {}, "param_groups": groups}
    train_state = payload.get("train_state")
    if train_state is not None:
        train_state["ema"] = None
        train_state["grads"] = None
    return payload


def load_sharded(handler_class: type[NNHandler], path: str, **options: Any) -> NNHandler:
    """What ``NNHandler.load(folder)`` does for a sharded checkpoint folder."""
    from nnh.checkpoint.integrity import INTEGRITY_KEY
    from nnh.checkpoint.policy import TrustPolicy
    from nnh.checkpoint.schema import check_handler_payload
    from nnh.checkpoint.sections import check_rng_state
    from nnh.checkpoint.signing import is_own
    from nnh.handler.loading import _sanitize, _section, apply_payload, resolve_payload
    from nnh.handler.logs import logging_options

    payload = read_metadata(path)  # metadata and every shard verified
    record = sharded_record(payload, path)
    check_handler_payload(payload, path)
    own = is_own(payload.get(INTEGRITY_KEY))
    policy = TrustPolicy.build(source=str(path), own=own, trusted=options.pop("trusted", None),
                               trust_modules=options.pop("trust_modules", None))  # fmt: skip
    skip = {"scheduler": options["skip_scheduler"], "callbacks": options["skip_callbacks"],
            "sampler_sde": options["skip_sampler_sde"]}  # fmt: skip
    resolved = resolve_payload(payload, str(path), trust_model_code=options["trust_model_code"],
                               skip=skip, policy=policy)  # fmt: skip
    _sanitize(payload, str(path), own, resolved.messages)
    rngs = record.get("rng")
    if not (isinstance(rngs, list) and len(rngs) == record["world_size"] and all(
        isinstance(r, dict) and check_rng_state(r.get("global")) for r in rngs
    )):  # fmt: skip
        raise CheckpointError(
            f"sharded checkpoint {path!r}: its per-rank RNG record is malformed; nnh used none "
            "of it.",
            path=path,
            kind="damaged",
        )
    model = payload["model"]
    with _section(str(path), "logging"):
        log_options = logging_options(payload.get("logging"), str(path), confine=not own)
    device = options["device"]
    strategy = options.get("strategy") or "fsdp"  # the folder's, unless the caller asks for DDP
    if strategy not in ("fsdp", "ddp"):
        raise ValueError(f"NNHandler.load(strategy=...) must be 'fsdp' or 'ddp', got {strategy!r}")
    with _section(str(path), "sharded.fsdp"):
        handler = handler_class(
            resolved.model,
            device=torch.device(device) if device is not None else "cpu",
            model_type=model["type"],
            save_model_code=model.get("source") is not None,
            strategy=strategy,
            fsdp=(options.get("fsdp") or dict(record.get("fsdp") or {}))
            if strategy == "fsdp"
            else None,
            **log_options,
            **model["kwargs"],
        )
    apply_payload(handler, payload, str(path), resolved, strict_load=options["strict_load"],
                  skip_optimizer=options["skip_optimizer"], skip_history=options["skip_history"],
                  skip_ema=options["skip_ema"], load_weights=False)  # fmt: skip
    with _section(str(path), "shards"):
        _load_tensors(handler, path, record, skip_optimizer=options["skip_optimizer"],
                      skip_ema=options["skip_ema"])  # fmt: skip
    _restore_rank_rng(handler, rngs, str(path))
    handler._dist.barrier()
    handler._log(f"loaded sharded checkpoint {path!r} ({record['world_size']} ranks saved it)")
    return handler


def _load_tensors(
    h: NNHandler, path: str, record: dict[str, Any], *, skip_optimizer: bool, skip_ema: bool
) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    names = record.get("tensors")
    if not isinstance(names, dict) or not all(
        isinstance(v, list) and all(isinstance(n, str) for n in v) for v in names.values()
    ):
        raise CheckpointError(f"sharded checkpoint {path!r}: its record of saved tensors is "
                              "malformed", path=path, kind="damaged")  # fmt: skip
    saved = set(names)
    wanted = {"model"} | (saved & {"ema", "grads"})
    if skip_ema:
        wanted.discard("ema")
    if skip_optimizer:
        wanted.discard("grads")
    elif "optim" in saved and h.optimizer is not None:
        wanted.add("optim")
    state = {k: v for k, v in _tensor_state(h, for_load=names).items() if k in wanted}
    with warnings.catch_warnings():  # one process, no process group: intended, not news
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        reader = SafeReader(path)
        reader.read_metadata()  # a planted index is refused here, naming the file
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(),
                 no_dist=not h._dist.enabled)  # fmt: skip
    strict = StateDictOptions(strict=True)
    set_model_state_dict(h.module, state["model"], options=strict)
    if "optim" in state:
        set_optimizer_state_dict(h.module, h.optimizer, state["optim"])
    ts = h._state
    if ts is not None:
        from nnh.core.tree import flat_td

        changes: dict[str, Any] = {"opt_state": h._adapter.export_state(ts.params)}
        for key in ("ema", "grads"):
            if key in state:
                changes[key] = flat_td(state[key])
        h._state = attrs.evolve(ts, **changes)
    elif "ema" in state or "grads" in state:  # pragma: no cover - the payload has train_state
        h._log("the folder's EMA weights were not restored (no train state)", logging.WARNING)


def _restore_rank_rng(h: NNHandler, rngs: list[dict[str, Any]], path: str) -> None:
    """Each rank gets back its own RNG states (and a step checkpoint's running sums) when
    the world size is the saved one; on another number of ranks every rank takes rank 0's
    RNG states (already restored from the payload), and a mid-epoch position is refused."""
    if h._dist.world_size != len(rngs):
        if h._resume is not None:
            raise CheckpointError(
                f"sharded checkpoint {path!r} is a mid-epoch step checkpoint of a run on "
                f"{len(rngs)} ranks; its position (batches and running sums per rank) exists "
                f"only on {len(rngs)} ranks, not on {h._dist.world_size}. What to do: resume it "
                f"on {len(rngs)} ranks, or load an epoch checkpoint, which resumes on any number.",
                path=path,
                kind="world_size",
            )
        return
    mine = rngs[h._dist.rank]
    restore_rng(mine["global"])
    if h._resume is not None:
        from nnh.checkpoint.sections import check_resume

        base = {k: v for k, v in h._resume.items() if k != "source"}
        own = {**base, **{k: mine[k] for k in _PER_RANK if mine.get(k) is not None}}
        loader = h._train_loader
        checked = check_resume(own, len(loader) if loader is not None else None, path)
        h._resume = {**checked, "source": path}
