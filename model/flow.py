"""Flow matching in the SiT convention (t = 0 noise, t = 1 data) and the samplers that integrate it.

Path x_t = t·x_data + (1 − t)·noise with velocity target x_data − noise (PAE_SPEC §3.4). Sampling
runs on linspace(0, 1, steps + 1) warped by the shift, so `steps` is the number of Euler updates; the
CFG interval is checked at every model evaluation and, outside it, only the conditional half runs.
Every random draw at sampling time comes from a per-image generator, so an image depends on its
seed alone and never on what it was batched with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
GuidedFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

SAMPLERS = ("euler", "heun", "sde")


@dataclass(frozen=True)
class SamplerConfig:
    """How to integrate the flow: solver, step count, time shift and interval CFG (SiT time)."""

    sampler: str = "euler"
    steps: int = 250
    shift: float = 1.0
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"SamplerConfig.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"SamplerConfig.steps must be an int >= 1, got {self.steps!r}")
        if self.sampler == "sde" and self.steps < 3:
            raise ValueError(
                "SamplerConfig.steps must be >= 3 for the sde sampler (its first and last steps are "
                f"deterministic, so fewer steps would inject no noise at all), got {self.steps}"
            )
        if not (isinstance(self.shift, int | float) and math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"SamplerConfig.shift must be a finite number > 0, got {self.shift!r}")
        if not (
            isinstance(self.cfg_scale, int | float) and math.isfinite(self.cfg_scale) and self.cfg_scale >= 0
        ):
            raise ValueError(f"SamplerConfig.cfg_scale must be a finite number >= 0, got {self.cfg_scale!r}")
        interval = self.cfg_interval
        if not (isinstance(interval, tuple | list) and len(interval) == 2):
            raise ValueError(f"SamplerConfig.cfg_interval must be a (start, end) pair, got {interval!r}")
        start, end = interval
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in (start, end)):
            raise ValueError(f"SamplerConfig.cfg_interval values must be finite numbers, got {interval!r}")
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(
                f"SamplerConfig.cfg_interval must satisfy 0 <= start <= end <= 1, got {interval!r}"
            )
        object.__setattr__(self, "cfg_interval", (float(start), float(end)))

    @property
    def guided(self) -> bool:
        """True when some step will run the unconditional half (scale ≠ 1)."""
        return self.cfg_scale != 1.0

    def guides_at(self, t: float) -> bool:
        """Whether the model evaluation at SiT time `t` uses CFG."""
        start, end = self.cfg_interval
        return self.guided and start <= t <= end


def _check_shift(s: float) -> None:
    if not (isinstance(s, int | float) and math.isfinite(s) and s > 0):
        raise ValueError(f"time shift must be a finite number > 0, got {s!r}")


def shift_time(t: torch.Tensor | float, s: float) -> torch.Tensor | float:
    """Warp SiT time: s·t / (1 + (s − 1)·t). Fixes 0 and 1; s < 1 spends more time near the noise end."""
    _check_shift(s)
    return s * t / (1 + (s - 1) * t)


def time_grid(steps: int, shift: float) -> torch.Tensor:
    """The sampling grid: steps + 1 float64 times from 0 (noise) to 1 (data), warped by `shift`."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return shift_time(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64), shift)


def sample_training_t(
    n: int,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(n,) training times: logit-normal(0, 1), then the training shift (PAE uses 0.7)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    _check_shift(shift)
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


_SEED_LIMIT = 2**63


def _seed_list(seeds: Sequence[int] | np.ndarray | torch.Tensor) -> list[int]:
    values = seeds.tolist() if isinstance(seeds, np.ndarray | torch.Tensor) else list(seeds)
    if not values:
        raise ValueError("seeds must hold at least one seed")
    for s in values:
        if not isinstance(s, int | np.integer) or isinstance(s, bool) or not 0 <= int(s) < _SEED_LIMIT:
            raise ValueError(f"every seed must be an integer in [0, 2**63), got {s!r}")
    return [int(s) for s in values]


def _generators(seeds: Sequence[int], stream: int) -> list[torch.Generator]:
    """One CPU generator per image; `stream` > 0 derives an independent seed (SplitMix64 mix) so the
    SDE's noise never replays the initial noise drawn from the same user seed."""
    gens = []
    for seed in seeds:
        z = (seed + stream * 0x9E3779B97F4A7C15) % 2**64
        if stream:
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
            z ^= z >> 31
        gens.append(torch.Generator(device="cpu").manual_seed(z))
    return gens


def _draw(gens: Sequence[torch.Generator], shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    # Drawn on the CPU in float32 so an image's noise is the same on every device and batch size.
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device=device, dtype=dtype)


def noise_from_seeds(
    seeds: Sequence[int] | np.ndarray | torch.Tensor,
    shape: Sequence[int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """B×shape standard-normal noise, image i drawn from its own generator seeded with seeds[i]."""
    shape = tuple(int(d) for d in shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive sizes, got {shape}")
    return _draw(_generators(_seed_list(seeds), stream=0), shape, device, dtype)


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


def _check_sample_inputs(noise: torch.Tensor, y: torch.Tensor, null_class: int) -> None:
    if noise.dim() < 2 or not noise.is_floating_point():
        raise ValueError(f"noise must be a float B×… tensor, got {noise.dtype} {tuple(noise.shape)}")
    if y.dim() != 1 or y.shape[0] != noise.shape[0] or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"y must be an int64 tensor of shape ({noise.shape[0]},), got {y.dtype} {tuple(y.shape)}"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) > null_class):
        raise ValueError(
            f"class labels must lie in [0, {null_class}] ({null_class} = unconditional), got {y.tolist()}"
        )


@torch.no_grad()
def sample(
    model: VelocityFn,
    noise: torch.Tensor,
    y: torch.Tensor,
    cfg: SamplerConfig,
    null_class: int,
    guided: GuidedFn | None = None,
    generator_seeds: Sequence[int] | np.ndarray | torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate from noise (t = 0) to data (t = 1) and return the data-space sample.

    - euler: x ← x + Δt·v on the shifted grid; `steps` model evaluations.
    - heun: trapezoidal predictor–corrector, Euler on the last step; 2·steps − 1 evaluations.
    - sde: Euler–Maruyama for dx = (v + D·score) dt + √(2D) dW with the SBDM diffusion
      D(t) = (1 − t)/t·(1 − t) + (1 − t) = (1 − t)/t, which keeps the path's marginals. For this path
      E[noise | x_t] = x_t − t·v, so score = −(x_t − t·v)/(1 − t). D is infinite at t = 0, so the
      first step is a deterministic Euler step and the last is the noise-free "Mean" step (it lands
      on E[x_data | x_t]); its per-step noise comes from per-image generators derived from
      `generator_seeds` (required for sde).

    CFG runs at evaluations whose t lies in `cfg.cfg_interval` when `cfg.cfg_scale` ≠ 1, through
    `guided(x, t, y, scale)` when given (an exported graph, say) or `guided_velocity` otherwise; every
    other evaluation calls `model(x, t, y)` on the conditional batch alone.
    """
    if not isinstance(cfg, SamplerConfig):
        raise ValueError(f"cfg must be a SamplerConfig, got {type(cfg).__name__}")
    if isinstance(model, nn.Module) and model.training:
        raise ValueError("sample() needs the model in eval mode (training mode drops labels at random)")
    _check_sample_inputs(noise, y, null_class)
    batch = noise.shape[0]
    sde_gens = None
    if cfg.sampler == "sde":
        if generator_seeds is None:
            raise ValueError(
                "the sde sampler needs generator_seeds (one seed per image) for its per-step noise"
            )
        seeds = _seed_list(generator_seeds)
        if len(seeds) != batch:
            raise ValueError(f"generator_seeds has {len(seeds)} seeds for a batch of {batch}")
        sde_gens = _generators(seeds, stream=1)

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        t_vec = torch.full((batch,), t, dtype=torch.float32, device=x.device)
        if cfg.guides_at(t):
            if guided is not None:
                return guided(x, t_vec, y, float(cfg.cfg_scale))
            return guided_velocity(model, x, t_vec, y, float(cfg.cfg_scale), null_class)
        return model(x, t_vec, y)

    grid = time_grid(cfg.steps, cfg.shift).tolist()
    x = noise
    last = cfg.steps - 1
    for k in range(cfg.steps):
        t, t_next = grid[k], grid[k + 1]
        dt = t_next - t
        v = velocity(x, t)
        if cfg.sampler == "euler" or (cfg.sampler == "heun" and k == last):
            x = x + dt * v
        elif cfg.sampler == "heun":
            x_pred = x + dt * v
            x = x + 0.5 * dt * (v + velocity(x_pred, t_next))
        elif k == 0 or k == last:
            x = x + dt * v
        else:
            diffusion = (1 - t) / t
            score = -(x - t * v) / (1 - t)
            dw = _draw(sde_gens, tuple(x.shape[1:]), x.device, x.dtype)
            x = x + dt * (v + diffusion * score) + math.sqrt(2 * diffusion * dt) * dw
    return x
