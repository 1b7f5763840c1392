"""Laws of the checkpoint seal (:mod:`nnh.checkpoint.integrity`).

The fast description of a payload that every save and load runs must hash exactly what the
reference walk describes: otherwise files written before the change would stop verifying.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nnh.checkpoint.errors import CheckpointError
from nnh.checkpoint.integrity import _measure, _tensordict_base, seal, tensor_checksum, verify

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=4),
    st.builds(lambda n: torch.arange(n, dtype=torch.float32), st.integers(0, 5)),
)
payloads = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=4), inner, max_size=4),
        st.dictionaries(st.integers(0, 9), inner, max_size=3).map(OrderedDict),
    ),
    max_leaves=20,
)


def _walk(obj: Any, where: str) -> Iterator[tuple[str, Any]]:
    """The reference definition of what format 2's digest covers: ``(location, leaf)`` pairs
    in a fixed order, containers described too (the generator nnh 0.1 hashed)."""
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, _tensordict_base()):
        yield from _walk(dict(obj.flatten_keys(".").items()), where)
    elif isinstance(obj, Mapping):
        yield where, f"dict[{len(obj)}]"
        for key, value in obj.items():
            yield from _walk(value, f"{where}/{key!r}")
    elif isinstance(obj, (list, tuple)):
        yield where, f"{type(obj).__name__}[{len(obj)}]"
        for i, value in enumerate(obj):
            yield from _walk(value, f"{where}[{i}]")
    else:
        yield where, f"{type(obj).__name__}:{obj!r}"


def _reference(payload: dict) -> tuple[dict[str, int], str]:
    sums: dict[str, int] = {}
    digest = hashlib.sha256()
    for key, value in payload.items():
        for where, leaf in _walk(value, repr(key)):
            if isinstance(leaf, torch.Tensor):
                sums[where] = tensor_checksum(leaf)
                leaf = f"tensor:{leaf.dtype}:{tuple(leaf.shape)}"
            digest.update(f"{where}={leaf}\n".encode("utf-8", "backslashreplace"))
    return sums, digest.hexdigest()


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=6), payloads, max_size=5))
def test_fast_description_hashes_exactly_what_the_reference_walk_describes(payload: dict) -> None:
    assert _measure(payload) == _reference(payload)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=6), payloads, min_size=1, max_size=5))
def test_a_sealed_payload_verifies_and_changing_a_leaf_breaks_it(payload: dict) -> None:
    sealed = seal(payload)
    verify(sealed)
    key = next(iter(payload))
    tampered = {**sealed, key: [payload[key]]}  # wrap one section: a different structure
    with pytest.raises(CheckpointError) as caught:
        verify(tampered)
    assert caught.value.kind == "corrupt"
