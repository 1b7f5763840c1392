"""The shell side of ``NNHandler.sample`` and ``NNHandler.log_likelihood``.

Everything stateful lives here: the handler's device, EMA weights, eval mode, progress bars,
the global RNG and the DDP split. The computations are the pure functions of
:mod:`nnh.generative`.

Under DDP (every rank must make the call):

- ``sample(shape)`` draws ``shape[0]`` samples in total: rank ``r`` draws its share (the first
  ``N % world_size`` ranks one more) with its own generator, seeded from one draw of the
  global RNG plus the rank, so the ranks' noises are independent. Rank 0 returns all ``N``
  (rank 0's first); the other ranks return ``None``.
- ``log_likelihood`` of a ``Dataset``/``DataLoader`` is sharded like ``predict`` and
  gathered on rank 0 in dataset order; a tensor ``x`` is computed by rank 0 alone.
- Inside :func:`rank_local` (``get_samples`` runs a custom sampler in it, on rank 0 only)
  ``sample`` draws all ``N`` samples on the calling rank, with no collective.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from nnh.core.objectives import batch_size as count_batch
from nnh.distributed.ddp import (
    ShardCounter,
    gather_predictions,
    real_samples,
    sharded_eval_loader,
    trim_batch,
)
from nnh.generative.adaptive import check_tolerance
from nnh.generative.checks import check_data, check_sample_shape
from nnh.generative.divergence import PROBE_KINDS, fresh_probes
from nnh.generative.likelihood import (
    check_divergence,
    check_exact_size,
    check_finite_input,
    check_likelihood_method,
    log_likelihood_ode,
)
from nnh.generative.samplers import check_sampler_options, sample_sde
from nnh.generative.sampling import check_steps
from nnh.generative.time_grid import check_data_scale
from nnh.generative.time_grid import time_grid as make_time_grid
from nnh.handler.data import fast_loader, move_to_device
from nnh.handler.full_state import is_sharded
from nnh.handler.inference import ema_weights
from nnh.handler.progress import interactive
from nnh.handler.train_setup import train_mode

__all__ = [
    "handler_log_likelihood",
    "handler_sample",
    "progress_flag",
    "rank_generator",
    "rank_local",
    "split_count",
]

NOISE_TYPES = (*PROBE_KINDS, "exact")
DATASET_BATCH = 256  # batch size for a Dataset given to log_likelihood
DOPRI5_MAX_ATTEMPTS = 1000  # ode_steps's default for method='dopri5': the most step attempts


def progress_flag(pbar: bool, verbose: int | bool | None) -> bool:
    """Whether to show a progress bar: ``verbose`` (score_models' keyword) wins when given.

    Example:
        >>> progress_flag(True, 0), progress_flag(False, 1), progress_flag(True, None)
        (False, True, True)
    """
    if verbose is None:
        return bool(pbar)
    if isinstance(verbose, int):  # bool is an int
        return bool(verbose)
    raise TypeError(f"verbose must be an int or bool (0 = silent), got {type(verbose).__name__}")


_RANK_LOCAL = contextvars.ContextVar("nnh_rank_local_sampling", default=False)


@contextlib.contextmanager
def rank_local() -> Iterator[None]:
    """Within this block ``sample`` runs on the calling rank alone (no split, no gather).

    Example:
        >>> with rank_local():
        ...     _RANK_LOCAL.get()
        True
    """
    token = _RANK_LOCAL.set(True)
    try:
        yield
    finally:
        _RANK_LOCAL.reset(token)


def split_count(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, count)`` of rank ``rank``'s share of ``n`` items, the first ``n % world_size`` ranks one more.

    Example:
        >>> [split_count(5, 2, r) for r in (0, 1)]
        [(0, 3), (3, 2)]
    """
    base, extra = divmod(n, world_size)
    count = base + (1 if rank < extra else 0)
    return rank * base + min(rank, extra), count


def rank_generator(handler: Any) -> torch.Generator | None:
    """``None`` (the global RNG) in one process; under DDP a generator per rank, seeded from
    one draw of the global RNG (the same on every rank when they share a seed) plus the rank.
    """
    dist = handler._dist
    if not dist.enabled or _RANK_LOCAL.get():
        return None
    base = int(torch.randint(0, 2**62, (1,)))
    return torch.Generator(device=handler.device).manual_seed(base + dist.rank)


class _EvalSession:
    """Eval mode and (optionally) EMA weights for the duration of a ``with`` block."""

    def __init__(self, handler: Any, apply_ema: bool):
        self.handler, self.apply_ema = handler, apply_ema

    def __enter__(self) -> None:
        self.was_training = self.handler.module.training
        self.handler.module.eval()
        self.ema = ema_weights(self.handler, self.apply_ema)
        self.ema.__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            self.ema.__exit__(*exc)
        finally:
            if self.was_training:
                train_mode(self.handler)


# ---------------------------------------------------------------- sampling
def _check_condition_batch(condition: Any, n: int) -> None:
    """A batched condition (a tensor of 2 or more dims) must have ``shape[0]`` rows or 1."""
    items = [condition] if isinstance(condition, torch.Tensor) else list(condition or [])
    for i, c in enumerate(items):
        if isinstance(c, torch.Tensor) and c.ndim >= 2 and c.shape[0] not in (1, n):
            raise ValueError(
                f"condition[{i}] has batch {c.shape[0]} (shape {tuple(c.shape)}) but shape[0]={n}: "
                f"give one row per sample ({n}) or a single row (1) that every sample shares"
            )


def _rank_condition(condition: Any, device: torch.device, n: int, start: int, count: int) -> list:
    if isinstance(condition, torch.Tensor):
        condition = [condition]
    out = []
    for c in condition or []:
        if isinstance(c, torch.Tensor):
            if c.ndim >= 1 and c.shape[0] == n and count != n:
                c = c[start : start + count]  # per-sample conditions follow their samples
            c = c.to(device)
        out.append(c)
    return out


def handler_sample(
    handler: Any,
    shape: Any,
    steps: int,
    condition: Any = None,
    likelihood_score_fn: Any = None,
    guidance_factor: float = 1.0,
    apply_ema: bool = True,
    bar: bool = True,
    stop_on_NaN: bool = True,
    method: str = "em",
    ode_method: str = "Heun",
    corrector_steps: int = 1,
    snr: float = 0.16,
    denoise: bool = False,
    time_grid: str = "uniform",
    data_scale: float | None = None,
) -> torch.Tensor | None:
    """``NNHandler.sample``: see its docstring. Checks every argument before any work."""
    sde = handler._require_sde("sample")
    check_steps(steps)
    shape = check_sample_shape(shape)
    method, ode_method = check_sampler_options(
        method, ode_method, corrector_steps, snr, time_grid, denoise, guidance_factor
    )
    if check_data_scale(data_scale) is not None:
        make_time_grid(sde, steps, sde.epsilon, time_grid, data_scale)
    _check_condition_batch(condition, shape[0])
    dist = handler._dist
    split = dist.enabled and not _RANK_LOCAL.get()
    n = shape[0]
    start, count = split_count(n, dist.world_size, dist.rank) if split else (0, n)
    generator = rank_generator(handler)
    extra = _rank_condition(condition, handler.device, n, start, count)

    def score_fn(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return handler.score(t, x, *extra)

    x = None
    if count > 0:
        progress = tqdm(
            total=steps,
            desc="Sampling",
            disable=not bar or (split and not dist.is_main) or not interactive(),
            dynamic_ncols=True,
        )
        try:
            with _EvalSession(handler, apply_ema):
                x = sample_sde(
                    sde,
                    score_fn,
                    (count, *shape[1:]),
                    steps,
                    method=method,
                    ode_method=ode_method,
                    corrector_steps=corrector_steps,
                    snr=snr,
                    denoise=denoise,
                    time_grid=time_grid,
                    data_scale=data_scale,
                    generator=generator,
                    device=handler.device,
                    guidance_fn=likelihood_score_fn,
                    guidance_factor=guidance_factor,
                    stop_on_nan=stop_on_NaN,
                    progress=progress,
                )
        finally:
            progress.close()
    if not split:
        return x
    parts = dist.gather_objects(None if x is None else x.detach().cpu())
    if not dist.is_main:
        return None
    return torch.cat([p for p in parts if p is not None]).to(handler.device)


# ---------------------------------------------------------------- likelihood
def _check_likelihood_options(
    n_cotangent_vectors: Any,
    noise_type: Any,
    method: Any,
    ode_steps: Any,
    rtol: Any,
    atol: Any,
    divergence: Any,
) -> tuple[str, int, float, float, str]:
    method = check_likelihood_method(method)
    if ode_steps is None and method != "dopri5":
        raise ValueError(
            f"ode_steps is required for method={method!r} (the number of fixed steps); only "
            f"method='dopri5' chooses its steps (there ode_steps is the most step attempts, "
            f"default {DOPRI5_MAX_ATTEMPTS})"
        )
    ode_steps = DOPRI5_MAX_ATTEMPTS if ode_steps is None else ode_steps
    if isinstance(ode_steps, bool) or not isinstance(ode_steps, int) or ode_steps < 1:
        raise ValueError(
            f"ode_steps must be an integer >= 1 (fixed steps; for dopri5 the most step "
            f"attempts), got {ode_steps!r}"
        )
    rtol, atol = check_tolerance("rtol", rtol), check_tolerance("atol", atol)
    divergence = check_divergence(divergence)
    if (
        isinstance(n_cotangent_vectors, bool)
        or not isinstance(n_cotangent_vectors, int)
        or n_cotangent_vectors < 1
    ):
        raise ValueError(f"n_cotangent_vectors must be an int >= 1, got {n_cotangent_vectors!r}")
    if noise_type not in NOISE_TYPES:
        raise ValueError(
            f"noise_type={noise_type!r}: use 'rademacher' or 'gaussian' (Hutchinson probes) or "
            f"'exact' (the exact divergence, D vector-Jacobian products per evaluation)"
        )
    return method, ode_steps, rtol, atol, "exact" if noise_type == "exact" else divergence


class _Likelihood:
    """The likelihood options of one call, applied to a batch."""

    def __init__(self, handler: Any, generator: torch.Generator | None, **options: Any):
        self.handler, self.generator, self.o = handler, generator, options

    def __call__(self, x: torch.Tensor, args: tuple[Any, ...], progress: Any) -> torch.Tensor:
        o = self.o
        if o["divergence"] == "exact":
            check_exact_size(x)
            probes: Any = None
        else:
            draw = fresh_probes(
                (o["n_cotangent_vectors"], *x.shape),
                o["noise_type"],
                self.generator,
                device=x.device,
                dtype=x.dtype,
            )
            probes = draw if o["fresh"] else draw(0)
        handler = self.handler
        check_finite_input(x)

        def score(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = handler.score(t, y, *args)
            if out.shape != y.shape:
                raise ValueError(
                    f"the model's score (NNHandler.score(t, x, *condition)) came back with shape "
                    f"{tuple(out.shape)} for x of shape {tuple(y.shape)}; a score model must "
                    f"return a tensor shaped like x"
                )
            return out

        return log_likelihood_ode(
            handler.sde,
            score,
            x,
            steps=o["ode_steps"],
            probes=probes,
            method=o["method"],
            t0=o["t0"],
            t1=o["t1"],
            progress=progress,
            differentiable=o["differentiable"],
            rtol=o["rtol"],
            atol=o["atol"],
        )


def _split_batch(batch: Any) -> tuple[torch.Tensor, tuple[Any, ...]]:
    if isinstance(batch, torch.Tensor):
        return batch, ()
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], tuple(batch[1:])
    raise TypeError(
        "log_likelihood's loader must yield tensors x or tuples (x, *condition), got "
        f"{type(batch).__name__}"
    )


def _loader_log_likelihood(
    handler: Any, loader: DataLoader, args: tuple[Any, ...], compute: _Likelihood, show: bool
) -> torch.Tensor | None:
    dist = handler._dist
    loader = sharded_eval_loader(loader, dist)
    shard = ShardCounter(real_samples(loader))
    adaptive = compute.o["method"] == "dopri5"
    total = None if adaptive else compute.o["ode_steps"] * len(loader)
    progress = tqdm(
        total=total,
        desc="Log-likelihood",
        disable=not show or not dist.is_main or not interactive(),
        dynamic_ncols=True,
    )
    outputs: list[torch.Tensor] = []
    try:
        for batch in fast_loader(loader):
            n = count_batch(batch)
            k = shard.take(n)
            if k == 0:
                continue  # all DistributedSampler padding
            if k < n:
                batch = trim_batch(batch, k)
            x, extra = _split_batch(move_to_device(batch, handler.device))
            check_data(x)
            out = compute(x, (*extra, *args), progress)
            outputs.append(out if compute.o["differentiable"] else out.detach())
    finally:
        progress.close()
    if not dist.enabled:
        return torch.cat(outputs) if outputs else torch.zeros(0)
    gathered = gather_predictions(dist, outputs, loader)
    return None if gathered is None else torch.cat(gathered).to(handler.device)


def handler_log_likelihood(
    handler: Any,
    x: Any,
    args: tuple[Any, ...],
    *,
    ode_steps: int | None,
    n_cotangent_vectors: int = 1,
    noise_type: str = "rademacher",
    method: str = "Euler",
    t0: float | None = None,
    t1: float | None = None,
    apply_ema: bool = True,
    pbar: bool = False,
    verbose: int | bool | None = None,
    fresh_probes: bool = True,
    differentiable: bool = False,
    divergence: str = "hutchinson",
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> torch.Tensor | None:
    """``NNHandler.log_likelihood``: see its docstring. Checks every argument before any work.

    ``method='dopri5'``: adaptive Dormand-Prince 5(4) in the noise level with a step size per
    sample, ``rtol``/``atol`` on the state and the log-density; ``ode_steps`` is the most step
    attempts (default 1000; a named error when a sample needs more). ``divergence='exact'``
    (or ``noise_type='exact'``) takes the exact trace for samples of at most 256 entries;
    ``'hutchinson'`` (the default) uses ``n_cotangent_vectors`` probes of ``noise_type``.
    """
    handler._require_sde("log_likelihood")
    method, ode_steps, rtol, atol, divergence = _check_likelihood_options(
        n_cotangent_vectors, noise_type, method, ode_steps, rtol, atol, divergence
    )
    show = progress_flag(pbar, verbose)
    is_data = isinstance(x, (Dataset, DataLoader))
    if not is_data:
        check_data(x)
        if divergence == "exact":
            check_exact_size(x)
        check_finite_input(x)
    dist = handler._dist
    everywhere = is_sharded(handler.module)  # FSDP: every rank joins the model's all-gathers
    if everywhere and is_data and str(method).lower() == "dopri5":
        raise ValueError(
            "log_likelihood(method='dopri5') of a Dataset/DataLoader cannot run under "
            "strategy='fsdp': each rank's share takes its own number of adaptive steps, while "
            "every model call all-gathers across all ranks. What to do: use a fixed-step method "
            "('Euler', 'Heun', 'RK4'), or pass the samples as one tensor (computed on every rank)"
        )
    if not is_data and not dist.is_main and not everywhere:
        return None
    device = handler.device
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    compute = _Likelihood(
        handler,
        rank_generator(handler) if is_data else None,
        ode_steps=ode_steps,
        n_cotangent_vectors=n_cotangent_vectors,
        noise_type=noise_type,
        fresh=fresh_probes,
        method=method,
        t0=t0,
        t1=t1,
        differentiable=differentiable,
        divergence=divergence,
        rtol=rtol,
        atol=atol,
    )
    with _EvalSession(handler, apply_ema):
        if is_data:
            loader = x if isinstance(x, DataLoader) else DataLoader(x, batch_size=DATASET_BATCH)
            return _loader_log_likelihood(handler, loader, args, compute, show)
        progress = tqdm(
            total=None if method == "dopri5" else ode_steps,
            desc="Log-likelihood",
            disable=not show or not interactive(),
            dynamic_ncols=True,
        )
        try:
            out = compute(x.to(device), args, progress)
        finally:
            progress.close()
    if not dist.is_main:
        return None  # FSDP: rank 0's result (every rank computed the same tensor)
    return out if differentiable else out.detach()
