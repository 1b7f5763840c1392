"""The README's "A taste", run verbatim in fresh processes, keeps its promise: loading the
saved handler and training 5 more epochs is bitwise the same as 15 epochs straight."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from test_resume import assert_bitwise_equal

from nnh.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def readme_taste() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## A taste", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_script(source: str, folder: Path) -> None:
    env = {
        **os.environ,
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    folder.mkdir()
    (folder / "taste.py").write_text(source)
    proc = subprocess.run([sys.executable, "taste.py"], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_readme_taste_resumed_is_bitwise_the_straight_run(tmp_path):
    taste = readme_taste()
    assert "again.train(epochs=5)" in taste and "handler.train(epochs=10," in taste
    run_script(taste + '\nagain.save("final.pth")\n', tmp_path / "resumed")
    straight = taste.replace("handler.train(epochs=10,", "handler.train(epochs=15,")
    straight = straight.split("handler.plot_losses")[0] + 'handler.save("final.pth")\n'
    run_script(straight, tmp_path / "straight")
    a = load_checkpoint(tmp_path / "resumed" / "final.pth")
    b = load_checkpoint(tmp_path / "straight" / "final.pth")
    assert a["train_state"]["ema"] is not None  # the EMA weights went on after the load
    for key in ("model_state_dict", "optimizer", "scheduler", "train_state", "history"):
        assert_bitwise_equal(a[key], b[key], key)
    assert len(a["history"]["train_losses"]) == 15
    # the automatic saves of the resumed part used the restored metric in their names
    names = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("*.pth"))
    assert [n[:7] for n in names] == ["mlp_05_", "mlp_10_", "mlp_15_"], names
