"""Flow matching for training the generator, and the torch side of sampling.

SiT convention, as in the paper's LightningDiT training: the path is x_t = t·x_data + (1 − t)·noise with velocity target
x_data − noise, t = 0 noise and t = 1 data. The sampler itself is torch-free (`model.sampling`);
`TorchNetworks` hands it the DiT, and `guided_velocity` is the fused CFG call that the exported `dit`
graph computes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .sampling import check_shift, shift_time

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sample_training_t(
    n: int,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(n,) training times: logit-normal(0, 1), then the training shift (PAE uses 0.7)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    check_shift(shift)
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.sigmoid(torch.randn(n, generator=generator, device=gen_device))
    t = shift_time(t, shift)
    return t if device is None else t.to(device)


def interpolate(
    x_data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, velocity target) for the linear path x_t = t·x_data + (1 − t)·noise."""
    if x_data.shape != noise.shape:
        raise ValueError(f"x_data {tuple(x_data.shape)} and noise {tuple(noise.shape)} must have one shape")
    if t.dim() != 1 or t.shape[0] != x_data.shape[0]:
        raise ValueError(f"t must have shape ({x_data.shape[0]},), got {tuple(t.shape)}")
    tb = t.to(x_data.dtype).reshape(-1, *([1] * (x_data.dim() - 1)))
    return tb * x_data + (1 - tb) * noise, x_data - noise


def flow_loss(v_pred: torch.Tensor, v_target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE plus the velocity-direction term mean(1 − cos) over positions, cosine taken along channels."""
    if v_pred.shape != v_target.shape:
        raise ValueError(
            f"v_pred {tuple(v_pred.shape)} and v_target {tuple(v_target.shape)} must have one shape"
        )
    if v_pred.dim() < 2:
        raise ValueError(f"velocities need a channel axis (B×C×…), got shape {tuple(v_pred.shape)}")
    mse = F.mse_loss(v_pred.float(), v_target.float())
    cos = (1 - F.cosine_similarity(v_pred.float(), v_target.float(), dim=1, eps=1e-8)).mean()
    return mse + cos, {"mse": mse.detach(), "cos": cos.detach()}


def guided_velocity(
    model: VelocityFn,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    scale: float | torch.Tensor,
    null_class: int,
) -> torch.Tensor:
    """v_u + scale·(v_c − v_u) on every channel, both halves from one model call on the 2B batch.

    `scale` is a number or a tensor of shape () or (B,) (a per-image scale, as an exported graph takes).
    The halves are split by slicing at B, not `chunk(2)`, whose size arithmetic makes torch.export
    specialise the batch axis.
    """
    batch = x.shape[0]
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    v_c, v_u = v[:batch], v[batch:]
    w = torch.as_tensor(scale, dtype=v_c.dtype, device=v_c.device)
    if w.dim() == 1:
        w = w.reshape(-1, *([1] * (v_c.dim() - 1)))
    return v_u + w * (v_c - v_u)


class TorchNetworks:
    """A velocity network (a LightningDiT, say) as the sampler's `Networks`: torch tensors on the
    network's device, no autograd. `null_class` defaults to the network's own."""

    def __init__(
        self, dit: torch.nn.Module, null_class: int | None = None, device: torch.device | str | None = None
    ) -> None:
        if dit.training:
            raise ValueError("sampling needs the DiT in eval mode (training mode drops labels at random)")
        self.dit = dit
        self.null_class = dit.null_class if null_class is None else null_class
        self.device = torch.device(device) if device is not None else next(dit.parameters()).device

    def _t(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, t: float, y: torch.Tensor) -> torch.Tensor:
        return self.dit(x, self._t(x, t), y)

    @torch.no_grad()
    def guided(self, x: torch.Tensor, t: float, y: torch.Tensor, scale: float) -> torch.Tensor:
        return guided_velocity(self.dit, x, self._t(x, t), y, scale, self.null_class)

    def asarray(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values)).to(self.device)
