"""The pure step functions: :func:`train_step`, :func:`eval_step`, :func:`end_epoch`.

Contract (DESIGN.md): a step never mutates its input record unless ``donate=True``; the same
inputs give the same outputs; the result is a new record; donating or not gives equal
results. Without donation the step clones the record and runs the donated path on the clone,
so the two paths are one code path.

The model and optimizer in :class:`TrainConfig` are execution engines: a step *binds* them
to the record it works on (installs the record's tensors in the module's slots and the
optimizer's param groups). A record that is already bound — the donated steady state —
costs one identity check.

Distributed seam: ``config.model`` may be a ``DistributedDataParallel`` wrapper of
``config.module``. Gradients are then reduced inside ``backward()``; on accumulation
micro-steps that do not update, the step enters ``model.no_sync()``. Only the donated path
on a bound record may be used under DDP (DDP's hooks belong to the original parameters).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
from torch import nn

from nnh.core.binding import ModuleBinding, unwrap_module
from nnh.core.ema import ema_update_
from nnh.core.metrics import metric_sums
from nnh.core.objectives import Evaluation
from nnh.core.optim import OptimizerAdapter
from nnh.core.scaler import LossScaler, scaler_update, unscale_grads_
from nnh.core.state import TrainState, clone_state
from nnh.core.tree import flat_td

__all__ = [
    "EvalOutput",
    "StepOutput",
    "TrainConfig",
    "apply_pending_update",
    "end_epoch",
    "eval_step",
    "train_step",
]

_AMP_DTYPES = (torch.bfloat16, torch.float16)


@attrs.frozen(eq=False)
class TrainConfig:
    """The static part of training: engines and hyper-parameters (like an optax chain).

    Attributes:
        model: the callable that runs the forward pass (the module, or a DDP /
            ``torch.compile`` wrapper of it).
        optimizer: an :class:`OptimizerAdapter`, or ``None`` for evaluation only.
        objective: ``objective(model, batch, epoch) -> Evaluation`` (e.g. ``Supervised``).
        accumulation_steps: micro-batches per optimizer update.
        clip_norm: clip the global gradient norm to this value (``None``: no clipping).
        amp_dtype: ``torch.bfloat16`` or ``torch.float16`` to run the forward in autocast.
        loss_scaler: dynamic loss scaler configuration (used when the record has a scaler).
        ema_decay: EMA decay (used when the record has EMA weights).
        module: the plain module whose slots hold the record's tensors (default: unwrapped
            ``model``).

    Example:
        >>> from nnh.core.objectives import Supervised
        >>> m = nn.Linear(2, 1)
        >>> cfg = TrainConfig(model=m, optimizer=OptimizerAdapter.create(torch.optim.SGD, m, lr=0.1),
        ...                   objective=Supervised(nn.functional.mse_loss), accumulation_steps=2)
        >>> cfg.accumulation_steps
        2
    """

    model: Callable[..., Any]
    optimizer: OptimizerAdapter | None
    objective: Callable[[Any, Any, int], Evaluation]
    accumulation_steps: int = 1
    clip_norm: float | None = None
    amp_dtype: torch.dtype | None = None
    loss_scaler: LossScaler | None = None
    ema_decay: float = 0.0
    module: nn.Module | None = None
    _binding: ModuleBinding = attrs.field(init=False)
    _cache: dict[str, Any] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.accumulation_steps, int) or self.accumulation_steps < 1:
            raise ValueError(
                f"accumulation_steps must be an int >= 1, got {self.accumulation_steps!r}"
            )
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(
                f"clip_norm must be > 0 (or None for no clipping), got {self.clip_norm!r}"
            )
        if self.amp_dtype is not None and self.amp_dtype not in _AMP_DTYPES:
            raise ValueError(
                f"amp_dtype must be torch.bfloat16 or torch.float16, got {self.amp_dtype!r}"
            )
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay!r}")
        module = self.module if self.module is not None else unwrap_module(self.model)
        if not isinstance(module, nn.Module):
            raise TypeError(
                "TrainConfig needs an nn.Module (pass module= when model is a plain callable)"
            )
        object.__setattr__(self, "module", module)
        object.__setattr__(self, "_binding", ModuleBinding(module))

    # -- binding --------------------------------------------------------------------------
    def bind(self, state: TrainState, *, with_optimizer: bool = True) -> None:
        """Make the module (and optimizer) compute with ``state``'s tensors (O(1) if bound)."""
        binding = self._binding
        if not binding.is_bound(state.params, state.buffers):
            binding.bind(state.params, state.buffers)
            grads = state.grads
            for name, p in state.params.items():
                p.grad = grads.get(name, None) if grads is not None else None
            self._cache.clear()
        if (
            with_optimizer
            and self.optimizer is not None
            and not self.optimizer.is_bound(state.params, state.opt_state)
        ):
            self.optimizer.bind(state.params, state.opt_state)

    def _leaves(self, state: TrainState) -> list[torch.Tensor]:
        cached = self._cache.get("params")
        if cached is None or cached[0] is not state.params:
            cached = (state.params, list(state.params.values()))
            self._cache["params"] = cached
        return cached[1]

    def _ema_leaves(self, state: TrainState) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cached = self._cache.get("ema")
        if cached is None or cached[0] is not state.ema or cached[1] is not state.params:
            names = list(state.params.keys())
            cached = (
                state.ema,
                state.params,
                [state.ema[n] for n in names],
                [state.params[n] for n in names],
            )
            self._cache["ema"] = cached
        return cached[2], cached[3]

    @property
    def members(self) -> int | None:
        """Ensemble members trained by this configuration (``None``: a single model)."""
        return None

    def clip_grads_(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Scale ``grads`` in place to global norm ``<= clip_norm``; returns the norm."""
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 shards: the norm across all shards
            grad_norm = grad_norm.full_tensor()
        coef = torch.clamp(self.clip_norm / (grad_norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device))
        return grad_norm

    def metric_sums(
        self,
        metrics: Mapping[str, Callable[[Any, Any], Any]],
        output: Any,
        target: Any,
        num_samples: int,
    ) -> dict[str, torch.Tensor | float]:
        """Sample-weighted sums of ``metrics`` on a batch's output (see :func:`metric_sums`)."""
        return metric_sums(metrics, output, target, num_samples)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of this configuration (a no-op without ``amp_dtype``)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        device_type = self._cache.get("device_type")
        if device_type is None:
            first = next(iter(self.module.parameters()), None)
            device_type = first.device.type if first is not None else "cpu"
            self._cache["device_type"] = device_type
        return torch.autocast(device_type=device_type, dtype=self.amp_dtype)


@attrs.frozen(eq=False)
class StepOutput:
    """What :func:`train_step` reports besides the new state.

    ``loss`` is the detached mean loss of the micro-batch (a device tensor: no sync).
    ``updated`` tells whether an optimizer update was applied at this step.
    ``grad_norm`` is the pre-clipping global norm when clipping is on.
    """

    loss: torch.Tensor
    output: Any
    target: Any
    num_samples: int
    updated: bool
    grad_norm: torch.Tensor | None = None


@attrs.frozen(eq=False)
class EvalOutput:
    """Sample-weighted sums of one evaluated batch: ``loss_sum / num_samples`` is its mean."""

    loss_sum: torch.Tensor
    metric_sums: dict[str, torch.Tensor | float]
    num_samples: int
    output: Any


class _RngScope:
    """Run a block on a record's CPU generator state, leaving the global RNG untouched."""

    def __init__(self, rng: torch.Tensor | None):
        self.rng = rng
        self.new_rng: torch.Tensor | None = None
        self._fork: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> _RngScope:
        if self.rng is not None:
            self._fork = torch.random.fork_rng(devices=[])
            self._fork.__enter__()
            torch.set_rng_state(self.rng)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fork is not None:
            if exc[0] is None:
                self.new_rng = torch.get_rng_state()
            self._fork.__exit__(*exc)


_NO_RNG = _RngScope(None)


def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (list, tuple)):
        return type(x)(_detach(v) for v in x)
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


def _check_loss(loss: Any, members: int | None = None) -> torch.Tensor:
    if members is not None and isinstance(loss, torch.Tensor) and loss.shape == (members,):
        pass  # one loss per ensemble member
    elif not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        what = (
            type(loss).__name__
            if not isinstance(loss, torch.Tensor)
            else f"shape {tuple(loss.shape)}"
        )
        raise TypeError(
            f"the loss function must return a scalar tensor (reduce it to the batch mean), got {what}"
        )
    if not loss.requires_grad:
        raise RuntimeError(
            "the loss does not require grad: no parameter took part in it (all frozen, or the "
            "loss was computed under torch.no_grad / from detached tensors)"
        )
    return loss


@contextlib.contextmanager
def _fsdp_no_sync(model: Any) -> Any:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def train_step(
    state: TrainState,
    batch: Any,
    config: TrainConfig,
    *,
    donate: bool = False,
    last_batch: bool = False,
) -> tuple[TrainState, StepOutput]:
    """One micro-step: forward, loss, backward; the update when the window is full.

    The accumulation window holds ``config.accumulation_steps`` micro-batches; the update
    also happens at ``last_batch=True`` (end of an epoch), with the partial window's own
    weight. Micro-batch losses are weighted by their sample count, so a window equals one
    batch of all its samples with a mean-reduced loss, whatever its micro-batch sizes.

    Example:
        >>> from nnh.core import Supervised, init_train_state
        >>> m = nn.Linear(2, 1)
        >>> opt = OptimizerAdapter.create(torch.optim.SGD, m, lr=0.1)
        >>> cfg = TrainConfig(model=m, optimizer=opt, objective=Supervised(nn.functional.mse_loss))
        >>> s0 = init_train_state(m, opt)
        >>> s1, out = train_step(s0, (torch.ones(4, 2), torch.zeros(4, 1)), cfg)
        >>> s1.step, s0.step, out.updated
        (1, 0, True)
    """
    if config.optimizer is None:
        raise RuntimeError("train_step needs an optimizer in the TrainConfig")
    if not donate:
        state = clone_state(state)
    config.bind(state)
    k = config.accumulation_steps
    micro = state.micro_step + 1
    update = micro >= k or last_batch
    sync: contextlib.AbstractContextManager = contextlib.nullcontext()
    if not update and hasattr(config.model, "no_sync"):
        sync = config.model.no_sync()
    elif not update and hasattr(config.model, "set_requires_gradient_sync"):
        sync = _fsdp_no_sync(config.model)  # FSDP2: reduce-scatter only on the update
    scope = _RngScope(state.rng) if state.rng is not None else _NO_RNG
    with scope, sync:
        with config.autocast():
            ev = config.objective(config.model, batch, state.epoch)
        members = config.members
        loss = _check_loss(ev.loss, members)
        n = ev.num_samples
        first = state.window_first if state.micro_step else n
        scaled = loss
        if k > 1 and n != first:
            scaled = loss * (n / first)
        if state.scaler is not None:
            scaled = scaled * state.scaler["scale"]
        # ensemble members are independent: the sum's gradient is each member's own
        (scaled.sum() if members else scaled).backward()
    window = _Window(
        micro, state.window_samples + n, first, scope.new_rng if state.rng is not None else None
    )
    out_loss, output, target = loss.detach(), _detach(ev.output), ev.target
    if not update:
        grads = flat_td({name: p.grad for name, p in state.params.items() if p.grad is not None})
        state = attrs.evolve(
            state,
            grads=grads,
            micro_step=window.micro_step,
            window_samples=window.samples,
            window_first=window.first,
            rng=window.rng if window.rng is not None else state.rng,
        )
        return state, StepOutput(out_loss, output, target, n, False)
    state, grad_norm = _apply_update(state, config, window)
    return state, StepOutput(out_loss, output, target, n, True, grad_norm)


@attrs.frozen
class _Window:
    """The accumulation window as it stands after the current micro-step."""

    micro_step: int
    samples: int
    first: int
    rng: torch.Tensor | None = None


def _apply_update(
    state: TrainState, config: TrainConfig, window: _Window
) -> tuple[TrainState, torch.Tensor | None]:
    """Apply the window's gradients (in place on ``state``, which the caller owns)."""
    weight = window.samples / window.first if window.micro_step > 1 else 1.0
    params = config._leaves(state)
    grads: list[torch.Tensor] = []
    if weight != 1.0 or state.scaler is not None or config.clip_norm is not None:
        grads = [p.grad for p in params if p.grad is not None]
    found_inf = None
    if state.scaler is not None:
        found_inf = unscale_grads_(grads, state.scaler, extra_factor=weight)
    elif weight != 1.0 and grads:
        torch._foreach_div_(grads, weight)
    grad_norm = None
    if config.clip_norm is not None and grads:
        grad_norm = config.clip_grads_(grads)
    skipped = found_inf is not None and bool(found_inf.item())
    new_opt_state = None
    if not skipped:
        new_opt_state = config.optimizer.step(state.params)
        if state.ema is not None:
            ema_leaves, param_leaves = config._ema_leaves(state)
            ema_update_(ema_leaves, param_leaves, config.ema_decay)
    config.optimizer.zero_grad()
    scaler = state.scaler
    if scaler is not None:
        scaler = scaler_update(scaler, found_inf, config.loss_scaler or LossScaler(), donate=True)
    state = attrs.evolve(
        state,
        opt_state=new_opt_state if new_opt_state is not None else state.opt_state,
        grads=None,
        scaler=scaler,
        rng=window.rng if window.rng is not None else state.rng,
        step=state.step + (0 if skipped else 1),
        skipped_steps=state.skipped_steps + (1 if skipped else 0),
        micro_step=0,
        window_samples=0,
        window_first=0,
    )
    return state, grad_norm


def apply_pending_update(
    state: TrainState, config: TrainConfig, *, donate: bool = False
) -> TrainState:
    """Apply a partially filled accumulation window now (no-op when none is open).

    Example:
        >>> from nnh.core import Supervised, init_train_state
        >>> m = nn.Linear(2, 1)
        >>> opt = OptimizerAdapter.create(torch.optim.SGD, m, lr=0.1)
        >>> cfg = TrainConfig(model=m, optimizer=opt, objective=Supervised(nn.functional.mse_loss),
        ...                   accumulation_steps=4)
        >>> s, _ = train_step(init_train_state(m, opt), (torch.ones(2, 2), torch.zeros(2, 1)), cfg)
        >>> s.micro_step, apply_pending_update(s, cfg).step
        (1, 1)
    """
    if state.micro_step == 0:
        return state
    if not donate:
        state = clone_state(state)
    config.bind(state)
    window = _Window(state.micro_step, state.window_samples, state.window_first)
    return _apply_update(state, config, window)[0]


def end_epoch(state: TrainState, config: TrainConfig, *, donate: bool = False) -> TrainState:
    """Close an epoch: apply any open window (it never crosses an epoch), count the epoch.

    Example:
        >>> from nnh.core import Supervised, init_train_state
        >>> m = nn.Linear(2, 1)
        >>> opt = OptimizerAdapter.create(torch.optim.SGD, m, lr=0.1)
        >>> cfg = TrainConfig(model=m, optimizer=opt, objective=Supervised(nn.functional.mse_loss))
        >>> end_epoch(init_train_state(m, opt), cfg).epoch
        1
    """
    state = apply_pending_update(state, config, donate=donate)
    return attrs.evolve(state, epoch=state.epoch + 1)


def eval_step(
    state: TrainState,
    batch: Any,
    config: TrainConfig,
    *,
    metrics: Mapping[str, Callable[[Any, Any], Any]] | None = None,
) -> EvalOutput:
    """Loss and metrics of one batch as sample-weighted sums, without gradients.

    The model runs in its current mode (call ``model.eval()`` first for evaluation). The
    record is not modified (in eval mode no buffer changes).

    Example:
        >>> from nnh.core import Supervised, init_train_state
        >>> m = nn.Linear(2, 1)
        >>> cfg = TrainConfig(model=m, optimizer=None, objective=Supervised(nn.functional.mse_loss))
        >>> s = init_train_state(m, OptimizerAdapter.create(torch.optim.SGD, m, lr=0.1))
        >>> out = eval_step(s, (torch.ones(3, 2), torch.zeros(3, 1)), cfg)
        >>> out.num_samples
        3
    """
    config.bind(state, with_optimizer=False)
    with torch.no_grad(), _RngScope(state.rng), config.autocast():
        ev = config.objective(config.model, batch, state.epoch)
    n = ev.num_samples
    loss_sum = ev.loss.detach().double() * n
    sums = config.metric_sums(metrics, ev.output, ev.target, n) if metrics else {}
    return EvalOutput(loss_sum=loss_sum, metric_sums=sums, num_samples=n, output=ev.output)
