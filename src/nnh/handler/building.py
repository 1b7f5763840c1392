"""Building the handler's model: constructor checks, construction (plain or ensemble), the
meta-device build while a checkpoint is loaded, and the DDP wrapper.

Shell internals of :class:`~nnh.handler.NNHandler`; not public API.
"""

from __future__ import annotations

import contextvars
import copy
import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nnh.checkpoint.shapes import check_meta_model
from nnh.distributed.fsdp import materialize_sharded, shard_module

if TYPE_CHECKING:
    from nnh.handler.nnhandler import NNHandler

__all__ = ["CHECKPOINT_TENSORS", "build_module", "check_model_kwargs", "construct", "wrap_module"]

# While NNHandler.load builds a handler, (the checkpoint's weights, its path): the model is
# built on the meta device and checked against them before any allocation; one whose
# parameters and buffers all come from the file receives them directly (no init, no copy).
CHECKPOINT_TENSORS: contextvars.ContextVar[tuple[Any, str] | None] = contextvars.ContextVar(
    "nnh_checkpoint_tensors", default=None
)


def check_model_kwargs(model_class: type, model_kwargs: dict[str, Any]) -> None:
    if not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
        raise TypeError(f"model_class must be an nn.Module subclass, got {model_class!r}")
    try:
        inspect.signature(model_class).bind(**model_kwargs)
    except TypeError as err:
        try:
            accepted = str(inspect.signature(model_class))
        except (TypeError, ValueError):
            accepted = "(unknown)"
        raise TypeError(
            f"{model_class.__name__} cannot be built with keyword arguments {sorted(model_kwargs)}: "
            f"{err}. Its constructor takes {accepted}"
        ) from None


def build_module(
    h: NNHandler, model_class: type[nn.Module], model_kwargs: dict[str, Any]
) -> nn.Module:
    supplied = CHECKPOINT_TENSORS.get()
    if supplied is not None:  # loading: shapes are checked before any allocation
        try:
            with torch.device("meta"):
                module = construct(h, model_class, model_kwargs)
        except Exception:  # a constructor that needs real tensors: built for real below
            module = None
        sharded = h._fsdp is not None and h._dist.enabled  # FSDP: built sharded, then loaded
        if module is not None and check_meta_model(module, *supplied) and not sharded:
            module._nnh_meta_init = True  # type: ignore[attr-defined]
            return module  # every tensor comes from the checkpoint: no init needed
    if h._fsdp is not None and h._dist.enabled:
        return build_sharded(h, model_class, model_kwargs)
    return construct(h, model_class, model_kwargs).to(h._device)


def build_sharded(
    h: NNHandler, model_class: type[nn.Module], model_kwargs: dict[str, Any]
) -> nn.Module:
    """The model built on the meta device, sharded with FSDP2 and materialised shard by shard."""
    with torch.device("meta"):
        module = construct(h, model_class, model_kwargs)
    template = copy.deepcopy(module)
    shard_module(module, h._fsdp)
    materialize_sharded(module, h._device, template)
    module._nnh_fsdp = True  # type: ignore[attr-defined]
    return module


def construct(
    h: NNHandler, model_class: type[nn.Module], model_kwargs: dict[str, Any]
) -> nn.Module:
    if h._ensemble is None:
        return model_class(**model_kwargs)
    return h._ensemble.build(model_class, model_kwargs)


def wrap_module(h: NNHandler, module: nn.Module) -> nn.Module:
    if not h._dist.enabled or getattr(module, "_nnh_fsdp", False):
        return module  # FSDP2 shards in place: the module is what is called
    if not any(p.requires_grad for p in module.parameters()):
        return module
    device_ids = [h._device.index] if h._device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
