"""Who vouches for the names a checkpoint holds: the registry, the user, or nobody.

A :class:`TrustPolicy` is built for one load. A name a file holds is resolved as follows:

1. an entry of nnh's closed registry (:mod:`nnh.checkpoint.registry`) for that slot: used,
   with its arguments checked against the entry's schema;
2. otherwise, user code — restored only when the user vouches for it, for this load:
   the object itself is in ``trusted=[...]`` (nothing is imported), its module is under one
   of ``trust_modules=(...)``, or the file is the user's own (its MAC verifies under the
   user's key, :mod:`nnh.checkpoint.signing`). Vouched names are imported and must still be
   of their slot's type (a callback class must subclass ``Callback``, ...);
3. otherwise the record is dropped: the rest loads, and one warning lists every dropped
   record with the argument that restores it.

The model class is the one name a file can always bring (:meth:`TrustPolicy.model_class`):
it must be an ``nn.Module`` subclass whose path is not in the standard library, has no
private (``_``) segment unless vouched, and no ``__main__`` segment (a leading
``__main__.`` means the script being run and imports nothing). An import that raises or
exits becomes a :class:`CheckpointError`.

Example:
    >>> import torch
    >>> policy = TrustPolicy.build(source="x.pth")
    >>> policy.resolve("torch.optim.sgd.SGD", "optimizer", record="optimizer.class").__name__
    'SGD'
    >>> policy.resolve("mypkg.MyCallback", "callback", record="callbacks[0].class") is None
    True
    >>> policy.dropped
    [('callbacks[0].class', 'mypkg.MyCallback')]
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterable
from typing import Any

import attrs
import torch
from torch import nn

from nnh.checkpoint.errors import CheckpointError, ImportPathError
from nnh.checkpoint.imports import import_path, resolve_import_path
from nnh.checkpoint.registry import lookup
from nnh.checkpoint.trust import describe_object, is_trusted_function

__all__ = ["TrustPolicy", "safe_import"]

PathLike = str | os.PathLike[str]
MAIN = "__main__"


def _stdlib_roots() -> frozenset[str]:
    from nnh.checkpoint.trust import _stdlib_names

    return _stdlib_names()


def _where(source: PathLike | None) -> str:
    return "the checkpoint" if source is None else f"checkpoint {os.fspath(source)!r}"


def _shown(name: Any) -> str:
    text = repr(name).encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= 100 else text[:97] + "..."


def safe_import(
    name: Any, *, record: str, source: PathLike | None = None, allow_private: bool = False
) -> Any:
    """Import the object ``name`` names, under the rules for names from files.

    Refused without importing anything (``CheckpointError`` kind ``"untrusted"``): a
    non-string or a string that is not dotted identifiers, a standard-library root, a
    ``__main__`` segment after the first (importing it would run a program), and, unless
    ``allow_private``, a private segment (``_x``). A leading ``__main__.`` resolves in the
    script being run without importing. Any exception or exit while importing becomes a
    ``CheckpointError`` (kind ``"not_importable"``).

    Example:
        >>> safe_import("torch.nn.Linear", record="model.class").__name__
        'Linear'
        >>> for bad in ("os.system", "torch.utils.model_dump.__main__.X", "torch._C.X"):
        ...     try:
        ...         safe_import(bad, record="model.class")
        ...     except CheckpointError as err:
        ...         print(err.kind)
        untrusted
        untrusted
        untrusted
    """

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(
            f"{_where(source)}: record {record!r} names {_shown(name)}, {why}. nnh imported "
            "and called nothing. What to do: do not use this file, or load a checkpoint "
            "written by NNHandler.save.",
            path=source,
            kind="untrusted",
        )

    if not isinstance(name, str) or len(name) > 300:
        raise refuse("which is not an import path (a dotted string)")
    parts = name.split(".")
    if not all(p.isidentifier() for p in parts) or len(parts) < 2:
        raise refuse("which is not an import path of the form 'package.module.Name'")
    if parts[0] in _stdlib_roots():
        raise refuse("from the Python standard library, where nothing a checkpoint may name lives")
    if MAIN in parts[1:] or any(p.startswith("__") and p.endswith("__") for p in parts[1:]):
        raise refuse("a path through a '__main__' or dunder segment (importing it runs a program)")
    if not allow_private and any(p.startswith("_") for p in parts if p != MAIN):
        raise refuse("a private ('_') module or name, which a file from a stranger may not name")
    try:
        return resolve_import_path(name)
    except CheckpointError:
        raise
    except (Exception, SystemExit) as err:
        raise CheckpointError(
            f"{_where(source)}: importing {_shown(name)} for record {record!r} failed "
            f"({type(err).__name__}: {str(err)[:200]}). What to do: make that module importable, "
            "or do not use this file.",
            path=source,
            kind="not_importable",
        ) from None


_CLASS_BASES: dict[str, Any] = {}


def _slot_base(slot: str) -> Any:
    if not _CLASS_BASES:
        from nnh.callbacks.base import Callback
        from nnh.generative.sampler import Sampler
        from nnh.generative.sde import SDE

        sched = torch.optim.lr_scheduler
        _CLASS_BASES.update(
            optimizer=torch.optim.Optimizer,
            scheduler=(sched.LRScheduler, sched.ReduceLROnPlateau),
            callback=Callback,
            sde=SDE,
            sampler=Sampler,
            loss=nn.Module,
            metric=nn.Module,
        )
    return _CLASS_BASES[slot]


def _fits_slot(obj: Any, slot: str) -> bool:
    base = _slot_base(slot)
    if isinstance(obj, type):
        return issubclass(obj, base)
    return slot in ("loss", "metric") and is_trusted_function(obj)


@attrs.define
class TrustPolicy:
    """What one load may restore; collects the records it dropped.

    Build it with :meth:`build`; ``own`` is whether the file is the user's own (its MAC
    verified), ``trusted`` maps import paths to the objects passed in ``trusted=[...]``,
    ``modules`` are the ``trust_modules`` prefixes.

    Example:
        >>> from torch import nn
        >>> TrustPolicy.build(trusted=[nn.Linear]).vouched("torch.nn.modules.linear.Linear")
        True
    """

    source: str | None = None
    own: bool = False
    trusted: dict[str, Any] = attrs.Factory(dict)
    modules: tuple[str, ...] = ()
    dropped: list[tuple[str, str]] = attrs.Factory(list)

    @classmethod
    def build(
        cls,
        *,
        source: PathLike | None = None,
        own: bool = False,
        trusted: Iterable[Any] | None = None,
        trust_modules: Iterable[str] | str | None = None,
    ) -> TrustPolicy:
        """Check the user's arguments and build the policy for one load.

        Example:
            >>> TrustPolicy.build(trust_modules="mypkg").modules
            ('mypkg',)
            >>> TrustPolicy.build(trusted=["mypkg.Net"])
            Traceback (most recent call last):
                ...
            TypeError: trusted=[...] takes the classes and functions themselves (e.g. trusted=[MyCallback, my_loss]), not 'mypkg.Net' (a str); for a whole package use trust_modules=('mypkg',)
        """
        table: dict[str, Any] = {}
        for obj in trusted or ():
            if not isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
                raise TypeError(
                    "trusted=[...] takes the classes and functions themselves (e.g. "
                    f"trusted=[MyCallback, my_loss]), not {obj!r:.60} (a {type(obj).__name__}); "
                    "for a whole package use trust_modules=('mypkg',)"
                )
            with contextlib.suppress(ImportPathError):
                table[import_path(obj)] = obj
            table[f"{obj.__module__}.{obj.__qualname__}"] = obj
        if isinstance(trust_modules, str):
            trust_modules = (trust_modules,)
        modules = tuple(trust_modules or ())
        for prefix in modules:
            if not isinstance(prefix, str) or not all(p.isidentifier() for p in prefix.split(".")):
                raise TypeError(
                    f"trust_modules takes package or module names like ('mypkg',), not {prefix!r:.60}"
                )
        return cls(
            source=None if source is None else os.fspath(source),
            own=bool(own),
            trusted=table,
            modules=modules,
        )

    def vouched(self, name: str) -> bool:
        """Whether the user vouched for ``name`` in this load.

        Example:
            >>> TrustPolicy.build(trust_modules=("mypkg",)).vouched("mypkg.models.Net")
            True
        """
        if self.own or name in self.trusted:
            return True
        return any(name == m or name.startswith(m + ".") for m in self.modules)

    def _refuse(self, name: str, found: Any, slot: str, record: str) -> CheckpointError:
        return CheckpointError(
            f"{_where(self.source)}: record {record!r} names {_shown(name)}, which is "
            f"{describe_object(found)}, not a valid {slot}. nnh called nothing. What to do: do "
            "not use this file, or remove that object from trusted=[...].",
            path=self.source,
            kind="untrusted",
        )

    def resolve(self, name: Any, slot: str, *, record: str) -> Any:
        """The object ``name`` selects for ``slot``, or ``None`` when dropped (recorded in
        :attr:`dropped`). Raises ``CheckpointError`` for a vouched name of the wrong type.

        Example:
            >>> TrustPolicy.build().resolve("torch.nn.functional.mse_loss", "loss",
            ...                             record="loss.fn").__name__
            'mse_loss'
        """
        entry = lookup(name, slot)
        if entry is not None:
            return entry
        if not isinstance(name, str):
            raise CheckpointError(
                f"{_where(self.source)}: record {record!r} should name an import path (a "
                f"string), but holds a {type(name).__name__}. The file is damaged or was "
                "crafted. What to do: use a checkpoint written by NNHandler.save.",
                path=self.source,
                kind="untrusted",
            )
        if not self.vouched(name):
            self.dropped.append((record, name))
            return None
        found = self.trusted.get(name)
        if found is None:
            found = safe_import(name, record=record, source=self.source, allow_private=True)
        if not _fits_slot(found, slot):
            raise self._refuse(name, found, slot, record)
        return found

    def model_class(self, name: Any, *, record: str = "model.class") -> type[nn.Module]:
        """The model class: from ``trusted``, else imported under :func:`safe_import`'s rules
        (private segments only when vouched); it must subclass ``nn.Module``.

        Example:
            >>> TrustPolicy.build().model_class("torch.nn.Linear").__name__
            'Linear'
        """
        found = self.trusted.get(name) if isinstance(name, str) else None
        if found is None:
            allow = isinstance(name, str) and self.vouched(name)
            found = safe_import(name, record=record, source=self.source, allow_private=allow)
        if not (isinstance(found, type) and issubclass(found, nn.Module)):
            raise self._refuse(str(name), found, "model (an nn.Module subclass)", record)
        return found

    def dropped_message(self) -> str | None:
        """One message naming every dropped record and how to restore it, or ``None``.

        Example:
            >>> p = TrustPolicy.build(source="run.pth")
            >>> _ = p.resolve("mypkg.Cb", "callback", record="callbacks[0].class")
            >>> print(p.dropped_message())  # doctest: +ELLIPSIS
            checkpoint 'run.pth' is not signed with your key ... callbacks[0].class = 'mypkg.Cb'...
        """
        if not self.dropped:
            return None
        items = "; ".join(f"{rec} = {_shown(name)}" for rec, name in self.dropped[:10])
        more = f" and {len(self.dropped) - 10} more" if len(self.dropped) > 10 else ""
        roots = sorted({n.split(".")[0] for _, n in self.dropped if isinstance(n, str)})
        return (
            f"{_where(self.source)} is not signed with your key (written by someone else, on "
            "another machine without your key, or edited), so only nnh's registry was restored "
            f"from it; not restored: {items}{more}. What to do: if you trust this code, load "
            "with NNHandler.load(path, trusted=[TheClass, the_function]) or "
            f"trust_modules={tuple(roots)!r}, or set them again after loading."
        )
