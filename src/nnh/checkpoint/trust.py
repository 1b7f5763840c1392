"""Type checks for names the user vouched for (see :mod:`nnh.checkpoint.policy`).

Since the second trust round a file from a stranger only selects from nnh's registry
(:mod:`nnh.checkpoint.registry`); the rules here apply to names the user vouched for (their
own signed file, ``trusted=``, ``trust_modules=``), which are imported and must still fit
their slot. Background: ``torch.load(weights_only=True)`` stops pickled code,
but a valid file can still *name* any importable callable: ``"os.system"`` as a callback
class, ``"shutil.rmtree"`` as a loss. Every name is therefore resolved here and checked
against what its slot expects *before* it is called:

* a class slot (model, optimizer, scheduler, callback, SDE, sampler, loss or metric object)
  must name a class that is a subclass of the slot's base (:func:`resolve_class_record`);
* a function slot (loss, metric) must name a plain Python function defined outside the
  standard library, or a function of torch (:func:`resolve_function_record`).

Anything else raises :class:`CheckpointError` (kind ``"untrusted"``) naming the file, the
record and what was found. Nothing is called here. Names from the standard library are refused
before anything is imported (no slot can hold one, and some stdlib modules act on import);
otherwise importing the named module is the only effect, and a module's import runs only the
code its author ships with it.

Example:
    >>> from torch import nn
    >>> resolve_class_record("torch.nn.Linear", nn.Module, record="model").__name__
    'Linear'
    >>> try:
    ...     resolve_class_record("os.system", nn.Module, record="callbacks[0]", path="x.pth")
    ... except CheckpointError as err:
    ...     print(err.kind)
    untrusted
"""

from __future__ import annotations

import inspect
import os
import sys
import types
from typing import Any

from nnh.checkpoint.errors import CheckpointError
from nnh.checkpoint.imports import resolve_import_path

__all__ = [
    "describe_object",
    "is_trusted_function",
    "resolve_class_record",
    "resolve_function_record",
]

PathLike = str | os.PathLike[str]

# Standard-library modules whose functions are never a loss or a metric. Everything of the
# standard library is refused (sys.stdlib_module_names); these are listed for Python 3.9.
_FALLBACK_STDLIB = frozenset(
    {"os", "sys", "subprocess", "shutil", "builtins", "importlib", "pickle", "socket", "pty",
     "posix", "nt", "io", "pathlib", "tempfile", "runpy", "code", "ctypes", "multiprocessing",
     "webbrowser", "urllib", "http", "ftplib", "smtplib", "signal", "threading", "asyncio"}
)  # fmt: skip


# The torch modules whose functions may be a loss or metric: tensor maths only. torch's
# functions that read or write files (torch.save, torch.hub), compile or configure are not.
_TORCH_MATH = frozenset(
    {"torch", "torch.functional", "torch.nn.functional", "torch.linalg", "torch.special",
     "torch.fft", "torch._C._nn", "torch._C._linalg", "torch._C._special", "torch._C._fft"}
)  # fmt: skip


def _stdlib_names() -> frozenset[str]:
    return frozenset(getattr(sys, "stdlib_module_names", _FALLBACK_STDLIB)) | _FALLBACK_STDLIB


def describe_object(obj: Any) -> str:
    """A short, safe description of what a name resolved to (for error messages).

    Example:
        >>> import os
        >>> describe_object(os.system)
        "the built-in function 'posix.system'"
    """
    name = f"{getattr(obj, '__module__', None) or '?'}.{getattr(obj, '__qualname__', '?')}"
    if isinstance(obj, type):
        return f"the class {name!r}"
    if isinstance(obj, types.BuiltinFunctionType):
        return f"the built-in function {name!r}"
    if isinstance(obj, types.FunctionType):
        return f"the function {name!r}"
    if isinstance(obj, types.ModuleType):
        return f"the module {obj.__name__!r}"
    return f"a {type(obj).__name__} object"


def _where(path: PathLike | None) -> str:
    return "the checkpoint" if path is None else f"checkpoint {os.fspath(path)!r}"


def _resolve(name: object, record: str, path: PathLike | None) -> Any:
    if not isinstance(name, str):
        raise CheckpointError(
            f"{_where(path)}: record {record!r} should name an import path (a string), but "
            f"holds a {type(name).__name__}. The file is damaged or was crafted. What to do: "
            "use a checkpoint written by NNHandler.save.",
            path=path,
            kind="untrusted",
        )
    root = name.split(".")[0]
    if root in _stdlib_names():
        raise CheckpointError(
            f"{_where(path)}: record {record!r} names {name!r}, from the Python standard "
            "library, where no model, optimizer, callback, loss or metric nnh can use lives. "
            "nnh refused it without importing anything: a file that names such objects was "
            "crafted to run code. What to do: do not use this file; load only checkpoints "
            "from sources you trust.",
            path=path,
            kind="untrusted",
        )
    return resolve_import_path(name)


def resolve_class_record(
    name: object,
    base: type | tuple[type, ...],
    *,
    record: str,
    path: PathLike | None = None,
) -> type:
    """Import the class ``name`` and check it subclasses ``base``; never call it.

    Raises :class:`CheckpointError` (kind ``"untrusted"``) when ``name`` is not a string or
    resolves to anything but a subclass of ``base``, and :class:`ImportPathError` when it
    cannot be imported.

    Example:
        >>> import torch
        >>> resolve_class_record("torch.optim.SGD", torch.optim.Optimizer, record="optimizer")
        <class 'torch.optim.sgd.SGD'>
    """
    found = _resolve(name, record, path)
    bases = base if isinstance(base, tuple) else (base,)
    if not (isinstance(found, type) and issubclass(found, bases)):
        expected = " or ".join(f"{b.__module__}.{b.__qualname__}" for b in bases)
        raise CheckpointError(
            f"{_where(path)}: record {record!r} names {name!r}, which is "
            f"{describe_object(found)}, not a subclass of {expected}. nnh refused to use it "
            "and called nothing: a file that names such objects was crafted to run code. "
            "What to do: do not use this file; load only checkpoints from sources you trust.",
            path=path,
            kind="untrusted",
        )
    return found


def is_trusted_function(fn: Any) -> bool:
    """Whether ``fn`` may serve as a loss or metric loaded from a file.

    True for torch's tensor maths (``torch.*`` operations, ``torch.nn.functional``,
    ``torch.linalg``, ``torch.special``, ``torch.fft``) and for plain Python functions defined
    outside the standard library and outside torch; False for everything else
    (``os.system``, ``shutil.rmtree``, ``builtins.eval``, ``torch.save``, ``torch.compile``,
    classes, methods, ...).

    Example:
        >>> import os, shutil, torch
        >>> [is_trusted_function(f) for f in (torch.nn.functional.mse_loss, torch.sum,
        ...                                   os.system, shutil.rmtree, eval, torch.save,
        ...                                   torch.compile)]
        [True, True, False, False, False, False, False]
    """
    module = getattr(fn, "__module__", None) or ""
    root = module.split(".")[0]
    if isinstance(fn, types.BuiltinFunctionType):  # torch's tensor operations
        return module in _TORCH_MATH
    if not isinstance(fn, types.FunctionType):
        return False
    if root == "torch":  # torch's maths, not its file, hub or compiler functions
        return module in _TORCH_MATH and module != "torch"
    if root in _stdlib_names() or not module:
        return False
    return not inspect.isgeneratorfunction(fn) and not inspect.iscoroutinefunction(fn)


def resolve_function_record(name: object, *, record: str, path: PathLike | None = None) -> Any:
    """Import the function ``name`` and check :func:`is_trusted_function`; never call it.

    Example:
        >>> resolve_function_record("torch.nn.functional.mse_loss", record="loss").__name__
        'mse_loss'
        >>> try:
        ...     resolve_function_record("subprocess.getoutput", record="loss")
        ... except CheckpointError as err:
        ...     print(err.kind)
        untrusted
    """
    found = _resolve(name, record, path)
    if not is_trusted_function(found):
        raise CheckpointError(
            f"{_where(path)}: record {record!r} names {name!r}, which is "
            f"{describe_object(found)}; a loss or metric must be a function of torch or a "
            "plain Python function outside the standard library. nnh refused to use it and "
            "called nothing. What to do: do not use this file; load only checkpoints from "
            "sources you trust.",
            path=path,
            kind="untrusted",
        )
    return found
