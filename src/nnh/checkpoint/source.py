"""Model source capture for ``save_model_code=True``, and opt-in rebuilding from it.

What is stored: by default (``mode="module"``) the source of the WHOLE module that defines
the model class, so helper functions, constants and sibling classes come along; this is the
simplest choice that works for real code. A class defined in the script run as ``__main__``
is different: the script's top level is training code, so only the class and what it needs
are stored (:func:`script_safe_source`), and a trusted load never re-runs the script. ``mode="class"`` (used automatically when the
module's source cannot be read, or the class is defined inside a function) stores only the
module's top-level import statements followed by the class source.

Stored code is plain text inside the checkpoint; loading a checkpoint never runs it.
:func:`rebuild_class_from_source` runs it only with ``trust_code=True``, in a fresh module
registered as ``nnh_restored.<original module name>``. The module runs with that name, so
``if __name__ == "__main__":`` blocks do not run, but any other top-level code does.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import linecache
import os
import sys
import textwrap
import types
from collections.abc import Mapping
from typing import Any

from nnh.checkpoint.errors import CheckpointError, ImportPathError
from nnh.checkpoint.imports import resolve_import_path

__all__ = [
    "RESTORED_PACKAGE",
    "capture_model_source",
    "rebuild_class_from_source",
    "resolve_class",
    "script_safe_source",
]

RESTORED_PACKAGE = "nnh_restored"
_RECORD_FIELDS = ("module", "qualname", "mode", "source", "sha256")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _module_source(cls: type) -> str | None:
    module = sys.modules.get(cls.__module__)
    if module is None:
        return None
    try:
        return inspect.getsource(module)
    except (OSError, TypeError):
        return None


def _import_lines(module_source: str | None) -> list[str]:
    if not module_source:
        return []
    try:
        tree = ast.parse(module_source)
    except SyntaxError:
        return []
    lines = []
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            segment = ast.get_source_segment(module_source, node)
            if segment:
                lines.append(segment)
    return lines


def _class_source(cls: type) -> str:
    try:
        return textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError) as err:
        why = str(err)
        if cls.__module__ not in sys.modules:
            why = f"its module {cls.__module__!r} is no longer loaded"
        raise CheckpointError(
            f"cannot capture the source code of {cls.__module__}.{cls.__qualname__}: {why}. "
            "save_model_code needs a class defined in a .py file (or a notebook cell). What "
            "to do: define the class in a file, or save without save_model_code.",
            kind="bad_source",
        ) from err


def _bound_names(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return {t.id for t in targets if isinstance(t, ast.Name)}


def _used_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _is_literal_assignment(node: ast.stmt) -> bool:
    value = getattr(node, "value", None)
    if not isinstance(node, ast.Assign | ast.AnnAssign) or value is None:
        return False
    try:
        ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def script_safe_source(module_source: str, class_name: str) -> str | None:
    r"""The parts of a script that define ``class_name``: nothing that runs the script.

    Keeps, in their original order, the top-level class itself and what it needs,
    transitively: the functions and classes it refers to, constants assigned a literal
    value, and the imports that bind names it uses (``from __future__`` imports always).
    Every other statement (training code, ``if __name__ == "__main__":`` blocks, calls) is
    left out, so rebuilding the class never re-runs the script. ``None`` when the class is
    not defined at the script's top level.

    Example:
        >>> script = (
        ...     "import torch\nimport os\nWIDTH = 8\n"
        ...     "class Net(torch.nn.Linear):\n    def __init__(self):\n"
        ...     "        super().__init__(WIDTH, 1)\n"
        ...     "net = Net()\nos.system('echo retraining')\n"
        ... )
        >>> print(script_safe_source(script, "Net"), end="")
        import torch
        WIDTH = 8
        class Net(torch.nn.Linear):
            def __init__(self):
                super().__init__(WIDTH, 1)
    """
    try:
        tree = ast.parse(module_source)
    except SyntaxError:
        return None
    definitions: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(
            node,
            ast.Import | ast.ImportFrom | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef,
        ) or _is_literal_assignment(node):
            for name in _bound_names(node):
                definitions[name] = node  # the last definition wins, as when the script ran
    root = definitions.get(class_name)
    if not isinstance(root, ast.ClassDef):
        return None
    keep: dict[int, ast.stmt] = {}
    todo = [root]
    while todo:
        node = todo.pop()
        if id(node) in keep:
            continue
        keep[id(node)] = node
        for name in _used_names(node):
            found = definitions.get(name)
            if found is not None and id(found) not in keep:
                todo.append(found)
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            keep[id(node)] = node
    parts = [
        ast.get_source_segment(module_source, node, padded=False) or ""
        for node in tree.body
        if id(node) in keep
    ]
    return "\n".join(p for p in parts if p) + "\n"


def capture_model_source(model_class: type, *, mode: str = "module") -> dict[str, Any]:
    """Capture the source needed to rebuild ``model_class``, as plain strings.

    Returns ``{"module", "qualname", "mode", "source", "class_source", "imports",
    "filename", "sha256"}``: ``source`` is the code :func:`rebuild_class_from_source` runs
    (the whole defining module in ``"module"`` mode, imports + class in ``"class"`` mode),
    ``sha256`` its checksum.

    Example:
        >>> from collections import OrderedDict
        >>> record = capture_model_source(OrderedDict)
        >>> record["qualname"], record["mode"], "class OrderedDict" in record["class_source"]
        ('OrderedDict', 'module', True)
    """
    if mode not in ("module", "class"):
        raise ValueError(f"mode must be 'module' or 'class', got {mode!r}")
    if not isinstance(model_class, type):
        raise TypeError(f"capture_model_source needs a class, got {type(model_class).__name__}")
    class_source = _class_source(model_class)
    module_source = _module_source(model_class)
    if module_source is None or "<locals>" in model_class.__qualname__:
        mode = "class"
    imports = _import_lines(module_source)
    script = None
    if (
        model_class.__module__ == "__main__"
        and module_source
        and "." not in model_class.__qualname__
    ):
        # a script: store the class and what it needs, never the script's top-level code
        script = script_safe_source(module_source, model_class.__qualname__)
        mode = "class"
    if script is not None:
        source = script
    elif mode == "module":
        source = module_source or ""
    else:
        source = "\n".join(imports) + "\n\n\n" + class_source
    module = sys.modules.get(model_class.__module__)
    filename = os.path.basename(getattr(module, "__file__", None) or "<unknown>")
    return {
        "module": model_class.__module__,
        "qualname": model_class.__qualname__,
        "mode": mode,
        "source": source,
        "class_source": class_source,
        "imports": imports,
        "filename": filename,
        "sha256": _sha256(source),
    }


def _check_record(record: object, path: str | os.PathLike[str] | None) -> Mapping[str, Any]:
    where = (
        "the stored model source" if path is None else f"the model source in {os.fspath(path)!r}"
    )
    if not isinstance(record, Mapping) or any(
        not isinstance(record.get(field), str) for field in _RECORD_FIELDS
    ):
        raise CheckpointError(
            f"{where} is malformed: expected a dict with string fields {list(_RECORD_FIELDS)}. "
            "What to do: re-save the checkpoint with save_model_code=True.",
            path=path,
            kind="bad_source",
        )
    if _sha256(record["source"]) != record["sha256"]:
        raise CheckpointError(
            f"{where} does not match its checksum: the file was damaged or edited. nnh will "
            "not run it. What to do: use an intact copy of the checkpoint.",
            path=path,
            kind="bad_source",
        )
    return record


def _untrusted(
    record: Mapping[str, Any], path: Any, reason: str | None, flag: str
) -> CheckpointError:
    name = f"{record['module']}.{record['qualname']}"
    where = "the checkpoint" if path is None else f"the checkpoint {os.fspath(path)!r}"
    why = f" ({reason})" if reason else ""
    return CheckpointError(
        f"the model class {name!r} cannot be imported here{why}. {where} holds its source code, "
        "but nnh never runs code stored in a file unless you ask, because that code can do "
        "anything your user account can. What to do: make the module importable (install it "
        "or add its folder to PYTHONPATH) or pass the model class explicitly; or, only if you "
        f"trust this file, pass {flag}=True to rebuild the class from the stored source.",
        path=path,
        kind="untrusted_code",
    )


def _fresh_module(record: Mapping[str, Any]) -> tuple[types.ModuleType, str]:
    if RESTORED_PACKAGE not in sys.modules:
        package = types.ModuleType(RESTORED_PACKAGE, "Model classes rebuilt from checkpoints.")
        package.__path__ = []
        sys.modules[RESTORED_PACKAGE] = package
    name = f"{RESTORED_PACKAGE}.{record['module']}"
    filename = f"<nnh-restored {record['module']} {record['sha256'][:12]}>"
    module = types.ModuleType(name)
    module.__file__ = filename
    # Relative imports ("from .layers import Block") resolve against the original package
    # when that package is still importable.
    module.__package__ = record["module"].rpartition(".")[0]
    source = record["source"]
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    return module, filename


def _find_class(module: types.ModuleType, record: Mapping[str, Any]) -> Any:
    names = (
        record["qualname"].split(".")
        if record["mode"] == "module"
        else [record["qualname"].rsplit(".", 1)[-1]]
    )
    owner: Any = module
    for name in names:
        owner = getattr(owner, name, None)
    return owner


def rebuild_class_from_source(
    record: Mapping[str, Any],
    trust_code: bool,
    *,
    path: str | os.PathLike[str] | None = None,
    reason: str | None = None,
    flag: str = "trust_code",
) -> type:
    """Rebuild a model class from a :func:`capture_model_source` record.

    Never runs the stored code unless ``trust_code=True``: with ``False`` it raises
    :class:`CheckpointError` saying that the class cannot be imported (``reason``, if given,
    says why) and how to opt in. With ``True`` the stored source runs in a fresh module
    ``nnh_restored.<module>`` (registered in ``sys.modules``) and the class is returned.
    ``path`` names the checkpoint file in errors, ``flag`` the opt-in argument of the caller
    (``NNHandler.load`` calls it ``trust_model_code``).

    Example:
        >>> src = "import torch\\nclass Net(torch.nn.Module):\\n    pass\\n"
        >>> import hashlib
        >>> rec = {"module": "demo_models", "qualname": "Net", "mode": "module", "source": src,
        ...        "sha256": hashlib.sha256(src.encode()).hexdigest()}
        >>> rebuild_class_from_source(rec, trust_code=True).__module__
        'nnh_restored.demo_models'
    """
    record = _check_record(record, path)
    if not trust_code:
        raise _untrusted(record, path, reason, flag)
    module, filename = _fresh_module(record)
    sys.modules[module.__name__] = module
    try:
        exec(compile(record["source"], filename, "exec"), module.__dict__)
    except BaseException as err:
        sys.modules.pop(module.__name__, None)
        raise CheckpointError(
            f"running the stored source of module {record['module']!r} failed with "
            f"{type(err).__name__}: {err}. What to do: install the packages it imports, or "
            "make the original module importable.",
            path=path,
            kind="bad_source",
        ) from err
    found = _find_class(module, record)
    if not isinstance(found, type):
        raise CheckpointError(
            f"the stored source of module {record['module']!r} does not define the class "
            f"{record['qualname']!r}. What to do: pass the model class explicitly.",
            path=path,
            kind="bad_source",
        )
    return found


def resolve_class(
    import_path: str,
    source: Mapping[str, Any] | None = None,
    *,
    trust_code: bool = False,
    path: str | os.PathLike[str] | None = None,
) -> Any:
    """Import ``import_path``; if that fails, fall back to the stored ``source`` (opt-in).

    Without a source record the import error is raised as is; with one, the class is
    rebuilt only when ``trust_code`` is true (otherwise the error explains how to opt in).

    Example:
        >>> resolve_class("collections.OrderedDict").__name__
        'OrderedDict'
    """
    try:
        return resolve_import_path(import_path)
    except ImportPathError as err:
        if source is None:
            raise
        reason = str(err).split(". What to do", 1)[0]
        return rebuild_class_from_source(source, trust_code, path=path, reason=reason)
