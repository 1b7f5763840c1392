"""Time per step: a loop of nnh.core.train_step (donated) vs the idiomatic plain PyTorch loop.

MLP 64-256-256-10, batch 128, Adam, CPU, one thread. Both loops run in this process on the
same pre-built batches, in interleaved rounds; we report the median of per-round ratios
(this machine is noisy: ratios, not absolute times).

    python benchmarks/bench_core_loop.py [--rounds 15] [--steps 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from nnh.core import OptimizerAdapter, Supervised, TrainConfig, init_train_state, train_step


def make_model(width: int = 256) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def plain_loop(batches):
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def run():
        for x, y in batches:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()

    return run


def core_loop(batches):
    model = make_model()
    adapter = OptimizerAdapter.create(torch.optim.Adam, model, lr=1e-3)
    box = {"state": init_train_state(model, adapter)}
    config = TrainConfig(model=model, optimizer=adapter, objective=Supervised(nn.CrossEntropyLoss()))

    def run():
        state = box["state"]
        for batch in batches:
            state, _ = train_step(state, batch, config, donate=True)
        box["state"] = state

    return run


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(128, 64, generator=g), torch.randint(0, 10, (128,), generator=g)) for _ in range(args.steps)]
    plain, core = plain_loop(batches), core_loop(batches)
    plain(), core()  # warm up
    ratios, tp, tc = [], [], []
    for r in range(args.rounds):
        order = [("plain", plain), ("core", core)] if r % 2 == 0 else [("core", core), ("plain", plain)]
        times = {name: timed(fn) for name, fn in order}
        tp.append(times["plain"] / args.steps)
        tc.append(times["core"] / args.steps)
        ratios.append(times["core"] / times["plain"])
    result = {
        "plain_us_per_step": statistics.median(tp) * 1e6,
        "core_us_per_step": statistics.median(tc) * 1e6,
        "median_ratio_core_over_plain": statistics.median(ratios),
        "rounds": args.rounds,
        "steps": args.steps,
    }
    print(f"plain loop : {result['plain_us_per_step']:8.1f} us/step")
    print(f"nnh.core   : {result['core_us_per_step']:8.1f} us/step")
    print(f"ratio (median of rounds): {result['median_ratio_core_over_plain']:.3f}  (goal <= 1.05)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
