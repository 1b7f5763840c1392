import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))

# tests/data holds fixtures and the script that writes them (run by hand, never collected:
# importing it would train and write files named after sys.argv[1])
collect_ignore = ["data"]


@pytest.fixture(autouse=True)
def _headless(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped only where torch.cuda.is_available() is False."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs CUDA, and torch.cuda.is_available() is False here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_disk():
    """A real 1 MiB file system (tmpfs; CI runs as root). Mounted outside pytest's tmp
    folders, which concurrent pytest runs may rename while they clean up."""
    mount = Path(tempfile.mkdtemp(prefix="nnh-tiny-disk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
        mount.rmdir()
