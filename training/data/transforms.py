"""Image transforms the datasets share, written against PIL and torch only (no torchvision).

All functions return float32 tensors in [0, 1] with layout 3×H×W, the project-wide image
convention (docs/INTERFACES.md).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def grey_to_rgb_padded(image: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Centre-pad an H×W uint8 grey image with zeros to size×size and replicate it to 3 channels.

    Padding (not resizing) keeps the 28×28 digits pixel-exact; the zero border matches the black
    background of (Fashion-)MNIST, and 32 = 28 + 4 gives a size every power-of-two patch divides.
    """
    grey = torch.as_tensor(image)
    if grey.ndim != 2 or grey.dtype != torch.uint8:
        raise ValueError(f"expected an H×W uint8 grey image, got shape {tuple(grey.shape)} {grey.dtype}")
    h, w = grey.shape
    if size < h or size < w:
        raise ValueError(f"cannot pad a {h}×{w} image to {size}×{size}: size must be at least {max(h, w)}")
    top, left = (size - h) // 2, (size - w) // 2
    out = torch.zeros(3, size, size, dtype=torch.float32)
    out[:, top : top + h, left : left + w] = grey.to(torch.float32).div_(255.0)
    return out


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → 3×H×W float32 tensor in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM-style centre crop to size×size.

    While the short side is at least twice the target, halve the image with a BOX filter (cheap
    and alias-free), then resize with BICUBIC so the short side equals `size`, then cut the centre
    square. This is the preprocessing the ImageNet-256 generation and reconstruction numbers in
    the literature are measured with, so matching it keeps our numbers comparable.
    """
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.Resampling.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def hflip(image: torch.Tensor) -> torch.Tensor:
    """Mirror a …×H×W tensor left-right."""
    return torch.flip(image, dims=(-1,))
