"""Time per epoch: one ``NNHandler(..., ensemble_size=8)`` vs 8 separate handler runs.

CPU, one thread, MLP 20-W-W-3, batch 128, Adam, 32 batches per epoch, progress bars off.
Rounds are interleaved in one process and the reported ratio is the median of the per-round
ratios ``ensemble / (8 separate)``. Goal at W = 64: <= 0.45x. For context the script also
times a plain ``torch.func`` prototype (``vmap`` over ``functional_call`` in a hand-written
loop, with a ``DataLoader``), the baseline the issue measured at 0.52x.

    python benchmarks/bench_ensemble.py [--rounds 9] [--members 8] [--widths 64 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.data import DataLoader, TensorDataset

from nnh import NNHandler

BATCH, BATCHES = 128, 32


class MLP(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(20, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3)
        )

    def forward(self, x):
        return self.net(x)


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    n = BATCH * BATCHES
    return TensorDataset(torch.randn(n, 20, generator=g), torch.randint(0, 3, (n,), generator=g))


def handler(width: int, ds: TensorDataset, members: int | None) -> NNHandler:
    h = NNHandler(MLP, width=width, ensemble_size=members)
    h.set_optimizer(torch.optim.Adam, lr=1e-3)
    h.set_loss_fn(nn.functional.cross_entropy)
    h.set_train_loader(ds, batch_size=BATCH, shuffle=True)
    return h


def ensemble_epoch(width: int, ds: TensorDataset, members: int):
    h = handler(width, ds, members)
    return lambda: h.train(epochs=1, progress_bar=False)


def separate_epochs(width: int, ds: TensorDataset, members: int):
    handlers = [handler(width, ds, None) for _ in range(members)]

    def run():
        for h in handlers:
            h.train(epochs=1, progress_bar=False)

    return run


def prototype_epoch(width: int, ds: TensorDataset, members: int):
    """The plain torch.func recipe: stacked parameters, vmap(functional_call), torch Adam."""
    models = [MLP(width) for _ in range(members)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    loader = DataLoader(ds, batch_size=BATCH, shuffle=True)

    def loss_of(p, b, x, y):
        return nn.functional.cross_entropy(functional_call(base, (p, b), (x,)), y)

    batched = vmap(loss_of, in_dims=(0, 0, None, None), randomness="different")

    def run():
        for x, y in loader:
            opt.zero_grad()
            batched(params, buffers, x, y).sum().backward()
            opt.step()

    return run


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(width: int, members: int, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    ds = data()
    runs = {
        "ensemble": ensemble_epoch(width, ds, members),
        "separate": separate_epochs(width, ds, members),
        "prototype": prototype_epoch(width, ds, members),
    }
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    ratio = [e / s for e, s in zip(times["ensemble"], times["separate"])]
    proto = [p / s for p, s in zip(times["prototype"], times["separate"])]
    return {
        "width": width,
        "members": members,
        "ensemble_ms_per_epoch": 1e3 * statistics.median(times["ensemble"]),
        "separate_ms_per_epoch": 1e3 * statistics.median(times["separate"]),
        "prototype_ms_per_epoch": 1e3 * statistics.median(times["prototype"]),
        "ratio_median": statistics.median(ratio),
        "ratio_min": min(ratio),
        "ratio_max": max(ratio),
        "prototype_ratio_median": statistics.median(proto),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for width in args.widths:
        r = bench(width, args.members, args.rounds)
        results.append(r)
        print(
            f"W={width:4d}: ensemble of {r['members']} {r['ensemble_ms_per_epoch']:.1f} ms/epoch, "
            f"{r['members']} separate handlers {r['separate_ms_per_epoch']:.1f} ms -> "
            f"{r['ratio_median']:.3f}x (rounds {r['ratio_min']:.3f}-{r['ratio_max']:.3f}); "
            f"plain vmap prototype {r['prototype_ratio_median']:.3f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
