"""A conventional convolutional KL autoencoder (the LDM first stage: Rombach et al., arXiv 2112.10752,
§3 and appendix G), trained from pixels with no VFM: the reconstruction-oriented latent PAE is
compared against at the same latent shape.

Encoder: conv → per level (ResNet blocks, stride-2 conv except at the last level) → middle (ResNet,
self-attention, ResNet) → GroupNorm, SiLU, conv to 2·d channels, read as the mean and log-variance of
a diagonal Gaussian posterior. The decoder mirrors it with nearest-neighbour upsampling. The number
of levels follows the downsampling factor image_size / latent_grid (32 px → 8×8 is two halvings).

`encode` returns the posterior mean, so the diffusion latents are deterministic; `forward` samples
the posterior, as training does, and also returns the KL term of LDM's objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .validation import positive_ints

# LDM clamps the posterior log-variance to keep exp() finite early in training.
LOGVAR_RANGE = (-30.0, 20.0)


@dataclass(frozen=True)
class KLAutoencoderConfig:
    """Image size, latent shape (d × g × g) and widths: `channels[i]` is level i's width."""

    image_size: int
    latent_dim: int
    latent_grid: int
    channels: tuple[int, ...] = (64, 128, 128)
    res_blocks: int = 1

    def __post_init__(self) -> None:
        positive_ints(self, "image_size", "latent_dim", "latent_grid", "res_blocks")
        factor = self.image_size // self.latent_grid
        if self.image_size % self.latent_grid or factor & (factor - 1):
            raise ValueError(
                f"image_size {self.image_size} / latent_grid {self.latent_grid} must be a power of two"
            )
        if len(self.channels) != self.levels:
            raise ValueError(
                f"channels {self.channels} must give one width per level: {self.levels} for "
                f"{self.image_size} px → {self.latent_grid}×{self.latent_grid}"
            )
        if any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in self.channels):
            raise ValueError(f"channels must be positive ints, got {self.channels}")

    @property
    def levels(self) -> int:
        """Resolution levels: one more than the number of halvings."""
        return int(math.log2(self.image_size // self.latent_grid)) + 1

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_dim, self.latent_grid, self.latent_grid)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, twice, with a 1×1 shortcut when the width changes."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the spatial positions, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.flatten(2).transpose(1, 2) for t in self.qkv(self.norm(x)).chunk(3, dim=1))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        return x + self.proj(out)


def _middle(channels: int) -> nn.Sequential:
    return nn.Sequential(ResBlock(channels, channels), AttnBlock(channels), ResBlock(channels, channels))


class KLAutoencoder(nn.Module):
    """Pixels → diagonal-Gaussian latent B×d×g×g → pixels. Same interface as PAE where the stages meet
    it: `encode(x01, h_vfm=None)`, `decode(z)`, `decoder_last_layer`, `trainable_state_dict()`."""

    def __init__(self, cfg: KLAutoencoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        enc: list[nn.Module] = [nn.Conv2d(3, ch[0], 3, padding=1)]
        c = ch[0]
        for level, width in enumerate(ch):
            for _ in range(cfg.res_blocks):
                enc.append(ResBlock(c, width))
                c = width
            if level < cfg.levels - 1:
                enc.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        enc += [_middle(c), _norm(c), nn.SiLU(), nn.Conv2d(c, 2 * cfg.latent_dim, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [nn.Conv2d(cfg.latent_dim, ch[-1], 3, padding=1), _middle(ch[-1])]
        c = ch[-1]
        for level in reversed(range(cfg.levels)):
            for _ in range(cfg.res_blocks + 1):
                dec.append(ResBlock(c, ch[level]))
                c = ch[level]
            if level > 0:
                dec += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        dec += [_norm(c), nn.SiLU()]
        self.decoder = nn.Sequential(*dec)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.cfg.latent_shape

    @property
    def decoder_last_layer(self) -> torch.Tensor:
        """Weight of the decoder's output conv, for the adaptive GAN weight."""
        return self.conv_out.weight

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters()}

    def posterior(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images B×3×H×W in [0, 1] → (mean, log-variance), each B×d×g×g."""
        if x01.ndim != 4 or x01.shape[1] != 3 or x01.shape[-1] != self.cfg.image_size:
            raise ValueError(
                f"images must be B×3×{self.cfg.image_size}×{self.cfg.image_size}, got {tuple(x01.shape)}"
            )
        mean, logvar = self.encoder(x01 * 2.0 - 1.0).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, x01: torch.Tensor, h_vfm: torch.Tensor | None = None) -> torch.Tensor:
        """The posterior mean (deterministic latents); `h_vfm` is accepted and ignored (no VFM)."""
        return self.posterior(x01)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent B×d×g×g → image B×3×H×W, ≈[0, 1] and unclamped."""
        if z.ndim != 4 or z.shape[1] != self.cfg.latent_dim:
            raise ValueError(f"latent must be B×{self.cfg.latent_dim}×h×w, got shape {tuple(z.shape)}")
        return (self.conv_out(self.decoder(z)) + 1.0) / 2.0

    def forward(
        self, x01: torch.Tensor, h_vfm: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (x̂ decoded from a posterior sample, that sample, KL to N(0, I))."""
        mean, logvar = self.posterior(x01)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return self.decode(z), z, kl_divergence(mean, logvar)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) ‖ N(0, I)), summed over each latent's elements, averaged over the batch
    (LDM's reduction)."""
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(dim=1).mean()
