"""A checkpoint folder written under a temporary name appears at its target only when committed."""

from nnh.checkpoint.folder_commit import commit_folder, temp_folder_for


def test_uncommitted_folder_leaves_previous_in_place(tmp_path):
    final = tmp_path / "ckpt"
    first = temp_folder_for(final)
    (first / "shard0").write_bytes(b"old")
    commit_folder(first, final)
    second = temp_folder_for(final)
    (second / "shard0").write_bytes(b"new-partial")
    # not committed (a rank was killed): the previous folder is what a reader sees
    assert (final / "shard0").read_bytes() == b"old"
    commit_folder(second, final)
    assert (final / "shard0").read_bytes() == b"new-partial"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_corrupt_shard_is_named(tmp_path):
    import pytest

    from nnh.checkpoint.errors import CheckpointError
    from nnh.checkpoint.sharded_files import folder_checksums, verify_folder

    (tmp_path / "__0_0.distcp").write_bytes(b"aaaa")
    (tmp_path / "__1_0.distcp").write_bytes(b"bbbb")
    sums = folder_checksums(tmp_path)
    verify_folder(tmp_path, sums)
    (tmp_path / "__1_0.distcp").write_bytes(b"bbbc")
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp"):
        verify_folder(tmp_path, sums)
