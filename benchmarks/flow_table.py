"""Model calls vs error for the ODE samplers, nnh and k-diffusion on the same exact score (issue 20).

Used by ``bench_generative.py --flow``. Per SDE (VE sigma_max 50, VP) and sampler: model
calls, max |weight error|, max relative within-mode std error, and the flow error: the RMS
distance to a converged solve (RK4 in the noise level, edm grid, 250 steps = 1000 calls) from
the same prior draw. k-diffusion's samplers run when ``k_diffusion`` is installed
(``pip install k-diffusion --no-deps``): only its ``sampling.py`` is loaded (the package
imports vision extras), on its Karras sigmas from ``lambda(T)`` down to ``lambda(t_end)``,
in the rescaled variables ``x / mu`` with the Tweedie denoiser of the same score.

Rows marked ``edm+ds`` pass ``data_scale`` (the data's per-coordinate std, 1.41 for the
mixture) so that the edm grid's first step jumps from ``lambda(T)`` to ``5 * data_scale``.
``seed`` picks the prior draw (the reference and k-diffusion use the same one); ``data="moons"``
swaps the 4-mode mixture for a two-moons mixture (128 Gaussians of std 0.08 on two arcs; no
mode metrics, flow error only).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gen_models import MixtureExactScore, mixture_errors

from nnh.generative import SDE, score_calls
from nnh.generative.samplers import sample_sde
from nnh.generative.time_grid import noise_level

NNH_ROWS = [("Euler", "edm"), ("Heun", "edm"), ("RK4", "edm"), ("dpm++2m", "edm"),
            ("dpm++2m", "logsnr"), ("dpm++3m", "edm"), ("unipc", "edm"),
            ("dpm++2m", "edm+ds"), ("dpm++3m", "edm+ds"), ("unipc", "edm+ds")]  # fmt: skip
KD_ROWS = ["sample_euler", "sample_heun", "sample_dpm_2", "sample_dpmpp_2m", "sample_dpmpp_3m_sde"]
CALLS = (10, 20, 40)


def load_k_diffusion_sampling() -> types.ModuleType | None:
    """k-diffusion's ``sampling.py`` alone (its optional imports stubbed), or None when absent."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "sampling.py"
    source = path.read_text()
    for name in ("scipy", "torchdiffeq", "torchsde"):
        if importlib.util.find_spec(name) is None:
            stub = types.ModuleType(name)
            stub.integrate, stub.odeint, stub.BrownianTree = None, None, None
            sys.modules.setdefault(name, stub)
    utils = types.ModuleType("k_diffusion_utils_stub")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    source = source.replace("from . import utils", "")
    module = types.ModuleType("k_diffusion_sampling")
    module.utils = utils
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


def _score_fn(sde: SDE, model: MixtureExactScore, counter: list[int]):
    def score(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        counter[0] += 1
        with torch.no_grad():
            return model(t, x) / sde.sigma(t.to(x.dtype)).reshape(-1, 1)

    return score


def _time_of_level(sde: SDE, level: float, t_end: float) -> float:
    lo, hi = t_end, sde.T
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if float(noise_level(sde, mid)) > level else (mid, hi)
    return 0.5 * (lo + hi)


def run_k_diffusion(kd, name: str, sde: SDE, model, x_T: torch.Tensor, calls: int):
    """k-diffusion's sampler ``name`` with about ``calls`` model calls; returns (x at t_end, calls)."""
    t_end = sde.epsilon
    per_step = 2 if name in ("sample_heun", "sample_dpm_2") else 1
    steps = max(1, calls // per_step)
    lam_hi, lam_lo = float(noise_level(sde, sde.T)), float(noise_level(sde, t_end))
    # steps + 1 levels from lambda(T) to lambda(t_end) (k-diffusion's trailing zero dropped)
    sigmas = kd.get_sigmas_karras(steps + 1, lam_lo, lam_hi, rho=7.0)[:-1].to(x_T.dtype)
    counter = [0]
    score = _score_fn(sde, model, counter)
    times = {}

    def denoiser(x_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        level = float(sigma.reshape(-1)[0])
        if level not in times:
            times[level] = _time_of_level(sde, level, t_end)
        t = torch.full((x_hat.shape[0],), times[level], dtype=x_hat.dtype)
        mu, s = (
            float(sde.mu(torch.tensor(times[level]))),
            float(sde.sigma(torch.tensor(times[level]))),
        )
        x = mu * x_hat
        return (x + s * s * score(t, x)) / mu

    mu_T, mu_end = float(sde.mu(torch.tensor(sde.T))), float(sde.mu(torch.tensor(t_end)))
    extra = {}
    if name == "sample_dpmpp_3m_sde":  # eta = 0: its deterministic (ODE) form, no noise drawn
        extra = {"eta": 0.0, "noise_sampler": lambda a, b: torch.zeros_like(x_T)}
    x_hat = getattr(kd, name)(denoiser, x_T / mu_T, sigmas, disable=True, **extra)
    return mu_end * x_hat, counter[0]


def two_moons(k: int = 64, std: float = 0.08) -> tuple[list[float], list[list[float]], float]:
    """(weights, means, std) of a two-moons mixture: ``k`` Gaussians on each arc, centred."""
    a = torch.linspace(0, math.pi, k, dtype=torch.float64)
    upper = torch.stack([torch.cos(a), torch.sin(a)], 1)
    lower = torch.stack([1 - torch.cos(a), 0.5 - torch.sin(a)], 1)
    means = torch.cat([upper, lower]) - torch.tensor([0.5, 0.25], dtype=torch.float64)
    return [1 / (2 * k)] * (2 * k), means.tolist(), std


def data_std(model: MixtureExactScore) -> float:
    """The mixture's per-coordinate std (what ``data_scale`` means)."""
    w = torch.tensor(model.weights, dtype=torch.float64)
    m = torch.tensor(model.means, dtype=torch.float64)
    centred = m - (w[:, None] * m).sum(0)
    return math.sqrt(float((w * centred.pow(2).sum(1)).sum()) / m.shape[1] + model.std**2)


def flow_table(
    sde: SDE, n: int, kd=None, calls_list=CALLS, seed: int = 0, data: str = "mixture"
) -> list[dict]:
    """Rows of (sampler, grid, calls, weight_err, std_err, flow_err) for ``sde``."""
    if data == "moons":
        model = MixtureExactScore(*two_moons(), sde_config=sde.config())
    else:
        model = MixtureExactScore(sde_config=sde.config())
    scale = data_std(model)
    counter = [0]
    score = _score_fn(sde, model, counter)

    def nnh(ode_method: str, grid: str, steps: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        extra = {"data_scale": scale} if grid.endswith("+ds") else {}
        return sample_sde(sde, score, (n, 2), steps, method="ode", ode_method=ode_method,
                          time_grid=grid.removesuffix("+ds"), generator=g, **extra)  # fmt: skip

    def errors(x: torch.Tensor) -> tuple[float, float]:
        return mixture_errors(x, sde) if data != "moons" else (float("nan"), float("nan"))

    reference = nnh("RK4", "edm", 250)
    rows = [{"sampler": "reference RK4", "grid": "edm", "calls": 1000,
             **dict(zip(("weight_err", "std_err"), (round(v, 4) for v in errors(reference)))),
             "flow_err": 0.0}]  # fmt: skip
    x_T = sde.prior((n, 2), generator=torch.Generator().manual_seed(seed))

    def row(sampler: str, grid: str, calls: int, x: torch.Tensor) -> dict:
        w, s = errors(x)
        flow = float((x - reference).pow(2).sum(-1).mean().sqrt())
        return {"sampler": sampler, "grid": grid, "calls": calls, "weight_err": round(w, 4),
                "std_err": round(s, 4), "flow_err": round(flow, 4)}  # fmt: skip

    for ode_method, grid in NNH_ROWS:
        per = score_calls("ode", 1, ode_method)
        for calls in calls_list:
            if calls % per:
                continue
            rows.append(row(f"nnh {ode_method}", grid, calls, nnh(ode_method, grid, calls // per)))
    if kd is not None:
        for name in KD_ROWS:
            for calls in calls_list:
                x, used = run_k_diffusion(kd, name, sde, model, x_T, calls)
                rows.append(row(f"k-diffusion {name[7:]}", "karras", used, x))
    return rows
