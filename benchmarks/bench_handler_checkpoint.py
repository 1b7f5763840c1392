"""``NNHandler.save`` / ``NNHandler.load`` of a ~100M-parameter model vs ``torch.save`` /
``torch.load(weights_only=True)`` of its plain ``state_dict``, interleaved rounds, same disk.

Goal: at most 1.1x for each. The handler's save is atomic and durable (temp file, fsync,
``os.replace``, folder fsync); ``torch.save`` is neither. The handler's load rebuilds a
working handler (model built on the meta device, loaded tensors assigned, no copy).

    python benchmarks/bench_handler_checkpoint.py [--rounds 7] [--width 4096] [--layers 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from nnh import NNHandler


class Big(nn.Module):
    def __init__(self, width: int = 4096, layers: int = 6):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])

    def forward(self, x):
        return self.layers(x)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    handler = NNHandler(Big, width=args.width, layers=args.layers, model_type="regression")
    n_params = handler.count_parameters()
    with tempfile.TemporaryDirectory(dir=".") as folder:
        nnh_path, plain_path = Path(folder) / "handler.pth", Path(folder) / "plain.pth"
        ops = {
            "torch.save": lambda: torch.save(handler.module.state_dict(), plain_path),
            "NNHandler.save": lambda: handler.save(str(nnh_path)),
            "torch.load": lambda: torch.load(plain_path, weights_only=True),
            "NNHandler.load": lambda: NNHandler.load(str(nnh_path)),
        }
        for fn in ops.values():
            fn()  # warm up (and create the files)
        times: dict[str, list[float]] = {k: [] for k in ops}
        for r in range(args.rounds):
            order = list(ops) if r % 2 == 0 else list(ops)[::-1]
            for name in order:
                times[name].append(timed(ops[name]))
        size = nnh_path.stat().st_size
    med = {k: statistics.median(v) for k, v in times.items()}
    save_ratio = statistics.median(a / b for a, b in zip(times["NNHandler.save"], times["torch.save"]))
    load_ratio = statistics.median(a / b for a, b in zip(times["NNHandler.load"], times["torch.load"]))
    print(f"model: {n_params / 1e6:.1f}M parameters, checkpoint {size / 2**20:.0f} MiB, {args.rounds} rounds")
    for name, value in med.items():
        print(f"  {name:<15} median {value:6.3f} s   min {min(times[name]):6.3f} s")
    print(f"save ratio {save_ratio:.3f}, load ratio {load_ratio:.3f} (goal <= 1.1 each; medians of per-round ratios)")
    if args.json:
        Path(args.json).write_text(json.dumps({"params": n_params, "times": times, "save_ratio": save_ratio,
                                               "load_ratio": load_ratio}, indent=2))


if __name__ == "__main__":
    main()
