"""Progress output in a log file (Slurm, nohup): one plain line per epoch, no '\\r' frames."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SRC = str(TESTS.parent / "src")

SCRIPT = """
    import torch
    from models import MLP, classification_data
    from nnh import NNHandler

    torch.manual_seed(0)
    h = NNHandler(MLP, model_type="classification")
    h.set_optimizer(torch.optim.SGD, lr=0.1)
    h.set_loss_fn(torch.nn.functional.cross_entropy)
    h.set_train_loader(classification_data(64), batch_size=8)
    h.set_val_loader(classification_data(32, seed=1), batch_size=8)
    h.train(3, progress_bar=True, epoch_train_and_val_pbar=True)
"""


def run_with_stderr_in_a_file(tmp_path: Path, **env_extra: str) -> str:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(SCRIPT))
    log = tmp_path / "slurm.err"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + str(TESTS), **env_extra}
    env.pop("NNH_PROGRESS", None) if not env_extra else None
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=err, timeout=300)  # fmt: skip
    text = log.read_bytes().decode()  # bytes: read_text would turn "\r" into "\n"
    assert proc.returncode == 0, text[-3000:]
    return text


def test_a_log_file_gets_one_line_per_epoch_and_no_carriage_returns(tmp_path):
    text = run_with_stderr_in_a_file(tmp_path)
    assert "\r" not in text, repr(text[:500])
    lines = [line for line in text.splitlines() if line.startswith("Epoch ")]
    assert [line.split(":")[0] for line in lines] == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"], text
    assert all("loss=" in line and "val_loss=" in line for line in lines), lines


def test_bars_can_be_asked_for_in_a_file(tmp_path):
    text = run_with_stderr_in_a_file(tmp_path, NNH_PROGRESS="bars")
    assert "\r" in text and "Epochs" in text
