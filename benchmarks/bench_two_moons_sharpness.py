"""How a score model's samples sharpen with training epochs and with EMA (issue 20's docs section).

Data: two moons (the upper arc ``(cos a, sin a)`` and the lower ``(1 - cos a, 1/2 - sin a)``,
``a`` uniform in ``[0, pi]``) plus ``N(0, noise^2 I)``, 2048 training points. Model: the
demo's ``ScoreMLP`` (``examples/generative_demo.py``, hidden 128), ``VESDE(0.01, 5)``, DSM
with Adam (lr 3e-3, batch 128). Training goes on in chunks; at each epoch count in
``--epochs`` the handler samples 2000 points (EM, 500 steps, the same seed) with the raw
weights and with each EMA (one training run per EMA decay; the raw weights of every run are
the same). Sharpness: the mean distance of the samples to the noiseless curve (the data's own
value is the floor), and the fraction farther than ``0.25`` (off the moons). One thread.

    python benchmarks/bench_two_moons_sharpness.py [--epochs 25 50 100 200 400]
        [--ema 0.99 0.999] [--noise 0.05] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from generative_demo import ScoreMLP

from nnh import NNHandler
from nnh.generative import VESDE

__all__ = ["distance_to_moons", "moons_curve", "two_moons"]


def moons_curve(points_per_arc: int = 4000) -> torch.Tensor:
    """``[2 * points_per_arc, 2]`` points densely on the two noiseless arcs."""
    a = torch.linspace(0, math.pi, points_per_arc, dtype=torch.float64)
    upper = torch.stack([a.cos(), a.sin()], dim=1)
    lower = torch.stack([1 - a.cos(), 0.5 - a.sin()], dim=1)
    return torch.cat([upper, lower])


def two_moons(n: int, noise: float, seed: int) -> torch.Tensor:
    """``n`` points of the two-moons data (half per arc, uniform angle) plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    a = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    upper = torch.arange(n) % 2 == 0
    x = torch.where(upper[:, None], torch.stack([a.cos(), a.sin()], 1),
                    torch.stack([1 - a.cos(), 0.5 - a.sin()], 1))  # fmt: skip
    return (x + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()


def distance_to_moons(x: torch.Tensor, curve: torch.Tensor) -> torch.Tensor:
    """``[B]`` distance of each sample to the nearest point of ``curve`` (chunked)."""
    return torch.cat([torch.cdist(c.double(), curve).min(dim=1).values for c in x.split(2048)])


def sharpness(x: torch.Tensor, curve: torch.Tensor, far: float = 0.25) -> dict[str, float]:
    d = distance_to_moons(x, curve)
    finite = torch.isfinite(d)
    return {
        "mean_dist": round(float(d[finite].mean()), 4),
        "off_moons": round(float((~finite | (d > far)).double().mean()), 4),
    }


def run(epochs: list[int], ema: float, noise: float, n_samples: int, steps: int) -> list[dict]:
    torch.manual_seed(0)
    h = NNHandler(ScoreMLP, model_type="score_based", hidden=128)
    h.set_sde(VESDE, sigma_min=0.01, sigma_max=5.0)
    h.set_optimizer(torch.optim.Adam, lr=3e-3)
    h.set_train_loader(TensorDataset(two_moons(2048, noise, seed=1)), batch_size=128, shuffle=True)
    curve, rows, done, train_s = moons_curve(), [], 0, 0.0
    for e in epochs:
        start = time.perf_counter()
        h.train(epochs=e - done, ema_decay=ema, seed=None if done else 0, progress_bar=False)
        train_s += time.perf_counter() - start
        done = e
        row = {"epochs": e, "ema_decay": ema, "train_loss": round(h.train_losses[-1], 4)}
        for key, apply_ema in (("raw", False), ("ema", True)):
            h.seed = 123
            x = h.sample((n_samples, 2), steps, apply_ema=apply_ema, bar=False)
            row[key] = sharpness(x, curve)
        row["train_seconds"] = round(train_s, 1)
        rows.append(row)
        print(
            f"  {e:5d} {ema:6g} | {row['train_loss']:.4f} | raw {row['raw']['mean_dist']:.4f} "
            f"{row['raw']['off_moons']:.4f} | ema {row['ema']['mean_dist']:.4f} "
            f"{row['ema']['off_moons']:.4f} | {train_s:.0f} s",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[25, 50, 100, 200, 400])
    parser.add_argument("--ema", type=float, nargs="+", default=[0.99, 0.999])
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="epochs 10 40, one EMA, 300 steps")
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.epochs, args.ema, args.steps = [10, 40], args.ema[:1], 300
    floor = sharpness(two_moons(args.samples, args.noise, seed=5), moons_curve())
    print(
        f"data (noise {args.noise}): mean distance {floor['mean_dist']:.4f}, off {floor['off_moons']}"
    )
    print("epochs ema | loss | raw: mean_dist off_moons | ema: mean_dist off_moons | train time")
    results = {"data": floor, "runs": [run(sorted(args.epochs), d, args.noise, args.samples,
                                           args.steps) for d in args.ema]}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
