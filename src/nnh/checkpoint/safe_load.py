"""Reading checkpoint files safely.

Every file is read with ``torch.load(..., weights_only=True)``: only tensors, numbers,
strings, lists, tuples, dicts (and TensorDicts) can come out of it, and no code stored in
the file is ever run. Every way reading can fail becomes a :class:`CheckpointError` that
names the file, says what is wrong and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import pickletools
import re
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nnh.checkpoint.errors import CheckpointError
from nnh.checkpoint.format import FIRST_SEALED_VERSION, check_header, format_version, has_header
from nnh.checkpoint.integrity import INTEGRITY_KEY, verify

__all__ = ["load_checkpoint", "load_weights_file", "to_flat_state_dict"]

PathLike = str | os.PathLike[str]
MapLocation = str | torch.device | dict[str, str] | None

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
_MAX_SCAN_OPS = 200_000


def _ensure_tensordict_registered() -> None:
    # tensordict registers its reducers as weights_only-safe when imported; a TensorDict
    # stored in a checkpoint is refused by torch.load unless that happened first.
    with contextlib.suppress(ImportError):
        import tensordict  # noqa: F401


def _check_is_readable_file(path: Path) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        folder = path.parent
        hint = "" if folder.is_dir() else f" (the folder {str(folder)!r} does not exist either)"
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist{hint}. What to do: check the path and "
            "the working folder; relative paths are taken from the current directory "
            f"{os.getcwd()!r}.",
            path=path,
            kind="missing",
        ) from None
    except OSError as err:
        raise _unreadable(path, err) from err
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a folder, not a file. What to do: pass the "
            f"checkpoint file inside it{_folder_listing(path)}.",
            path=path,
            kind="not_a_file",
        )
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a regular file. What to do: pass the path of a "
            "file written by NNHandler.save or torch.save.",
            path=path,
            kind="not_a_file",
        )
    if info.st_size == 0:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is empty (0 bytes): its write was interrupted before "
            "any data reached the disk, or it was truncated. What to do: use an earlier "
            "checkpoint or save again.",
            path=path,
            kind="empty",
        )


def _folder_listing(folder: Path) -> str:
    try:
        names = sorted(p.name for p in folder.iterdir() if p.is_file())
    except OSError:
        return ""
    names = [n for n in names if not n.startswith(".")][:5]
    return f" (it holds: {', '.join(names)})" if names else " (it holds no files)"


def _unreadable(path: Path, err: OSError) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {str(path)!r} cannot be read: {err.strerror or err}. What to do: check "
        "the file's permissions and that its disk is mounted.",
        path=path,
        kind="unreadable",
    )


def _head(path: Path, n: int = 4) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(n)
    except OSError:
        return b""


def _pickle_globals(path: Path) -> list[str]:
    """Names of the globals a raw pickle refers to, found without unpickling anything."""
    names: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as handle:
            for count, (op, arg, _pos) in enumerate(pickletools.genops(handle)):
                if count > _MAX_SCAN_OPS:
                    break
                if isinstance(arg, str):
                    strings.append(arg)
                if op.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    names.append(".".join(strings[-2:]) if len(strings) >= 2 else "?")
    except Exception:  # a damaged pickle: report what was found so far
        pass
    return list(dict.fromkeys(names))


def _unsafe(path: Path, names: list[str]) -> CheckpointError:
    refs = f" (it refers to {', '.join(names[:5])})" if names else ""
    return CheckpointError(
        f"checkpoint {str(path)!r} contains objects other than tensors, numbers, strings, "
        f"lists and dicts{refs}. nnh refused to load it and did NOT execute anything from it: "
        "such objects run code when unpickled. What to do: if you wrote this file yourself, "
        "re-save only tensors and plain values (for example model.state_dict()); only if you "
        "fully trust its origin, open it yourself with torch.load(path, weights_only=False).",
        path=path,
        kind="unsafe",
    )


def _corrupt(path: Path, detail: str) -> CheckpointError:
    head = _head(path)
    if head[:4] == _ZIP_MAGIC:
        what = "is damaged or incomplete (truncated copy, interrupted download or write)"
    elif head[:1] == bytes([_PICKLE_PROTO]):
        what = "is a damaged pickle, or a pickle that is not a PyTorch checkpoint"
    else:
        what = "is not a PyTorch checkpoint (its bytes are not a torch.save file)"
    detail = detail.strip().splitlines()[0] if detail.strip() else "unexpected end of file"
    detail = detail.split(". ", 1)[0].rstrip(".")
    return CheckpointError(
        f"checkpoint {str(path)!r} {what}: {detail}. What to do: copy or download the file "
        "again, or use an earlier checkpoint; nnh writes atomically, so a previous complete "
        "checkpoint may still sit next to it.",
        path=path,
        kind="corrupt",
    )


def _exists(name: str) -> bool:
    """Whether the global ``name`` exists in an already imported module (imports nothing):
    a name that exists nowhere is damage, not a planted object."""
    module, _, attr = name.rpartition(".")
    found = sys.modules.get(module)
    return found is not None and hasattr(found, attr)


def _classify_unpickling(path: Path, err: BaseException) -> CheckpointError:
    message = str(err)
    named = _GLOBAL_RE.findall(message)
    if named and not any(_exists(n) for n in named):
        return _corrupt(path, f"it refers to {named[0][:80]!r}, which exists nowhere")
    if named:
        return _unsafe(path, list(dict.fromkeys(named)))
    if _head(path)[:1] == bytes([_PICKLE_PROTO]):
        found = _pickle_globals(path)
        if found:
            return _unsafe(path, found)
    cause = err.__cause__ or err.__context__
    return _corrupt(path, str(cause) if cause is not None else message)


def _classify_runtime(path: Path, err: RuntimeError) -> CheckpointError:
    message = str(err)
    if "deserialize object on" in message or ("device" in message and "available" in message):
        return CheckpointError(
            f"checkpoint {str(path)!r} holds tensors saved on a device this machine does not "
            f"have ({message.splitlines()[0]}). What to do: pass map_location='cpu' "
            "(or device='cpu') to load it here.",
            path=path,
            kind="device",
        )
    return _corrupt(path, message)


def _torch_load(path: Path, map_location: MapLocation, mmap: bool) -> Any:
    _ensure_tensordict_registered()
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise _classify_unpickling(path, err) from None
    except (EOFError, ValueError, KeyError, IndexError, UnicodeDecodeError, TypeError) as err:
        raise _corrupt(path, f"{type(err).__name__}: {err}") from None
    except RuntimeError as err:
        raise _classify_runtime(path, err) from None
    except OSError as err:
        if isinstance(err, PermissionError) or err.errno == errno.EIO:
            raise _unreadable(path, err) from None
        # e.g. EINVAL: torch seeks past the end of a truncated zip archive
        raise _corrupt(path, f"{type(err).__name__}: {err}") from None
    except (Exception, RecursionError) as err:  # e.g. AttributeError from a damaged opcode
        raise _corrupt(path, f"{type(err).__name__}: {err}") from None


#: Deepest nesting of containers a checkpoint may have (a genuine one stays under 20).
MAX_DEPTH = 100


def check_depth(payload: Any, path: PathLike | None = None, limit: int = MAX_DEPTH) -> None:
    """Raise :class:`CheckpointError` (kind ``"damaged"``) when containers in ``payload``
    nest deeper than ``limit``; iterative, so a 100,000-deep list cannot exhaust the stack.

    Example:
        >>> deep = []; x = deep
        >>> for _ in range(500):
        ...     x.append([]); x = x[0]
        >>> try:
        ...     check_depth(deep)
        ... except CheckpointError as err:
        ...     print(err.kind)
        damaged
    """
    stack: list[tuple[Any, int]] = [(payload, 0)]
    while stack:
        obj, depth = stack.pop()
        if depth > limit:
            where = "checkpoint" if path is None else f"checkpoint {os.fspath(path)!r}"
            raise CheckpointError(
                f"{where} nests lists or dicts more than {limit} levels deep; no checkpoint "
                "nnh writes does. The file was crafted or damaged; nnh used none of it. What "
                "to do: use a checkpoint written by NNHandler.save.",
                path=path,
                kind="damaged",
            )
        if isinstance(obj, Mapping) and not isinstance(obj, torch.Tensor):
            stack.extend((v, depth + 1) for v in obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend((v, depth + 1) for v in obj)


def load_checkpoint(
    path: PathLike,
    map_location: MapLocation = None,
    *,
    require_header: bool = True,
    mmap: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint file safely (``weights_only=True``) and check its format marker.

    With ``require_header=True`` (the default) the file must be an nnh checkpoint (see
    :func:`nnh.checkpoint.format.check_header`). With ``False`` any dict is accepted, but a
    file that does carry an nnh marker is still checked (e.g. for a newer format version)
    and its checksums are verified (:mod:`nnh.checkpoint.integrity`): a damaged file is
    refused before any of it is used.
    ``mmap=True`` maps the tensors from the file instead of reading them into memory.

    Raises :class:`CheckpointError` naming the file for: a missing path, a folder, an empty,
    truncated or random file, a file whose data no longer match their checksums, a file holding objects weights_only refuses (nothing in it is
    executed), a torch file that is not an nnh checkpoint, a newer format version, and
    tensors on a device this machine lacks.

    Example:
        >>> import tempfile, torch
        >>> from nnh.checkpoint import save_checkpoint
        >>> p = save_checkpoint({"step": 3}, f"{tempfile.mkdtemp()}/c.pth")
        >>> load_checkpoint(p, map_location="cpu")["step"]
        3
    """
    file = Path(path)
    _check_is_readable_file(file)
    payload = _torch_load(file, map_location, mmap)
    check_depth(payload, file)
    if require_header or has_header(payload):
        sealed = isinstance(payload, Mapping) and isinstance(payload.get(INTEGRITY_KEY), Mapping)
        if sealed:  # verified first: a damaged header is damage, not a newer format
            verify(payload, file)
        check_header(payload, file)
        if not sealed and format_version(payload) >= FIRST_SEALED_VERSION:
            verify(payload, file)
    elif not isinstance(payload, dict):
        raise CheckpointError(
            f"checkpoint {str(file)!r} holds a {type(payload).__name__}, not a dict. What to "
            "do: save a dict, e.g. torch.save(model.state_dict(), path).",
            path=file,
            kind="not_nnh",
        )
    return payload


def _is_extra_state(key: str) -> bool:
    return key == "_extra_state" or key.endswith("._extra_state")


def to_flat_state_dict(weights: object, path: PathLike | None = None) -> dict[str, torch.Tensor]:
    """Validate ``weights`` as a state_dict (``str -> Tensor``) and return it as a plain dict.

    A (nested) TensorDict is flattened with ``"."`` between key levels, which is the
    ``nn.Module.state_dict`` key form. ``_extra_state`` entries may hold any value.

    Example:
        >>> import torch
        >>> sorted(to_flat_state_dict({"w": torch.zeros(1), "b": torch.ones(1)}))
        ['b', 'w']
    """
    where = "the weights" if path is None else f"the weights in {os.fspath(path)!r}"
    from tensordict import TensorDictBase

    if isinstance(weights, TensorDictBase):
        weights = dict(weights.flatten_keys(".").items())
    if not isinstance(weights, Mapping):
        raise CheckpointError(
            f"{where} are a {type(weights).__name__}, not a state_dict (a dict of name -> "
            "tensor). What to do: save model.state_dict(), or an nnh checkpoint.",
            path=path,
            kind="bad_weights",
        )
    bad = [
        f"{k!r}: {type(v).__name__}"
        for k, v in weights.items()
        if not isinstance(k, str) or not (isinstance(v, torch.Tensor) or _is_extra_state(k))
    ]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(
            f"{where} are not a state_dict: every key must be a str and every value a tensor, "
            f"but found {', '.join(bad[:5])}{more}. What to do: save model.state_dict(), or "
            "an nnh checkpoint (which stores it under 'model_state_dict').",
            path=path,
            kind="bad_weights",
        )
    return dict(weights)


def _select_weights(payload: dict[str, Any], path: Path) -> object:
    if "model_state_dict" in payload:
        return payload["model_state_dict"]
    if has_header(payload):
        raise CheckpointError(
            f"nnh checkpoint {str(path)!r} has no 'model_state_dict' section. What to do: "
            "save the handler after set_model, or pass a file holding model weights.",
            path=path,
            kind="bad_weights",
        )
    state = payload.get("state_dict")
    if isinstance(state, Mapping) and not isinstance(state, torch.Tensor):
        return state  # e.g. a PyTorch Lightning checkpoint
    return payload


def load_weights_file(path: PathLike, map_location: MapLocation = None) -> dict[str, torch.Tensor]:
    """Load model weights from a bare ``state_dict`` file or from a full checkpoint.

    Full checkpoints (nnh or others) give their ``"model_state_dict"`` section (or a
    Lightning-style ``"state_dict"``); any other dict must itself be a state_dict.
    The result is validated as ``str -> Tensor``.

    Example:
        >>> import tempfile, torch
        >>> p = f"{tempfile.mkdtemp()}/w.pt"
        >>> torch.save(torch.nn.Linear(2, 1).state_dict(), p)
        >>> sorted(load_weights_file(p))
        ['bias', 'weight']
    """
    file = Path(path)
    payload = load_checkpoint(file, map_location, require_header=False)
    return to_flat_state_dict(_select_weights(payload, file), file)
