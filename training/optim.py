"""Optimiser pieces shared by every training stage: AdamW groups, the LR schedule and the EMA.

Weight decay is applied only to matrices and convolution kernels. Biases, norm scales and every other
1-D (or 0-D) parameter are left undecayed, as LightningDiT and RAE do: decaying a norm scale or a
bias towards zero fights the normalisation instead of regularising capacity.

The learning-rate schedule is a pure function of the step (`lr_factor`), wrapped in a `LambdaLR` so
its state is a small JSON-able dict; resuming restores the step and therefore the exact LR.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.distributed import unwrap

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.RMSNorm,
)

SCHEDULES = ("cosine", "constant")


def _is_norm(module: nn.Module) -> bool:
    """True for torch's norm layers and for any home-made layer whose class name says it is a norm."""
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed and an undecayed AdamW group.

    Undecayed: parameters with fewer than 2 dimensions, anything named `*.bias`, and every parameter
    owned directly by a norm layer. Frozen parameters (`requires_grad=False`) are left out entirely.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if _is_norm(module):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name.endswith(".bias") or name == "bias" or id(param) in no_decay_ids:
            no_decay.append(param)
        else:
            decay.append(param)
    if not decay and not no_decay:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimise")
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_adamw(
    model: nn.Module,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, weight_decay)` (decay only on matrices and kernels)."""
    if not lr > 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    b1, b2 = betas
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"AdamW betas must lie in [0, 1), got {betas}")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(b1, b2), eps=eps)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base LR at optimiser step `step` (0-based).

    Linear warmup from 1/warmup to 1 over `warmup_steps`, then either constant or a half-cosine
    from 1 down to `min_lr_ratio` at `total_steps` (held there if training runs longer).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"LR schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """`LambdaLR` driven by `lr_factor`; validated eagerly so a bad config fails before training."""
    lr_factor(0, warmup_steps, total_steps, schedule, min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, schedule, min_lr_ratio)
    )


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers.

    Initialised as an exact copy (the LightningDiT recipe the paper trains with), updated after each optimiser step with
    `shadow ← decay·shadow + (1 − decay)·param`. Held outside the module so DDP never sees it.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().clone() for k, v in unwrap(model).state_dict().items() if v.is_floating_point()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the live weights into the average; non-float buffers are not tracked."""
        live = unwrap(model).state_dict()
        for name, avg in self.shadow.items():
            avg.lerp_(live[name].detach().to(avg.dtype), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        unexpected = set(state) - set(self.shadow)
        if missing or unexpected:
            raise ValueError(
                f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        for name, value in state.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(
                    f"EMA tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(self.shadow[name].shape)}"
                )
            self.shadow[name].copy_(value)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (its non-float buffers are kept)."""
        unwrap(model).load_state_dict(self.shadow, strict=False)
