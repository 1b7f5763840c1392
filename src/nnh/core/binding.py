"""Binding a module to a record: the module computes with the record's tensors.

A :class:`ModuleBinding` knows every slot (sub-module and attribute) of the module's
parameters and buffers, tied ones included. :meth:`ModuleBinding.bind` installs a record's
tensors in those slots; when the record is already bound (the common, donated case) the
check is one identity comparison.
"""

from __future__ import annotations

from collections import defaultdict

from tensordict import TensorDict
from torch import nn

__all__ = ["ModuleBinding", "unwrap_module"]


def unwrap_module(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / ``torch.compile`` wrappers.

    Example:
        >>> m = nn.Linear(1, 1)
        >>> unwrap_module(nn.DataParallel(m)) is m
        True
    """
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


class ModuleBinding:
    """Installs records' tensors into a module's parameter and buffer slots.

    Example:
        >>> from nnh.core.tree import flat_td, clone_parameters
        >>> m = nn.Linear(2, 1)
        >>> b = ModuleBinding(m)
        >>> p = clone_parameters(flat_td(dict(m.named_parameters())))
        >>> b.bind(p, flat_td({}))
        >>> m.weight is p["weight"]
        True
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self._param_slots = _slots(module, "_parameters")
        self._buffer_slots = _slots(module, "_buffers")
        self.params: TensorDict | None = TensorDict(dict(module.named_parameters()), batch_size=[])
        self.buffers: TensorDict | None = TensorDict(dict(module.named_buffers()), batch_size=[])

    def is_bound(self, params: TensorDict, buffers: TensorDict) -> bool:
        """Whether the module already computes with exactly these TensorDicts."""
        return params is self.params and buffers is self.buffers

    def bind(self, params: TensorDict, buffers: TensorDict) -> None:
        """Install ``params`` and ``buffers`` in the module (no copy)."""
        if self.is_bound(params, buffers):
            return
        _install(self._param_slots, params, "parameter", nn.Parameter)
        _install(self._buffer_slots, buffers, "buffer", None)
        self.params, self.buffers = params, buffers


def _slots(module: nn.Module, kind: str) -> dict[str, list[tuple[nn.Module, str]]]:
    """name -> every (sub-module, attribute) holding that tensor, tied weights included."""
    first_name: dict[int, str] = {}
    slots: dict[str, list[tuple[nn.Module, str]]] = defaultdict(list)
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for attr, tensor in getattr(mod, kind).items():
            if tensor is None:
                continue
            full = f"{mod_name}.{attr}" if mod_name else attr
            name = first_name.setdefault(id(tensor), full)
            if (mod, attr) not in slots[name]:
                slots[name].append((mod, attr))
    return dict(slots)


def _install(slots, tensors: TensorDict, kind: str, required_type) -> None:
    names = set(tensors.keys())
    if names != set(slots):
        missing, extra = sorted(set(slots) - names), sorted(names - set(slots))
        raise KeyError(
            f"the record's {kind}s do not match the module: missing {missing}, unexpected {extra}; "
            "build the state from this module with init_train_state"
        )
    for name, places in slots.items():
        tensor = tensors[name]
        if required_type is not None and not isinstance(tensor, required_type):
            raise TypeError(
                f"{kind} {name!r} must be an nn.Parameter to be installed in the module"
            )
        for mod, attr in places:
            getattr(mod, f"_{kind}s")[attr] = tensor
