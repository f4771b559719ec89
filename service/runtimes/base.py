"""The runtime interface every backend implements, and the generation pipeline they share.

A runtime turns batches into batches: images (B×3×H×W float32 in [0, 1]) to latents
(B×d×h×w float32), latents back to images, and (labels, seeds, sampler settings) to images. The
sampling loop is always `model.flow.sample`, so the solver, step count, shift and CFG interval are
request parameters; a backend only supplies the two velocity functions and the decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from export.repository import ModelConfig
from model.flow import SamplerConfig, noise_from_seeds, sample

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
GuidedFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


@runtime_checkable
class Runtime(Protocol):
    """What a worker needs from a backend (docs/INTERFACES.md, "service/ runtimes")."""

    config: ModelConfig

    def encode(self, images: np.ndarray) -> np.ndarray:
        """B×3×H×W float32 in [0, 1] → B×d×h×w float32 latents on the RMS sphere."""
        ...

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """B×d×h×w float32 latents → B×3×H×W float32 images, ≈[0, 1] (unclamped)."""
        ...

    def generate(self, labels: np.ndarray, seeds: np.ndarray, sampler: SamplerConfig) -> np.ndarray:
        """int64 labels and seeds (B,) → B×3×H×W float32 images; image i depends on seeds[i] alone."""
        ...

    def warmup(self, max_batch: Mapping[str, int]) -> None:
        """Run every graph at every batch size from 1 to max_batch[task], so no request pays a first-shape cost."""
        ...

    def info(self) -> dict[str, object]:
        """Runtime name, active provider and library versions (reported by /v1/models and metrics)."""
        ...


def check_generate_inputs(config: ModelConfig, labels: np.ndarray, seeds: np.ndarray) -> None:
    """Labels in [0, null_class] and one seed per label, with messages naming what is wrong."""
    if labels.ndim != 1 or seeds.shape != labels.shape:
        raise ValueError(
            f"labels {labels.shape} and seeds {seeds.shape} must be two 1-D arrays of one length"
        )
    if labels.size and (labels.min() < 0 or labels.max() > config.null_class):
        raise ValueError(f"labels must lie in [0, {config.null_class}], got {labels.tolist()}")


def sample_images(
    config: ModelConfig,
    labels: np.ndarray,
    seeds: np.ndarray,
    sampler: SamplerConfig,
    model: VelocityFn,
    guided: GuidedFn | None,
    decode: Callable[[torch.Tensor], np.ndarray],
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Seeded noise → `model.flow.sample` → de-normalised latents → decoded images.

    `guided` is the backend's fused CFG call (an exported graph); None lets `sample` batch both halves.

    The DiT works on normalised latents (z − mean)/std, so its samples are mapped back with the
    version's latent statistics before the decoder sees them.
    """
    check_generate_inputs(config, labels, seeds)
    seed_list = [int(s) for s in seeds]
    noise = noise_from_seeds(seed_list, config.latent_shape, device=device)
    y = torch.as_tensor(labels, dtype=torch.int64, device=device)
    x = sample(model, noise, y, sampler, config.null_class, guided=guided, generator_seeds=seed_list)
    mean = torch.tensor(config.latent_mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    std = torch.tensor(config.latent_std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return decode(x * std + mean)


def warm_up(
    config: ModelConfig,
    max_batch: Mapping[str, int],
    encode: Callable[[np.ndarray], np.ndarray],
    decode: Callable[[np.ndarray], np.ndarray],
    velocities: tuple[VelocityFn, GuidedFn | None],
    device: torch.device | str = "cpu",
) -> None:
    """Run each graph once at every batch size from 1 to `max_batch[task]` (see `Runtime.warmup`).

    Generation warms the conditional velocity and, when the backend has one, its fused CFG graph;
    the decoder it ends in is already warm from the decode sizes up to the same maximum.
    """
    size = config.image_size
    d, h, w = config.latent_shape
    for b in range(1, max_batch.get("encode", 0) + 1):
        encode(np.zeros((b, 3, size, size), np.float32))
    for b in range(1, max(max_batch.get("decode", 0), max_batch.get("generate", 0)) + 1):
        decode(np.zeros((b, d, h, w), np.float32))
    velocity, guided = velocities
    with torch.no_grad():
        for b in range(1, max_batch.get("generate", 0) + 1):
            x = torch.zeros(b, d, h, w, device=device)
            t = torch.full((b,), 0.5, device=device)
            y = torch.zeros(b, dtype=torch.int64, device=device)
            velocity(x, t, y)
            if guided is not None:
                guided(x, t, y, 2.0)
