"""The device a handler is asked for, checked before anything is built on it."""

from __future__ import annotations

import torch

__all__ = ["check_device"]


def check_device(device: torch.device | str) -> torch.device | str:
    """``device`` unchanged when this machine can use it, else a ``RuntimeError`` naming it
    and the fix (instead of torch's bare assertion deep inside ``Module.to``).

    Example:
        >>> check_device("cpu")
        'cpu'
        >>> try:
        ...     check_device("warp-drive")
        ... except ValueError as err:
        ...     print(str(err).split(":")[0])
        device='warp-drive' is not a device torch knows
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device={device!r} is not a device torch knows: {err}. Use 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise RuntimeError(
                f"device={device!r}: this PyTorch build ({torch.__version__}) has no CUDA "
                "support. Use device='cpu', or install a CUDA build of PyTorch "
                "(https://pytorch.org/get-started/locally/)"
            )
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device={device!r}: PyTorch has CUDA support but sees no GPU here (driver "
                "missing or CUDA_VISIBLE_DEVICES empty). Use device='cpu', or run on a machine "
                "with a visible NVIDIA GPU"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device={device!r}: only {torch.cuda.device_count()} GPU(s) are visible "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); choose one of them"
            )
    return device
