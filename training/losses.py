"""PAE training objective (the paper's L_recon + L_p): reconstruction, GAN and the three prior-alignment
terms.

Every function takes plain tensors and callables (`decode`, `lpips`), so the terms can be tested,
and reused by the refine stage, without a full model. `PAELoss` combines them with weights from a
config; a term whose weight is zero is never computed, which is how the reconstruction-only
baseline is trained with the same code.

Latents are B×d×h×w on the per-token RMS sphere; token tensors B×N×D (VFM output) are accepted
wherever only token geometry matters (SSR, SCR).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.pae import sphere_norm
from model.validation import non_negative_numbers

Decode = Callable[[torch.Tensor], torch.Tensor]
Perceptual = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def l1(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean absolute error in [0, 1] pixel space."""
    if x_hat.shape != x.shape:
        raise ValueError(f"l1: shapes differ: {tuple(x_hat.shape)} vs {tuple(x.shape)}")
    return (x_hat - x).abs().mean()


def _tokens(z: torch.Tensor, what: str) -> torch.Tensor:
    """B×d×h×w latent or B×N×D tokens → B×N×C float32 tokens."""
    if z.ndim == 4:
        return z.float().flatten(2).transpose(1, 2)
    if z.ndim == 3:
        return z.float()
    raise ValueError(f"{what} must be B×d×h×w or B×N×D, got shape {tuple(z.shape)}")


def cosine_gram(z: torch.Tensor) -> torch.Tensor:
    """B×N×N matrix of cosine similarities between the tokens of each image."""
    t = F.normalize(_tokens(z, "latent"), dim=-1, eps=1e-8)
    return t @ t.transpose(1, 2)


def ssr_loss(z: torch.Tensor, z_target: torch.Tensor) -> torch.Tensor:
    """Spatial Structure Regularisation: mean squared difference of cosine Gram matrices.

    The Gram matrix over tokens is invariant to any rotation of the channel axis, so SSR constrains
    which tokens resemble which (spatial structure) without pinning the latent's channel basis, and
    the target may even have a different channel count. The published form ‖G_z − G_T‖²_F leaves
    normalisation and reduction open; tokens are L2-normalised (cosine Gram, entries in [−1, 1], so
    the loss does not depend on token norms or d) and the squared error is averaged over the N²
    entries (so λ_ssr does not depend on the token count). The target is a fixed prior: no gradient.
    """
    t, tt = _tokens(z, "z"), _tokens(z_target, "z_target")
    if t.shape[:2] != tt.shape[:2]:
        raise ValueError(
            f"ssr_loss: z has (batch, tokens) {tuple(t.shape[:2])}, z_target {tuple(tt.shape[:2])}; they must match"
        )
    return (cosine_gram(t) - cosine_gram(tt.detach())).pow(2).mean()


def scr_loss(z: torch.Tensor, z_target: torch.Tensor) -> torch.Tensor:
    """Semantic Consistency Regularisation: (1 − cos of mean-pooled tokens) + mean over tokens of (1 − cos).

    Cosines ignore scale, so a latent aligned with the target in direction scores 0 whatever its
    norm. Pooling is a global average over tokens (the spec's default reading). Averaged over the
    batch; the target gets no gradient.
    """
    t, tt = _tokens(z, "z"), _tokens(z_target, "z_target").detach()
    if t.shape != tt.shape:
        raise ValueError(
            f"scr_loss: z tokens {tuple(t.shape)} and z_target tokens {tuple(tt.shape)} must match"
        )
    pooled = 1.0 - F.cosine_similarity(t.mean(dim=1), tt.mean(dim=1), dim=-1, eps=1e-8)
    per_token = 1.0 - F.cosine_similarity(t, tt, dim=-1, eps=1e-8)
    return (pooled + per_token.mean(dim=1)).mean()


def tangent_direction(z: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Project `direction` onto each token's tangent space at z and rescale it to the token's norm."""
    if direction.shape != z.shape or z.ndim != 4:
        raise ValueError(
            f"direction {tuple(direction.shape)} must have the B×d×h×w shape of z {tuple(z.shape)}"
        )
    z32, d32 = z.float(), direction.float()
    norm = z32.norm(dim=1, keepdim=True).clamp_min(1e-12)
    unit = z32 / norm
    tangent = d32 - (d32 * unit).sum(dim=1, keepdim=True) * unit
    return tangent * (norm / tangent.norm(dim=1, keepdim=True).clamp_min(1e-12))


def sphere_perturb(z: torch.Tensor, angle_deg: float, direction: torch.Tensor) -> torch.Tensor:
    """Geodesic step of `angle_deg` from each token of z towards `direction` on its sphere.

    z(θ) = cos θ·z + sin θ·Δ with Δ the tangent part of `direction` at z, rescaled to z's norm;
    the same as normalising z + tan θ·Δ, but exact at 85° where tan θ ≈ 11.4.
    The result is re-projected with `sphere_norm` so rounding never moves it off the RMS sphere.
    Using one `direction` for several angles keeps all points on one great circle per token.
    """
    if not 0.0 <= angle_deg <= 180.0:
        raise ValueError(f"angle_deg must lie in [0, 180], got {angle_deg}")
    theta = math.radians(angle_deg)
    step = math.cos(theta) * z.float() + math.sin(theta) * tangent_direction(z, direction)
    return sphere_norm(step).to(z.dtype)


class MCROutput(NamedTuple):
    """MCR loss with its two cascade terms and the perturbed latents (kept for inspection/tests)."""

    loss: torch.Tensor
    medium_term: torch.Tensor
    large_term: torch.Tensor
    z_medium: torch.Tensor
    z_large: torch.Tensor


def mcr_loss(
    z: torch.Tensor,
    decode: Decode,
    lpips: Perceptual,
    angles: tuple[float, float] = (42.5, 85.0),
    generator: torch.Generator | None = None,
    x_anchor: torch.Tensor | None = None,
) -> MCROutput:
    """Manifold Continuity Regularisation: cascaded consistency of decodes along one random geodesic.

    One Gaussian direction per token (radial part removed, rescaled to the token norm) gives
    z_m and z_l at the two angles on the same great circle. Loss:
    [L1 + LPIPS](x̂_m, sg(x̂_r)) + [L1 + LPIPS](x̂_l, sg(x̂_m)). The anchor decode is only a target;
    pass the training step's reconstruction as `x_anchor` to reuse it (it is detached here),
    otherwise it is decoded without building a graph. x̂_m and x̂_l are decoded in one call.
    """
    a_m, a_l = angles
    if not 0.0 < a_m < a_l < 180.0:
        raise ValueError(f"MCR angles must satisfy 0 < medium < large < 180 degrees, got {angles}")
    device = generator.device if generator is not None else z.device
    noise = torch.randn(z.shape, generator=generator, device=device, dtype=torch.float32).to(z.device)
    z_m = sphere_perturb(z, a_m, noise)
    z_l = sphere_perturb(z, a_l, noise)
    if x_anchor is None:
        with torch.no_grad():
            x_r = decode(z)
    else:
        x_r = x_anchor.detach()
    x_m, x_l = decode(torch.cat([z_m, z_l])).chunk(2)
    x_m_target = x_m.detach()
    medium = l1(x_m, x_r) + lpips(x_m, x_r).mean()
    large = l1(x_l, x_m_target) + lpips(x_l, x_m_target).mean()
    return MCROutput(medium + large, medium, large, z_m, z_l)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ½[mean relu(1 − D(x)) + mean relu(1 + D(x̂))]."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def nonsat_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss −log σ(D(x̂)), written as softplus for stability."""
    return F.softplus(-logits_fake).mean()


def adaptive_gan_weight(
    rec_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-6,
) -> torch.Tensor:
    """‖∇_W L_rec‖ / (‖∇_W L_gan‖ + eps), clamped to [0, max_weight], detached.

    W is the decoder's last layer weight: balancing the two gradients where they meet the output
    keeps the GAN term from swamping reconstruction early on, whatever the loss scales are.
    """
    if not last_layer.requires_grad:
        raise ValueError("adaptive_gan_weight: last_layer does not require grad")
    g_rec, g_gan = (
        torch.autograd.grad(loss, last_layer, retain_graph=True, allow_unused=True)[0]
        for loss in (rec_loss, gan_loss)
    )
    for name, g in (("rec_loss", g_rec), ("gan_loss", g_gan)):
        if g is None:
            raise ValueError(f"adaptive_gan_weight: {name} does not depend on last_layer")
    weight = g_rec.norm() / (g_gan.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


_TERM_WEIGHTS = ("l1_weight", "lpips_weight", "gan_weight", "ssr_weight", "mcr_weight", "scr_weight")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the PAE objective (the paper's values) and MCR/GAN settings.

    Field names match `training.recipes.TokenizerTrainConfig`, so `PAELoss` takes that config (or any
    object with the six `*_weight` term attributes) directly; other fields fall back to these defaults.
    """

    l1_weight: float = 1.0
    lpips_weight: float = 1.0
    gan_weight: float = 0.5
    ssr_weight: float = 0.2
    mcr_weight: float = 0.5
    scr_weight: float = 1.0
    mcr_angles: tuple[float, float] = (42.5, 85.0)
    adaptive_gan_weight: bool = True
    gan_max_weight: float = 1e4

    def __post_init__(self) -> None:
        non_negative_numbers(self, *_TERM_WEIGHTS, "gan_max_weight")

    @classmethod
    def from_config(cls, cfg: object) -> LossWeights:
        """Read the weights from a config object; the six term weights are required."""
        if isinstance(cfg, LossWeights):
            return cfg
        missing = [name for name in _TERM_WEIGHTS if not hasattr(cfg, name)]
        if missing:
            raise ValueError(f"{type(cfg).__name__} lacks loss weights {missing}")
        values = {f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)}
        values["mcr_angles"] = tuple(values.get("mcr_angles", cls.mcr_angles))
        return cls(**values)


def quantize_fake(x_hat: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to 8-bit levels, so D sees fakes exactly as images would be saved."""
    return torch.round(x_hat.clamp(0.0, 1.0) * 255.0) / 255.0


class PAELoss(nn.Module):
    """L1 + λ·LPIPS + λ·GAN + λ·(SSR, MCR, SCR) with zero-weight terms skipped.

    `forward` returns (total, parts) for the autoencoder step; `discriminator_loss` gives the hinge
    loss for the discriminator step. Parts are Python floats for logging (one device sync each).
    The generator's GAN term also leaves gradients on D's parameters: zero D's grads (or use
    separate optimisers with `zero_grad`) before its own step.
    """

    def __init__(
        self, weights: object, lpips: Perceptual | None = None, discriminator: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.weights = LossWeights.from_config(weights)
        w = self.weights
        if (w.lpips_weight > 0 or w.mcr_weight > 0) and lpips is None:
            raise ValueError("an LPIPS module is required when lpips_weight or mcr_weight is > 0")
        if w.gan_weight > 0 and discriminator is None:
            raise ValueError("a discriminator is required when gan_weight > 0")
        if w.gan_weight > 0 and w.adaptive_gan_weight and w.l1_weight == 0 and w.lpips_weight == 0:
            raise ValueError(
                "the adaptive GAN weight needs a reconstruction term (l1_weight or lpips_weight > 0)"
            )
        self.lpips = lpips
        self.discriminator = discriminator

    def forward(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        z: torch.Tensor,
        *,
        decode: Decode | None = None,
        z_target: torch.Tensor | None = None,
        last_layer: torch.Tensor | None = None,
        gan_active: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Autoencoder loss. `gan_active=False` skips the GAN term (its delayed start)."""
        w = self.weights
        if (w.ssr_weight > 0 or w.scr_weight > 0) and z_target is None:
            raise ValueError("z_target (refined VFM target) is required when ssr_weight or scr_weight is > 0")
        if w.mcr_weight > 0 and decode is None:
            raise ValueError("decode is required when mcr_weight > 0")
        if w.gan_weight > 0 and gan_active and w.adaptive_gan_weight and last_layer is None:
            raise ValueError("the adaptive GAN weight needs last_layer (the decoder's final weight)")
        terms: dict[str, torch.Tensor] = {}
        rec = x_hat.new_zeros(())
        if w.l1_weight > 0:
            terms["l1"] = l1(x_hat, x)
            rec = rec + w.l1_weight * terms["l1"]
        if w.lpips_weight > 0:
            terms["lpips"] = self.lpips(x_hat, x).mean()
            rec = rec + w.lpips_weight * terms["lpips"]
        total = rec
        if w.gan_weight > 0 and gan_active:
            terms["gan"] = nonsat_g_loss(self.discriminator(x_hat))
            if w.adaptive_gan_weight:
                terms["gan_adaptive"] = adaptive_gan_weight(rec, terms["gan"], last_layer, w.gan_max_weight)
            else:
                terms["gan_adaptive"] = x_hat.new_ones(())
            total = total + w.gan_weight * terms["gan_adaptive"] * terms["gan"]
        if w.ssr_weight > 0:
            terms["ssr"] = ssr_loss(z, z_target)
            total = total + w.ssr_weight * terms["ssr"]
        if w.scr_weight > 0:
            terms["scr"] = scr_loss(z, z_target)
            total = total + w.scr_weight * terms["scr"]
        if w.mcr_weight > 0:
            terms["mcr"] = mcr_loss(z, decode, self.lpips, w.mcr_angles, generator, x_anchor=x_hat).loss
            total = total + w.mcr_weight * terms["mcr"]
        parts = {name: float(value.detach()) for name, value in terms.items()}
        parts["total"] = float(total.detach())
        return total, parts

    def discriminator_loss(
        self, x: torch.Tensor, x_hat: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge loss for the discriminator on real x and detached, 8-bit-quantised fakes."""
        if self.discriminator is None:
            raise ValueError("discriminator_loss needs a discriminator (gan_weight > 0)")
        logits_real = self.discriminator(x)
        logits_fake = self.discriminator(quantize_fake(x_hat.detach()))
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, {
            "d_loss": float(loss.detach()),
            "logits_real": float(logits_real.detach().mean()),
            "logits_fake": float(logits_fake.detach().mean()),
        }
