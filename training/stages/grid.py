"""Class-conditional sample grids: one row per class, decoded from the EMA DiT, saved as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.autoencoders import Autoencoder
from model.flow import TorchNetworks
from model.lightningdit import LightningDiT
from model.sampling import SamplerConfig
from model.sampling import generate as generate_latents_and_decode


def save_grid(images: torch.Tensor, rows: int, path: str | Path, pad: int = 2) -> None:
    """B×3×H×W images in [0, 1] (row-major, B = rows·cols) → one PNG with `pad` px white gutters."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] % rows:
        raise ValueError(
            f"save_grid needs B×3×H×W with B a multiple of rows={rows}, got {tuple(images.shape)}"
        )
    cols = images.shape[0] // rows
    _, _, h, w = images.shape
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for k in range(images.shape[0]):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y : y + h, x : x + w] = pixels[k]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(canvas).save(tmp)
    tmp.replace(path)


@torch.no_grad()
def generate(
    dit: LightningDiT,
    pae: Autoencoder,
    labels: torch.Tensor,
    seeds: torch.Tensor,
    sampler: SamplerConfig,
    mean: torch.Tensor,
    std: torch.Tensor,
    batch_size: int = 100,
) -> torch.Tensor:
    """Images (B×3×H×W in [0, 1], on the CPU) for `labels`, image i from seeds[i], in chunks of `batch_size`."""
    networks = TorchNetworks(dit)
    shape = (dit.cfg.in_channels, dit.cfg.input_size, dit.cfg.input_size)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return pae.decode(z).clamp(0, 1).cpu()

    out = []
    for start in range(0, labels.shape[0], batch_size):
        chunk = slice(start, start + batch_size)
        images = generate_latents_and_decode(
            networks,
            decode,
            labels[chunk].numpy(),
            seeds[chunk].numpy(),
            sampler,
            shape,
            mean.tolist(),
            std.tolist(),
            dit.null_class,
        )
        out.append(images)
    return torch.cat(out)


def class_grid(
    dit: LightningDiT,
    pae: Autoencoder,
    num_classes: int,
    per_class: int,
    sampler: SamplerConfig,
    mean: torch.Tensor,
    std: torch.Tensor,
    path: str | Path,
    seed: int = 0,
) -> None:
    """`num_classes` rows × `per_class` samples (seeds `seed + k`), written to `path`."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    seeds = torch.arange(labels.shape[0], dtype=torch.int64) + seed
    save_grid(generate(dit, pae, labels, seeds, sampler, mean, std), num_classes, path)
