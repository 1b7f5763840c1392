"""Vectorised ensembles: E copies of one model trained by one pure step.

An :class:`EnsembleModule` holds E members of one architecture with every parameter and
buffer stacked along a leading member dimension (``[E, *shape]``), under the *same names*
as the plain model. Its forward runs the members with ``torch.func.vmap`` over a
``functional_call``-style call of the model: ``ensemble(x)`` is ``[E, B, ...]``.

Because the module exposes ordinary (stacked) parameters, the rest of the core works on it
unchanged: :func:`~nnh.core.init_train_state` builds the record, the
:class:`~nnh.core.OptimizerAdapter` runs any *elementwise* torch optimizer on the stacked
tensors (each member's entries are updated exactly as they would be alone), EMA is a lerp
per element (so per member), and BatchNorm statistics are stacked buffers (per member).
What is not elementwise is done per member here: the loss (one per member; their sum is
backpropagated, and the members are independent, so each gets its own gradient), gradient
clipping (one norm per member) and metrics.

:func:`ensemble_train_step` is :func:`~nnh.core.train_step` on an :class:`EnsembleConfig`:
the same code path, hence the same contract (purity, ``donate`` equivalence, determinism
with an explicit ``rng``). Dropout draws independent masks per member
(``randomness="different"``) from the step's generator. With a loss scaler the scale is
shared: an inf/NaN gradient in any member skips the update of all of them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from nnh.core import OptimizerAdapter, Supervised, init_train_state
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> ens = EnsembleModule([nn.Linear(3, 2) for _ in range(4)])
    >>> ens.weight.shape, ens(torch.ones(5, 3)).shape
    (torch.Size([4, 2, 3]), torch.Size([4, 5, 2]))
    >>> opt = OptimizerAdapter.create(torch.optim.Adam, ens, lr=1e-2)
    >>> cfg = EnsembleConfig(model=ens, optimizer=opt, objective=Supervised(nn.functional.mse_loss))
    >>> s1, out = ensemble_train_step(init_train_state(ens, opt), (torch.ones(5, 3), torch.zeros(5, 2)), cfg)
    >>> out.loss.shape, s1.step
    (torch.Size([4]), 1)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch
from tensordict import TensorDict
from torch import nn
from torch.func import vmap

from nnh.core.binding import ModuleBinding, _slots
from nnh.core.metrics import metric_sums
from nnh.core.objectives import Evaluation
from nnh.core.state import TrainState
from nnh.core.step import StepOutput, TrainConfig, end_epoch, eval_step, train_step
from nnh.core.tree import flat_td

__all__ = [
    "ELEMENTWISE_OPTIMIZERS",
    "EnsembleConfig",
    "EnsembleModule",
    "VectorisedObjective",
    "check_vectorisable",
    "ensemble_end_epoch",
    "ensemble_eval_step",
    "ensemble_train_step",
    "member_state",
    "stack_states",
    "vectorise_objective",
]

# Optimizers whose update of an element depends only on that element's own history (and on
# the shared step count): on stacked members they give each member its solo update.
ELEMENTWISE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.ASGD,
    torch.optim.Rprop,
)

_WHY_NOT = {
    "LBFGS": "it needs a closure that re-runs the forward pass and takes global line-search steps",
    "SparseAdam": "it needs sparse gradients",
    "Adafactor": "it factors second moments over the rows and columns of each tensor, so "
    "stacked members would share statistics",
    "Muon": "it orthogonalises each weight matrix as a whole, so stacked members would be mixed",
}

# The keyword through which the vectorised objective reaches EnsembleModule.forward (so the
# call goes through a DDP wrapper's forward, which prepares the gradient reduction).
_JOB = "_nnh_vectorised_objective"


def check_vectorisable(optimizer_class: type) -> None:
    """Raise ``TypeError`` naming ``optimizer_class`` when it cannot train stacked members.

    Example:
        >>> check_vectorisable(torch.optim.AdamW)
        >>> check_vectorisable(torch.optim.LBFGS)
        Traceback (most recent call last):
            ...
        TypeError: LBFGS cannot train an ensemble: it needs a closure that re-runs the forward pass and takes global line-search steps. Use an elementwise optimizer: SGD, Adam, AdamW, RMSprop, Adagrad, Adadelta, Adamax, NAdam, RAdam, ASGD, Rprop
    """
    if isinstance(optimizer_class, type) and issubclass(optimizer_class, ELEMENTWISE_OPTIMIZERS):
        return
    name = getattr(optimizer_class, "__name__", repr(optimizer_class))
    why = _WHY_NOT.get(
        name,
        "nnh cannot tell that its update of each element depends only on that element "
        "(what lets stacked members train as if alone)",
    )
    known = ", ".join(c.__name__ for c in ELEMENTWISE_OPTIMIZERS)
    raise TypeError(
        f"{name} cannot train an ensemble: {why}. Use an elementwise optimizer: {known}"
    )


class _Member:
    """One member as a callable: the holder module run on that member's tensors.

    Inside ``vmap`` the tensors are the members' batched views. They are installed in the
    holder's slots (tied ones included) for the call and the stacked tensors put back
    after: what ``torch.func.functional_call`` does, without its per-call name lookups
    (about 0.1 ms a call on a small MLP, several percent of a step).
    """

    __slots__ = ("holder", "places", "tensors")

    def __init__(
        self,
        holder: nn.Module,
        places: list[tuple[str, dict[str, Any], str]],
        tensors: dict[str, torch.Tensor],
    ):
        self.holder, self.places, self.tensors = holder, places, tensors

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tensors = self.tensors
        saved = [(table, attr, table[attr]) for _, table, attr in self.places]
        for name, table, attr in self.places:
            table[attr] = tensors[name]
        try:
            return self.holder(*args, **kwargs)
        finally:
            for table, attr, value in saved:
                table[attr] = value


class EnsembleModule(nn.Module):
    """E members of one architecture, parameters and buffers stacked as ``[E, *shape]``.

    Names are those of the plain model (``ens.state_dict()`` has the member model's keys
    with a leading member dimension). ``ens(x)`` runs every member on the same input and
    returns ``[E, B, ...]``; :meth:`member` gives a plain module holding one member's
    weights. The member modules passed in are copied, not consumed.

    Example:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> members = [nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4)) for _ in range(3)]
        >>> ens = EnsembleModule(members)
        >>> ens.ensemble_size, ens.state_dict()["1.num_batches_tracked"].shape
        (3, torch.Size([3]))
        >>> torch.equal(ens.member(1)[0].weight, members[1][0].weight)
        True
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        members = list(members)
        if not members or not all(isinstance(m, nn.Module) for m in members):
            raise ValueError("EnsembleModule needs a non-empty list of nn.Module members")
        first = members[0]
        kinds = {type(m) for m in members}
        if len(kinds) > 1:
            raise TypeError(
                f"ensemble members must be one class, got {sorted(k.__name__ for k in kinds)}"
            )
        params = _stack(members, "named_parameters", first, parameters=True)
        buffers = _stack(members, "named_buffers", first, parameters=False)
        holder = copy.deepcopy(first)
        ModuleBinding(holder).bind(params, buffers)
        # The holder (a member-class module) owns the slots; this module shares its
        # parameter, buffer and sub-module tables, so names and slots are the member's.
        self.__dict__["_holder"] = holder
        self.__dict__["_parameters"] = holder._parameters
        self.__dict__["_buffers"] = holder._buffers
        self.__dict__["_non_persistent_buffers_set"] = holder._non_persistent_buffers_set
        self.__dict__["_modules"] = holder._modules
        self.training = holder.training
        self.ensemble_size = len(members)
        self._param_slots = _first_slots(holder, "_parameters")
        self._buffer_slots = _first_slots(holder, "_buffers")
        self._places = _all_places(holder, "_parameters") + _all_places(holder, "_buffers")

    @property
    def member_class(self) -> type[nn.Module]:
        """The class of the members."""
        return type(self._holder)

    def extra_repr(self) -> str:
        return f"members={self.ensemble_size}, model={type(self._holder).__name__}"

    def train(self, mode: bool = True) -> EnsembleModule:
        super().train(mode)
        self._holder.training = mode
        return self

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {name: mod._parameters[attr] for name, mod, attr in self._param_slots}
        out.update({name: mod._buffers[attr] for name, mod, attr in self._buffer_slots})
        return out

    def map_members(self, fn: Callable[[Callable[..., Any]], Any]) -> Any:
        """``fn(member)`` for every member at once (``vmap``); results stacked on dim 0.

        ``member(*args)`` runs the plain model with one member's tensors. Randomness
        (dropout) differs between members. BatchNorm in training mode updates each
        member's own statistics in place.

        Example:
            >>> ens = EnsembleModule([nn.Linear(2, 1) for _ in range(3)])
            >>> ens.map_members(lambda m: m(torch.zeros(4, 2)).sum()).shape
            torch.Size([3])
        """
        holder, places = self._holder, self._places
        return vmap(lambda t: fn(_Member(holder, places, t)), randomness="different")(
            self._tensors()
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        job = kwargs.pop(_JOB, None)
        if job is not None:
            return self._evaluate(*job)
        return self.map_members(lambda member: member(*args, **kwargs))

    def _evaluate(self, objective: Callable, batch: Any, epoch: int) -> tuple[Any, ...]:
        side: dict[str, Any] = {}

        def one(member: Callable[..., Any]) -> tuple[Any, ...]:
            ev = objective(member, batch, epoch)
            side["n"] = ev.num_samples
            loss = ev.loss
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                what = (
                    type(loss).__name__
                    if not isinstance(loss, torch.Tensor)
                    else f"shape {tuple(loss.shape)}"
                )
                raise TypeError(
                    "the loss function must return a scalar tensor for each member (reduce it "
                    f"to the batch mean), got {what}"
                )
            loss = loss.reshape(())
            if _is_tensor_tree(ev.target):
                return loss, ev.output, ev.target
            side["target"] = ev.target
            return loss, ev.output

        out = self.map_members(one)
        target = out[2] if len(out) == 3 else side["target"]
        return out[0], out[1], target, side["n"]

    def member(self, index: int) -> nn.Module:
        """A plain model-class module holding member ``index``'s current weights (a copy).

        Example:
            >>> ens = EnsembleModule([nn.Linear(2, 1) for _ in range(2)])
            >>> m = ens.member(1)
            >>> type(m).__name__, torch.equal(m.weight, ens.weight[1])
            ('Linear', True)
        """
        if not isinstance(index, int) or not -self.ensemble_size <= index < self.ensemble_size:
            raise IndexError(
                f"member index {index!r} out of range for an ensemble of {self.ensemble_size}"
            )
        memo: dict[int, Any] = {}
        for t in self._tensors().values():
            piece = t.detach()[index].clone()
            if isinstance(t, nn.Parameter):
                piece = nn.Parameter(piece, requires_grad=t.requires_grad)
            memo[id(t)] = piece
        return copy.deepcopy(self._holder, memo)


def _stack(
    members: list[nn.Module], kind: str, first: nn.Module, *, parameters: bool
) -> TensorDict:
    named = [dict(getattr(m, kind)()) for m in members]
    shapes = {k: v.shape for k, v in named[0].items()}
    for i, tensors in enumerate(named):
        if {k: v.shape for k, v in tensors.items()} != shapes:
            raise ValueError(
                f"ensemble member {i} has other {kind[6:]} (names or shapes) than member 0"
            )
    out: dict[str, torch.Tensor] = {}
    for name, ref in named[0].items():
        stacked = torch.stack([tensors[name].detach() for tensors in named])
        out[name] = (
            nn.Parameter(stacked, requires_grad=ref.requires_grad) if parameters else stacked
        )
    return flat_td(out)


def _first_slots(module: nn.Module, kind: str) -> list[tuple[str, nn.Module, str]]:
    return [(name, *places[0]) for name, places in _slots(module, kind).items()]


def _all_places(module: nn.Module, kind: str) -> list[tuple[str, dict[str, Any], str]]:
    """(name, slot table, attribute) of every slot, tied ones included."""
    return [
        (name, getattr(mod, kind), attr)
        for name, places in _slots(module, kind).items()
        for mod, attr in places
    ]


def _is_tensor_tree(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, (list, tuple)):
        return len(x) > 0 and all(_is_tensor_tree(v) for v in x)
    if isinstance(x, dict):
        return len(x) > 0 and all(_is_tensor_tree(v) for v in x.values())
    return False


@attrs.frozen(eq=False)
class VectorisedObjective:
    """An objective run for every member at once; the loss is ``[E]`` (one per member).

    It calls the model with a keyword that :class:`EnsembleModule` answers with the
    vectorised evaluation, so under DDP the call goes through the wrapper's forward.
    """

    objective: Callable[[Any, Any, int], Evaluation]

    def __call__(self, model: Callable[..., Any], batch: Any, epoch: int = 0) -> Evaluation:
        loss, output, target, n = model(**{_JOB: (self.objective, batch, epoch)})
        return Evaluation(loss=loss, output=output, target=target, num_samples=n)


@attrs.frozen(eq=False)
class _VectorisedWithLossOf(VectorisedObjective):
    def loss_of(self, output: Any, target: Any, epoch: int = 0) -> torch.Tensor:
        """Per-member losses of given ``[E, ...]`` outputs and targets."""
        return vmap(lambda o, t: self.objective.loss_of(o, t, epoch))(output, target)


def vectorise_objective(objective: Callable[[Any, Any, int], Evaluation]) -> VectorisedObjective:
    """Wrap ``objective`` to evaluate every member (no-op when already vectorised).

    Example:
        >>> from nnh.core import Supervised
        >>> v = vectorise_objective(Supervised(nn.functional.mse_loss))
        >>> vectorise_objective(v) is v, hasattr(v, "loss_of")
        (True, True)
    """
    if isinstance(objective, VectorisedObjective):
        return objective
    if callable(getattr(objective, "loss_of", None)):
        return _VectorisedWithLossOf(objective)
    return VectorisedObjective(objective)


@attrs.frozen(eq=False)
class EnsembleConfig(TrainConfig):
    """A :class:`~nnh.core.TrainConfig` for an :class:`EnsembleModule`.

    The objective is vectorised over members, clipping takes one norm per member, metrics
    are computed per member, and the optimizer must be elementwise
    (:data:`ELEMENTWISE_OPTIMIZERS`).

    Example:
        >>> from nnh.core import OptimizerAdapter, Supervised
        >>> ens = EnsembleModule([nn.Linear(2, 1) for _ in range(3)])
        >>> cfg = EnsembleConfig(model=ens, optimizer=OptimizerAdapter.create(torch.optim.SGD, ens, lr=0.1),
        ...                      objective=Supervised(nn.functional.mse_loss), clip_norm=1.0)
        >>> cfg.members
        3
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if not isinstance(self.module, EnsembleModule):
            raise TypeError(
                f"EnsembleConfig needs an EnsembleModule as its module, got {type(self.module).__name__}; "
                "build one with EnsembleModule([model_class(...) for _ in range(E)])"
            )
        if self.optimizer is not None:
            check_vectorisable(type(self.optimizer.optimizer))
        object.__setattr__(self, "objective", vectorise_objective(self.objective))

    @property
    def members(self) -> int:
        return self.module.ensemble_size

    def clip_grads_(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Scale each member's gradients to norm ``<= clip_norm``; returns the ``[E]`` norms."""
        e = self.members
        per_leaf = torch.stack([torch.linalg.vector_norm(g.reshape(e, -1), dim=1) for g in grads])
        norms = torch.linalg.vector_norm(per_leaf, dim=0)
        coef = torch.clamp(self.clip_norm / (norms + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.view(e, *([1] * (g.dim() - 1))))
        return norms

    def metric_sums(
        self,
        metrics: Mapping[str, Callable[[Any, Any], Any]],
        output: Any,
        target: Any,
        num_samples: int,
    ) -> dict[str, torch.Tensor]:
        """``{name: [E] sums}``: each metric on each member's output and target."""
        per = [
            metric_sums(metrics, _member_slice(output, i), _member_slice(target, i), num_samples)
            for i in range(self.members)
        ]
        device = _first_device(output)
        return {
            name: torch.stack(
                [torch.as_tensor(p[name], dtype=torch.float64, device=device) for p in per]
            )
            for name in metrics
        }


def _member_slice(x: Any, i: int) -> Any:
    if isinstance(x, torch.Tensor):
        return x[i]
    if isinstance(x, (list, tuple)):
        return type(x)(_member_slice(v, i) for v in x)
    if isinstance(x, dict):
        return {k: _member_slice(v, i) for k, v in x.items()}
    return x


def _first_device(x: Any) -> torch.device:
    if isinstance(x, torch.Tensor):
        return x.device
    if isinstance(x, (list, tuple)) and x:
        return _first_device(x[0])
    if isinstance(x, dict) and x:
        return _first_device(next(iter(x.values())))
    return torch.device("cpu")


def _require(config: TrainConfig) -> None:
    if not isinstance(config, EnsembleConfig):
        raise TypeError(
            f"an ensemble step needs an EnsembleConfig, got {type(config).__name__}; "
            "use train_step for a single model"
        )


def ensemble_train_step(
    state: TrainState,
    batch: Any,
    config: EnsembleConfig,
    *,
    donate: bool = False,
    last_batch: bool = False,
) -> tuple[TrainState, StepOutput]:
    """One vectorised micro-step of every member (the contract of :func:`~nnh.core.train_step`).

    ``StepOutput.loss`` is ``[E]``, ``output`` is ``[E, B, ...]``, ``grad_norm`` (with
    clipping) is ``[E]``.

    Example:
        >>> from nnh.core import OptimizerAdapter, Supervised, init_train_state
        >>> ens = EnsembleModule([nn.Linear(2, 1) for _ in range(2)])
        >>> opt = OptimizerAdapter.create(torch.optim.SGD, ens, lr=0.1)
        >>> cfg = EnsembleConfig(model=ens, optimizer=opt, objective=Supervised(nn.functional.mse_loss))
        >>> s0 = init_train_state(ens, opt)
        >>> s1, out = ensemble_train_step(s0, (torch.ones(4, 2), torch.zeros(4, 1)), cfg)
        >>> s1.step, s0.step, out.output.shape
        (1, 0, torch.Size([2, 4, 1]))
    """
    _require(config)
    return train_step(state, batch, config, donate=donate, last_batch=last_batch)


def ensemble_eval_step(state: TrainState, batch: Any, config: EnsembleConfig, *, metrics=None):
    """:func:`~nnh.core.eval_step` for every member: ``loss_sum`` and metric sums are ``[E]``.

    Example:
        >>> from nnh.core import OptimizerAdapter, Supervised, init_train_state
        >>> ens = EnsembleModule([nn.Linear(2, 1) for _ in range(2)])
        >>> cfg = EnsembleConfig(model=ens, optimizer=None, objective=Supervised(nn.functional.mse_loss))
        >>> s = init_train_state(ens, OptimizerAdapter.create(torch.optim.SGD, ens, lr=0.1))
        >>> ensemble_eval_step(s, (torch.ones(3, 2), torch.zeros(3, 1)), cfg).loss_sum.shape
        torch.Size([2])
    """
    _require(config)
    return eval_step(state, batch, config, metrics=metrics)


def ensemble_end_epoch(
    state: TrainState, config: EnsembleConfig, *, donate: bool = False
) -> TrainState:
    """:func:`~nnh.core.end_epoch` for an ensemble (an open window is applied per member).

    Example:
        >>> from nnh.core import OptimizerAdapter, Supervised, init_train_state
        >>> ens = EnsembleModule([nn.Linear(2, 1) for _ in range(2)])
        >>> opt = OptimizerAdapter.create(torch.optim.SGD, ens, lr=0.1)
        >>> cfg = EnsembleConfig(model=ens, optimizer=opt, objective=Supervised(nn.functional.mse_loss))
        >>> ensemble_end_epoch(init_train_state(ens, opt), cfg).epoch
        1
    """
    _require(config)
    return end_epoch(state, config, donate=donate)


# Optimizer-state entries that are one number per parameter whatever its shape (the step
# count and step-derived factors): shared by the members, never stacked.
_SCALAR_STATE = frozenset({"step", "eta", "mu", "mu_product"})


def _member_td(td: TensorDict | None, i: int, *, parameters: bool = False) -> TensorDict | None:
    if td is None:
        return None
    out = {}
    for key, value in td.items():
        piece = value.detach()[i].clone()
        if parameters:
            piece = nn.Parameter(piece, requires_grad=value.requires_grad)
        out[key] = piece
    return flat_td(out)


def _member_opt_state(opt_state: TensorDict, params: TensorDict, i: int) -> TensorDict:
    out = {}
    for name, entries in opt_state.items():
        shape = params[name].shape
        out[name] = flat_td(
            {k: v[i].clone() if v.shape == shape else v.clone() for k, v in entries.items()}
        )
    return TensorDict(out, batch_size=[])


def member_state(state: TrainState, index: int) -> TrainState:
    """Member ``index``'s record as a single-model :class:`~nnh.core.TrainState` (a copy).

    Optimizer-state entries shaped like their (stacked) parameter are sliced; the others
    (an optimizer's step count), the loss scaler, the generator state and the counters are
    shared by the members and copied as they are.

    Example:
        >>> from nnh.core import OptimizerAdapter, init_train_state
        >>> ens = EnsembleModule([nn.Linear(2, 1) for _ in range(3)])
        >>> s = init_train_state(ens, OptimizerAdapter.create(torch.optim.SGD, ens, lr=0.1))
        >>> member_state(s, 2).params["weight"].shape
        torch.Size([1, 2])
    """
    return attrs.evolve(
        state,
        params=_member_td(state.params, index, parameters=True),
        buffers=_member_td(state.buffers, index),
        opt_state=_member_opt_state(state.opt_state, state.params, index),
        grads=_member_td(state.grads, index),
        ema=_member_td(state.ema, index),
        scaler=None if state.scaler is None else state.scaler.clone(),
        rng=None if state.rng is None else state.rng.clone(),
    )


def _stack_tds(tds: list[TensorDict | None], *, parameters: bool = False) -> TensorDict | None:
    if tds[0] is None:
        return None
    out = {}
    for key, value in tds[0].items():
        stacked = torch.stack([td[key].detach() for td in tds])
        out[key] = (
            nn.Parameter(stacked, requires_grad=value.requires_grad) if parameters else stacked
        )
    return flat_td(out)


def _stack_opt_state(opt_states: list[TensorDict], params: TensorDict) -> TensorDict:
    out = {}
    for name, entries in opt_states[0].items():
        shape = params[name].shape
        stacked = {}
        for key, value in entries.items():
            per_element = value.shape == shape and not (len(shape) == 0 and key in _SCALAR_STATE)
            stacked[key] = (
                torch.stack([s[name][key] for s in opt_states]) if per_element else value.clone()
            )
        out[name] = flat_td(stacked)
    return TensorDict(out, batch_size=[])


def stack_states(states: Sequence[TrainState]) -> TrainState:
    """The ensemble record of single-model records: the inverse of :func:`member_state`.

    Counters, the scaler, the generator state and shared optimizer entries come from the
    first record.

    Example:
        >>> from nnh.core import OptimizerAdapter, init_train_state
        >>> ms = [nn.Linear(2, 1) for _ in range(2)]
        >>> s = stack_states([init_train_state(m, OptimizerAdapter.create(torch.optim.SGD, m, lr=0.1)) for m in ms])
        >>> s.params["weight"].shape
        torch.Size([2, 1, 2])
    """
    states = list(states)
    first = states[0]
    return attrs.evolve(
        first,
        params=_stack_tds([s.params for s in states], parameters=True),
        buffers=_stack_tds([s.buffers for s in states]),
        opt_state=_stack_opt_state([s.opt_state for s in states], first.params),
        grads=_stack_tds([s.grads for s in states]),
        ema=_stack_tds([s.ema for s in states]),
        scaler=None if first.scaler is None else first.scaler.clone(),
        rng=None if first.rng is None else first.rng.clone(),
    )
