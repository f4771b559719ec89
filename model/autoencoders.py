"""Which autoencoder makes a preset's diffusion latent: PAE (the default), RAE or a KL autoencoder.

The generator, the sampler and every metric only ever meet an autoencoder through `encode(x01,
h_vfm)` and `decode(z)` (the `Autoencoder` protocol), so the same LightningDiT recipe can be trained
on any of the three latents. That is what the headline comparison needs: PAE against the latents
people use instead — RAE's frozen VFM token grid (arXiv 2510.11690) and a reconstruction-oriented
KL autoencoder (LDM, arXiv 2112.10752) — with everything else shared. RAE reuses PAE's frozen VFM and
pixel decoder settings, the KL autoencoder PAE's latent shape, so `PAEConfig` describes all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .kl_autoencoder import KLAutoencoder, KLAutoencoderConfig
from .pae import PAE, PAEConfig
from .rae import RAE
from .validation import one_of, positive_ints
from .vfm.base import FrozenVFM

KINDS = ("pae", "rae", "vae")


class Autoencoder(Protocol):
    """What the stages, the sampler and the metrics use of a tokenizer."""

    def encode(self, x01: torch.Tensor, h_vfm: torch.Tensor | None = None) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class AutoencoderConfig:
    """`kind`: `pae` (the preset's PAE), `rae` (the VFM token grid with PAE's pixel decoder) or `vae`
    (a convolutional KL autoencoder at PAE's latent shape, widths `vae_channels`, `vae_res_blocks`
    ResNet blocks per level)."""

    kind: str = "pae"
    vae_channels: tuple[int, ...] = (32, 64, 96)
    vae_res_blocks: int = 1

    def __post_init__(self) -> None:
        one_of(self, "kind", KINDS)
        positive_ints(self, "vae_res_blocks")

    @property
    def uses_vfm(self) -> bool:
        """Whether encoding reads the frozen VFM's tokens (PAE and RAE do; the KL autoencoder does not)."""
        return self.kind != "vae"


def vae_config(cfg: AutoencoderConfig, pae: PAEConfig) -> KLAutoencoderConfig:
    """The KL autoencoder at PAE's image size and latent shape."""
    return KLAutoencoderConfig(
        image_size=pae.image_size,
        latent_dim=pae.latent_dim,
        latent_grid=pae.latent_grid,
        channels=tuple(cfg.vae_channels),
        res_blocks=cfg.vae_res_blocks,
    )


def latent_shape(cfg: AutoencoderConfig, pae: PAEConfig) -> tuple[int, int, int]:
    """(channels, grid, grid) of the diffusion latent: RAE's is the VFM's width on its token grid."""
    if cfg.kind == "rae":
        return (pae.vfm.dim, pae.vfm.grid, pae.vfm.grid)
    return pae.latent_shape


def build_autoencoder(
    cfg: AutoencoderConfig, pae: PAEConfig, vfm: FrozenVFM | None = None
) -> PAE | RAE | KLAutoencoder:
    """A freshly initialised autoencoder of `cfg.kind` (`vfm` is attached to PAE and RAE only)."""
    if cfg.kind == "pae":
        return PAE(pae, vfm)
    if cfg.kind == "rae":
        return RAE(pae, vfm)
    return KLAutoencoder(vae_config(cfg, pae))
