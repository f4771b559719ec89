"""Sampling the generator's flow, and the generation pipeline every backend shares.

SiT convention: t = 0 is noise, t = 1 is data, the velocity is data − noise (the paper's generator and sampling setup). The
module is plain numpy on the backend's own arrays (numpy for ONNX Runtime, torch tensors for the torch
networks), so one loop serves training's sample grids, export's checks and every serving runtime, and
a serving image needs no torch. A backend supplies its networks through `Networks`; the solver, step
count, grid, shift and CFG interval stay request parameters.

Two time grids:
- `updates` (this project's default): `steps` updates on `steps + 1` points of [0, 1], so `steps` is
  the number of Euler model evaluations.
- `release`: the authors' code — `steps` points of linspace(0, 1), i.e. `steps − 1` updates; its SDE
  runs Euler–Maruyama on linspace(1e-5, 0.996, steps) and ends with one drift-only step of 0.004.
Both grids are warped by the shift t ↦ s·t / (1 + (s − 1)·t).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from fractions import Fraction
from functools import lru_cache
from typing import Any, Protocol

import numpy as np

from .validation import is_number, non_negative_numbers, one_of, positive_ints, positive_numbers

SAMPLERS = ("euler", "heun", "sde")
GRIDS = ("updates", "release")

# The release's SDE grid ends short of t = 1 and closes with one noise-free "Mean" step of this size.
RELEASE_SDE_START = 1e-5
RELEASE_SDE_LAST_STEP = 0.004

_SEED_LIMIT = 2**63


@dataclass(frozen=True)
class SamplerConfig:
    """How to integrate the flow: solver, step count, time grid, shift and interval CFG (SiT time)."""

    sampler: str = "euler"
    steps: int = 250
    shift: float = 1.0
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    grid: str = "updates"

    def __post_init__(self) -> None:
        one_of(self, "sampler", SAMPLERS)
        one_of(self, "grid", GRIDS)
        positive_ints(self, "steps")
        positive_numbers(self, "shift")
        non_negative_numbers(self, "cfg_scale")
        fewest = 3 if self.sampler == "sde" else (2 if self.grid == "release" else 1)
        if self.steps < fewest:
            why = (
                "its first and last steps are deterministic, so fewer steps would inject no noise"
                if self.sampler == "sde"
                else "the release grid makes steps − 1 updates"
            )
            raise ValueError(
                f"SamplerConfig.steps must be >= {fewest} for sampler {self.sampler!r} on the "
                f"{self.grid!r} grid ({why}), got {self.steps}"
            )
        interval = self.cfg_interval
        if not (isinstance(interval, tuple | list) and len(interval) == 2):
            raise ValueError(f"SamplerConfig.cfg_interval must be a (start, end) pair, got {interval!r}")
        start, end = interval
        if not (is_number(start) and is_number(end)):
            raise ValueError(f"SamplerConfig.cfg_interval values must be finite numbers, got {interval!r}")
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(
                f"SamplerConfig.cfg_interval must satisfy 0 <= start <= end <= 1, got {interval!r}"
            )
        object.__setattr__(self, "cfg_interval", (float(start), float(end)))
        # One form however the numbers arrived (JSON's 1 or 1.0): equal settings compare, hash and
        # serialise alike, which the service's batching by settings relies on.
        object.__setattr__(self, "shift", float(self.shift))
        object.__setattr__(self, "cfg_scale", float(self.cfg_scale))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamplerConfig:
        """From a JSON object (a model repository's `sampler`); unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown sampler settings {unknown}; known: {sorted(names)}")
        return cls(**{k: tuple(v) if k == "cfg_interval" else v for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        """A JSON object of every field (the interval as a list)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @property
    def guided(self) -> bool:
        """True when some step will run the unconditional half (scale ≠ 1)."""
        return self.cfg_scale != 1.0

    def guides_at(self, t: float) -> bool:
        """Whether the model evaluation at SiT time `t` uses CFG."""
        start, end = self.cfg_interval
        return self.guided and start <= t <= end


# The authors' three published settings (their released sampling configs): guided Euler for the 80- and 800-epoch
# LightningDiT-XL/1 checkpoints, and the unguided SDE.
RELEASE_SAMPLERS: dict[str, SamplerConfig] = {
    "release-80ep": SamplerConfig("euler", 250, 0.4, 2.5, (0.25, 1.0), "release"),
    "release-800ep": SamplerConfig("euler", 250, 0.4, 3.3, (0.3, 1.0), "release"),
    "release-sde": SamplerConfig("sde", 250, 0.4, 1.0, (0.0, 1.0), "release"),
}


def check_shift(s: float) -> None:
    """A time shift is a finite number > 0."""
    if not is_number(s) or s <= 0:
        raise ValueError(f"time shift must be a finite number > 0, got {s!r}")


def shift_time(t: Any, s: float) -> Any:
    """Warp SiT time: s·t / (1 + (s − 1)·t). Fixes 0 and 1; s < 1 spends more time near the noise end."""
    check_shift(s)
    return s * t / (1 + (s - 1) * t)


def _linspace(start: float, stop: float, n: int) -> list[float]:
    """`n` points from start to stop as torch.linspace computes them (fused multiply-add from the
    nearer end), rounded exactly, so grids equal the authors' to the last bit on every machine."""
    if n == 1:
        return [start]
    step = (stop - start) / (n - 1)
    half = n // 2
    return [
        float(Fraction(step) * i + Fraction(start))
        if i < half
        else float(Fraction(stop) - Fraction(step) * (n - 1 - i))
        for i in range(n)
    ]


@lru_cache(maxsize=256)
def time_grid(steps: int, shift: float, grid: str = "updates", sampler: str = "euler") -> tuple[float, ...]:
    """The float64 times the sampler visits, noise end first, after the shift.

    `updates`: steps + 1 points of [0, 1]. `release`: `steps` points, of [0, 1] for the ODE and of
    [1e-5, 1 − 0.004] for the SDE (whose last drift-only step is not a grid interval).
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if grid == "updates":
        points = _linspace(0.0, 1.0, steps + 1)
    elif grid == "release":
        end = 1.0 - RELEASE_SDE_LAST_STEP
        points = _linspace(RELEASE_SDE_START, end, steps) if sampler == "sde" else _linspace(0.0, 1.0, steps)
    else:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    return tuple(float(shift_time(t, shift)) for t in points)


def model_evaluations(cfg: SamplerConfig) -> int:
    """Network calls one sample costs (a guided call counts once): what admission and tests count."""
    intervals = len(time_grid(cfg.steps, cfg.shift, cfg.grid, cfg.sampler)) - 1
    if cfg.sampler == "heun":
        return 2 * intervals - 1
    if cfg.sampler == "sde" and cfg.grid == "release":
        return intervals + 1
    return intervals


def seed_list(seeds: Sequence[int] | np.ndarray) -> list[int]:
    """Seeds as Python ints, each checked to lie in [0, 2**63)."""
    values = seeds.tolist() if hasattr(seeds, "tolist") else list(seeds)
    if not values:
        raise ValueError("seeds must hold at least one seed")
    for s in values:
        if not isinstance(s, int | np.integer) or isinstance(s, bool) or not 0 <= int(s) < _SEED_LIMIT:
            raise ValueError(f"every seed must be an integer in [0, 2**63), got {s!r}")
    return [int(s) for s in values]


def _stream_seed(seed: int, stream: int) -> int:
    """Seed of an independent per-image stream (SplitMix64 mix), so the SDE's step noise never
    replays the initial noise drawn from the same user seed."""
    z = (seed + stream * 0x9E3779B97F4A7C15) % 2**64
    if stream:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        z ^= z >> 31
    return z


class NoiseStreams:
    """One standard-normal stream per image, so an image's noise depends on its seed alone.

    Each stream is a PCG64 bit generator seeded with the image's seed; its raw 64-bit outputs (whose
    sequence NumPy guarantees across versions, unlike its Generator methods) become normals by
    Box–Muller in float64, rounded to float32. Any language can reproduce an image from its seed.
    """

    def __init__(self, seeds: Sequence[int] | np.ndarray, stream: int = 0) -> None:
        self._bits = [np.random.PCG64(_stream_seed(s, stream)) for s in seed_list(seeds)]

    def __len__(self) -> int:
        return len(self._bits)

    def draw(self, shape: Sequence[int]) -> np.ndarray:
        """B×shape float32 noise, row i the next draw of image i's stream."""
        shape = tuple(int(d) for d in shape)
        if not shape or any(d < 1 for d in shape):
            raise ValueError(f"shape must be a non-empty tuple of positive sizes, got {shape}")
        count = math.prod(shape)
        return np.stack([_normals(bits, count).reshape(shape) for bits in self._bits])


def _normals(bits: np.random.PCG64, count: int) -> np.ndarray:
    """`count` float32 standard normals from ⌈count/2⌉ Box–Muller pairs of 53-bit uniforms."""
    raw = bits.random_raw(2 * ((count + 1) // 2)).reshape(-1, 2) >> np.uint64(11)
    u1 = (raw[:, 0].astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]: log never sees 0
    u2 = raw[:, 1].astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    pairs = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return pairs.reshape(-1)[:count].astype(np.float32)


def noise_from_seeds(seeds: Sequence[int] | np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """B×shape float32 standard-normal noise, image i from its own stream seeded with seeds[i]."""
    return NoiseStreams(seeds).draw(shape)


class Networks(Protocol):
    """What the pipeline needs from a backend, in the backend's own array type."""

    def velocity(self, x: Any, t: float, y: Any) -> Any:
        """The conditional velocity at SiT time t (one number for the whole batch)."""
        ...

    def guided(self, x: Any, t: float, y: Any, scale: float) -> Any:
        """v_u + scale·(v_c − v_u), both halves in one call."""
        ...

    def asarray(self, values: np.ndarray) -> Any:
        """A host array (noise, labels, statistics) as the backend's array, on its device."""
        ...


def _check_labels(y: np.ndarray, batch: int, null_class: int) -> None:
    if y.ndim != 1 or y.shape[0] != batch or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be {batch} integers, got {y.dtype} {tuple(y.shape)}")
    if y.size and (int(y.min()) < 0 or int(y.max()) > null_class):
        raise ValueError(
            f"class labels must lie in [0, {null_class}] ({null_class} = unconditional), got {y.tolist()}"
        )


def sample(
    networks: Networks,
    noise: Any,
    y: Any,
    cfg: SamplerConfig,
    seeds: Sequence[int] | np.ndarray | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Any:
    """Integrate from noise (t = 0) to data (t = 1) and return the data-space sample.

    - euler: x ← x + Δt·v on the grid.
    - heun: trapezoidal predictor–corrector, Euler on the last interval.
    - sde: Euler–Maruyama for dx = (v + D·score) dt + √(2D) dW with the SBDM diffusion
      D(t) = (1 − t)/t·(1 − t) + (1 − t) = (1 − t)/t, which keeps the path's marginals; for this path
      E[noise | x_t] = x_t − t·v, so score = −(x_t − t·v)/(1 − t). On the `updates` grid, whose ends
      are 0 (D infinite) and 1, the first and last intervals are plain Euler steps; on the `release`
      grid every interval is stochastic and a drift-only step of 0.004 follows. Step noise comes
      from per-image streams derived from `seeds` (required for sde).

    CFG runs at evaluations whose t lies in the interval when the scale ≠ 1; every other evaluation
    calls the conditional network alone. `on_step(k)` runs before interval k (a cancellation hook:
    raising there stops the batch between network calls).
    """
    if not isinstance(cfg, SamplerConfig):
        raise ValueError(f"cfg must be a SamplerConfig, got {type(cfg).__name__}")
    batch = noise.shape[0]
    step_noise = None
    if cfg.sampler == "sde":
        if seeds is None:
            raise ValueError("the sde sampler needs seeds (one per image) for its per-step noise")
        step_noise = NoiseStreams(seeds, stream=1)
        if len(step_noise) != batch:
            raise ValueError(f"{len(step_noise)} seeds for a batch of {batch}")

    def velocity(x: Any, t: float) -> Any:
        if cfg.guides_at(t):
            return networks.guided(x, t, y, float(cfg.cfg_scale))
        return networks.velocity(x, t, y)

    def drift(x: Any, t: float, v: Any) -> Any:
        diffusion = (1 - t) / t
        score = -(x - t * v) / (1 - t)
        return v + diffusion * score

    grid = time_grid(cfg.steps, cfg.shift, cfg.grid, cfg.sampler)
    release_sde = cfg.sampler == "sde" and cfg.grid == "release"
    last = len(grid) - 2
    x = noise
    for k in range(last + 1):
        if on_step is not None:
            on_step(k)
        t, t_next = grid[k], grid[k + 1]
        dt = t_next - t
        v = velocity(x, t)
        if cfg.sampler == "euler" or (cfg.sampler == "heun" and k == last):
            x = x + dt * v
        elif cfg.sampler == "heun":
            x_pred = x + dt * v
            x = x + 0.5 * dt * (v + velocity(x_pred, t_next))
        elif not release_sde and k in (0, last):
            x = x + dt * v
        else:
            diffusion = (1 - t) / t
            dw = networks.asarray(step_noise.draw(tuple(x.shape[1:])))
            x = x + dt * drift(x, t, v) + math.sqrt(2 * diffusion * dt) * dw
    if release_sde:
        if on_step is not None:
            on_step(last + 1)
        t = grid[-1]
        x = x + RELEASE_SDE_LAST_STEP * drift(x, t, velocity(x, t))
    return x


def generate(
    networks: Networks,
    decode: Callable[[Any], np.ndarray],
    labels: np.ndarray,
    seeds: np.ndarray,
    cfg: SamplerConfig,
    latent_shape: Sequence[int],
    latent_mean: Sequence[float],
    latent_std: Sequence[float],
    null_class: int,
    on_step: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Seeds → noise → `sample` → de-normalised latents → `decode`: one image per (label, seed).

    The generator works on normalised latents (z − mean)/std, so samples are mapped back with the
    model's latent statistics before the decoder sees them.
    """
    labels = np.asarray(labels)
    seeds_ = seed_list(seeds)
    if len(seeds_) != labels.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels and {len(seeds_)} seeds: one seed per label")
    _check_labels(labels, len(seeds_), null_class)
    noise = networks.asarray(noise_from_seeds(seeds_, latent_shape))
    y = networks.asarray(labels.astype(np.int64))
    x = sample(networks, noise, y, cfg, seeds=seeds_, on_step=on_step)
    stats = np.asarray([latent_mean, latent_std], dtype=np.float32).reshape(2, 1, -1, 1, 1)
    mean, std = networks.asarray(stats[0]), networks.asarray(stats[1])
    return decode(x * std + mean)
