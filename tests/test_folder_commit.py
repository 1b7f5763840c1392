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
