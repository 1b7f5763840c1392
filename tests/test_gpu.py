"""The handler on one CUDA GPU: AMP (fp16 with the loss scaler, bf16), single-GPU training with
a bitwise resume under deterministic algorithms, and sampling / log-likelihood on CUDA.

Marked ``gpu``: ``conftest.py`` skips them only where ``torch.cuda.is_available()`` is False.
"""

from __future__ import annotations

import math
import os

# cuBLAS needs this before its first use for deterministic algorithms (set at collection)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest
import torch
from models import MLP, classification_data
from test_generative_handler import M, data_points, exact_handler
from torch import nn

from nnh import NNHandler
from nnh.generative import VPSDE

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def classifier(**kw) -> NNHandler:
    h = NNHandler(MLP, device="cuda", **kw)
    h.set_optimizer(torch.optim.Adam, lr=1e-2)
    h.set_loss_fn(nn.functional.cross_entropy)
    h.set_train_loader(classification_data(), batch_size=16, shuffle=True)
    h.set_val_loader(classification_data(37, seed=1), batch_size=10)
    return h


def test_fp16_amp_with_the_loss_scaler_on_cuda(tmp_path):
    h = classifier()
    h.seed = 0
    h.train(epochs=4, use_amp="fp16", gradient_clipping_norm=1.0, progress_bar=False)
    assert h.device.type == "cuda" and next(h.module.parameters()).device.type == "cuda"
    assert next(h.module.parameters()).dtype == torch.float32  # weights stay fp32
    scaler = h.state.scaler
    assert scaler is not None and scaler["scale"].device.type == "cuda"
    assert 1.0 <= float(scaler["scale"]) <= 2.0**16
    assert h.state.step + h.state.skipped_steps == 4 * math.ceil(120 / 16)
    assert all(math.isfinite(v) for v in h.train_losses) and h.train_losses[-1] < h.train_losses[0]
    h.save(str(tmp_path / "fp16.pth"))
    g = NNHandler.load(str(tmp_path / "fp16.pth"), device="cuda")
    assert torch.equal(g.state.scaler["scale"], scaler["scale"])
    assert torch.equal(g.state.scaler["growth_tracker"], scaler["growth_tracker"])
    g.train(epochs=1, use_amp="fp16", progress_bar=False)
    assert math.isfinite(g.train_losses[-1])


def test_bf16_amp_on_cuda_is_close_to_fp32():
    if not torch.cuda.is_bf16_supported():
        pytest.fail("this GPU has no bf16 support; run the gpu tests on an Ampere or newer GPU")
    runs = {}
    for amp in (False, "bf16"):
        h = classifier()
        h.seed = 0
        h.train(epochs=3, use_amp=amp, progress_bar=False)
        assert h.state.scaler is None  # bf16 needs no loss scaling
        runs[amp] = h.train_losses
    assert runs["bf16"][-1] < runs["bf16"][0]
    assert runs["bf16"] == pytest.approx(runs[False], rel=5e-2)


def test_single_gpu_train_and_bitwise_resume_with_deterministic_algorithms(tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        a = classifier()
        a.seed = 0
        a.train(epochs=2, progress_bar=False)
        a.save(str(tmp_path / "mid.pth"))
        a.train(epochs=2, progress_bar=False)
        b = NNHandler.load(str(tmp_path / "mid.pth"), device="cuda")
        assert b.device.type == "cuda"
        b.train(epochs=2, progress_bar=False)
    finally:
        torch.use_deterministic_algorithms(False)
    assert b.train_losses == a.train_losses and b.val_losses == a.val_losses  # bitwise
    for (k, va), vb in zip(a.module.state_dict().items(), b.module.state_dict().values()):
        assert va.device.type == "cuda" and torch.equal(va, vb), k


def test_sample_and_log_likelihood_on_cuda():
    h = exact_handler(VPSDE, device="cuda", sde_kwargs={"T": 3.0})
    h.seed = 0
    x = h.sample((4000, 2), steps=300, bar=False)
    assert x.device.type == "cuda" and torch.isfinite(x).all()
    assert torch.allclose(x.mean(0).cpu(), M, atol=0.05), x.mean(0)
    points = data_points()
    lp_gpu = h.log_likelihood(points.to(CUDA), ode_steps=100, method="RK4")
    lp_cpu = exact_handler(VPSDE, sde_kwargs={"T": 3.0}).log_likelihood(points, ode_steps=100, method="RK4")
    assert lp_gpu.device.type == "cuda" and lp_gpu.dtype == torch.float64
    assert (lp_gpu.cpu() - lp_cpu).abs().max() < 1e-6
