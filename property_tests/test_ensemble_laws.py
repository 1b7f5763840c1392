"""Laws of the vectorised ensemble step: each member steps as if alone; purity; donation."""

from __future__ import annotations

import pytest
import torch
from core_helpers import OPTIMIZERS, bitwise_equal, counters, snapshot
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from nnh.core import (
    OptimizerAdapter,
    Supervised,
    TrainConfig,
    clone_state,
    init_train_state,
    train_step,
)
from nnh.core.ensemble import (
    EnsembleConfig,
    EnsembleModule,
    check_vectorisable,
    ensemble_end_epoch,
    ensemble_train_step,
    member_state,
    stack_states,
)

# d_in >= 2 and batches >= 3: with one input or two samples, BatchNorm after a bias-free
# layer makes the output invariant to that layer's weights, whose gradient is then pure
# rounding noise that adaptive optimizers blow up (see mlp below)
shapes = st.tuples(st.integers(2, 5), st.integers(1, 6), st.integers(1, 3), st.integers(3, 7))
hyper = st.fixed_dictionaries(
    {
        "members": st.integers(1, 4),
        "opt": st.sampled_from(sorted(OPTIMIZERS)),
        "k": st.integers(1, 2),
        "clip": st.one_of(st.none(), st.floats(0.01, 5.0)),
        "ema": st.booleans(),
        "decay": st.floats(0.0, 1.0),
        "batchnorm": st.booleans(),
    }
)


def mlp(d_in, hidden, d_out, *, seed, dropout=0.0, batchnorm=False):
    """An MLP; with BatchNorm the layer before it has no bias (its gradient would be pure
    rounding noise, which adaptive optimizers blow up to full steps in any two runs)."""
    torch.manual_seed(seed)
    layers = [nn.Linear(d_in, hidden, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(hidden))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, d_out))
    return nn.Sequential(*layers)


def batches(d_in, d_out, n, count, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g))
        for _ in range(count)
    ]


def build(shape, h, *, dropout=0.0, rng_seed=None, model_seed=0):
    d_in, hidden, d_out, _ = shape
    members = [
        mlp(d_in, hidden, d_out, seed=model_seed + i, dropout=dropout, batchnorm=h["batchnorm"])
        for i in range(h["members"])
    ]
    ens = EnsembleModule(members)
    cls, kwargs = OPTIMIZERS[h["opt"]]
    adapter = OptimizerAdapter.create(cls, ens, **kwargs)
    state = init_train_state(ens, adapter, ema=h["ema"], seed=rng_seed)
    config = EnsembleConfig(
        model=ens,
        optimizer=adapter,
        objective=Supervised(nn.functional.mse_loss),
        accumulation_steps=h["k"],
        clip_norm=h["clip"],
        ema_decay=h["decay"],
    )
    return members, state, config


def single_config(shape, h):
    d_in, hidden, d_out, _ = shape
    model = mlp(d_in, hidden, d_out, seed=99, batchnorm=h["batchnorm"])
    cls, kwargs = OPTIMIZERS[h["opt"]]
    adapter = OptimizerAdapter.create(cls, model, **kwargs)
    return TrainConfig(
        model=model,
        optimizer=adapter,
        objective=Supervised(nn.functional.mse_loss),
        accumulation_steps=h["k"],
        clip_norm=h["clip"],
        ema_decay=h["decay"],
    )


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Equal up to float32 rounding: batched matmuls round differently from one model's, and
    adaptive optimizers on tiny random models (e.g. centered RMSprop's difference of
    squares) can amplify one ulp of a gradient to ~1e-4 relative in their state."""
    if a.keys() != b.keys():
        return False
    return all(torch.allclose(a[k].double(), b[k].double(), atol=2e-5, rtol=2e-4) for k in a)


@given(shape=shapes, h=hyper, data_seed=st.integers(0, 2**16))
def test_member_i_steps_as_if_alone(shape, h, data_seed):
    """member_state(ensemble_step(s), i) == train_step(member_state(s, i)) over an epoch."""
    _, state, config = build(shape, h)
    single = single_config(shape, h)
    solo = [member_state(state, i) for i in range(h["members"])]
    data = batches(shape[0], shape[2], shape[3], 3, data_seed)
    for j, batch in enumerate(data):
        last = j == len(data) - 1
        state, out = ensemble_train_step(state, batch, config, last_batch=last)
        for i in range(h["members"]):
            solo[i], solo_out = train_step(solo[i], batch, single, last_batch=last)
            assert torch.allclose(out.loss[i], solo_out.loss, atol=1e-5, rtol=1e-5)
    state = ensemble_end_epoch(state, config)
    for i in range(h["members"]):
        alone = snapshot(single_end(solo[i], single))
        inside = snapshot(member_state(state, i))
        assert close(inside, alone), h
        assert counters(member_state(state, i)) == counters(single_end(solo[i], single))


def single_end(state, config):
    from nnh.core import end_epoch

    return end_epoch(state, config)


@given(shape=shapes, h=hyper, data_seed=st.integers(0, 2**16))
def test_purity_and_determinism_with_dropout(shape, h, data_seed):
    """The input record is bitwise unchanged; the same inputs give bitwise the same outputs."""
    _, state, config = build(shape, h, dropout=0.3, rng_seed=data_seed)
    for batch in batches(shape[0], shape[2], shape[3], 3, data_seed):
        before = snapshot(state)
        new, _ = ensemble_train_step(state, batch, config)
        again, _ = ensemble_train_step(state, batch, config)
        assert bitwise_equal(snapshot(state), before)
        assert new is not state
        assert bitwise_equal(snapshot(new), snapshot(again))
        state = new


@given(shape=shapes, h=hyper, data_seed=st.integers(0, 2**16))
def test_donation_equivalence(shape, h, data_seed):
    """donate=True and donate=False give bitwise equal records."""
    _, state, config = build(shape, h, dropout=0.2, rng_seed=data_seed)
    donated = clone_state(state)
    data = batches(shape[0], shape[2], shape[3], 3, data_seed)
    for j, batch in enumerate(data):
        last = j == len(data) - 1
        state, _ = ensemble_train_step(state, batch, config, last_batch=last)
        donated, _ = ensemble_train_step(donated, batch, config, donate=True, last_batch=last)
    assert bitwise_equal(snapshot(state), snapshot(donated))
    assert counters(state) == counters(donated)


def test_dropout_masks_differ_between_members():
    """Identical members with dropout produce different outputs: independent masks."""
    torch.manual_seed(0)
    member = nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.5))
    ens = EnsembleModule([member, member])
    out = ens(torch.ones(8, 4))
    assert not torch.equal(out[0], out[1])
    ens.eval()
    out = ens(torch.ones(8, 4))
    assert torch.equal(out[0], out[1])


def test_batchnorm_statistics_are_per_member():
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(3)]
    ens = EnsembleModule(members)
    x = torch.randn(16, 3)
    ens(x)
    for i, m in enumerate(members):
        m(x)
        assert torch.allclose(ens.get_buffer("1.running_mean")[i], m[1].running_mean, atol=1e-6)
        assert int(ens.get_buffer("1.num_batches_tracked")[i]) == 1


def test_member_and_stack_roundtrip():
    torch.manual_seed(0)
    members = [mlp(3, 5, 2, seed=i, batchnorm=True) for i in range(3)]
    ens = EnsembleModule(members)
    adapter = OptimizerAdapter.create(torch.optim.Adam, ens, lr=1e-2)
    state = init_train_state(ens, adapter, ema=True)
    state, _ = ensemble_train_step(
        state,
        (torch.randn(4, 3), torch.randn(4, 2)),
        EnsembleConfig(
            model=ens,
            optimizer=adapter,
            objective=Supervised(nn.functional.mse_loss),
            ema_decay=0.5,
        ),
    )
    again = stack_states([member_state(state, i) for i in range(3)])
    assert bitwise_equal(snapshot(again), snapshot(state))
    for i in range(3):
        assert all(
            torch.equal(v, ens.get_parameter(k)[i]) for k, v in ens.member(i).named_parameters()
        )


def test_non_elementwise_optimizer_is_refused_by_name():
    ens = EnsembleModule([nn.Linear(2, 1) for _ in range(2)])
    adapter = OptimizerAdapter.create(torch.optim.SparseAdam, ens, lr=0.1)
    with pytest.raises(TypeError, match="SparseAdam cannot train an ensemble: it needs sparse"):
        EnsembleConfig(model=ens, optimizer=adapter, objective=Supervised(nn.functional.mse_loss))
    with pytest.raises(TypeError, match="LBFGS cannot train an ensemble"):
        check_vectorisable(torch.optim.LBFGS)
