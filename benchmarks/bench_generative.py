"""Model calls against sample error for every sampler and time grid (issue 10), on exact ground truth.

Data: the 4-Gaussian 2-D mixture (weights 0.4/0.3/0.2/0.1, means (+-2, 0), (0, +-2), std
0.15); the model is ``MixtureExactScore`` from ``tests/gen_models.py``: sigma(t) times the
exact score of the mixture perturbed by the SDE's kernel, so the errors are the sampler's
own. For VP and VE, 20 000 samples per row (Monte-Carlo SE: weight <= 0.0035, std of the
0.1-mode ~1.1 %), one thread. Prints, per method and grid: model calls, max |weight error|,
max relative within-mode std error, seconds. When ``score_models`` is installed, its
Euler-Maruyama ``ScoreModel.sample`` on the same network is timed beside nnh's ``em``.

``--likelihood`` (issue 20) prints instead the likelihood table: mean bias (nats) of
``log_likelihood`` against the exact ``log p_t0`` of the mixture at ``--n`` points drawn from
it (default 20 000), model calls per solve and seconds, for ``method='dopri5'`` (exact and
Hutchinson divergence) and fixed-step Euler/Heun-100, on VP and VE.

``--flow`` (issue 20) prints instead the ODE samplers' table of model calls against weight,
std and flow error (RMS distance to a converged solve from the same prior draw), nnh's and,
when ``k_diffusion`` is installed (``pip install k-diffusion --no-deps``), k-diffusion's on
the same exact score (see ``flow_table.py``).

``--corrector`` (issue 20) prints instead the predictor-corrector's bias at 400 calls (and
1000), per-sample corrector against the seed's batch-mean rule and EM, over several seeds
(``--seeds``, default 5; see ``corrector_table.py``).

    python benchmarks/bench_generative.py [--n 20000] [--quick]
        [--flow [--seed S] [--moons] [--calls 10,20] | --likelihood | --corrector] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gen_models import FOUR_MODES, CallRecorder, MixtureExactScore, mixture_errors

from nnh import NNHandler
from nnh.generative import VESDE, VPSDE, score_calls

CONFIGS = [
    ("em", "uniform", {}, (100, 250, 500, 1000)),
    ("em", "edm", {}, (100, 250, 500)),
    ("pc", "uniform", {"corrector_steps": 1}, (50, 100, 200)),
    ("ode", "uniform", {"ode_method": "Euler"}, (50, 100, 200)),
    ("ode", "uniform", {"ode_method": "Heun"}, (10, 20, 50)),
    ("ode", "edm", {"ode_method": "Heun"}, (10, 15, 20, 50)),
    ("ode", "edm", {"ode_method": "RK4"}, (5, 10)),
    ("ode", "edm", {"ode_method": "dpm++2m"}, (10, 20, 40)),
    ("ode", "edm", {"ode_method": "dpm++3m"}, (10, 20, 40)),
]


def handler_for(sde_class: type) -> NNHandler:
    h = NNHandler(MixtureExactScore, sde_config=sde_class().config(), model_type="score_based")
    h.set_sde(sde_class)
    return h


def run_nnh(h: NNHandler, n: int, steps: int, method: str, grid: str, options: dict) -> dict:
    h.seed = 0
    start = time.perf_counter()
    x = h.sample((n, 2), steps, method=method, time_grid=grid, bar=False, **options)
    seconds = time.perf_counter() - start
    w_err, s_err = mixture_errors(x, h.sde)
    calls = score_calls(
        method, steps, options.get("ode_method", "Heun"), options.get("corrector_steps", 1)
    )
    return {
        "method": method,
        "grid": grid,
        **options,
        "steps": steps,
        "calls": calls,
        "weight_err": round(w_err, 4),
        "std_err": round(s_err, 4),
        "seconds": round(seconds, 2),
    }


def run_score_models(h: NNHandler, n: int, steps: int) -> dict | None:
    """score_models' EM sampler on the same network, when the package is installed."""
    try:
        from score_models import ScoreModel
    except ImportError:
        return None
    sde = h.sde
    kwargs = (
        {"sigma_min": sde.sigma_min, "sigma_max": sde.sigma_max}
        if isinstance(sde, VESDE)
        else {"beta_min": sde.beta_min, "beta_max": sde.beta_max}
    )
    try:
        model = ScoreModel(model=h.module, **kwargs)
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.no_grad():
            x = model.sample(shape=(n, 2), steps=steps)
        seconds = time.perf_counter() - start
    except Exception as exc:  # an API change in score_models: report it, keep the bench going
        return {"score_models_error": f"{type(exc).__name__}: {exc}"}
    w_err, s_err = mixture_errors(x.to(torch.get_default_dtype()), sde)
    return {
        "method": "score_models em",
        "steps": steps,
        "calls": steps,
        "weight_err": round(w_err, 4),
        "std_err": round(s_err, 4),
        "seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="fewest steps of each row only")
    parser.add_argument("--json", type=str, default=None)
    parser.add_argument("--flow", action="store_true", help="the ODE samplers' flow-error table")
    parser.add_argument("--likelihood", action="store_true", help="the likelihood bias/calls table")
    parser.add_argument("--corrector", action="store_true", help="the pc corrector's bias table")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per row of --corrector")
    parser.add_argument("--seed", type=int, default=0, help="--flow: the prior draw")
    parser.add_argument("--moons", action="store_true", help="--flow: the two-moons mixture")
    parser.add_argument("--calls", type=str, default=None, help="--flow: e.g. 20 or 10,20")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.likelihood:
        likelihood_main(args)
        return
    if args.flow:
        flow_main(args)
        return
    if args.corrector:
        corrector_main(args)
        return
    results: dict[str, list[dict]] = {}
    for name, sde_class in (("VP", VPSDE), ("VE", VESDE)):
        h = handler_for(sde_class)
        rows = results.setdefault(name, [])
        print(f"\n{name}: method grid options | steps calls | weight_err std_err | seconds")
        for method, grid, options, steps_list in CONFIGS:
            for steps in steps_list[:1] if args.quick else steps_list:
                row = run_nnh(h, args.n, steps, method, grid, options)
                rows.append(row)
                print(
                    f"  {method:3s} {grid:7s} {options.get('ode_method', ''):5s} | {steps:5d} "
                    f"{row['calls']:5d} | {row['weight_err']:.4f} {row['std_err']:.4f} | {row['seconds']:.2f}"
                )
        sm = run_score_models(h, args.n, 1000)
        if sm is None:
            print("  score_models not installed: no comparison (pip install score_models==0.5.11)")
        else:
            rows.append(sm)
            print(f"  score_models: {sm}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def flow_main(args: argparse.Namespace) -> None:
    from flow_table import flow_table, load_k_diffusion_sampling

    kd = load_k_diffusion_sampling()
    if kd is None:
        print("k-diffusion not installed: nnh rows only (pip install k-diffusion --no-deps)")
    results = {}
    for name, sde in (("VE", VESDE()), ("VP", VPSDE())):
        print(f"\n{name}: sampler grid | calls | weight_err std_err flow_err")
        calls = (10, 20) if args.quick else (10, 20, 40)
        if args.calls:
            calls = tuple(int(c) for c in args.calls.split(","))
        data = "moons" if args.moons else "mixture"
        rows = results[name] = flow_table(sde, args.n, kd, calls, args.seed, data)
        for r in rows:
            print(
                f"  {r['sampler']:26s} {r['grid']:7s} | {r['calls']:4d} | "
                f"{r['weight_err']:.4f} {r['std_err']:.4f} {r['flow_err']:.4f}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def mixture_sample(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor(FOUR_MODES["means"])
    k = torch.multinomial(torch.tensor(FOUR_MODES["weights"]), n, True, generator=g)
    return means[k] + FOUR_MODES["std"] * torch.randn(n, 2, generator=g)


def mixture_log_p(sde: object, x: torch.Tensor, t: float) -> torch.Tensor:
    """The exact log-density of the mixture's marginal at time ``t`` (float64)."""
    tt = torch.tensor(t, dtype=torch.float64)
    mu, sigma = sde.mu(tt), sde.sigma(tt)
    var = mu**2 * FOUR_MODES["std"] ** 2 + sigma**2
    means = torch.tensor(FOUR_MODES["means"], dtype=torch.float64)
    d2 = ((x.double()[:, None] - mu * means[None]) ** 2).sum(-1)
    log_w = torch.tensor(FOUR_MODES["weights"], dtype=torch.float64).log()
    return torch.logsumexp(log_w - 0.5 * d2 / var - torch.log(2 * torch.pi * var), dim=1)


def per_sample_calls(h: NNHandler, x: torch.Tensor, tol: float) -> tuple[float, int]:
    """(mean, max) calls a sample's own dopri5 solve takes (what it costs alone, batch of one)."""
    from nnh.generative.adaptive import dopri5_solve
    from nnh.generative.level_ode import level_field, noise_level_of

    sde = h.sde
    times = torch.tensor([sde.epsilon, sde.T], dtype=torch.float64)
    lam = noise_level_of(sde, times).to(x.dtype)
    n = x.shape[0]
    with torch.no_grad():
        _, _, stats = dopri5_solve(
            level_field(sde, h.score, None),
            lam[0].expand(n),
            lam[1].expand(n),
            x / sde.mu(times[0]).to(x.dtype),
            rtol=tol,
            atol=tol,
        )
    own = 2 + 6 * (stats.accepted + stats.rejected)
    return float(own.double().mean()), int(own.max())


LIKELIHOOD_ROWS = [
    ("dopri5", "exact", {"rtol": 1e-5, "atol": 1e-5}),
    ("dopri5", "exact", {"rtol": 1e-4, "atol": 1e-4}),
    ("dopri5", "hutchinson", {"rtol": 1e-5, "atol": 1e-5}),
    ("Euler", "exact", {"ode_steps": 100}),
    ("Heun", "exact", {"ode_steps": 100}),
    ("Heun", "hutchinson", {"ode_steps": 100}),
]


def likelihood_main(args: argparse.Namespace) -> None:
    results: dict[str, list[dict]] = {}
    n = min(args.n, 2000) if args.quick else args.n
    x = mixture_sample(n)
    for name, sde_class in (("VP", VPSDE), ("VE", VESDE)):
        h = handler_for(sde_class)
        exact = mixture_log_p(h.sde, x, h.sde.epsilon)
        rows = results.setdefault(name, [])
        print(
            f"\n{name} ({n} points): method divergence options | calls | bias +- se | max|err| | s"
        )
        for method, divergence, options in LIKELIHOOD_ROWS:
            torch.manual_seed(0)
            with CallRecorder(h.module) as rec:
                start = time.perf_counter()
                lp = h.log_likelihood(x, method=method, divergence=divergence, **options)
                seconds = time.perf_counter() - start
            err = lp.double() - exact
            row = {
                "method": method,
                "divergence": divergence,
                **options,
                "calls": rec.calls,
                "bias": float(err.mean()),
                "bias_se": float(err.std() / n**0.5),
                "max_abs_err": float(err.abs().max()),
                "seconds": round(seconds, 2),
            }
            if method == "dopri5" and divergence == "exact":
                row["own_calls_mean"], row["own_calls_max"] = per_sample_calls(
                    h, x, options["rtol"]
                )
            rows.append(row)
            own = (
                f" (alone: mean {row['own_calls_mean']:.0f}, max {row['own_calls_max']})"
                if "own_calls_mean" in row
                else ""
            )
            print(
                f"  {method:6s} {divergence:10s} {options} | {rec.calls:4d}{own} | "
                f"{row['bias']:+.5f} +- {row['bias_se']:.5f} | {row['max_abs_err']:.4f} | {seconds:.1f}"
            )
def corrector_main(args: argparse.Namespace) -> None:
    from corrector_table import corrector_table

    seeds = 2 if args.quick else args.seeds
    results = {}
    for name, sde in (("VE", VESDE()), ("VP", VPSDE())):
        print(
            f"\n{name} ({seeds} seeds x {args.n}): sampler grid calls | per-mode std error "
            "(w 0.4 0.3 0.2 0.1) | bias ± SE | seed 0 max std/weight err | s/run"
        )
        results[name] = corrector_table(sde, args.n, seeds, 250 if args.quick else 500)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
