"""``NNHandler.evaluate``: exact sample-weighted loss and metrics over a loader, the same
numbers ``train()`` logs for the same weights, with or without the EMA weights.

(Under DDP every rank gets the same numbers: ``tests/test_ddp.py``.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nnh import NNHandler


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g))


def abs_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).abs().mean()


def handler(ema_decay: float = 0.0) -> NNHandler:
    torch.manual_seed(0)
    h = NNHandler(nn.Linear, in_features=3, out_features=1, model_type="regression")
    h.set_optimizer(torch.optim.SGD, lr=0.05)
    h.set_loss_fn(nn.functional.mse_loss)
    h.add_metric("mae", abs_error)
    h.set_train_loader(data(40, 0), batch_size=8, shuffle=True)
    h.set_val_loader(data(10, 1), batch_size=4)  # 4 + 4 + 2: an uneven last batch
    h.train(epochs=2, progress_bar=False, ema_decay=ema_decay)
    return h


def direct(module: nn.Module, dataset: TensorDataset) -> dict[str, float]:
    """The loss and metric over every sample at once (per-sample quantities, so the
    sample-weighted mean over batches must equal the mean over the whole set)."""
    x, y = dataset.tensors
    with torch.no_grad():
        out = module(x)
    return {"loss": nn.functional.mse_loss(out, y).item(), "mae": abs_error(out, y).item()}


def test_evaluate_reproduces_train_logged_validation_for_the_live_weights():
    h = handler()
    result = h.evaluate(apply_ema=False)
    assert result == {"loss": h.val_losses[-1], "mae": h.val_metrics_history["mae"][-1]}
    # without EMA weights, apply_ema=True is the same evaluation
    assert h.evaluate() == result


def test_evaluate_is_the_exact_sample_weighted_mean_over_uneven_batches():
    h = handler()
    result = h.evaluate(apply_ema=False)
    expected = direct(h.module, h.val_loader.dataset)
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert result["mae"] == pytest.approx(expected["mae"], rel=1e-6)


def test_evaluate_uses_the_ema_weights_on_request_and_restores_the_live_ones():
    h = handler(ema_decay=0.9)
    live = {k: v.clone() for k, v in h.module.state_dict().items()}
    with_ema = h.evaluate()
    without = h.evaluate(apply_ema=False)
    assert with_ema != without
    for k, v in h.module.state_dict().items():
        assert torch.equal(v, live[k]), k  # the live weights are back, bitwise
    ema_model = nn.Linear(3, 1)
    ema_model.load_state_dict({k: h.state.ema[k] for k in ("weight", "bias")})
    expected = direct(ema_model, h.val_loader.dataset)
    assert with_ema["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert without == {"loss": h.val_losses[-1], "mae": h.val_metrics_history["mae"][-1]}


def test_evaluate_takes_any_loader_or_dataset_and_leaves_the_mode_alone():
    h = handler()
    other = data(13, 7)
    from_dataset = h.evaluate(other, apply_ema=False)
    from_loader = h.evaluate(DataLoader(other, batch_size=5), apply_ema=False)
    assert from_dataset["loss"] == pytest.approx(direct(h.module, other)["loss"], rel=1e-6)
    assert from_loader["loss"] == pytest.approx(from_dataset["loss"], rel=1e-6)
    assert h.module.training  # train() leaves training mode; evaluate() keeps it
    h.eval()
    h.evaluate(other)
    assert not h.module.training


def test_evaluate_before_any_training_and_without_an_optimizer():
    torch.manual_seed(0)
    h = NNHandler(nn.Linear, in_features=3, out_features=1, model_type="regression")
    h.set_loss_fn(nn.functional.mse_loss)
    val = data(9, 2)
    assert h.evaluate(val)["loss"] == pytest.approx(direct(h.module, val)["loss"], rel=1e-6)


def test_evaluate_named_errors():
    torch.manual_seed(0)
    h = NNHandler(nn.Linear, in_features=3, out_features=1, model_type="regression")
    h.set_loss_fn(nn.functional.mse_loss)
    with pytest.raises(ValueError, match="set_val_loader"):
        h.evaluate()
    with pytest.raises(TypeError, match="DataLoader or a Dataset, got list"):
        h.evaluate([1, 2, 3])
    with pytest.raises(TypeError, match="apply_ema"):
        h.evaluate(data(4, 0), apply_ema="yes")
    empty = TensorDataset(torch.zeros(0, 3), torch.zeros(0, 1))
    with pytest.raises(ValueError, match=r"no batches|no sample"):
        h.evaluate(DataLoader(empty, batch_size=2))


def test_evaluate_leaves_the_random_stream_so_a_resume_stays_exact():
    """Iterating a DataLoader draws from the global RNG; evaluate must not move it, or a run
    that evaluates between train() calls would diverge from one that does not."""
    h = handler(ema_decay=0.9)
    h.train(1, progress_bar=False)
    before = torch.get_rng_state()
    h.evaluate()
    h.evaluate(data(10, 3), apply_ema=False)
    assert torch.equal(before, torch.get_rng_state())
