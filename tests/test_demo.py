"""The README's main job, run as a user runs it (quick mode), in a fresh process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import torch

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


@pytest.mark.slow
def test_demo_trains_plots_checkpoints_resumes_samples_and_reports_a_log_likelihood(tmp_path):
    proc = subprocess.run([sys.executable, str(DEMO), "--out", str(tmp_path), "--quick"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "UserWarning" not in proc.stderr
    for name in ("losses.png", "metric_accuracy.png", "losses_after_resume.png", "generative_samples.png"):
        image = mpimg.imread(tmp_path / name)
        assert image.shape[0] > 200 and image.std() > 0.01, name
    for name in ("spiral_classifier.pth", "spiral_classifier_resumed.pth", "score_model.pth", "history.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    resumed = torch.load(tmp_path / "spiral_classifier_resumed.pth", weights_only=True)
    assert len(resumed["history"]["train_losses"]) == 6 + 3  # quick: 6 epochs, then 3 after the resume
    accuracy = float(re.search(r"validation accuracy: ([0-9.]+)", out).group(1))
    assert accuracy > 0.9
    log_likelihood = float(re.search(r"log_likelihood_nats: (-?[0-9.]+)", out).group(1))
    prior = float(re.search(r"prior_log_density_nats: (-?[0-9.]+)", out).group(1))
    assert log_likelihood > prior + 2
