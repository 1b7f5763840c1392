"""Writing a handler's checkpoint: only good states, only onto files this run may replace.

:func:`write_checkpoint` is what ``NNHandler.save`` and every automatic save run. Before a
byte is written it checks, on every rank (the answer is the same on all of them):

* the state is finite: parameters, buffers, optimizer state and hyper-parameters (every
  float of ``param_groups``), EMA weights, the loss-scaler state, the gradients of an open
  accumulation window, and for a mid-epoch checkpoint the running loss of the epoch
  (:mod:`nnh.handler.finite`). A recovery
  file is never replaced by a diverged state; the last good one stays (a background save
  checks its snapshot on the writer thread instead);
* for automatic saves whose configuration came from a checkpoint file, that the target is
  free or a checkpoint of this run (:func:`owner_allows`). That check runs when the save is
  asked for (an early, clear error) and again at the rename, under an exclusive lock on
  the target that every guarded nnh writer takes (:func:`nnh.checkpoint.atomic_save`'s
  ``before_replace``): two runs, in one process or two, saving to one name never replace
  each other's file. The loser's write fails with kind ``"not_owned"`` (for a background
  save: raised by the next call) and its temporary file is removed.

Then rank 0 writes the file atomically with its checksums and every rank learns whether it
succeeded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnh.checkpoint import CheckpointError, save_checkpoint
from nnh.checkpoint.background import SaveHandle, defer_spec
from nnh.checkpoint.ownership import folder_may_receive, may_replace
from nnh.handler.finite import (
    NonFiniteStateError,
    non_finite_error,
    non_finite_snapshot,
    non_finite_state,
    optimizer_param_names,
)
from nnh.handler.full_state import is_sharded, write_full_checkpoint
from nnh.handler.persistence import handler_payload
from nnh.handler.sharded_async import submit_sharded
from nnh.handler.sharded_io import write_sharded

if TYPE_CHECKING:  # pragma: no cover
    from nnh.handler import NNHandler

__all__ = [
    "NonFiniteStateError",
    "check_resume_batch_size",
    "non_finite_state",
    "owner_allows",
    "submit_checkpoint",
    "wait_for_saves",
    "write_checkpoint",
    "write_step_checkpoint",
]


def write_checkpoint(
    handler: NNHandler,
    path: str,
    *,
    resume: dict[str, Any] | None = None,
    include_datasets: bool = True,
    guard_replace: bool = False,
    full: bool = False,
) -> None:
    """Check, then write ``handler``'s checkpoint to ``path`` on rank 0; every rank returns
    or raises together. ``full`` under FSDP: one ordinary file gathered from the shards
    (:mod:`nnh.handler.full_state`); elsewhere the ordinary file anyway.

    Raises :class:`NonFiniteStateError` (nothing written) when the state is not finite, and
    :class:`CheckpointError` (kind ``"not_owned"``) when ``guard_replace`` (settings read
    from a checkpoint file) and ``path`` is a file this run did not write, or lies in a
    folder the file chose (see :func:`_check_replace`).
    """
    if not isinstance(full, bool):
        raise TypeError(f"save(full=...) must be True or False, got {full!r}")
    if full and is_sharded(handler.module):  # FSDP, one file: gathered to rank 0
        write_full_checkpoint(handler, path, include_datasets=include_datasets, resume=resume,
                              guard_replace=guard_replace)  # fmt: skip
        return
    if is_sharded(handler.module):  # FSDP: a folder of per-rank shards
        write_sharded(handler, path, resume=resume, include_datasets=include_datasets,
                      guard_replace=guard_replace)  # fmt: skip
        return
    _refuse_non_finite(handler, path, resume)
    dist = handler._dist
    error: BaseException | None = None
    if dist.is_main:
        try:
            _check_replace(handler, path, guard_replace)
            payload = handler_payload(handler, include_datasets=include_datasets, resume=resume)
            _writer(handler, path, guard_replace)(payload, Path(path))
            handler._log(f"saved {path}")
        except BaseException as err:  # every rank must learn of it
            error = err
    failed = dist.any_true(error is not None, handler.device)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"saving {path} failed on rank 0; see its error")


def write_step_checkpoint(
    handler: NNHandler,
    path: str,
    *,
    resume: dict[str, Any],
    guard_replace: bool = False,
    background: bool = False,
) -> None:
    """Write a mid-epoch checkpoint (``background``: submit it); a non-finite state is
    reported as a warning and training goes on (the last good file stays).

    Example:
        >>> import tempfile, warnings, torch
        >>> from torch import nn
        >>> from nnh import NNHandler
        >>> h = NNHandler(nn.Linear, in_features=2, out_features=1, model_type="regression")
        >>> with torch.no_grad():
        ...     _ = h.module.bias.fill_(float("nan"))
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     write_step_checkpoint(h, f"{tempfile.mkdtemp()}/s.pth", resume={"epoch": 1})
        >>> "not finite (model bias" in str(caught[0].message)
        True
    """
    if background:
        submit_checkpoint(handler, path, resume=resume, guard_replace=guard_replace,
                          in_training=True, warn_if_refused=True)  # fmt: skip
        return
    try:
        write_checkpoint(handler, path, resume=resume, guard_replace=guard_replace)
    except NonFiniteStateError as err:
        handler._warn(str(err))


def submit_checkpoint(
    handler: NNHandler,
    path: str,
    *,
    resume: dict[str, Any] | None = None,
    include_datasets: bool = True,
    guard_replace: bool = False,
    after: Callable[[Path], None] | None = None,
    in_training: bool = False,
    warn_if_refused: bool = False,
    full: bool = False,
) -> SaveHandle:
    """Like :func:`write_checkpoint`, but the file is written by the handler's background
    writer: the state is snapshotted now, the call returns a :class:`SaveHandle`.

    The ownership check runs now, on the caller's thread, and again on the writer thread at
    the rename (under the target's lock); the finite check runs on the writer thread, over
    the snapshot (a non-finite state is not written, and the handle
    fails with :class:`NonFiniteStateError`). Under DDP only rank 0 snapshots and writes;
    the other ranks get a completed handle at once and never wait for the write.
    ``after(path)`` runs on the writer thread once the file is written.

    ``in_training``: an automatic save inside ``train()``. Then the optimizer's moments and
    the EMA weights, which only the optimizer's next ``step()`` changes, are copied on the
    writer's stager thread while training goes on, and that step waits for the copy
    (:meth:`nnh.checkpoint.background.BackgroundWriter.hold`); and while the machine has no
    core to spare for the writer, such a save is written inline, as a blocking one
    (:mod:`nnh.checkpoint.pacing`). ``warn_if_refused``: a
    non-finite state is reported as a warning (as a blocking step checkpoint does), not
    raised by the next call.
    """
    if full and is_sharded(handler.module):
        raise ValueError(
            f"save({path!r}, full=True, blocking=False): one file gathered from FSDP shards is "
            "written blocking only (every rank joins the gathers); use blocking=True"
        )
    if is_sharded(handler.module):  # FSDP: staged now, written in the background (sharded_async)
        return submit_sharded(handler, path, resume=resume, include_datasets=include_datasets,
                              guard_replace=guard_replace, after=after,
                              warn_if_refused=warn_if_refused)  # fmt: skip
    if not handler._dist.is_main:
        done = SaveHandle(Path(path))
        done._future.set_result(Path(path))
        return done
    _check_replace(handler, path, guard_replace)
    payload = handler_payload(handler, include_datasets=include_datasets, resume=resume)
    writer = handler._background_writer()
    optimizer = handler.optimizer
    defer = in_training and optimizer is not None and writer.hold(optimizer)
    param_name = optimizer_param_names(handler)

    def check(snapshot: dict[str, Any]) -> None:
        bad = non_finite_snapshot(snapshot, param_name)
        if bad:
            raise non_finite_error(path, bad)

    def saved(written: Path) -> None:  # on the writer thread, once the file is on disk
        handler._log(f"saved {written}")
        if after is not None:
            after(written)

    handle = writer.submit(
        payload,
        path,
        after=saved,
        share=_SHARED,  # embedded datasets are not copied: training never modifies them
        defer=_DEFERRED if defer else None,
        check=check,
        on_refused=(lambda err: handler._warn(str(err))) if warn_if_refused else None,
        write=_writer(handler, path, guard_replace) if guard_replace else None,
        paced=in_training,  # written inline while no core is free (nnh.checkpoint.pacing)
    )
    if not handle.inline:
        handler._log(f"saving {path} in the background")
    return handle


_SHARED = frozenset({"data"})
# changed in place only by the optimizer's step (which BackgroundWriter.hold makes wait)
_DEFERRED = defer_spec(("optimizer", "state_dict", "state"), ("train_state", "ema"))


def _check_replace(handler: NNHandler, path: str, guard_replace: bool) -> None:
    """For automatic saves configured by a loaded file: the folder and the file must be this
    run's to write (:mod:`nnh.checkpoint.ownership`)."""
    if not guard_replace:
        return
    folder = Path(path).parent
    if not folder_may_receive(folder, run_id=handler._run_id):
        raise CheckpointError(
            f"did not write checkpoint {path!r}: its folder {str(folder)!r} came from a "
            "checkpoint file and is neither under the working folder nor a folder where this "
            "run saved before; nnh does not write where a file says on its own authority. "
            "What to do: call handler.auto_save(...) (or set the callback's folder) to "
            "confirm where to save.",
            path=path,
            kind="not_owned",
        )
    if not owner_allows(path, handler._run_id):
        raise _not_owned(path)


def owner_allows(path: str | Path, run_id: str) -> bool:
    """Whether run ``run_id`` may write ``path``: it is free, or a checkpoint of this run.

    The one place every save asks (before writing and again at the rename), so that what
    counts as "this run's" is decided in :func:`nnh.checkpoint.ownership.may_replace` alone.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> owner_allows(d / "new.pth", "r1")
        True
        >>> _ = (d / "notes.pth").write_text("not a checkpoint")
        >>> owner_allows(d / "notes.pth", "r1")
        False
    """
    return may_replace(path, run_id=run_id)


def _not_owned(path: str | Path, at_rename: bool = False) -> CheckpointError:
    when = " (it was written by another run while this save was under way)" if at_rename else ""
    return CheckpointError(
        f"did not write checkpoint {str(path)!r}: a file of that name exists and was not "
        f"written by this run{when}. The automatic-save settings came from a checkpoint "
        "file, and nnh never replaces a file on a file's say-so. What to do: call "
        "handler.auto_save(...) (or set the callback's folder) to confirm where to "
        "save, or move that file.",
        path=path,
        kind="not_owned",
    )


def _writer(
    handler: NNHandler, path: str, guard_replace: bool
) -> Callable[[dict[str, Any], Path], Any]:
    """The function that writes a checkpoint payload to ``path``: with ``guard_replace``,
    one that checks ownership again at the rename, under the target's lock."""
    if not guard_replace:
        return save_checkpoint
    run_id = handler._run_id  # the run the payload records

    def refuse_if_not_owned(final: Path) -> None:
        if not owner_allows(final, run_id):
            raise _not_owned(path, at_rename=True)

    def write(payload: dict[str, Any], target: Path) -> Path:
        # what save_checkpoint writes (signed), with the ownership check at the rename
        return save_checkpoint(payload, target, before_replace=refuse_if_not_owned)

    return write


def _refuse_non_finite(handler: NNHandler, path: str, resume: dict[str, Any] | None) -> None:
    bad = non_finite_state(handler, resume)
    if bad:
        raise non_finite_error(path, bad)


def check_resume_batch_size(resume: dict[str, Any], loader: Any) -> None:
    """Refuse to resume a step checkpoint with a train loader of another batch size.

    The checkpoint's position is a count of batches; with another batch size the same count
    would skip a different number of samples and the run would silently diverge from the
    interrupted one.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> check_resume_batch_size({"batch_size": 8, "batch_offset": 10, "epoch": 3},
        ...                         DataLoader(range(100), batch_size=8))   # same: fine
        >>> try:
        ...     check_resume_batch_size({"batch_size": 8, "batch_offset": 10, "epoch": 3},
        ...                             DataLoader(range(100), batch_size=32))
        ... except CheckpointError as err:
        ...     print(err.kind)
        batch_size
    """
    saved = resume.get("batch_size")
    current = getattr(loader, "batch_size", None)
    if saved is None or current is None or saved == current:
        return
    offset = resume.get("batch_offset", 0)
    raise CheckpointError(
        f"cannot resume the step checkpoint{_source(resume)}: it stopped in epoch "
        f"{resume.get('epoch')} after {offset} batches of {saved} samples ({offset * saved} "
        f"samples), but the train loader now has batch_size={current}, so the same position "
        "does not exist and the continuation would not be the interrupted run. What to do: "
        f"set the train loader back to batch_size={saved} to resume exactly, or start the "
        "epoch over with the new batch size by loading the last epoch checkpoint instead.",
        path=resume.get("source"),
        kind="batch_size",
    )


def _source(resume: dict[str, Any]) -> str:
    source = resume.get("source")
    return f" {source!r}" if source else ""


def wait_for_saves(handler: NNHandler, timeout: float | None = None) -> None:
    """Wait for the handler's background saves; raise the first one's error (naming its file)."""
    errors = [err for w in _writers(handler) for err in w.wait(timeout)]
    if errors:
        raise errors[0]


def raise_save_failures(handler: NNHandler) -> None:
    """Raise the error of a background save that has failed since the last check; the
    deferred copies of earlier saves are complete when this returns (it runs at every call
    into the handler that may change its state)."""
    writer = handler.__dict__.get("_saves")
    if writer is not None:
        writer.wait_staged()
    errors = [err for w in _writers(handler) for err in w.failures()]
    if errors:
        raise errors[0]


def _writers(handler: NNHandler) -> list[Any]:
    """The handler's background writers: files (BackgroundWriter), FSDP folders (ShardedSaver)."""
    found = (handler.__dict__.get("_saves"), handler.__dict__.get("_sharded_saves"))
    return [w for w in found if w is not None]
