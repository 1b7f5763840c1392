"""Laws of background-save snapshots (:mod:`nnh.checkpoint.background`).

A snapshot whose copies are partly deferred (made later on the stager) must equal, once
those copies are made, the snapshot made all at once: same structure, same types, bitwise
the same tensors in fresh memory; and neither kind of snapshot may change its source.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nnh.checkpoint.background import _snapshot, defer_spec

KEYS = ("a", "b", "c")
leaves = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=4),
    st.builds(
        lambda n, seed: torch.randn(n, generator=torch.Generator().manual_seed(seed)),
        st.integers(0, 6),
        st.integers(0, 2**16),
    ),
)
trees = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from(KEYS), inner, max_size=3),
        st.dictionaries(st.sampled_from(KEYS), inner, max_size=3).map(OrderedDict),
    ),
    max_leaves=12,
)
payloads = st.dictionaries(st.sampled_from(KEYS), trees, min_size=1, max_size=3)
paths = st.lists(st.lists(st.sampled_from(KEYS), min_size=1, max_size=3).map(tuple), max_size=3)


def same(x: Any, y: Any) -> bool:
    """Same structure and types; tensors bitwise equal and in different memory."""
    if type(x) is not type(y):
        return False
    if isinstance(x, torch.Tensor):
        return torch.equal(x, y) and (x.numel() == 0 or x.data_ptr() != y.data_ptr())
    if isinstance(x, dict):
        return list(x) == list(y) and all(same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
    return x == y


def clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return type(x)((k, clone(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return type(x)(clone(v) for v in x)
    return x


@settings(max_examples=150, deadline=None)
@given(payloads, paths)
def test_a_deferred_snapshot_once_finished_equals_an_eager_one(payload, deferred):
    original = clone(payload)
    eager, _ = _snapshot(payload, frozenset(), None)
    late, copier = _snapshot(payload, frozenset(), None, defer_spec(*deferred))
    copier.finish("x.pth")
    assert same(eager, original) and same(late, original)
    assert same(payload, original)  # the source is untouched


@settings(max_examples=200, deadline=None)
@given(payloads, paths)
@example({"a": torch.ones(2), "b": [torch.ones(1)]}, [("a", "c"), ("b",)])
def test_only_tensors_under_a_deferred_section_wait_for_the_stager(payload, deferred):
    spec = defer_spec(*deferred)
    _, copier = _snapshot(payload, frozenset(), None, spec)
    expected = sum(1 for where, _ in _located(payload) if _under(where, deferred))
    assert len(copier.late) == expected
    copier.finish("x.pth")


def _located(x: Any, where: tuple = ()) -> list[tuple[tuple, torch.Tensor]]:
    if isinstance(x, torch.Tensor):
        return [(where, x)]
    if isinstance(x, dict):
        return [item for k, v in x.items() for item in _located(v, (*where, k))]
    if isinstance(x, (list, tuple)):  # a path of keys does not reach into a list's items
        return [item for v in x for item in _located(v, (*where, "[]"))]
    return []


def _under(where: tuple, deferred: list[tuple]) -> bool:
    return any(where[: len(p)] == p for p in deferred)
