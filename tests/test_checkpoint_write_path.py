"""The fast paths of a durable save keep every guarantee.

* ``save_checkpoint`` writes without the zip CRC-32 (nnh's own checksums cover the file),
  through torch's writer for that call only; the file loads with plain ``torch.load``.
* The page cache of a large file about to be replaced is handed back before the write.
* A large replaced file gets a hidden second name and is freed in the background.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from nnh.checkpoint import atomic as atomic_module
from nnh.checkpoint import list_temp_files, load_checkpoint, save_checkpoint
from nnh.checkpoint.atomic import atomic_save
from nnh.checkpoint.errors import CheckpointError
from nnh.checkpoint.torch_file import CAN_SKIP_CRC32, write_torch_file

BIG = 24 * 2**20  # above the 16 MiB threshold for the large-file paths


def _crcs(path: Path) -> list[int]:
    with zipfile.ZipFile(path) as archive:
        return [info.CRC for info in archive.infolist()]


def test_this_torch_supports_writing_without_crc32() -> None:
    # the fast path must be the one CI exercises; a torch upgrade that changes the
    # internals turns this red instead of silently falling back
    assert CAN_SKIP_CRC32


def test_checkpoint_is_written_without_zip_crc32_and_loads_with_plain_torch_load(
    tmp_path: Path,
) -> None:
    state = {"w": torch.randn(64, 64), "b": torch.arange(5)}
    path = save_checkpoint({"model_state_dict": state}, tmp_path / "c.pth")
    assert set(_crcs(path)) == {0}
    plain = torch.load(path, weights_only=True)["model_state_dict"]
    assert torch.equal(plain["w"], state["w"]) and torch.equal(plain["b"], state["b"])
    assert torch.equal(load_checkpoint(path)["model_state_dict"]["w"], state["w"])


def test_default_writes_keep_the_crc32_and_the_global_option_is_untouched(
    tmp_path: Path,
) -> None:
    before = torch.serialization.get_crc32_options()
    atomic_save({"w": torch.ones(100)}, tmp_path / "plain.pth")
    write_torch_file({"w": torch.ones(100)}, tmp_path / "nocrc.pth", crc32=False)
    assert torch.serialization.get_crc32_options() == before
    assert all(_crcs(tmp_path / "plain.pth"))
    assert 0 in _crcs(tmp_path / "nocrc.pth")


def test_a_bit_flip_in_tensor_data_is_still_caught_without_the_crc(tmp_path: Path) -> None:
    path = save_checkpoint({"w": torch.zeros(4096)}, tmp_path / "c.pth")
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
        offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw = bytearray(path.read_bytes())
    raw[offset + 1000] ^= 0x10
    path.write_bytes(bytes(raw))
    assert set(_crcs(path)) == {0}  # nothing in the zip itself could notice
    with pytest.raises(CheckpointError, match=r"c\.pth"):
        load_checkpoint(path)


def test_non_ascii_file_names_are_written_without_crc(tmp_path: Path) -> None:
    path = save_checkpoint({"w": torch.ones(3)}, tmp_path / "modèle-η.pth")
    assert set(_crcs(path)) == {0}
    assert load_checkpoint(path)["w"].tolist() == [1.0, 1.0, 1.0]


def test_a_save_that_fails_midway_raises_and_does_not_abort_the_interpreter(
    tmp_path: Path,
) -> None:
    # torch's writer finishes the archive in its destructor when nobody else did; failing
    # there (a full disk) terminates the process. A file-size limit makes the write fail.
    script = textwrap.dedent(
        f"""
        import resource, signal, torch
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
        from nnh.checkpoint import save_checkpoint, list_temp_files
        from nnh.checkpoint.errors import CheckpointError
        try:
            save_checkpoint({{"w": torch.zeros(2**20)}}, {str(tmp_path / "c.pth")!r})
        except CheckpointError as err:
            print("raised", err.kind)
        import gc; gc.collect()
        print("temps", len(list_temp_files({str(tmp_path)!r})))
        print("alive")
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "raised file_too_large" in run.stdout
    assert "temps 0" in run.stdout and "alive" in run.stdout
    assert not (tmp_path / "c.pth").exists()


def _resident_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache (Linux ``mincore`` on a private mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
        address = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        resident = sum(v & 1 for v in vec)
        del address
    return resident


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore is Linux's")
def test_the_replaced_files_page_cache_is_released_and_its_data_kept(tmp_path: Path) -> None:
    old = tmp_path / "old.pth"
    old.write_bytes(os.urandom(BIG))
    content = old.read_bytes()  # now in the page cache
    os.fsync(os.open(old, os.O_RDONLY))  # clean pages: the only kind that can be dropped
    assert _resident_pages(old) > 0.9 * BIG // mmap.PAGESIZE
    atomic_module._release_cached_pages(old)
    assert _resident_pages(old) < 0.1 * BIG // mmap.PAGESIZE
    assert old.read_bytes() == content


def test_releasing_cache_never_opens_a_device(monkeypatch) -> None:
    opened: list[object] = []
    real_open = os.open
    monkeypatch.setattr(
        atomic_module.os, "open", lambda p, *a, **k: (opened.append(p), real_open(p, *a, **k))[1]
    )
    atomic_module._release_cached_pages(Path("/dev/null"))
    assert opened == []


def test_releasing_cache_ignores_what_is_not_a_large_regular_file(tmp_path: Path) -> None:
    small = tmp_path / "small.pth"
    small.write_bytes(b"x" * 100)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link.pth"
    link.symlink_to(small)
    for target in (small, fifo, link, tmp_path / "missing.pth", tmp_path):
        atomic_module._release_cached_pages(target)  # returns at once, raises nothing
    assert small.read_bytes() == b"x" * 100


def test_saving_over_a_large_file_keeps_readers_of_the_old_one_and_leaves_no_hidden_name(
    tmp_path: Path, monkeypatch
) -> None:
    final = tmp_path / "ckpt.pth"
    released: list[Path] = []
    original = atomic_module._release_cached_pages
    monkeypatch.setattr(
        atomic_module, "_release_cached_pages", lambda p: (released.append(p), original(p))
    )
    first = torch.randn(BIG // 4)
    save_checkpoint({"w": first}, final)
    with open(final, "rb") as reader:  # a reader of the old file, e.g. a slow loader
        second = torch.randn(BIG // 4)
        save_checkpoint({"w": second}, final)
        atomic_module._retired_files.submit(lambda: None).result()  # background unlink done
        old_bytes = reader.read()
    assert released == [final, final]
    assert torch.equal(load_checkpoint(final)["w"], second)
    old_copy = tmp_path / "old-copy.pth"
    old_copy.write_bytes(old_bytes)
    assert torch.equal(load_checkpoint(old_copy)["w"], first)
    assert list_temp_files(tmp_path) == []
    assert os.stat(final).st_nlink == 1
