"""An adapter that runs any ``torch.optim.Optimizer`` as the update rule of a pure step.

The adapter owns a real torch optimizer (``adapter.optimizer``): schedulers and user code use
it as usual, and its ``param_groups`` hyper-parameters (``lr``, ``betas``, ...) are the
configuration of the update. The per-parameter state (``exp_avg``, ``momentum_buffer``, ...)
lives in the :class:`~nnh.core.TrainState` record; :meth:`OptimizerAdapter.bind` points the
optimizer at a record's tensors, and ``optimizer.step()`` then updates them in place.

Closure-based optimizers (``LBFGS``) are not supported: the step function owns the backward.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from tensordict import TensorDict
from torch import nn

from nnh.core.tree import flat_td

__all__ = ["OptimizerAdapter"]


def _param_names(module: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in module.named_parameters()}


class OptimizerAdapter:
    """A torch optimizer plus the parameter names of each of its param groups.

    Create one with :meth:`create` (class and keyword arguments, optional param groups)
    or :meth:`wrap` (an optimizer already built on the module's parameters).

    Example:
        >>> model = nn.Linear(4, 2)
        >>> adapter = OptimizerAdapter.create(torch.optim.AdamW, model, lr=1e-3, weight_decay=0.1)
        >>> type(adapter.optimizer).__name__, adapter.group_names
        ('AdamW', [['weight', 'bias']])
    """

    def __init__(self, optimizer: torch.optim.Optimizer, group_names: list[list[str]]):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}; "
                "build it with OptimizerAdapter.create(optimizer_class, module, **kwargs)"
            )
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError(
                "LBFGS needs a closure that re-evaluates the loss, which the step functions "
                "do not support; use a first-order optimizer (Adam, SGD, ...)"
            )
        self.optimizer = optimizer
        self.group_names = group_names
        self._bound_params: TensorDict | None = None
        self._bound_opt_state: TensorDict | None = None
        self._state_signature = -1

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        optimizer_class: type[torch.optim.Optimizer],
        module: nn.Module,
        params: Iterable[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> OptimizerAdapter:
        """Build ``optimizer_class`` over ``module``'s parameters.

        ``params`` may give param groups as in torch: dicts whose ``"params"`` hold the
        module's parameters or their names, with per-group options.

        Example:
            >>> m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
            >>> groups = [{"params": ["0.weight", "0.bias"], "lr": 0.1}, {"params": ["1.weight", "1.bias"]}]
            >>> a = OptimizerAdapter.create(torch.optim.SGD, m, params=groups, lr=0.01)
            >>> [g["lr"] for g in a.optimizer.param_groups]
            [0.1, 0.01]
        """
        if not (
            isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)
        ):
            raise TypeError(
                f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}; "
                "pass the class itself, e.g. torch.optim.Adam, and its options as keywords"
            )
        named = dict(module.named_parameters())
        if params is None:
            groups: list[dict[str, Any]] = [{"params": list(named.values())}]
        else:
            groups = [_resolve_group(g, named) for g in params]
        try:
            optimizer = optimizer_class(groups, **kwargs)
        except TypeError as err:
            raise TypeError(
                f"{optimizer_class.__name__} does not accept the options {sorted(kwargs)}: {err}"
            ) from err
        return cls.wrap(optimizer, module)

    @classmethod
    def wrap(cls, optimizer: torch.optim.Optimizer, module: nn.Module) -> OptimizerAdapter:
        """Adopt an optimizer already built on ``module``'s parameters.

        Example:
            >>> m = nn.Linear(2, 1)
            >>> a = OptimizerAdapter.wrap(torch.optim.SGD(m.parameters(), lr=0.1), m)
            >>> a.group_names
            [['weight', 'bias']]
        """
        names = _param_names(module)
        group_names = []
        for i, group in enumerate(optimizer.param_groups):
            try:
                group_names.append([names[id(p)] for p in group["params"]])
            except KeyError:
                raise ValueError(
                    f"param group {i} of {type(optimizer).__name__} holds a tensor that is not a "
                    "parameter of the module; build the optimizer on module.parameters()"
                ) from None
        return cls(optimizer, group_names)

    # -- binding to a record --------------------------------------------------------------
    def is_bound(self, params: TensorDict, opt_state: TensorDict) -> bool:
        """Whether the optimizer already points at these exact TensorDicts (O(1)).

        Example:
            >>> m = nn.Linear(2, 1)
            >>> a = OptimizerAdapter.create(torch.optim.SGD, m, lr=0.1)
            >>> p = flat_td(dict(m.named_parameters())); s = a.export_state(p)
            >>> a.bind(p, s); a.is_bound(p, s)
            True
        """
        return params is self._bound_params and opt_state is self._bound_opt_state

    def bind(self, params: TensorDict, opt_state: TensorDict) -> None:
        """Point the optimizer's param groups and state at a record's tensors.

        Example:
            >>> m = nn.Linear(2, 1)
            >>> a = OptimizerAdapter.create(torch.optim.SGD, m, lr=0.1)
            >>> p = flat_td(dict(m.named_parameters()))
            >>> a.bind(p, a.export_state(p))
            >>> a.optimizer.param_groups[0]["params"][0] is p["weight"]
            True
        """
        for group, names in zip(self.optimizer.param_groups, self.group_names):
            group["params"] = [params[n] for n in names]
        state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        for name in opt_state.keys():
            state[params[name]] = dict(opt_state[name].items())
        self.optimizer.state = state
        self._bound_params = params
        self._bound_opt_state = opt_state
        self._state_signature = len(state)

    def export_state(self, params: TensorDict) -> TensorDict:
        """The optimizer's per-parameter state as a nested TensorDict keyed by name.

        Example:
            >>> m = nn.Linear(2, 1)
            >>> a = OptimizerAdapter.create(torch.optim.SGD, m, lr=0.1)
            >>> len(a.export_state(flat_td(dict(m.named_parameters()))).keys())
            0
        """
        by_id = {id(t): name for name, t in params.items()}
        out = {}
        for p, s in self.optimizer.state.items():
            name = by_id.get(id(p))
            if name is None or not s:
                continue
            entries = {}
            for key, value in s.items():
                if not isinstance(value, torch.Tensor):
                    value = torch.as_tensor(value)
                entries[key] = value
            out[name] = flat_td(entries)
        return TensorDict(out, batch_size=[])

    def step(self, params: TensorDict) -> TensorDict | None:
        """Run ``optimizer.step()`` on the bound record; a new ``opt_state`` TensorDict when
        the optimizer created state (first step), else ``None`` (updated in place).

        Example:
            >>> m = nn.Linear(2, 1)
            >>> a = OptimizerAdapter.create(torch.optim.SGD, m, lr=0.1, momentum=0.9)
            >>> p = flat_td(dict(m.named_parameters())); a.bind(p, a.export_state(p))
            >>> m(torch.ones(1, 2)).sum().backward()
            >>> sorted(a.step(p).keys())
            ['bias', 'weight']
        """
        self.optimizer.step()
        signature = len(self.optimizer.state)
        if signature == self._state_signature:
            return None
        new_state = self.export_state(params)
        self._bound_opt_state = new_state
        self._state_signature = signature
        return new_state

    def zero_grad(self) -> None:
        """Drop the bound parameters' gradients (``set_to_none``, as ``torch`` does)."""
        self.optimizer.zero_grad(set_to_none=True)


def _resolve_group(group: Mapping[str, Any], named: Mapping[str, nn.Parameter]) -> dict[str, Any]:
    if "params" not in group:
        raise ValueError("each param group needs a 'params' entry (parameters or their names)")
    resolved = dict(group)
    items: Sequence[Any] = list(group["params"])
    out = []
    for item in items:
        if isinstance(item, str):
            if item not in named:
                raise KeyError(
                    f"param group names {item!r}, which is not a parameter of the module; "
                    f"known names start with {sorted(named)[:5]}"
                )
            out.append(named[item])
        else:
            out.append(item)
    resolved["params"] = out
    return resolved
