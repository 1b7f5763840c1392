"""Laws of the pure core: purity, determinism, donation, accumulation, optimizers, scaler,
EMA, clipping."""

from __future__ import annotations

import math

import pytest
import torch
from core_helpers import OPTIMIZERS, all_tensors, bitwise_equal, counters, mlp, setup, snapshot
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from nnh.core import (
    LossScaler,
    clone_state,
    ema_update,
    end_epoch,
    init_scaler_state,
    scaler_update,
    train_step,
)
from nnh.core.tree import flat_td

shapes = st.tuples(st.integers(1, 6), st.integers(1, 8), st.integers(1, 4), st.integers(1, 9))
hyper = st.fixed_dictionaries(
    {
        "opt": st.sampled_from(sorted(OPTIMIZERS)),
        "k": st.integers(1, 3),
        "clip": st.one_of(st.none(), st.floats(0.01, 10.0)),
        "ema": st.booleans(),
        "decay": st.floats(0.0, 1.0),
    }
)


def batches(d_in, d_out, n, count, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)) for _ in range(count)]


def make(shape, h, *, dropout=0.0, batchnorm=False, seed=0, rng_seed=None):
    d_in, hidden, d_out, _ = shape
    model = mlp(d_in, hidden, d_out, seed=seed, dropout=dropout, batchnorm=batchnorm and shape[3] > 1)
    return setup(
        model,
        h["opt"],
        ema=h["ema"],
        seed=rng_seed,
        accumulation_steps=h["k"],
        clip_norm=h["clip"],
        ema_decay=h["decay"],
    )


@given(shape=shapes, h=hyper, data_seed=st.integers(0, 2**16))
def test_purity_inputs_bitwise_unchanged(shape, h, data_seed):
    state, config = make(shape, h, dropout=0.2, batchnorm=True, rng_seed=data_seed)
    for batch in batches(shape[0], shape[2], shape[3], 3, data_seed):
        before, before_counters = snapshot(state), counters(state)
        new_state, _ = train_step(state, batch, config)
        assert new_state is not state
        assert bitwise_equal(snapshot(state), before), "train_step mutated its input record"
        assert counters(state) == before_counters
        state = new_state


@given(shape=shapes, h=hyper, data_seed=st.integers(0, 2**16))
def test_determinism_same_inputs_same_outputs(shape, h, data_seed):
    state, config = make(shape, h, dropout=0.3, batchnorm=True, rng_seed=data_seed)
    data = batches(shape[0], shape[2], shape[3], 3, data_seed)

    def run():
        s = state
        losses = []
        for b in data:
            s, out = train_step(s, b, config)
            losses.append(out.loss)
        return s, torch.stack(losses)

    (s1, l1), (s2, l2) = run(), run()
    assert bitwise_equal(snapshot(s1), snapshot(s2))
    assert torch.equal(l1, l2) and counters(s1) == counters(s2)


@given(shape=shapes, h=hyper, data_seed=st.integers(0, 2**16))
def test_donation_equivalence(shape, h, data_seed):
    state, config = make(shape, h, dropout=0.25, rng_seed=data_seed)
    data = batches(shape[0], shape[2], shape[3], 4, data_seed)
    pure, donated = state, clone_state(state)
    for i, b in enumerate(data):
        last = i == len(data) - 1
        pure, out_p = train_step(pure, b, config, last_batch=last)
        donated, out_d = train_step(donated, b, config, donate=True, last_batch=last)
        assert torch.equal(out_p.loss, out_d.loss)
    assert bitwise_equal(snapshot(pure), snapshot(donated))
    assert counters(pure) == counters(donated)


@given(
    d=st.integers(1, 5),
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    opt=st.sampled_from(["sgd", "sgd_momentum", "adam", "rmsprop"]),
    seed=st.integers(0, 1000),
)
def test_accumulation_equals_one_big_batch(d, sizes, opt, seed):
    """k micro-batches (any sizes) == one batch of all their samples, mean-reduced loss."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=g) for n in sizes]
    ys = [torch.randn(n, 1, generator=g) for n in sizes]
    acc_state, acc_cfg = setup(mlp(d, 4, 1, seed=seed), opt, accumulation_steps=len(sizes))
    big_state, big_cfg = setup(mlp(d, 4, 1, seed=seed), opt)
    for i, (x, y) in enumerate(zip(xs, ys)):
        acc_state, out = train_step(acc_state, (x, y), acc_cfg)
        assert out.updated == (i == len(sizes) - 1)
    big_state, _ = train_step(big_state, (torch.cat(xs), torch.cat(ys)), big_cfg)
    assert acc_state.step == big_state.step == 1
    for name in big_state.params.keys():
        torch.testing.assert_close(acc_state.params[name], big_state.params[name], rtol=1e-5, atol=1e-6)


def test_partial_window_at_epoch_end_uses_its_own_samples():
    """3 micro-batches in a window of 4 at the epoch end == one batch of those 3."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(5, 3, generator=g), torch.randn(5, 1, generator=g)) for _ in range(3)]
    acc_state, acc_cfg = setup(mlp(3, 4, 1, seed=1), "sgd", accumulation_steps=4)
    big_state, big_cfg = setup(mlp(3, 4, 1, seed=1), "sgd")
    for i, b in enumerate(data):
        acc_state, out = train_step(acc_state, b, acc_cfg, last_batch=i == 2)
    assert out.updated and acc_state.micro_step == 0
    big_state, _ = train_step(big_state, tuple(torch.cat(t) for t in zip(*data)), big_cfg)
    for name in big_state.params.keys():
        torch.testing.assert_close(acc_state.params[name], big_state.params[name], rtol=1e-5, atol=1e-6)


def test_window_never_crosses_an_epoch():
    state, cfg = setup(mlp(2, 3, 1, seed=0), "sgd", accumulation_steps=4)
    state, out = train_step(state, (torch.ones(2, 2), torch.zeros(2, 1)), cfg)
    assert not out.updated and state.micro_step == 1
    state = end_epoch(state, cfg)
    assert state.micro_step == 0 and state.step == 1 and state.epoch == 1 and state.grads is None


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@given(seed=st.integers(0, 10_000), steps=st.integers(1, 5))
def test_equals_torch_optim_used_directly(opt_name, seed, steps):
    cls, kwargs = OPTIMIZERS[opt_name]
    plain = mlp(3, 5, 2, seed=seed)
    plain_opt = cls(plain.parameters(), **kwargs)
    state, config = setup(mlp(3, 5, 2, seed=seed), opt_name)
    for b in batches(3, 2, 7, steps, seed):
        plain_opt.zero_grad()
        nn.functional.mse_loss(plain(b[0]), b[1]).backward()
        plain_opt.step()
        state, _ = train_step(state, b, config, donate=True)
    for name, p in plain.named_parameters():
        assert torch.equal(p, state.params[name]), f"{opt_name}: parameter {name} differs"
    by_name = dict(zip([n for n, _ in plain.named_parameters()], plain.parameters()))
    for name, p in by_name.items():
        for key, value in plain_opt.state[p].items():
            assert torch.equal(torch.as_tensor(value), state.opt_state[name][key]), f"{opt_name}: {name}/{key}"


def test_param_groups_with_their_own_options_match_torch():
    plain = mlp(3, 4, 1, seed=3)
    groups = lambda m: [  # noqa: E731
        {"params": [m[0].weight, m[0].bias], "lr": 0.1},
        {"params": [m[2].weight, m[2].bias], "weight_decay": 0.5},
    ]
    plain_opt = torch.optim.SGD(groups(plain), lr=0.01, momentum=0.9)
    from nnh.core import OptimizerAdapter, Supervised, TrainConfig, init_train_state

    model = mlp(3, 4, 1, seed=3)
    adapter = OptimizerAdapter.create(
        torch.optim.SGD,
        model,
        params=[{"params": ["0.weight", "0.bias"], "lr": 0.1}, {"params": ["2.weight", "2.bias"], "weight_decay": 0.5}],
        lr=0.01,
        momentum=0.9,
    )
    state = init_train_state(model, adapter)
    cfg = TrainConfig(model=model, optimizer=adapter, objective=Supervised(nn.functional.mse_loss))
    for b in batches(3, 1, 6, 3, 0):
        plain_opt.zero_grad()
        nn.functional.mse_loss(plain(b[0]), b[1]).backward()
        plain_opt.step()
        state, _ = train_step(state, b, cfg, donate=True)
    for name, p in plain.named_parameters():
        assert torch.equal(p, state.params[name])


# -- loss scaler --------------------------------------------------------------------------


class ScaledIdentity(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.w


@given(init_exp=st.integers(1, 20), backoff=st.floats(0.1, 0.9), steps=st.integers(1, 4))
def test_scaler_skips_update_and_backs_off_on_inf(init_exp, backoff, steps):
    scaler = LossScaler(init_scale=2.0**init_exp, backoff_factor=backoff, growth_interval=1000)
    state, cfg = setup(ScaledIdentity(), "adam", loss_scaler=scaler)
    state, _ = train_step(state, (torch.ones(2, 3), torch.zeros(2, 3)), cfg)  # create optimizer state
    scale = float(state.scaler["scale"])
    for _ in range(steps):
        before = snapshot(state)
        bad = (torch.full((2, 3), float("inf")), torch.zeros(2, 3))
        state, out = train_step(state, bad, cfg)
        after = snapshot(state)
        assert out.updated
        for key in before:
            if key.startswith(("params/", "opt_state/")):
                assert torch.equal(before[key], after[key]), f"{key} changed on an inf step"
        scale *= backoff
        assert math.isclose(float(state.scaler["scale"]), scale, rel_tol=1e-6)
        assert int(state.scaler["growth_tracker"]) == 0
    assert state.step == 1 and state.skipped_steps == steps


@given(interval=st.integers(1, 5), growth=st.floats(1.5, 4.0))
def test_scaler_grows_after_interval_good_steps(interval, growth):
    cfg = LossScaler(init_scale=8.0, growth_factor=growth, growth_interval=interval)
    s = init_scaler_state(cfg)
    for i in range(1, 2 * interval + 1):
        s = scaler_update(s, torch.zeros(1), cfg)
        expected = 8.0 * growth ** (i // interval)
        assert math.isclose(float(s["scale"]), expected, rel_tol=1e-5)
        assert int(s["growth_tracker"]) == i % interval


def test_scaler_unscales_before_clipping_and_matches_unscaled_run():
    """With a finite scale, a scaled fp32 run equals the unscaled one (powers of two are exact)."""
    data = batches(3, 2, 4, 3, 7)
    a, cfg_a = setup(mlp(3, 4, 2, seed=2), "adam", clip_norm=0.05, loss_scaler=LossScaler(init_scale=2.0**10))
    b, cfg_b = setup(mlp(3, 4, 2, seed=2), "adam", clip_norm=0.05)
    for batch in data:
        a, out_a = train_step(a, batch, cfg_a)
        b, out_b = train_step(b, batch, cfg_b)
        torch.testing.assert_close(out_a.grad_norm, out_b.grad_norm, rtol=1e-6, atol=0)
    for name in a.params.keys():
        torch.testing.assert_close(a.params[name], b.params[name], rtol=1e-6, atol=1e-7)


# -- EMA ----------------------------------------------------------------------------------

tensors = st.integers(1, 6).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=n, max_size=n),
        st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=n, max_size=n),
    )
)


@given(pair=tensors)
def test_ema_decay_zero_copies_and_one_keeps(pair):
    ema, params = flat_td({"w": torch.tensor(pair[0])}), flat_td({"w": torch.tensor(pair[1])})
    assert torch.equal(ema_update(ema, params, 0.0)["w"], params["w"])
    assert torch.equal(ema_update(ema, params, 1.0)["w"], ema["w"])


@given(pair=tensors, decay=st.floats(0.0, 0.999), k=st.integers(1, 30))
def test_ema_k_steps_match_closed_form(pair, decay, k):
    e0, p = torch.tensor(pair[0], dtype=torch.float64), torch.tensor(pair[1], dtype=torch.float64)
    ema, params = flat_td({"w": e0}), flat_td({"w": p})
    for _ in range(k):
        ema = ema_update(ema, params, decay)
    expected = decay**k * e0 + (1 - decay**k) * p
    torch.testing.assert_close(ema["w"], expected, rtol=1e-9, atol=1e-9)
    assert torch.equal(params["w"], p)


def test_ema_in_train_step_follows_params():
    state, cfg = setup(mlp(2, 3, 1, seed=0), "sgd", ema=True, ema_decay=0.5)
    e0 = snapshot(state)
    state, _ = train_step(state, (torch.ones(4, 2), torch.zeros(4, 1)), cfg)
    for name in state.params.keys():
        expected = 0.5 * e0[f"ema/{name}"] + 0.5 * state.params[name].detach()
        torch.testing.assert_close(state.ema[name], expected)


# -- clipping -----------------------------------------------------------------------------


@given(max_norm=st.floats(1e-3, 5.0), seed=st.integers(0, 1000))
def test_clipping_bounds_norm_and_keeps_direction(max_norm, seed):
    """SGD(lr=1) makes the update equal to minus the clipped gradient."""
    model = mlp(3, 4, 2, seed=seed)
    batch = batches(3, 2, 5, 1, seed)[0]
    ref = mlp(3, 4, 2, seed=seed)
    nn.functional.mse_loss(ref(batch[0]), batch[1]).backward()
    raw = torch.cat([p.grad.flatten() for p in ref.parameters()])
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    state, cfg = setup(model, "sgd", clip_norm=max_norm)
    cfg.optimizer.optimizer.param_groups[0]["lr"] = 1.0
    state, out = train_step(state, batch, cfg)
    after = torch.cat([state.params[n].detach().flatten() for n in state.params.keys()])
    clipped = before - after
    assert clipped.norm() <= max_norm * (1 + 1e-4) + 1e-7
    torch.testing.assert_close(out.grad_norm, raw.norm(), rtol=1e-5, atol=1e-7)
    cosine = torch.dot(clipped, raw) / (clipped.norm() * raw.norm())
    assert cosine > 1 - 1e-5
    if raw.norm() <= max_norm:
        torch.testing.assert_close(clipped, raw, rtol=1e-5, atol=1e-6)


def test_all_tensors_helper_sees_every_field():
    state, _ = setup(mlp(2, 2, 1, seed=0), "adam", ema=True, seed=1, loss_scaler=LossScaler())
    keys = all_tensors(state).keys()
    assert any(k.startswith("ema/") for k in keys) and "rng" in keys and "scaler/scale" in keys
