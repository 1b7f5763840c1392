"""The ensemble's DDP padding trim keeps every member and cuts only the padded samples."""

import torch

from nnh.handler.ensemble import trim_member_batch


def test_trim_keeps_every_member_and_the_first_k_samples_of_each():
    members, batch, k = 3, 5, 2
    x = torch.arange(members * batch * 4.0).reshape(members, batch, 4)
    out = trim_member_batch({"y": x, "pair": (x, x[..., 0])}, k)
    for t in (out["y"], out["pair"][0], out["pair"][1]):
        assert t.shape[:2] == (members, k)
    assert torch.equal(out["y"], x[:, :k])
    assert torch.equal(out["pair"][1], x[:, :k, 0])
