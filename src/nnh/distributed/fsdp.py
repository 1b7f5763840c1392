"""FSDP2 for the shell: the options record and the sharding of a handler's model.

:func:`shard_module` applies ``torch.distributed.fsdp.fully_shard`` in place: to each child
module of the listed classes (or, with none listed, to each child holding at least
``min_params`` parameters of its own subtree, innermost first), then to the root. A model
built on the meta device is materialised shard by shard with :func:`materialize_sharded`:
each module with parameters of its own is initialised at full size on the CPU (its
``reset_parameters``, in ``modules()`` order, from the RNG state the unsharded build would
use), and only this rank's shard is kept — so the sharded init equals the unsharded one of
the same seed, and no rank ever holds more than one module in full.

Example:
    >>> FSDPOptions.from_dict({"reshard_after_forward": False}).reshard_after_forward
    False
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import nn

__all__ = [
    "STRATEGIES",
    "FSDPOptions",
    "check_strategy",
    "materialize_sharded",
    "plain_class",
    "set_amp_precision",
    "shard_module",
]

STRATEGIES = ("ddp", "fsdp")

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}  # fmt: skip


def _dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    raise ValueError(
        f"fsdp dtype option must be a torch.dtype, one of {sorted(_DTYPES)} or None, got {value!r}"
    )


@attrs.frozen
class FSDPOptions:
    """How the handler shards its model (``NNHandler(..., strategy="fsdp", fsdp={...})``).

    ``wrap_classes``: module classes (or class names) each sharded as one unit (e.g.
    transformer blocks); empty: every child with at least ``min_params`` parameters.
    ``reshard_after_forward``: free gathered parameters after forward (less memory, one more
    all-gather in backward). ``param_dtype`` / ``reduce_dtype``: mixed precision (``None``:
    the parameters' dtype; with ``use_amp`` in ``train`` and no dtype given, bf16).
    ``activation_checkpointing``: recompute the ``wrap_classes`` blocks' activations in
    backward. ``cpu_offload``: keep parameter shards (and optimizer state) on the CPU.

    Example:
        >>> FSDPOptions.from_dict({"min_params": 10}).min_params
        10
        >>> FSDPOptions.from_dict({"shard_size": 3})
        Traceback (most recent call last):
        ...
        ValueError: unknown fsdp option(s) ['shard_size']; allowed: ['activation_checkpointing', 'cpu_offload', 'min_params', 'param_dtype', 'reduce_dtype', 'reshard_after_forward', 'wrap_classes']
    """

    wrap_classes: tuple[Any, ...] = attrs.field(default=(), converter=tuple)
    min_params: int = 100_000
    reshard_after_forward: bool = True
    param_dtype: torch.dtype | None = attrs.field(default=None, converter=_dtype)
    reduce_dtype: torch.dtype | None = attrs.field(default=None, converter=_dtype)
    activation_checkpointing: bool = False
    cpu_offload: bool = False

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.min_params, int) or self.min_params < 1:
            raise ValueError(f"fsdp option min_params must be an int >= 1, got {self.min_params!r}")
        for name in ("reshard_after_forward", "activation_checkpointing", "cpu_offload"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"fsdp option {name} must be a bool, got {getattr(self, name)!r}")
        for cls in self.wrap_classes:
            if not (isinstance(cls, str) or (isinstance(cls, type) and issubclass(cls, nn.Module))):
                raise TypeError(
                    f"fsdp option wrap_classes must hold nn.Module classes or class names, got {cls!r}"
                )
        if self.activation_checkpointing and not self.wrap_classes:
            raise ValueError(
                "fsdp option activation_checkpointing needs wrap_classes (the blocks to recompute)"
            )

    @classmethod
    def from_dict(cls, options: dict[str, Any] | FSDPOptions | None) -> FSDPOptions:
        """Validated options from a dict; unknown keys are named in the error."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, dict):
            raise TypeError(f"fsdp must be a dict of options or None, got {type(options).__name__}")
        allowed = sorted(f.name for f in attrs.fields(cls))
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"unknown fsdp option(s) {unknown}; allowed: {allowed}")
        return cls(**options)

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is one of the listed block classes."""
        return any(
            type(module).__name__ == c if isinstance(c, str) else isinstance(module, c)
            for c in self.wrap_classes
        )


def check_strategy(strategy: str, fsdp: Any, ensemble_size: int | None = None) -> str:
    """The validated strategy name.

    Example:
        >>> check_strategy("fsdp", None)
        'fsdp'
    """
    if strategy == "fsdp" and ensemble_size is not None:
        raise ValueError(
            f"ensemble_size={ensemble_size!r} cannot be used with strategy='fsdp' (ensemble members "
            "are stacked into one tensor per parameter); use strategy='ddp' for ensembles"
        )
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if fsdp is not None and strategy != "fsdp":
        raise ValueError(
            f"fsdp options were given but strategy is {strategy!r}; use strategy='fsdp'"
        )
    return strategy


def _units(module: nn.Module, options: FSDPOptions) -> list[nn.Module]:
    """Children to shard as their own unit, innermost first (the root excluded)."""
    units: list[nn.Module] = []

    def visit(m: nn.Module) -> int:
        own = sum(p.numel() for p in m.parameters(recurse=False))
        total = own + sum(visit(c) for c in m.children())
        if m is module:
            return total
        picked = options.matches(m) if options.wrap_classes else total >= options.min_params
        if picked:
            units.append(m)
            return 0  # its parameters are accounted for
        return total

    visit(module)
    return units


def shard_module(
    module: nn.Module, options: FSDPOptions, mesh: Any = None, amp_dtype: torch.dtype | None = None
) -> nn.Module:
    """Apply ``fully_shard`` in place to the chosen units, then the root; returns ``module``.

    ``amp_dtype`` is the autocast dtype ``train(use_amp=...)`` asks for: the default
    ``param_dtype`` when the options name none.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    param_dtype = options.param_dtype if options.param_dtype is not None else amp_dtype
    kwargs: dict[str, Any] = {"reshard_after_forward": options.reshard_after_forward}
    if mesh is not None:
        kwargs["mesh"] = mesh
    if param_dtype is not None or options.reduce_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=options.reduce_dtype
        )
    if options.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    units = _units(module, options)
    if options.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for unit in units:
            checkpoint(unit)
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(module, **kwargs)
    return module


def materialize_sharded(module: nn.Module, device: torch.device, template: nn.Module) -> None:
    """Fill a sharded meta-device ``module`` with the values an unsharded build would have.

    ``template`` is the same model still unsharded on the meta device. Each module of it
    with parameters or buffers of its own is made real on the CPU and reset (in
    ``modules()`` order, so RNG draws come in the order of an unsharded build), and this
    rank's shard of each tensor is copied into ``module``.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    module.to_empty(device=device)
    live = dict(module.named_modules())
    for name, tmpl in template.named_modules():
        own = list(tmpl.named_parameters(recurse=False)) + list(tmpl.named_buffers(recurse=False))
        if not own:
            continue
        full = _full_copy(tmpl)
        target = live[name]
        with torch.no_grad():
            for pname, _ in own:
                value = getattr(full, pname)
                dest = getattr(target, pname)
                if isinstance(dest, DTensor):
                    shard = distribute_tensor(
                        value.to(dest.device_mesh.device_type), dest.device_mesh, dest.placements
                    )
                    dest.to_local().copy_(shard.to_local())
                elif dest is not None:
                    dest.copy_(value)
        del full


def _full_copy(tmpl: nn.Module) -> nn.Module:
    """``tmpl``'s own tensors made real on the CPU and reset (children left on meta)."""
    import copy

    shallow = copy.copy(tmpl)
    shallow._modules = {}  # type: ignore[assignment]
    shallow._parameters = dict(tmpl._parameters)  # type: ignore[assignment]
    shallow._buffers = dict(tmpl._buffers)  # type: ignore[assignment]
    shallow.to_empty(device="cpu")
    reset = getattr(shallow, "reset_parameters", None)
    if callable(reset):
        reset()
    elif any(True for _ in shallow.parameters(recurse=False)):
        raise RuntimeError(
            f"strategy='fsdp' builds the model on the meta device and needs reset_parameters() on "
            f"every module with parameters of its own; {type(tmpl).__name__} has none"
        )
    return shallow


def set_amp_precision(
    module: nn.Module, options: FSDPOptions | None, amp_dtype: torch.dtype | None
) -> torch.dtype | None:
    """Follow ``train(use_amp=...)`` with FSDP mixed precision; returns the units' param dtype.

    Under FSDP, when the options name no ``param_dtype``, every unit gathers its parameters
    in the autocast dtype ``use_amp`` asks for (bf16 for ``use_amp=True`` under FSDP, on CPU
    and CUDA alike, and for ``"bf16"``) and reduces gradients in ``reduce_dtype`` (float32 unless set); the sharded
    master weights and the optimizer state stay in their own dtype. A later ``train()``
    without ``use_amp`` goes back to full precision. ``fully_shard`` runs when the handler is
    built, before ``use_amp`` is known, so the units' policy is updated in place here (FSDP2
    reads it at its lazy init and at every all-gather). Anything else: no change, ``None``.

    Example:
        >>> set_amp_precision(nn.Linear(2, 1), FSDPOptions(), torch.bfloat16) is None
        True
    """
    if (
        options is None
        or options.param_dtype is not None
        or not getattr(module, "_nnh_fsdp", False)
    ):
        return None
    if getattr(module, "_nnh_amp_dtype", None) == amp_dtype:
        return amp_dtype
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

    reduce = options.reduce_dtype
    if amp_dtype is not None and reduce is None:
        reduce = torch.float32
    policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=reduce)
    for unit in module.modules():
        if not isinstance(unit, FSDPModule):
            continue
        state = unit._get_fsdp_state()
        state._mp_policy = policy
        for group in state._fsdp_param_groups:
            if not group.is_sharded:
                group.reshard()
            group.mp_policy = policy
            for param in group.fsdp_params:
                param.mp_policy = policy
                # gather buffers of the old dtype are made again on the next all-gather
                param.all_gather_outputs = []
                if hasattr(param, "_unsharded_param"):
                    del param._unsharded_param
            group._init_mp_dtypes()
    module._nnh_amp_dtype = amp_dtype  # type: ignore[attr-defined]
    return amp_dtype


def plain_class(module: nn.Module) -> type[nn.Module]:
    """The model's own class: ``fully_shard`` swaps a module's class for a generated
    ``FSDP<Name>(FSDPModule, <Name>)``, which cannot be recorded by import path.

    Example:
        >>> plain_class(nn.Linear(2, 1)).__name__
        'Linear'
    """
    cls = type(module)
    from torch.distributed.fsdp import FSDPModule

    if issubclass(cls, FSDPModule) and FSDPModule in cls.__bases__:
        return next(b for b in cls.__bases__ if b is not FSDPModule)
    return cls
