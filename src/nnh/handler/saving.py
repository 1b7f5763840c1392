"""Writing a handler's checkpoint: only good states, only onto files this run may replace.

:func:`write_checkpoint` is what ``NNHandler.save`` and every automatic save run. Before a
byte is written it checks, on every rank (the answer is the same on all of them):

* the state is finite: parameters, buffers, optimizer state and EMA weights, and for a
  mid-epoch checkpoint the running loss of the epoch (:func:`non_finite_state`). A recovery
  file is never replaced by a diverged state; the last good one stays;
* for automatic saves whose configuration came from a checkpoint file, that the target is
  free or a checkpoint of this run (:func:`nnh.checkpoint.ownership.may_replace`).

Then rank 0 writes the file atomically with its checksums and every rank learns whether it
succeeded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nnh.checkpoint import CheckpointError, save_checkpoint
from nnh.checkpoint.background import SaveHandle
from nnh.checkpoint.ownership import folder_may_receive, may_replace
from nnh.handler.persistence import handler_payload

if TYPE_CHECKING:  # pragma: no cover
    from nnh.handler import NNHandler

__all__ = [
    "NonFiniteStateError",
    "check_resume_batch_size",
    "non_finite_state",
    "submit_checkpoint",
    "wait_for_saves",
    "write_checkpoint",
]


class NonFiniteStateError(CheckpointError):
    """Refused to save: the state holds NaN or infinite values."""


def _named_tensors(handler: NNHandler) -> list[tuple[str, torch.Tensor]]:
    out = [(f"model {k}", v) for k, v in handler.module.state_dict().items()]
    optimizer = handler.optimizer
    if optimizer is not None:
        names = {id(p): n for n, p in handler.module.named_parameters()}
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    out.append((f"optimizer {key} of {names.get(id(param), '?')}", value))
    state = handler._state
    if state is not None and state.ema is not None:
        out += [(f"EMA {k}", v) for k, v in state.ema.items()]
    return [(n, t) for n, t in out if t.is_floating_point() or t.is_complex()]


def _sum(t: torch.Tensor) -> torch.Tensor:
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.element_size() < 4:  # float16/bfloat16 would overflow at 65504 / sum in float32
        return t.sum(dtype=torch.float32)
    return t.sum()


def non_finite_state(handler: NNHandler, resume: dict[str, Any] | None = None) -> list[str]:
    """Names of the state's tensors (and mid-epoch sums) holding NaN or inf; empty when good.

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
    """
    named = _named_tensors(handler)
    bad: list[str] = []
    if named:
        # A sum is finite when every element is (one fast pass, no bool copy of the state);
        # a non-finite sum may also be an overflow of large finite values, so those few
        # tensors are confirmed element by element.
        device = named[0][1].device  # one transfer (one sync) for the whole state
        sums = torch.stack([_sum(t).float().to(device) for _, t in named]).cpu()
        suspects = (~torch.isfinite(sums)).nonzero().flatten().tolist()
        bad = [named[i][0] for i in suspects if not bool(torch.isfinite(named[i][1]).all())]
    if resume is not None:
        loss = resume.get("sums", {}).get("loss")
        # one running loss, or one per ensemble member
        if loss is not None and not bool(torch.isfinite(torch.as_tensor(loss)).all()):
            bad.append("the epoch's running loss")
    return bad


def write_checkpoint(
    handler: NNHandler,
    path: str,
    *,
    resume: dict[str, Any] | None = None,
    include_datasets: bool = True,
    guard_replace: bool = False,
) -> None:
    """Check, then write ``handler``'s checkpoint to ``path`` on rank 0; every rank returns
    or raises together.

    Raises :class:`NonFiniteStateError` (nothing written) when the state is not finite, and
    :class:`CheckpointError` (kind ``"not_owned"``) when ``guard_replace`` (settings read
    from a checkpoint file) and ``path`` is a file this run did not write, or lies in a
    folder the file chose (see :func:`_check_replace`).
    """
    _refuse_non_finite(handler, path, resume)
    dist = handler._dist
    error: BaseException | None = None
    if dist.is_main:
        try:
            _check_replace(handler, path, guard_replace)
            save_checkpoint(
                handler_payload(handler, include_datasets=include_datasets, resume=resume), path
            )
            handler._log(f"saved {path}")
        except BaseException as err:  # every rank must learn of it
            error = err
    failed = dist.any_true(error is not None, handler.device)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"saving {path} failed on rank 0; see its error")


def submit_checkpoint(
    handler: NNHandler,
    path: str,
    *,
    resume: dict[str, Any] | None = None,
    include_datasets: bool = True,
    guard_replace: bool = False,
    after: Callable[[Path], None] | None = None,
) -> SaveHandle:
    """Like :func:`write_checkpoint`, but the file is written by the handler's background
    writer: the state is snapshotted now, the call returns a :class:`SaveHandle`.

    The checks (finite state, ownership) run now, on the caller's thread. Under DDP only
    rank 0 snapshots and writes; the other ranks get a completed handle at once and never
    wait for the write. ``after(path)`` runs on the writer thread once the file is written.
    """
    _refuse_non_finite(handler, path, resume)
    if not handler._dist.is_main:
        done = SaveHandle(Path(path))
        done._future.set_result(Path(path))
        return done
    _check_replace(handler, path, guard_replace)
    payload = handler_payload(handler, include_datasets=include_datasets, resume=resume)
    # embedded datasets are not copied: training never modifies them
    handle = handler._background_writer().submit(payload, path, after=after, share=_SHARED)
    handler._log(f"saving {path} in the background")
    return handle


_SHARED = frozenset({"data"})


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
    if not may_replace(path, run_id=handler._run_id):
        raise CheckpointError(
            f"did not write checkpoint {path!r}: a file of that name exists and was not "
            "written by this run. The automatic-save settings came from a checkpoint "
            "file, and nnh never replaces a file on a file's say-so. What to do: call "
            "handler.auto_save(...) (or set the callback's folder) to confirm where to "
            "save, or move that file.",
            path=path,
            kind="not_owned",
        )


def _refuse_non_finite(handler: NNHandler, path: str, resume: dict[str, Any] | None) -> None:
    bad = non_finite_state(handler, resume)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteStateError(
            f"did not write checkpoint {path!r}: the state is not finite ({shown} hold NaN or "
            "inf). A diverged state is never saved, so the last good checkpoint stays. What "
            "to do: lower the learning rate, clip gradients (gradient_clipping_norm=...), or "
            "check the data and the loss; then resume from the last good checkpoint.",
            path=path,
            kind="non_finite",
        )


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
    writer = handler.__dict__.get("_saves")
    if writer is None:
        return
    errors = writer.wait(timeout)
    if errors:
        raise errors[0]


def raise_save_failures(handler: NNHandler) -> None:
    """Raise the error of a background save that has failed since the last check."""
    writer = handler.__dict__.get("_saves")
    if writer is None:
        return
    errors = writer.failures()
    if errors:
        raise errors[0]
