"""DistributedDataParallel helpers for the shell: padding, ordered predictions, failures.

``DistributedSampler`` makes shards equal by repeating samples from the start of the
(shuffled) index list: at most one duplicate per rank, always at the end of its shard. These
helpers let the handler never count that padding: evaluation trims it off the batch, training
logs the loss of the real samples only, and ``predict`` returns every sample once, in
dataset order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from nnh.distributed.context import DistContext

__all__ = [
    "ShardCounter",
    "gather_predictions",
    "real_samples",
    "sharded_eval_loader",
    "trim_batch",
]


def real_samples(loader: Any) -> int | None:
    """How many samples of this rank's shard are real (not padding); ``None`` if no padding.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.arange(5.0))
        >>> [real_samples(DataLoader(ds, sampler=DistributedSampler(ds, 2, r, shuffle=False))) for r in (0, 1)]
        [None, 2]
    """
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    n = len(sampler.dataset)
    real = len(range(sampler.rank, n, sampler.num_replicas))
    return None if real == sampler.num_samples else real


class ShardCounter:
    """Walks a rank's shard batch by batch and says how many samples of each are real.

    ``real`` is :func:`real_samples` of the loader (``None``: nothing is padding).

    Example:
        >>> counter = ShardCounter(real=5)
        >>> [counter.take(2) for _ in range(3)]
        [2, 2, 1]
    """

    def __init__(self, real: int | None):
        self.real, self.seen = real, 0

    def take(self, n: int) -> int:
        """Count a batch of ``n`` samples; return how many of them are real."""
        k = n if self.real is None else max(0, min(n, self.real - self.seen))
        self.seen += n
        return k


def trim_batch(batch: Any, k: int) -> Any:
    """The first ``k`` samples of every tensor in a (nested) batch.

    Example:
        >>> trim_batch((torch.arange(4), [torch.ones(4, 2)]), 3)[1][0].shape
        torch.Size([3, 2])
    """
    if isinstance(batch, torch.Tensor):
        return batch[:k] if batch.dim() else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(trim_batch(b, k) for b in batch)
    if isinstance(batch, dict):
        return {key: trim_batch(v, k) for key, v in batch.items()}
    return batch


def sharded_eval_loader(loader: DataLoader, dist: DistContext) -> DataLoader:
    """``loader`` itself when already sharded, else the same data sharded without shuffling."""
    if isinstance(loader.sampler, DistributedSampler) or not dist.enabled:
        return loader
    sampler = DistributedSampler(
        loader.dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=False
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


def _concat(outputs: list[Any]) -> Any:
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat([o.detach().cpu() for o in outputs])
    if isinstance(first, (list, tuple)):
        return type(first)(_concat([o[i] for o in outputs]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([o[k] for o in outputs]) for k in first}
    raise TypeError(
        f"predict can gather tensors (or tuples/dicts of them) across ranks, got {type(first).__name__}"
    )


def _rows(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.shape[0]
    if isinstance(tree, (list, tuple)):
        return _rows(tree[0])
    return _rows(next(iter(tree.values())))


def _take(tree: Any, index: torch.Tensor) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree[index]
    if isinstance(tree, (list, tuple)):
        return type(tree)(_take(t, index) for t in tree)
    return {k: _take(v, index) for k, v in tree.items()}


def gather_predictions(
    dist: DistContext, outputs: list[Any], loader: DataLoader
) -> list[Any] | None:
    """Every sample's output once, in dataset order, re-batched like ``loader`` (rank 0).

    ``outputs`` are this rank's batch outputs for ``loader`` (a DistributedSampler shard
    with padding already trimmed). Other ranks get ``None``.
    """
    sampler = loader.sampler
    indices = list(iter(sampler))
    real = real_samples(loader)
    if real is not None:
        indices = indices[:real]
    local = _concat(outputs) if outputs else None
    gathered = dist.gather_objects((indices, local))
    if not dist.is_main:
        return None
    assert gathered is not None
    for rank, (idx, out) in enumerate(gathered):  # a row per real sample, padding trimmed
        rows = 0 if out is None else _rows(out)
        if rows != len(idx):
            raise RuntimeError(
                f"predict: rank {rank} returned {rows} output rows for the {len(idx)} real samples "
                "of its shard; the model must return one row per input sample, and "
                "DistributedSampler padding must be trimmed off"
            )
    all_indices = torch.tensor([i for idx, _ in gathered for i in idx], dtype=torch.long)
    merged = _concat([out for _, out in gathered if out is not None])
    order = torch.argsort(all_indices, stable=True)
    ordered = _take(merged, order)
    n = len(all_indices)
    size = loader.batch_size or n
    return [_take(ordered, torch.arange(s, min(s + size, n))) for s in range(0, n, size)]
