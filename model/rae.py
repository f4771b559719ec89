"""RAE, the Representation Autoencoder (Zheng et al., arXiv 2510.11690, §3): the diffusion latent is
the frozen VFM's own token grid, and only a pixel decoder is trained.

Here it is the comparison point for PAE at the same scale, so it shares PAE's frozen VFM and PAE's
ViT pixel decoder settings (`PAEConfig.vfm`, `decoder_*`): the two differ in the latent alone. The
encoder is the VFM's final-LayerNorm token grid (B×N×D → B×D×g×g, e.g. 112×8×8 for EfficientNet-Lite0
at the default scale), standardised per channel with statistics of the training set (RAE normalises
its latents with dataset statistics before diffusion; they are buffers here, so the checkpoint carries
them). Decoding reads that standardised grid directly: no projector, no channel compression.

RAE trains its decoder on noisy latents (§3.2, "noise-augmented decoding"): z + σ·ε with σ ~ U(0, τ)
per image, so it tolerates the slightly off-manifold latents a diffusion model produces; τ = 0 at
inference. `forward(…, noise_tau=τ)` applies it, so the training step goes through the module's own
forward (and DDP) with the augmentation inside.
"""

from __future__ import annotations

import torch

from .pae import PAEConfig, PixelDecoder, init_weights
from .vfm.base import FrozenVFM, UsesFrozenVFM, normalize_image


def decoder_noise(z: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """z + σ·ε with σ ~ U(0, τ) drawn once per image and ε ~ N(0, I) (RAE's noise augmentation)."""
    if tau < 0:
        raise ValueError(f"noise tau must be >= 0, got {tau}")
    if tau == 0:
        return z
    device = generator.device if generator is not None else z.device
    sigma = torch.rand((z.shape[0], 1, 1, 1), generator=generator, device=device) * tau
    eps = torch.randn(z.shape, generator=generator, device=device)
    return z + (sigma * eps).to(device=z.device, dtype=z.dtype)


class RAE(UsesFrozenVFM):
    """Frozen VFM tokens (standardised per channel) as the latent; a trainable ViT pixel decoder.

    `vfm` may be None when tokens are always passed in (`h_vfm`, the feature cache); it is kept out of
    `state_dict()`. The latent statistics start as (0, 1) and are set once from the training set
    (`set_latent_stats`) before training; they are persistent buffers, so they travel with the weights.
    """

    def __init__(self, cfg: PAEConfig, vfm: FrozenVFM | None = None) -> None:
        super().__init__(cfg.vfm, vfm)
        self.cfg = cfg
        spec = cfg.vfm
        self.register_buffer("latent_mean", torch.zeros(1, spec.dim, 1, 1))
        self.register_buffer("latent_std", torch.ones(1, spec.dim, 1, 1))
        self.decoder = PixelDecoder(spec.dim, cfg)
        self.apply(init_weights)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.cfg.vfm.dim, self.cfg.vfm.grid, self.cfg.vfm.grid)

    @property
    def decoder_last_layer(self) -> torch.Tensor:
        """Weight of the decoder's final prediction Linear, for the adaptive GAN weight."""
        return self.decoder.head.weight

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The decoder and the latent statistics (what a checkpoint holds); never the frozen VFM."""
        return {name: t.detach() for name, t in self.state_dict().items()}

    @torch.no_grad()
    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel statistics (each D values) of the raw token grid, used to standardise it."""
        d = self.cfg.vfm.dim
        if mean.numel() != d or std.numel() != d or not bool((std > 0).all()):
            raise ValueError(f"latent statistics need {d} means and {d} positive stds")
        self.latent_mean.copy_(mean.reshape(1, d, 1, 1))
        self.latent_std.copy_(std.reshape(1, d, 1, 1))

    def tokens_to_grid(self, h_vfm: torch.Tensor) -> torch.Tensor:
        """B×N×D VFM tokens → the raw B×D×g×g grid (before standardisation)."""
        spec = self.cfg.vfm
        if h_vfm.ndim != 3 or tuple(h_vfm.shape[1:]) != (spec.grid * spec.grid, spec.dim):
            raise ValueError(f"h_vfm must be B×{spec.grid * spec.grid}×{spec.dim}, got {tuple(h_vfm.shape)}")
        return h_vfm.transpose(1, 2).unflatten(2, (spec.grid, spec.grid))

    def encode(self, x01: torch.Tensor, h_vfm: torch.Tensor | None = None) -> torch.Tensor:
        """Images B×3×H×W in [0, 1] → standardised token grid B×D×g×g. Pass cached tokens as `h_vfm`."""
        if h_vfm is None:
            if self.vfm is None:
                raise RuntimeError(
                    "RAE has no VFM attached: build it with RAE(cfg, build_vfm(cfg.vfm)) or pass h_vfm"
                )
            with torch.no_grad():
                h_vfm = self.vfm.features(normalize_image(x01, self.cfg.vfm, self.mean, self.std))
        return (self.tokens_to_grid(h_vfm) - self.latent_mean) / self.latent_std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent B×D×h×w → image B×3×H×W, ≈[0, 1] and unclamped."""
        if z.ndim != 4 or z.shape[1] != self.cfg.vfm.dim:
            raise ValueError(f"latent must be B×{self.cfg.vfm.dim}×h×w, got shape {tuple(z.shape)}")
        x = self.decoder(z.flatten(2).transpose(1, 2), (z.shape[2], z.shape[3]))
        return x * self.std + self.mean

    def forward(
        self, x01: torch.Tensor, h_vfm: torch.Tensor | None = None, noise_tau: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct, decoding the noise-augmented latent when `noise_tau` > 0: returns (x̂, clean z)."""
        z = self.encode(x01, h_vfm)
        return self.decode(decoder_noise(z, noise_tau)), z
