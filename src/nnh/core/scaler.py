"""A functional dynamic loss scaler (the algebra of ``torch.amp.GradScaler``).

State is a TensorDict ``{"scale": f32[], "growth_tracker": i32[]}``; configuration is the
frozen :class:`LossScaler`. Laws: an inf/NaN gradient skips the update and multiplies the
scale by ``backoff_factor``; ``growth_interval`` finite steps in a row multiply it by
``growth_factor``.
"""

from __future__ import annotations

import attrs
import torch
from tensordict import TensorDict

from nnh.core.tree import clone_tensors

__all__ = ["LossScaler", "init_scaler_state", "scaler_update", "unscale_grads_"]


@attrs.frozen
class LossScaler:
    """Configuration of the dynamic loss scaler.

    Example:
        >>> LossScaler(init_scale=1024.0).growth_interval
        2000
    """

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __attrs_post_init__(self) -> None:
        if not self.init_scale > 0:
            raise ValueError(f"LossScaler.init_scale must be > 0, got {self.init_scale}")
        if not self.growth_factor > 1.0:
            raise ValueError(f"LossScaler.growth_factor must be > 1, got {self.growth_factor}")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ValueError(
                f"LossScaler.backoff_factor must be in (0, 1), got {self.backoff_factor}"
            )
        if self.growth_interval < 1:
            raise ValueError(f"LossScaler.growth_interval must be >= 1, got {self.growth_interval}")


def init_scaler_state(config: LossScaler, device: torch.device | str = "cpu") -> TensorDict:
    """The initial scaler state on ``device``.

    Example:
        >>> float(init_scaler_state(LossScaler(init_scale=8.0))["scale"])
        8.0
    """
    return TensorDict(
        {
            "scale": torch.tensor(float(config.init_scale), dtype=torch.float32, device=device),
            "growth_tracker": torch.zeros((), dtype=torch.int32, device=device),
        },
        batch_size=[],
    )


def unscale_grads_(
    grads: list[torch.Tensor], scaler: TensorDict, extra_factor: float = 1.0
) -> torch.Tensor:
    """Divide ``grads`` in place by the scale (times ``1/extra_factor``) and return
    ``found_inf`` (a 1-element float tensor, 1.0 when any gradient is inf/NaN). No host sync.

    Example:
        >>> g = [torch.tensor([2.0, float("inf")])]
        >>> st = init_scaler_state(LossScaler(init_scale=2.0))
        >>> unscale_grads_(g, st).item(), g[0][0].item()
        (1.0, 1.0)
    """
    scale = scaler["scale"]
    found_inf = torch.zeros(1, dtype=torch.float32, device=scale.device)
    inv_scale = (scale.double().reciprocal() / extra_factor).float()
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    for device, group in by_device.items():
        local_inf = (
            found_inf if device == found_inf.device else torch.zeros_like(found_inf, device=device)
        )
        torch._amp_foreach_non_finite_check_and_unscale_(group, local_inf, inv_scale.to(device))
        if local_inf is not found_inf:
            found_inf += local_inf.to(found_inf.device)
    return found_inf


def scaler_update(
    scaler: TensorDict, found_inf: torch.Tensor, config: LossScaler, *, donate: bool = False
) -> TensorDict:
    """The scaler state after a step that saw ``found_inf`` (pure unless ``donate``).

    Example:
        >>> cfg = LossScaler(init_scale=4.0, growth_interval=1)
        >>> st = init_scaler_state(cfg)
        >>> float(scaler_update(st, torch.zeros(1), cfg)["scale"]), float(st["scale"])
        (8.0, 4.0)
        >>> float(scaler_update(st, torch.ones(1), cfg)["scale"])
        2.0
    """
    out = scaler if donate else clone_tensors(scaler)
    torch._amp_update_scale_(
        out["scale"],
        out["growth_tracker"],
        found_inf.to(out["scale"].device),
        config.growth_factor,
        config.backoff_factor,
        config.growth_interval,
    )
    return out
