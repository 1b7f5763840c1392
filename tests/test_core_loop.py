"""A loop written only with train_step/eval_step equals the idiomatic plain PyTorch loop."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nnh.core import (
    OptimizerAdapter,
    Supervised,
    TrainConfig,
    end_epoch,
    eval_step,
    init_train_state,
    train_step,
)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def dataset(n: int = 200) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_core_loop_matches_plain_loop_bitwise():
    ds = dataset()
    plain = make_model(1)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    torch.manual_seed(123)
    loader = DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(5))
    for _ in range(3):
        plain.train()
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(plain(x), y).backward()
            opt.step()

    model = make_model(1)
    adapter = OptimizerAdapter.create(torch.optim.Adam, model, lr=1e-2)
    state = init_train_state(model, adapter)
    config = TrainConfig(model=model, optimizer=adapter, objective=Supervised(nn.functional.cross_entropy))
    torch.manual_seed(123)
    loader = DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(5))
    for _ in range(3):
        model.train()
        for x, y in loader:
            state, _ = train_step(state, (x, y), config, donate=True)
        state = end_epoch(state, config, donate=True)

    assert state.epoch == 3 and state.step == 3 * len(loader)
    for name, p in plain.named_parameters():
        assert torch.equal(p, state.params[name]), name
    for name, b in plain.named_buffers():
        assert torch.equal(b, state.buffers[name]), name


def test_eval_step_sums_give_exact_sample_mean_whatever_the_batch_size():
    ds = dataset(101)
    model = make_model(0).eval()
    adapter = OptimizerAdapter.create(torch.optim.SGD, model, lr=0.1)
    state = init_train_state(model, adapter)
    config = TrainConfig(model=model, optimizer=None, objective=Supervised(nn.functional.cross_entropy))
    acc = lambda out, y: (out.argmax(1) == y).float().mean()  # noqa: E731
    with torch.no_grad():
        full_out = model(ds.tensors[0])
        full_loss = nn.functional.cross_entropy(full_out, ds.tensors[1]).double()
        full_acc = acc(full_out, ds.tensors[1]).double()
    for bs in (1, 7, 32, 101):
        total, acc_sum, count = 0.0, 0.0, 0
        for x, y in DataLoader(ds, batch_size=bs):
            out = eval_step(state, (x, y), config, metrics={"acc": acc})
            total, acc_sum, count = total + out.loss_sum, acc_sum + out.metric_sums["acc"], count + out.num_samples
        assert count == 101
        torch.testing.assert_close(total / count, full_loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(acc_sum / count, full_acc, rtol=1e-6, atol=1e-7)
