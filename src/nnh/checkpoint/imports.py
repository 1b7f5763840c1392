"""Recording classes and functions by import path, and finding them again.

A checkpoint never pickles a class: it stores ``"package.module.QualName"`` strings and
imports them when loading. Lambdas and functions or classes defined inside a function have
no such path; objects defined in the script run as ``__main__`` have one that only works
while that same script runs (unless it was started with ``python -m package.module``, in
which case the path uses the module's real name).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from nnh.checkpoint.errors import ImportPathError

__all__ = ["import_path", "import_record", "is_importable", "resolve_import_path"]

MAIN = "__main__"


def _describe(obj: object) -> str:
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    return repr(name) if name else f"a {type(obj).__name__} object"


def _main_module_name() -> str | None:
    """The real module name of ``__main__`` when the program was started with ``python -m``."""
    spec = getattr(sys.modules.get(MAIN), "__spec__", None)
    name = getattr(spec, "name", None)
    return name if name and name != MAIN else None


def import_path(obj: Any) -> str:
    """Return ``"package.module.QualName"`` for a class or function.

    Objects defined in ``__main__`` give ``"__main__.QualName"`` (or the real module name
    when run with ``python -m``). Raises :class:`ImportPathError` saying why for lambdas,
    objects defined inside a function (``<locals>``) and objects without a module.

    Example:
        >>> from collections import OrderedDict
        >>> import_path(OrderedDict)
        'collections.OrderedDict'
        >>> try:
        ...     import_path(lambda x: x)
        ... except ImportPathError as err:
        ...     print("lambda" in str(err))
        True
    """
    qualname = getattr(obj, "__qualname__", None)
    module = getattr(obj, "__module__", None)
    if not isinstance(qualname, str) or not isinstance(module, str):
        raise ImportPathError(
            f"{_describe(obj)} has no import path: only classes and functions defined at a "
            "module's top level have one. What to do: pass a class or a top-level function.",
            kind="not_importable",
        )
    if "<lambda>" in qualname:
        raise ImportPathError(
            f"{qualname!r} in module {module!r} is a lambda; lambdas have no importable name. "
            "What to do: define it with 'def' at the top level of a module.",
            kind="not_importable",
        )
    if "<locals>" in qualname:
        owner = qualname.split(".<locals>", 1)[0]
        raise ImportPathError(
            f"{qualname!r} in module {module!r} is defined inside the function {owner!r}, so "
            "it cannot be imported by name. What to do: move it to the top level of a module.",
            kind="not_importable",
        )
    if module == MAIN:
        module = _main_module_name() or MAIN
    return f"{module}.{qualname}"


def is_importable(obj: Any) -> tuple[bool, str]:
    """Tell whether ``obj`` can be found again by its import path in a new process, and why not.

    Example:
        >>> from collections import OrderedDict
        >>> is_importable(OrderedDict)
        (True, '')
        >>> ok, reason = is_importable(lambda: 0)
        >>> ok, "lambda" in reason
        (False, True)
    """
    try:
        path = import_path(obj)
    except ImportPathError as err:
        return False, str(err)
    if path.startswith(MAIN + "."):
        script = getattr(sys.modules.get(MAIN), "__file__", None) or "the interactive session"
        return False, (
            f"{path!r} is defined in the script run as __main__ ({script}); that path only "
            "resolves while the same script is running. What to do: move it into a module "
            "you import, or run the script with 'python -m package.module'."
        )
    if obj.__module__ == MAIN:  # started with python -m: importing it would rerun the script
        return True, ""
    try:
        found = resolve_import_path(path)
    except ImportPathError as err:
        return False, str(err)
    if found is not obj:
        return False, (
            f"{path!r} resolves to a different object than the one given (the name was "
            "redefined or shadowed). What to do: give the object a unique top-level name."
        )
    return True, ""


def import_record(obj: Any) -> dict[str, Any]:
    """Describe ``obj`` for a checkpoint: ``{"path": str | None, "importable": bool, "reason": str}``.

    Example:
        >>> import_record(dict)
        {'path': 'builtins.dict', 'importable': True, 'reason': ''}
    """
    try:
        path: str | None = import_path(obj)
    except ImportPathError:
        path = None
    importable, reason = is_importable(obj)
    return {"path": path, "importable": importable, "reason": reason}


def _import_longest_module(parts: list[str], path: str) -> tuple[Any, int]:
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            return importlib.import_module(name), i
        except ModuleNotFoundError as err:
            missing = err.name or ""
            if missing == name or name.startswith(missing + "."):
                continue  # this prefix (or its parent) is not a module: try a shorter one
            raise ImportPathError(
                f"cannot resolve {path!r}: importing module {name!r} failed because it needs "
                f"{missing!r}, which is not installed. What to do: install {missing!r}.",
                kind="not_importable",
            ) from err
        except Exception as err:
            raise ImportPathError(
                f"cannot resolve {path!r}: importing module {name!r} raised "
                f"{type(err).__name__}: {err}. What to do: fix that module so it imports.",
                kind="not_importable",
            ) from err
    raise ImportPathError(
        f"cannot resolve {path!r}: there is no module named {parts[0]!r}. What to do: install "
        "the package that defines it or add its folder to sys.path (PYTHONPATH), or pass the "
        "class explicitly.",
        kind="not_importable",
    )


def _walk(owner: Any, names: list[str], path: str, owner_name: str) -> Any:
    for name in names:
        try:
            owner = getattr(owner, name)
        except AttributeError:
            raise ImportPathError(
                f"cannot resolve {path!r}: {owner_name!r} has no attribute {name!r}; it was "
                "probably renamed or moved since the checkpoint was saved. What to do: restore "
                "the name, or pass the class explicitly.",
                kind="not_importable",
            ) from None
        owner_name = f"{owner_name}.{name}"
    return owner


def resolve_import_path(path: str) -> Any:
    """Import and return the object named by ``path`` (``"package.module.QualName"``).

    Raises :class:`ImportPathError` naming the path and what to do when the module or the
    attribute cannot be found, or when the path comes from a ``__main__`` script that is not
    the one running now.

    Example:
        >>> resolve_import_path("collections.OrderedDict").__name__
        'OrderedDict'
    """
    if not isinstance(path, str) or not all(p.isidentifier() for p in path.split(".")):
        raise ImportPathError(
            f"{path!r} is not an import path; expected dotted names like "
            "'package.module.ClassName'.",
            kind="not_importable",
        )
    parts = path.split(".")
    if parts[0] == MAIN:
        try:
            return _walk(sys.modules[MAIN], parts[1:], path, MAIN)
        except ImportPathError:
            raise ImportPathError(
                f"cannot resolve {path!r}: it was recorded from a script run as __main__ and "
                "is only found while that same script is running. What to do: pass the class "
                "explicitly, or move it into a module you import.",
                kind="not_importable",
            ) from None
    module, used = _import_longest_module(parts, path)
    return _walk(module, parts[used:], path, ".".join(parts[:used]))
