"""Paths read from a checkpoint are confined to the working folder before nnh uses them.

A checkpoint is data from a stranger (see ``docs/checkpoints.md``, *The trust model*): a
value it holds may *select* a file or folder for a restored callback, the AutoSaver or the
log, but never one outside the folders the user works in. These functions are pure checks
over values read from a file; the loader calls them before anything is built and reports
their warnings. Nothing here creates, opens or deletes a file.

A path is **confined** when, with every symbolic link resolved (:func:`os.path.realpath`,
also through the nearest existing ancestor of a path that does not exist yet, and through a
final component that is a link), it lies inside one of the allowed folders (by default the
current working folder) and it is not a *special place*:

* a hidden component (``.git``, ``.ssh``, ``.venv``, ``.bashrc`` ...) below the folder;
* a Python installation folder (``sys.prefix``, ``site-packages``, the ``sysconfig`` paths,
  ``__pycache__``) or a system folder (``/dev``, ``/proc``, ``/etc`` ...) below the folder;
* for a file: a name that programs execute or read as configuration (``*.py``, ``*.pth``,
  ``*.sh``, ``Makefile``, ``pyproject.toml`` ...), or an existing thing that is not a
  regular file; for a folder: an existing thing that is not a folder.

Refused outright: anything but a ``str`` (or ``os.PathLike`` giving one), the empty string,
NUL and other control characters, more than 4096 characters, URLs (``s3://...``) and any
``~`` at the start (``~`` is never expanded). The checks cannot close a race with another
process that swaps a folder for a link after the check; they stop a file from *naming* a
place, which is the threat here.

Example:
    >>> import tempfile
    >>> work = tempfile.mkdtemp()  # default: the current working folder
    >>> confine_path("runs/log.csv", record="callbacks[0].config.filename", source="a.pth",
    ...              base=work)
    ('runs/log.csv', None)
    >>> path, warning = confine_path("/etc/passwd", record="logging.filename", source="a.pth",
    ...                              base=work)
    >>> path is None and "outside the working folder" in warning
    True
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import reprlib
import string
import sys
import sysconfig
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "MAX_PATH_CHARS",
    "confine_auto_saver",
    "confine_callback_config",
    "confine_path",
    "name_pattern_problem",
    "path_problem",
    "safe_repr",
    "working_folders",
]

#: Longer values are refused without looking at them further.
MAX_PATH_CHARS = 4096

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

# File names that a program runs or reads as code or configuration when they appear.
_CODE_SUFFIXES = frozenset(
    [
        ".py",
        ".pyc",
        ".pyo",
        ".pyw",
        ".pyi",
        ".pth",
        ".pyd",
        ".so",
        ".dll",
        ".dylib",
        ".sh",
        ".bash",
        ".zsh",
        ".fish",
        ".csh",
        ".ksh",
        ".ps1",
        ".psm1",
        ".bat",
        ".cmd",
        ".com",
        ".exe",
        ".msi",
        ".vbs",
        ".js",
        ".mjs",
        ".jar",
        ".desktop",
        ".service",
        ".timer",
        ".plist",
        ".command",
        ".app",
        ".lnk",
        ".reg",
        ".scr",
        ".ipynb",
    ]
)
_CONFIG_NAMES = frozenset(
    [
        "makefile",
        "gnumakefile",
        "dockerfile",
        "containerfile",
        "justfile",
        "procfile",
        "vagrantfile",
        "pyproject.toml",
        "setup.cfg",
        "tox.ini",
        "pytest.ini",
        "noxfile.py",
        "conftest.py",
        "requirements.txt",
        "crontab",
        "authorized_keys",
    ]
)
_SPECIAL_COMPONENTS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_SYSTEM_FOLDERS = (
    "/dev", "/proc", "/sys", "/etc", "/boot", "/run", "/var", "/usr", "/bin", "/sbin",
    "/lib", "/lib64", "/opt", "/root", "/srv", "/snap",
)  # fmt: skip


def safe_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` fit for one line of a message: at most ``limit`` characters, with
    every control or line-breaking character escaped.

    Example:
        >>> safe_repr("a\\nb")
        "'a\\\\nb'"
        >>> len(safe_repr("x" * 500)) <= 80
        True
        >>> safe_repr("\\u202eevil")
        "'\\\\u202eevil'"
    """
    if isinstance(value, str):
        text = repr(value[: limit + 8])
    else:
        short = reprlib.Repr()
        short.maxstring = short.maxother = limit
        text = short.repr(value)
    text = _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def working_folders(source: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
    """The folders a checkpoint's paths may point into: the working folder, then the folder
    holding the checkpoint file ``source`` (where a resumed run's own logs and checkpoints
    usually live) unless that folder is the file-system root, the home folder or above it.

    Pass the result as ``base`` to :func:`confine_path` and the ``confine_*`` functions:
    relative values are interpreted against the first folder, the working folder, where
    nnh uses them.

    Example:
        >>> import os, tempfile
        >>> elsewhere = tempfile.mkdtemp()
        >>> ckpt = os.path.join(elsewhere, "run.pth"); open(ckpt, "w").close()
        >>> working_folders(ckpt) == (os.getcwd(), os.path.realpath(elsewhere))
        True
        >>> working_folders(None) == (os.getcwd(),)
        True
    """
    cwd = os.getcwd()
    if source is None:
        return (cwd,)
    try:
        text = os.fspath(source)
    except TypeError:
        return (cwd,)
    if not isinstance(text, str) or not os.path.isfile(text):
        return (cwd,)
    folder = os.path.dirname(os.path.realpath(text))
    home = os.path.realpath(os.path.expanduser("~"))
    if (
        folder == os.path.dirname(folder)
        or _within(home, folder)
        or any(
            _within(folder, special) for special in _special_folders() - {os.path.realpath("/var")}
        )
        or _SPECIAL_COMPONENTS & set(folder.lower().split(os.sep))
    ):
        return (cwd,)
    return (cwd,) if _within(folder, os.path.realpath(cwd)) else (cwd, folder)


def _within(path: str, root: str) -> bool:
    """Whether the absolute, resolved ``path`` is ``root`` or lies below it."""
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives, or a mix of absolute and relative
        return False


def _bases(base: Any) -> list[str]:
    if base is None:
        return [os.getcwd()]
    if isinstance(base, (str, os.PathLike)):
        return [os.path.abspath(os.fspath(base))]
    return [os.path.abspath(os.fspath(b)) for b in base]


def _special_folders() -> set[str]:
    found = {sys.prefix, sys.base_prefix, sys.exec_prefix, *_SYSTEM_FOLDERS}
    for name in ("purelib", "platlib", "stdlib", "platstdlib", "scripts", "include"):
        with contextlib.suppress(KeyError):  # every scheme has these
            found.add(sysconfig.get_path(name))
    return {os.path.realpath(f) for f in found if f}


def _path_problem(value: object, kind: str, bases: list[str]) -> str | None:
    """Why ``value`` is not a confined path (``None`` when it is)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        return f"is a {type(value).__name__}, not a path string"
    if not value:
        return "is empty"
    if len(value) > MAX_PATH_CHARS:
        return f"is longer than {MAX_PATH_CHARS} characters"
    if "\x00" in value:
        return "contains a NUL byte"
    if _CONTROL.search(value):
        return "contains control or line-breaking characters"
    if "://" in value:
        return "is a URL, not a local path"
    if value.replace("\\", "/").split("/", 1)[0].startswith("~"):
        return "starts with '~' (nnh never expands '~' in a path from a file)"
    roots = [os.path.realpath(b) for b in bases]
    resolved = os.path.realpath(os.path.join(roots[0], value))
    if os.path.islink(resolved):
        return "is a symbolic link that cannot be resolved (a loop)"
    inside = [r for r in roots if _within(resolved, r)]
    if not inside:
        where = "the working folder" if len(roots) == 1 else f"the allowed folders {roots}"
        return f"resolves to {safe_repr(resolved)}, outside {where}"
    root = max(inside, key=len)
    rel = os.path.relpath(resolved, root)
    parts = [] if rel == os.curdir else rel.split(os.sep)
    for part in parts:
        if part.startswith("."):
            return f"leads into the hidden file or folder {part!r}"
        if part.lower() in _SPECIAL_COMPONENTS:
            return f"leads into the Python folder {part!r}"
    for special in _special_folders():
        if special != root and _within(special, root) and _within(resolved, special):
            return f"leads into {special!r}, a Python installation or system folder"
    if kind in ("file", "checkpoint"):  # "checkpoint": a stored .pth file nnh wrote
        name = os.path.basename(resolved).lower()
        code = os.path.splitext(name)[1] in _CODE_SUFFIXES or name in _CONFIG_NAMES
        if code and not (kind == "checkpoint" and name.endswith(".pth")):
            return "names a file that programs run or read as code or configuration"
        if os.path.lexists(resolved) and not os.path.isfile(resolved):
            return "is an existing folder or special file, not a regular file"
    elif os.path.lexists(resolved) and not os.path.isdir(resolved):
        return "is an existing file, not a folder"
    return None


def path_problem(
    value: object,
    *,
    base: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
    kind: str = "file",
) -> str | None:
    """Why :func:`confine_path` would refuse ``value`` (a phrase such as ``"is empty"``),
    or ``None`` when it is confined.

    Example:
        >>> import tempfile
        >>> work = tempfile.mkdtemp()
        >>> path_problem("a\\x00b", base=work), path_problem("train.log", base=work)
        ('contains a NUL byte', None)
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    return _path_problem(value, kind, _bases(base))


def _reset_message(
    value: object, problem: str, *, record: str, source: str | None, outcome: str, fix: str
) -> str:
    return (
        f"checkpoint {safe_repr(source or '<unnamed>')}: {record} = {safe_repr(value)} {problem}; "
        f"{outcome}. What to do: {fix}"
    )


_GENERIC_FIX = (
    "if you trust this file, pass the path yourself after loading, e.g. "
    "handler.auto_save(..., save_path=...), or add the callback again with "
    "handler.add_callback(...)"
)


def confine_path(
    value: object,
    *,
    record: str,
    source: str | None,
    base: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
    kind: str = "file",
) -> tuple[str | None, str | None]:
    """Confine a path read from a checkpoint: ``(path, None)`` or ``(None, warning)``.

    ``path`` is ``value`` as given (``os.fspath`` of a PathLike), accepted because it
    resolves inside ``base`` (default: the current working folder; a sequence of folders,
    e.g. :func:`working_folders`, allows any of them, relative values being interpreted
    against the first) and is no special place (see the module docstring). ``kind`` is
    ``"file"`` or ``"dir"``. Otherwise ``path`` is ``None`` and ``warning`` names the
    checkpoint ``source``, the ``record`` (``"callbacks[0].config.filename"``), the value
    (shown safely, shortened), why it was refused, that it was reset, and how to restore it.

    Example:
        >>> import tempfile
        >>> work = tempfile.mkdtemp()  # default: the current working folder
        >>> confine_path("ckpt", record="auto_saver.save_path", source="a.pth", kind="dir",
        ...              base=work)
        ('ckpt', None)
        >>> path, warning = confine_path("../x.csv", record="r", source="a.pth", base=work)
        >>> path, "'../x.csv' resolves to" in warning, "outside the working folder" in warning
        (None, True, True)
        >>> confine_path("~/.bashrc", record="r", source="a.pth", base=work)[0] is None
        True
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"confine_path kind must be 'file' or 'dir', got {kind!r}")
    problem = _path_problem(value, kind, _bases(base))
    if problem is None:
        return os.fspath(value), None  # type: ignore[arg-type]
    return None, _reset_message(
        value, problem, record=record, source=source, outcome="it was reset", fix=_GENERIC_FIX
    )


def name_pattern_problem(value: object) -> str | None:
    """Why ``value`` is not a safe file-name pattern (``None`` when it is).

    A pattern is a non-empty ``str.format`` template of at most 255 characters, without
    path separators, control characters or a leading ``~``, not ``.``/``..``, whose fields
    are plain names (``{epoch:03d}``, ``{val_loss:.4f}``): no attribute or index access
    (``{loss.__class__}``) and no nested fields in a format spec, so that filling it can
    never produce a path or reveal anything but the logged values.

    Example:
        >>> name_pattern_problem("best_{epoch:03d}_{val_loss:.4f}") is None
        True
        >>> name_pattern_problem("../{epoch}")
        'contains a path separator'
        >>> name_pattern_problem("{loss.__class__}")
        "uses '{loss.__class__}': only plain field names are allowed"
    """
    if not isinstance(value, str):
        return f"is a {type(value).__name__}, not a string"
    if not value or len(value) > 255:
        return "must have 1 to 255 characters"
    if _CONTROL.search(value):
        return "contains control or line-breaking characters"
    if "/" in value or "\\" in value or "://" in value:
        return "contains a path separator"
    if value in (".", "..") or value.startswith("~"):
        return "is not a file name"
    try:
        fields = list(string.Formatter().parse(value))
    except ValueError as err:
        return f"is not a valid format string ({err})"
    for _, field, spec, _ in fields:
        if field is None:
            continue
        if not field.isidentifier():
            return f"uses {'{' + field + '}'!r}: only plain field names are allowed"
        if spec and ("{" in spec or "}" in spec):
            return f"nests a field in the format spec of {field!r}"
    return None


# ---------------------------------------------------------------------------------- callbacks
_CSV_SEPARATORS = (",", ";", "\t", "|")


def _nnh_path_options(cls: type) -> tuple[dict[str, str], tuple[str, ...]]:
    """``({option: kind}, name-pattern options)`` of the nnh callback ``cls`` (or a subclass)."""
    from nnh.callbacks.csv_logger import CSVLogger
    from nnh.callbacks.model_checkpoint import ModelCheckpoint
    from nnh.callbacks.tensorboard import TensorBoardLogger

    if not isinstance(cls, type):
        return {}, ()
    if issubclass(cls, CSVLogger):
        return {"filename": "file"}, ()
    if issubclass(cls, TensorBoardLogger):
        return {"log_dir": "dir"}, ()
    if issubclass(cls, ModelCheckpoint):
        return {"dirpath": "dir"}, ("filename",)
    return {}, ()


def _default(cls: type, option: str) -> tuple[bool, Any]:
    """``(has_default, default)`` of a constructor option."""
    try:
        param = inspect.signature(cls.__init__).parameters.get(option)
    except (TypeError, ValueError):  # pragma: no cover - a class without a signature
        return False, None
    if param is None or param.default is inspect.Parameter.empty:
        return False, None
    return True, param.default


def confine_callback_config(
    cls: type,
    config: dict,
    *,
    record: str,
    source: str | None,
    base: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
) -> tuple[dict | None, list[str]]:
    """The constructor options of a restored callback with every path confined.

    For nnh's callbacks that write files (and their subclasses): ``CSVLogger.filename``
    (a file), ``TensorBoardLogger.log_dir`` (a folder; ``comment``, appended to it, must be
    free of separators and keep the folder confined), ``ModelCheckpoint.dirpath`` (a
    folder) and ``ModelCheckpoint.filename`` (a file-name pattern, see
    :func:`name_pattern_problem`); ``CSVLogger.separator`` must be one of ``, ; \\t |``.
    A refused optional option is reset to the class default, with a warning; a refused
    required one (``filename``, ``dirpath``) gives ``None``: drop that callback and report
    the warnings. Options of other classes pass unchanged (their paths are not known).
    ``record`` is the callback's record (``"callbacks[0]"``); ``base`` as in
    :func:`confine_path`. ``config`` is never modified.

    Example:
        >>> import tempfile
        >>> from nnh.callbacks import CSVLogger, EarlyStopping
        >>> work = tempfile.mkdtemp()  # default: the current working folder
        >>> confine_callback_config(CSVLogger, {"filename": "log.csv", "separator": ";"},
        ...                         record="callbacks[0]", source="a.pth", base=work)
        ({'filename': 'log.csv', 'separator': ';'}, [])
        >>> config, warnings = confine_callback_config(CSVLogger, {"filename": "/etc/cron.d/x"},
        ...     record="callbacks[0]", source="a.pth", base=work)
        >>> config, "callbacks[0].config.filename" in warnings[0]
        (None, True)
        >>> confine_callback_config(EarlyStopping, {"patience": 3}, record="callbacks[1]",
        ...                         source="a.pth")
        ({'patience': 3}, [])
    """
    paths, patterns = _nnh_path_options(cls)
    if not paths and not patterns:
        return config, []
    name = getattr(cls, "__name__", "callback")
    again = f"if you trust this file, add the callback again yourself: handler.add_callback({name}(...))"
    if not isinstance(config, Mapping):
        return None, [
            _reset_message(
                config, "is not a dict of options", record=f"{record}.config", source=source,
                outcome=f"the {name} callback was dropped", fix=again,
            )
        ]  # fmt: skip
    out = dict(config)
    warnings: list[str] = []
    bases = _bases(base)

    def refuse(option: str, value: object, problem: str) -> bool:
        """Reset ``option`` to its class default (True), or say the callback must go (False)."""
        has_default, default = _default(cls, option)
        usable = has_default and (
            name_pattern_problem(default) is None
            if option in patterns
            else _path_problem(default, paths[option], bases) is None
        )
        if usable:
            out[option] = default
        outcome = (
            f"it was reset to the default {safe_repr(default)}"
            if usable
            else f"the {name} callback was dropped"
        )
        warnings.append(
            _reset_message(
                value, problem, record=f"{record}.config.{option}", source=source,
                outcome=outcome, fix=again,
            )
        )  # fmt: skip
        return usable

    for option, kind in paths.items():
        if option in out:
            problem = _path_problem(out[option], kind, bases)
            if problem is not None and not refuse(option, out[option], problem):
                return None, warnings
            if problem is None:
                out[option] = os.fspath(out[option])
    for option in patterns:
        if option in out:
            problem = name_pattern_problem(out[option])
            if problem is not None and not refuse(option, out[option], problem):
                return None, warnings
    if "separator" in out and "filename" in paths and out["separator"] not in _CSV_SEPARATORS:
        warnings.append(
            _reset_message(
                out["separator"], f"is not one of {list(_CSV_SEPARATORS)}",
                record=f"{record}.config.separator", source=source,
                outcome="it was reset to ','", fix=again,
            )
        )  # fmt: skip
        out["separator"] = ","
    if "log_dir" in paths and "comment" in out:
        comment, log_dir = out["comment"], out.get("log_dir", _default(cls, "log_dir")[1])
        problem = None
        if not isinstance(comment, str):
            problem = f"is a {type(comment).__name__}, not a string"
        elif comment:
            problem = name_pattern_problem(comment)
            if problem is None and isinstance(log_dir, str):
                run_dir = log_dir.rstrip("/\\") + comment
                inner = _path_problem(run_dir, "dir", bases)
                problem = (
                    None
                    if inner is None
                    else f"makes the event folder {safe_repr(run_dir)} {inner}"
                )
        if problem is not None:
            warnings.append(
                _reset_message(
                    comment, problem, record=f"{record}.config.comment", source=source,
                    outcome="it was reset to ''", fix=again,
                )
            )  # fmt: skip
            out["comment"] = ""
    return out, warnings


# ---------------------------------------------------------------------------------- AutoSaver
_AUTO_SAVE_FIX = (
    "if you trust this file, enable auto-saving yourself after loading: "
    "handler.auto_save(interval, save_path=..., name=...)"
)


def confine_auto_saver(
    state: dict,
    *,
    source: str | None,
    base: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
) -> tuple[dict, list[str]]:
    """The AutoSaver state of a checkpoint (``AutoSaver.state_dict()``), made safe for
    ``AutoSaver.from_state_dict``: ``(state, warnings)``.

    * ``save_path`` must be a confined folder (:func:`confine_path`, ``kind="dir"``);
      refused, auto-saving is disabled (``interval`` and ``every_n_steps`` ``None``,
      ``save_path`` ``"."``) with a warning saying how to enable it;
    * ``name`` must be a file-name pattern (:func:`name_pattern_problem`), else the default;
    * ``last_saved`` is kept only when it is a confined file (a ``.pth`` name allowed),
      else ``None``;
    * ``interval`` (int >= -1 or None), ``every_n_steps`` (int >= 1 or None),
      ``overwrite`` and ``async_save`` (bool) of the wrong type or range are reset
      (auto-saving off, ``None``, ``False``) with a warning; other keys are dropped.

    A ``state`` that is not a dict gives ``({}, [warning])`` (a fresh, disabled AutoSaver).
    ``state`` is never modified.

    Example:
        >>> import tempfile
        >>> work = tempfile.mkdtemp()  # default: the current working folder
        >>> confine_auto_saver({"interval": 1, "save_path": "ckpt", "name": "m_{epoch}"},
        ...                    source="a.pth", base=work)
        ({'interval': 1, 'save_path': 'ckpt', 'name': 'm_{epoch}'}, [])
        >>> state, warnings = confine_auto_saver({"interval": 1, "save_path": "/etc"},
        ...                                      source="a.pth", base=work)
        >>> state["interval"], state["save_path"], "handler.auto_save(" in warnings[0]
        (None, '.', True)
    """
    if not isinstance(state, Mapping):
        return {}, [
            _reset_message(
                state, "is not a dict", record="auto_saver", source=source,
                outcome="auto-saving is off", fix=_AUTO_SAVE_FIX,
            )
        ]  # fmt: skip
    bases = _bases(base)
    known = ("interval", "save_path", "name", "overwrite", "every_n_steps", "last_saved",
             "async_save")  # fmt: skip
    out = {k: state[k] for k in known if k in state}
    warnings: list[str] = []

    def reset(key: str, problem: str, value: Any, outcome: str, fix: str = _AUTO_SAVE_FIX) -> None:
        warnings.append(
            _reset_message(
                state[key], problem, record=f"auto_saver.{key}", source=source,
                outcome=outcome, fix=fix,
            )
        )  # fmt: skip
        out[key] = value

    def int_or_none(key: str, low: int) -> None:
        v = out.get(key)
        if v is not None and (type(v) is not int or v < low):
            reset(key, f"is not an int >= {low} or None", None, "it was reset to None")

    int_or_none("interval", -1)
    int_or_none("every_n_steps", 1)
    for key in ("overwrite", "async_save"):
        if key in out and not isinstance(out[key], bool):
            reset(key, "is not a bool", False, "it was reset to False")
    if "save_path" in out:
        problem = _path_problem(out["save_path"], "dir", bases)
        if problem is not None:
            reset("save_path", problem, ".", "auto-saving is off")
            out["interval"] = out["every_n_steps"] = None
            out.pop("last_saved", None)
    if "name" in out:
        problem = name_pattern_problem(out["name"])
        if problem is not None:
            reset(
                "name",
                problem,
                "model_epoch{epoch:02d}",
                "it was reset to 'model_epoch{epoch:02d}'",
            )
    if out.get("last_saved") is not None:
        problem = _path_problem(out["last_saved"], "checkpoint", bases)
        if problem is not None:
            reset("last_saved", problem, None, "it was forgotten (nothing is deleted for it)",
                  fix="nothing: the next automatic save starts afresh")  # fmt: skip
    return out, warnings
