"""Warnings point at the user's line (the first frame outside nnh) and show once per process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_script(tmp_path: Path, body: str, env_extra: dict[str, str] | None = None) -> str:
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONWARNINGS": "default", **(env_extra or {})}
    env.pop("NNH_WARN_ALWAYS", None) if not env_extra else None
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


USER = """
    import torch
    from torch import nn
    from nnh import NNHandler

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)
        def forward(self, x):
            return self.lin(x)

    for name in ("a", "b"):  # two handlers: the second one's save repeats the same warnings
        h = NNHandler(Net)
        h.set_optimizer(torch.optim.SGD, lr=0.1)
        h.set_loss_fn(nn.functional.mse_loss)
        if name == "a":
            h.save("a.pth")  # LINE-A
        else:
            h.save("b.pth")  # LINE-B
"""


def line_of(marker: str) -> int:
    return next(i for i, line in enumerate(textwrap.dedent(USER).splitlines(), 1) if marker in line)


def test_a_warning_names_the_users_file_and_line_and_shows_once(tmp_path):
    err = run_script(tmp_path, USER)
    script = str(tmp_path / "user_script.py")
    shown = [line for line in err.splitlines() if "UserWarning" in line]
    assert shown, err
    # every warning is attributed to the user's script at the first save, never to nnh
    assert all(line.startswith(f"{script}:{line_of('LINE-A')}:") for line in shown), shown
    assert "What to do: move it into a module you import" in err
    assert "site-packages" not in err and "/nnh/" not in "".join(shown)
    # the second save repeats nothing
    assert not any(f":{line_of('LINE-B')}:" in line for line in shown), shown


def test_nnh_warn_always_repeats_them(tmp_path):
    err = run_script(tmp_path, USER, {"NNH_WARN_ALWAYS": "1"})
    shown = [line for line in err.splitlines() if "UserWarning" in line]
    assert any(f":{line_of('LINE-B')}:" in line for line in shown), shown
