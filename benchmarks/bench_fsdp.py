"""FSDP vs DDP per-rank memory, and nnh's FSDP epoch vs a hand-written FSDP2 loop.

    python -m torch.distributed.run --nproc_per_node=2 benchmarks/bench_fsdp.py

CPU, gloo, 2 ranks, a ~4M-parameter MLP of 4 blocks (each block one FSDP unit). Rank 0
prints: bytes of parameters + gradients + Adam state held by one rank under FSDP and DDP
(their ratio; goal <= 0.55), peak RSS of the process after each phase, and the median epoch
time of nnh (strategy="fsdp") and of a plain FSDP2 loop with the same sharding (goal <= 1.05).
"""

from __future__ import annotations

import resource
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from nnh import NNHandler

D, BLOCKS, N, BATCH, EPOCHS = 700, 4, 2048, 64, 3


class Block(nn.Module):
    def __init__(self, d: int = D):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[Block() for _ in range(BLOCKS)])

    def forward(self, x):
        return self.blocks(x)


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    return TensorDataset(x, torch.randn(N, D, generator=g))


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def state_bytes(module: nn.Module, opt: torch.optim.Optimizer) -> int:
    total = 0
    for p in module.parameters():
        total += local(p).nbytes + (0 if p.grad is None else local(p.grad).nbytes)
    for s in opt.state.values():
        total += sum(local(v).nbytes for v in s.values() if torch.is_tensor(v) and v.dim())
    return total


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def nnh_run(strategy: str) -> tuple[int, list[float]]:
    fsdp = {"wrap_classes": [Block]} if strategy == "fsdp" else None
    h = NNHandler(Net, seed=0, model_type="regression", strategy=strategy, fsdp=fsdp)
    h.set_optimizer(torch.optim.Adam, lr=1e-4)
    h.set_loss_fn(nn.functional.mse_loss)
    h.set_train_loader(data(), batch_size=BATCH, shuffle=False)
    times = []
    for _ in range(EPOCHS):
        dist.barrier()
        t = time.perf_counter()
        h.train(epochs=1, progress_bar=False, save_on_last_epoch=False)
        times.append(time.perf_counter() - t)
    return state_bytes(h.module, h.optimizer), times


def hand_fsdp() -> list[float]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Net()
    for b in model.blocks:
        fully_shard(b)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    ds = data()
    loader = DataLoader(ds, batch_size=BATCH, sampler=DistributedSampler(ds, shuffle=False))
    times = []
    for _ in range(EPOCHS):
        dist.barrier()
        t = time.perf_counter()
        for x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        dist.barrier()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    dist.init_process_group("gloo")
    ddp_bytes, _ = nnh_run("ddp")
    rss_ddp = rss_mib()
    fsdp_bytes, nnh_times = nnh_run("fsdp")
    rss_fsdp = rss_mib()
    hand_times = hand_fsdp()
    if dist.get_rank() == 0:
        params = sum(p.numel() for p in Net().parameters())
        n, m = statistics.median(nnh_times[1:]), statistics.median(hand_times[1:])
        print(f"model: {params / 1e6:.2f}M parameters, 2 ranks, gloo, CPU")
        print(
            f"per-rank params+grads+Adam: DDP {ddp_bytes / 2**20:.1f} MiB, "
            f"FSDP {fsdp_bytes / 2**20:.1f} MiB, ratio {fsdp_bytes / ddp_bytes:.3f} (goal <= 0.55)"
        )
        print(
            f"peak RSS rank 0: after DDP run {rss_ddp:.0f} MiB, after FSDP run {rss_fsdp:.0f} MiB "
            "(one process, cumulative peak)"
        )
        print(f"epoch: nnh FSDP {n:.3f} s, hand FSDP2 {m:.3f} s, ratio {n / m:.3f} (goal <= 1.05)")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
