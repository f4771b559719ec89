"""Patch discriminator with DiffAugment for the PAE GAN term.

The published recipe (the paper's, inherited from RAE) uses a frozen DINO ViT-S/8 with trainable heads as
the discriminator. Those DINO weights are not obtainable offline (no registry package carries
them), so this project uses a small convolutional patch discriminator trained from scratch:
spectral-normalised convs (a Lipschitz bound that keeps the hinge game stable without BatchNorm,
whose batch statistics would differ between the separate real and fake passes) and LeakyReLU 0.2.
The number of stride-2 stages follows the image size, so the same class serves 32 px (8×8 logits)
and 256 px (32×32 logits).

DiffAugment (translation + colour, no cutout) is applied to every input — real and fake alike —
in training mode, as in the recipe: augmenting both sides keeps D from memorising a small dataset
while leaving the distribution it must tell apart unchanged.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def diff_augment(
    x: torch.Tensor, translation: float = 0.125, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Differentiable colour (brightness, saturation, contrast) + translation augmentation.

    Works on images in [-1, 1]. Random parameters are drawn per sample. Translation shifts by an
    integer number of pixels, up to `translation` of the size, filling with zeros.
    """
    b, _, h, w = x.shape
    device = generator.device if generator is not None else x.device

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=device).to(x.device, x.dtype)

    x = x + (uniform(b, 1, 1, 1) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (uniform(b, 1, 1, 1) * 2.0) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (uniform(b, 1, 1, 1) + 0.5) + mean
    if translation > 0:
        max_dy, max_dx = int(h * translation + 0.5), int(w * translation + 0.5)
        dy = torch.randint(-max_dy, max_dy + 1, (b,), generator=generator, device=device).to(x.device)
        dx = torch.randint(-max_dx, max_dx + 1, (b,), generator=generator, device=device).to(x.device)
        rows = torch.arange(h, device=x.device).view(1, h, 1) - dy.view(b, 1, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w) - dx.view(b, 1, 1)
        inside = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).unsqueeze(1)
        flat = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).view(b, 1, h * w).expand(-1, x.shape[1], -1)
        x = torch.gather(x.flatten(2), 2, flat).view_as(x) * inside
    return x


class PatchDiscriminator(nn.Module):
    """Convolutional patch discriminator: B×3×H×W images in [0, 1] → B×1×h×w logits.

    `image_size` fixes the depth: stride-2 stages until an 8×8 map at 32 px, three stages (a
    PatchGAN-like receptive field of ≈ 70 px) from 64 px up.
    """

    def __init__(self, image_size: int, base_channels: int = 64, augment: bool = True) -> None:
        super().__init__()
        if image_size < 16 or image_size & (image_size - 1):
            raise ValueError(f"image_size must be a power of two ≥ 16, got {image_size}")
        self.image_size = image_size
        self.augment = augment
        n_down = min(3, int(math.log2(image_size)) - 3)
        widths = [base_channels * min(2**i, 8) for i in range(n_down + 1)]
        layers: list[nn.Module] = [spectral_norm(nn.Conv2d(3, widths[0], 3, padding=1)), nn.LeakyReLU(0.2)]
        for c_in, c_out in itertools.pairwise(widths):
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        layers += [
            spectral_norm(nn.Conv2d(widths[-1], widths[-1], 3, padding=1)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(widths[-1], 1, 3, padding=1)),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"discriminator expects B×3×H×W images, got {tuple(x.shape)}")
        x = x * 2.0 - 1.0
        if self.augment and self.training:
            x = diff_augment(x)
        return self.net(x)
