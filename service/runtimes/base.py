"""The runtime interface every backend implements, and the generation glue they share.

A runtime turns batches into batches: images (B×3×H×W float32 in [0, 1]) to latents
(B×d×h×w float32), latents back to images, and (labels, seeds, sampler settings) to images. The
sampling loop is always `model.sampling.generate`, so the solver, step count, grid, shift and CFG
interval are request parameters; a backend only supplies its networks (`model.sampling.Networks`)
and the decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from export.repository import ModelConfig
from model.sampling import Networks, SamplerConfig, generate
from service.cancellation import PrunedGeneration


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

    def generate(
        self,
        labels: np.ndarray,
        seeds: np.ndarray,
        sampler: SamplerConfig,
        pruning: PrunedGeneration | None = None,
    ) -> np.ndarray:
        """int64 labels and seeds (B,) → B×3×H×W float32 images; image i depends on seeds[i] alone.

        With `pruning`, images whose jobs were abandoned leave the batch at the next sampler step
        (their rows come back as zeros), and Abandoned is raised when none is left."""
        ...

    def warmup(self, max_batch: Mapping[str, int]) -> None:
        """Run every graph at every batch size from 1 to max_batch[task], so no request pays a first-shape cost."""
        ...

    def info(self) -> dict[str, object]:
        """Runtime name, active provider and library versions (reported by /v1/models and metrics)."""
        ...


def generate_images(
    config: ModelConfig,
    networks: Networks,
    decode: Callable[[Any], np.ndarray],
    labels: np.ndarray,
    seeds: np.ndarray,
    sampler: SamplerConfig,
    pruning: PrunedGeneration | None = None,
) -> np.ndarray:
    """`model.sampling.generate` with the version's latent shape, statistics and null class, and
    the batch pruned of abandoned jobs between steps when `pruning` is given."""
    on_step = None
    if pruning is not None:
        networks, decode = pruning.wrap(networks, decode)
        on_step = pruning.on_step
    return generate(
        networks,
        decode,
        labels,
        seeds,
        sampler,
        config.latent_shape,
        config.latent_mean,
        config.latent_std,
        config.null_class,
        on_step=on_step,
    )


def warm_up(
    config: ModelConfig,
    max_batch: Mapping[str, int],
    encode: Callable[[np.ndarray], np.ndarray],
    decode: Callable[[np.ndarray], np.ndarray],
    networks: Networks,
) -> None:
    """Run each graph once at every batch size from 1 to `max_batch[task]` (see `Runtime.warmup`).

    Generation warms the conditional and the fused CFG velocity; the decoder it ends in is already
    warm from the decode sizes up to the same maximum.
    """
    size = config.image_size
    d, h, w = config.latent_shape
    for b in range(1, max_batch.get("encode", 0) + 1):
        encode(np.zeros((b, 3, size, size), np.float32))
    for b in range(1, max(max_batch.get("decode", 0), max_batch.get("generate", 0)) + 1):
        decode(np.zeros((b, d, h, w), np.float32))
    for b in range(1, max_batch.get("generate", 0) + 1):
        x = networks.asarray(np.zeros((b, d, h, w), np.float32))
        y = networks.asarray(np.zeros(b, np.int64))
        networks.velocity(x, 0.5, y)
        networks.guided(x, 0.5, y, 2.0)
