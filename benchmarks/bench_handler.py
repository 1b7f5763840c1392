"""Time per epoch: ``NNHandler.train`` (defaults: progress bar on, history kept) vs the
idiomatic plain PyTorch loop, same process, interleaved rounds.

MLP 64-W-W-10, batch 128, Adam, one thread, W = 64 and W = 1024. Goals: <= 0.95x the plain
loop at W = 64 and <= 1.02x at W = 1024. When ``pytorch-lightning`` is installed (extra
``nnh[lightning]``) its ``Trainer.fit`` on the same workload is reported beside ours.

    python benchmarks/bench_handler.py [--rounds 9] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nnh import NNHandler


class MLP(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))

    def forward(self, x):
        return self.net(x)


def data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g))


def plain_epoch(width: int, ds: TensorDataset):
    torch.manual_seed(0)
    model = MLP(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(ds, batch_size=128, shuffle=True)
    loss_fn = nn.CrossEntropyLoss()

    def run():
        model.train()
        losses = []
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses).mean().item()

    return run


def handler_epoch(width: int, ds: TensorDataset):
    torch.manual_seed(0)
    handler = NNHandler(MLP, width=width)
    handler.set_optimizer(torch.optim.Adam, lr=1e-3)
    handler.set_loss_fn(nn.CrossEntropyLoss())
    handler.set_train_loader(ds, batch_size=128, shuffle=True)

    def run():
        with contextlib.redirect_stderr(io.StringIO()):
            handler.train(epochs=1)  # defaults: progress bar on, history kept

    return run


def lightning_epoch(width: int, ds: TensorDataset):
    try:
        import pytorch_lightning as pl
    except ImportError:
        return None

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = MLP(width)

        def training_step(self, batch, _):
            x, y = batch
            loss = nn.functional.cross_entropy(self.model(x), y)
            self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    lit = Lit()
    loader = DataLoader(ds, batch_size=128, shuffle=True)

    def run():
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_model_summary=False)
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            trainer.fit(lit, loader)

    return run


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(width: int, n: int, rounds: int) -> dict[str, float]:
    ds = data(n)
    runners = {"plain": plain_epoch(width, ds), "nnh": handler_epoch(width, ds)}
    lit = lightning_epoch(width, ds)
    if lit is not None:
        runners["lightning"] = lit
    for fn in runners.values():
        fn()  # warm up
    times: dict[str, list[float]] = {k: [] for k in runners}
    ratios: dict[str, list[float]] = {k: [] for k in runners if k != "plain"}
    names = list(runners)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        t = {name: timed(runners[name]) for name in order}
        for name in names:
            times[name].append(t[name])
        for name in ratios:
            ratios[name].append(t[name] / t["plain"])
    out = {f"{k}_ms_per_epoch": statistics.median(v) * 1e3 for k, v in times.items()}
    out.update({f"{k}_over_plain": statistics.median(v) for k, v in ratios.items()})
    return out


CONFIGS = {64: (128 * 60, 0.95), 1024: (128 * 12, 1.02)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--json", default=None)
    ap.add_argument("--width", type=int, default=None, help="run one width in this process")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.width is not None:
        n, _ = CONFIGS[args.width]
        print(json.dumps(bench(args.width, n, args.rounds)))
        return
    # each width in a fresh process: one configuration's heap and caches cannot skew another's
    import subprocess
    import sys

    results = {}
    for width, (_, goal) in CONFIGS.items():
        out = subprocess.run([sys.executable, __file__, "--width", str(width), "--rounds", str(args.rounds)],
                             check=True, capture_output=True, text=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        results[f"W={width}"] = res
        line = f"W={width:5d}: plain {res['plain_ms_per_epoch']:8.1f} ms/epoch, nnh {res['nnh_ms_per_epoch']:8.1f} ms/epoch, " \
               f"ratio {res['nnh_over_plain']:.3f} (goal <= {goal})"
        if "lightning_over_plain" in res:
            line += f", lightning {res['lightning_over_plain']:.3f}"
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
