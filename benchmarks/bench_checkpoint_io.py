"""Checkpoint I/O: nnh's atomic, durable, header-checked files vs plain torch.save/torch.load.

Saves and loads the state_dict of a ~100M-parameter model (400 MB of float32) with:

* ``torch.save``          : ``torch.save(sd, path)`` / ``torch.load(path, weights_only=True)``
* ``torch.save+fsync``    : the same, then fsync of the file (the cheapest durable baseline)
* ``torch+fsync no CRC`` : ``torch.save+fsync`` with torch's zip CRC-32 switched off, as nnh
                            writes (its own checksums cover the file)
* ``nnh durable``         : ``save_checkpoint`` (header + checksums + temp file + fsync +
                            os.replace + folder fsync, the default; no zip CRC-32) /
                            ``load_checkpoint``
                            (weights_only + header check + checksum verification)
* ``nnh unverified``      : the same files, loaded without the checksum verification (to
                            show what verifying costs: the issue's goal is <= 10 % at 100M)
* ``nnh no-fsync``        : ``save_checkpoint(..., durable=False)``: still atomic against a
                            killed process, not against a power cut

Methods run in interleaved rounds in one process: each round saves with every method, then
loads with every method, each pass in a fresh random (seeded) order. A fixed order would
give each method a fixed predecessor, and on a shared virtual disk the operation before a
save changes its speed by up to 4x (measured: the same save function was 0.2 s after one
method and 1.0 s after another). Every timed operation starts after ``os.sync()`` so that
one method's write-back does not land in another's timing.
Each file overwrites the previous one of its method, as repeated checkpointing does. We report
per-method medians and the median of per-round ratios to ``torch.save`` (this machine is
shared and noisy: trust ratios more than absolute times).

    python benchmarks/bench_checkpoint_io.py [--params 100000000] [--rounds 15] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from nnh.checkpoint import load_checkpoint, save_checkpoint


def make_state(params: int) -> dict[str, torch.Tensor]:
    """A stack of square Linear layers with about ``params`` parameters."""
    width = max(8, min(2048, int((params / 4) ** 0.5)))
    layers = max(1, round(params / (width * width + width)))
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model.state_dict()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _no_verification():
    import nnh.checkpoint.safe_load as safe_load

    original = safe_load.verify
    safe_load.verify = lambda payload, path=None: None
    try:
        yield
    finally:
        safe_load.verify = original


def methods(sd: dict[str, torch.Tensor]) -> dict[str, tuple[Callable, Callable]]:
    def torch_save(path: Path) -> None:
        torch.save(sd, path)

    def torch_save_fsync(path: Path) -> None:
        torch.save(sd, path)
        _fsync_file(path)

    def torch_save_fsync_no_crc(path: Path) -> None:
        # the same, without the zip CRC-32 that nnh skips: shows how much of nnh's lead
        # over torch.save+fsync is that CRC and how much is the write path
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            torch_save_fsync(path)
        finally:
            torch.serialization.set_crc32_options(before)

    def torch_load(path: Path) -> object:
        return torch.load(path, weights_only=True)

    def nnh_load(path: Path) -> object:
        return load_checkpoint(path)

    def nnh_load_unverified(path: Path) -> object:
        with _no_verification():
            return load_checkpoint(path)

    return {
        "torch.save": (torch_save, torch_load),
        "torch.save+fsync": (torch_save_fsync, torch_load),
        "torch+fsync no CRC": (torch_save_fsync_no_crc, torch_load),
        "nnh durable": (lambda p: save_checkpoint({"model_state_dict": sd}, p), nnh_load),
        "nnh unverified": (
            lambda p: save_checkpoint({"model_state_dict": sd}, p),
            nnh_load_unverified,
        ),
        "nnh no-fsync": (
            lambda p: save_checkpoint({"model_state_dict": sd}, p, durable=False),
            nnh_load,
        ),
    }


def timed(fn: Callable[[], object]) -> float:
    os.sync()
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def run(params: int, rounds: int, folder: Path) -> dict[str, dict[str, list[float]]]:
    sd = make_state(params)
    count = sum(t.numel() for t in sd.values())
    size_mb = sum(t.numel() * t.element_size() for t in sd.values()) / 1e6
    print(
        f"model: {count / 1e6:.1f}M parameters, {size_mb:.0f} MB; folder {folder}; {rounds} rounds"
    )
    table = methods(sd)
    names = list(table)
    times: dict[str, dict[str, list[float]]] = {n: {"save": [], "load": []} for n in names}
    for name in names:  # warm-up: create every file once, untimed
        table[name][0](folder / f"{name.replace(' ', '_')}.pth")
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        for op, index in (("save", 0), ("load", 1)):
            order = list(names)
            shuffle(order)  # a fresh order per round and operation: no fixed predecessor
            for name in order:
                fn, path = table[name][index], folder / f"{name.replace(' ', '_')}.pth"
                times[name][op].append(timed(lambda fn=fn, path=path: fn(path)))
    return times


def report(times: dict[str, dict[str, list[float]]]) -> None:
    base = times["torch.save"]
    head = f"{'median s':>9} {'min s':>7} {'ratio':>7}"
    print(f"{'':<18} {'save':^25}   {'load':^25}")
    print(f"{'method':<18} {head}   {head}")
    for name, t in times.items():
        cells = []
        for op in ("save", "load"):
            ratio = statistics.median(a / b for a, b in zip(t[op], base[op]))
            cells.append(f"{statistics.median(t[op]):>9.3f} {min(t[op]):>7.3f} {ratio:>6.2f}x")
        print(f"{name:<18} {cells[0]}   {cells[1]}")
    print("ratio = median over rounds of (method / torch.save) in the same round")
    goal = statistics.median(
        a / b for a, b in zip(times["nnh durable"]["save"], times["torch.save+fsync"]["save"])
    )
    print(f"nnh durable save / torch.save+fsync: {goal:.2f}x (median over rounds; goal <= 1.1x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dir", type=Path, default=None, help="folder for the files")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="nnh-bench-ckpt-", dir=args.dir))
    try:
        report(run(args.params, args.rounds, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
