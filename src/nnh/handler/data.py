"""Data loaders: the user's DataLoader, plus a batched-indexing fast path.

``DataLoader(TensorDataset, batch_size=128)`` fetches 128 single samples and collates them.
When the dataset supports batched indexing we fetch each batch with one index operation
instead. The fast loader reuses the reference loader's own ``batch_sampler`` and generator,
so it yields exactly the same batches in the same order and draws the same random numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils.data.dataloader import default_collate
from torch.utils.data.distributed import DistributedSampler

if TYPE_CHECKING:
    from nnh.handler.nnhandler import NNHandler

__all__ = ["BatchIndexedDataset", "build_loader", "fast_loader", "move_to_device"]

_PASSTHROUGH = (
    "num_workers",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "prefetch_factor",
    "persistent_workers",
    "pin_memory_device",
    "in_order",
)


class BatchIndexedDataset(Dataset):
    """``dataset[list_of_indices]`` returns the whole batch: one gather per tensor.

    Wraps a ``TensorDataset`` or a ``Subset`` of one.

    Example:
        >>> ds = BatchIndexedDataset(TensorDataset(torch.arange(5.0)))
        >>> ds[[3, 1]][0].tolist()
        [3.0, 1.0]
    """

    def __init__(self, dataset: TensorDataset | Subset):
        self.source = dataset
        base, index = dataset, None
        while isinstance(base, Subset):
            sub = torch.as_tensor(base.indices, dtype=torch.long)
            index = sub if index is None else sub[index]
            base = base.dataset
        if not isinstance(base, TensorDataset):
            raise TypeError("BatchIndexedDataset needs a TensorDataset or a Subset of one")
        self.tensors = base.tensors
        self.index = index

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.index is not None:
            idx = self.index[idx]
        return tuple(t[idx] for t in self.tensors)


def supports_batched_indexing(dataset: Any) -> bool:
    """Whether ``dataset`` can be fetched a whole batch at a time.

    Example:
        >>> supports_batched_indexing(TensorDataset(torch.zeros(3)))
        True
    """
    base = dataset
    while isinstance(base, Subset):
        base = base.dataset
    return type(base) is TensorDataset


def fast_loader(loader: DataLoader) -> DataLoader:
    """A loader that yields the same batches as ``loader`` by batched indexing, or
    ``loader`` itself when that is not possible (custom collate, iterable dataset, no
    automatic batching).

    Example:
        >>> ds = TensorDataset(torch.arange(10.0), torch.arange(10))
        >>> ref = DataLoader(ds, batch_size=4)
        >>> [b[0].tolist() for b in fast_loader(ref)] == [b[0].tolist() for b in ref]
        True
    """
    if (
        getattr(loader, "_nnh_fast", False)
        or loader.batch_sampler is None
        or loader.collate_fn is not default_collate
        or not supports_batched_indexing(loader.dataset)
    ):
        return loader
    extra = {k: getattr(loader, k) for k in _PASSTHROUGH if hasattr(loader, k)}
    if not extra.get("num_workers"):
        extra = {
            k: v for k, v in extra.items() if k not in ("prefetch_factor", "persistent_workers")
        }
    if extra.get("pin_memory_device") == "":
        extra.pop("pin_memory_device")
    fast = DataLoader(
        BatchIndexedDataset(loader.dataset),
        batch_size=None,
        sampler=loader.batch_sampler,
        generator=loader.generator,
        collate_fn=_identity,
        **extra,
    )
    fast._nnh_fast = True  # type: ignore[attr-defined]
    return fast


def _identity(batch: Any) -> Any:
    return batch


def build_loader(
    dataset: Dataset | DataLoader, *, sampler: Any = None, **loader_kwargs: Any
) -> DataLoader:
    """A DataLoader for ``dataset`` with ``loader_kwargs``; a ready DataLoader passes through.

    ``sampler`` (e.g. a DistributedSampler) replaces ``shuffle``.

    Example:
        >>> len(build_loader(TensorDataset(torch.zeros(10)), batch_size=4))
        3
    """
    if isinstance(dataset, DataLoader):
        if loader_kwargs:
            raise ValueError(
                f"got a ready DataLoader and DataLoader options {sorted(loader_kwargs)}; "
                "pass a Dataset with options, or the DataLoader alone"
            )
        return dataset
    if not isinstance(dataset, Dataset) and not hasattr(dataset, "__getitem__"):
        raise TypeError(f"expected a torch Dataset or DataLoader, got {type(dataset).__name__}")
    if sampler is not None:
        loader_kwargs = {k: v for k, v in loader_kwargs.items() if k != "shuffle"}
        loader_kwargs["sampler"] = sampler
    try:
        return DataLoader(dataset, **loader_kwargs)
    except (TypeError, ValueError) as err:
        raise type(err)(
            f"cannot build a DataLoader with options {sorted(loader_kwargs)}: {err}"
        ) from err


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``; no copy when already there.

    Example:
        >>> move_to_device((torch.zeros(1), [torch.ones(1)]), torch.device("cpu"))[1][0].item()
        1.0
    """
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    return batch


def make_loader(
    h: NNHandler, which: str, dataset: Dataset | DataLoader, loader_kwargs: dict[str, Any]
) -> DataLoader:
    """The handler's loader for ``which`` ("train"/"val"): a Dataset gets ``loader_kwargs``
    (sharded by a DistributedSampler under DDP, ``shuffle``/``drop_last`` honoured); the
    options are remembered for checkpoints.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> from nnh import NNHandler
        >>> h = NNHandler(torch.nn.Linear, in_features=2, out_features=1)
        >>> len(make_loader(h, "val", TensorDataset(torch.zeros(5, 2)), {"batch_size": 2}))
        3
    """
    kwargs = dict(loader_kwargs)
    sampler = kwargs.pop("sampler", None)
    if (
        sampler is None
        and h._dist.enabled
        and not isinstance(dataset, DataLoader)
        and "batch_sampler" not in kwargs
    ):
        sampler = DistributedSampler(
            dataset,
            num_replicas=h._dist.world_size,
            rank=h._dist.rank,
            shuffle=bool(kwargs.get("shuffle", False)),
            seed=h._seed if h._seed is not None else 0,
            drop_last=bool(kwargs.get("drop_last", False)),
        )
    loader = build_loader(dataset, sampler=sampler, **kwargs)
    h._loader_kwargs[which] = dict(loader_kwargs)
    return loader
