"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one page run in order, in one fresh process, in an empty temporary folder, as
the script a user would paste them into (``__main__``). A block may be marked
``<!-- not-run: reason -->`` on the line before it only when it needs what a test machine
does not have (a GPU, a cluster, the user's own data or model). A block whose first line is
``# file: some/path.py`` is the content of that file: it is written there, not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*not-run\b[^>]*-->\s*$")

RUNNER = """
import pathlib, re, sys
blocks = {blocks!r}
namespace = sys.modules["__main__"].__dict__
for line, source in blocks:
    print(f"--- block at line {{line}}", flush=True)
    target = re.match(r"^# file: (\\S+\\.py)\\n", source)
    if target:
        path = pathlib.Path(target.group(1))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
        continue
    exec(compile(source, f"{page}:{{line}}", "exec"), namespace)
"""


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """``(line, source)`` of each runnable python block of ``page``."""
    text = page.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if NOT_RUN.search(before):
            continue
        blocks.append((text.count("\n", 0, match.start()) + 2, match.group(1)))
    return blocks


def test_the_extractor_sees_blocks_and_honours_not_run(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 1\n```\n<!-- not-run: needs a GPU -->\n```python\ncuda()\n```\n")
    assert python_blocks(page) == [(2, "x = 1\n")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_python_block_runs(page, tmp_path):
    blocks = python_blocks(page)
    if not blocks:
        return  # a page without python blocks has nothing to run
    script = tmp_path / "doc_blocks.py"
    script.write_text(RUNNER.format(blocks=blocks, page=page.relative_to(ROOT)))
    env = {
        **os.environ,
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{page.name}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
