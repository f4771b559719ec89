"""Tiny checkpoint directories in the format training writes, built from random weights.

A randomly initialised, shrunken `fmnist32-tiny` (real EfficientNet-Lite0 VFM, one block everywhere
else) loads and exports in seconds. Zero-initialised layers (adaLN-Zero, the DAM fusion, the DiT
output) are perturbed so every graph computes something non-trivial: parity on an all-zero output
would prove nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from model.checkpoint import write_checkpoint
from model.lightningdit import LightningDiT
from model.pae import PAE
from model.presets import Preset, get_preset


def tiny_preset() -> Preset:
    base = get_preset("fmnist32-tiny")
    pae = dataclasses.replace(base.pae, dam_depth=1, decoder_width=32, decoder_depth=1, decoder_heads=2)
    dit = dataclasses.replace(base.dit, hidden=32, depth=1, heads=2)
    return dataclasses.replace(base, pae=pae, dit=dit)


def _perturb(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.05) -> None:
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


def random_checkpoint(directory: Path, preset: Preset, ema: bool = True, seed: int = 0) -> Path:
    """Random PAE / DiT weights and latent stats of `preset`, saved as a checkpoint in `directory`."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pae = PAE(preset.pae)
    dit = LightningDiT(preset.dit)
    _perturb(pae, generator)
    _perturb(dit, generator)
    d = preset.pae.latent_dim
    mean = 0.1 * torch.randn(d, generator=generator)
    std = 0.5 + torch.rand(d, generator=generator)
    return write_checkpoint(directory, preset, pae, dit, mean, std, ema=ema)
