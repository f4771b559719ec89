"""Real images for the parity gate: Fashion-MNIST test digits and scikit-image photographs.

Parity on random noise can hide errors that only show on natural statistics (saturated pixels,
large flat regions, sharp edges), so the gate runs on real pictures. Export must work without the
training package, so the Fashion-MNIST files are read here with the shared IDX reader of `model/`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.idx import read_idx

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
# Colour photographs bundled with scikit-image, chosen for varied content (faces, fur, text, sky).
PHOTO_NAMES: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")


class SampleDataMissing(FileNotFoundError):
    """Neither Fashion-MNIST nor scikit-image photos are available for the parity gate."""


def fashion_mnist_test(count: int, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """First `count` Fashion-MNIST test images (count×28×28 uint8) and labels (count, int64)."""
    images_path = root / "t10k-images-idx3-ubyte.gz"
    labels_path = root / "t10k-labels-idx1-ubyte.gz"
    for path in (images_path, labels_path):
        if not path.is_file():
            raise SampleDataMissing(
                f"Fashion-MNIST test file {path} not found; install the Debian package "
                "'dataset-fashion-mnist' or set FASHION_MNIST_DIR"
            )
    images = read_idx(images_path, (None, 28, 28))[:count]
    labels = read_idx(labels_path, (None,))[:count].astype(np.int64)
    return images, labels


def _resize(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bicubic resize of a B×3×h×w batch to size×size, kept in [0, 1]."""
    if batch.shape[-2:] == (size, size):
        return batch
    out = F.interpolate(batch, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0.0, 1.0)


def fashion_mnist_images(count: int, size: int, root: Path = FASHION_MNIST_DIR) -> torch.Tensor:
    """Fashion-MNIST test images as the data loaders present them: padded 28→32, grey → 3 channels.

    Resized to `size` afterwards when a model works at another resolution (the paper scale).
    """
    images, _ = fashion_mnist_test(count, root)
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    x = F.pad(x, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()
    return _resize(x, size)


def photo_images(count: int, size: int) -> torch.Tensor:
    """`count` scikit-image colour photos, centre-cropped square and resized to size×size, in [0, 1]."""
    try:
        import skimage.data
    except ImportError as exc:
        raise SampleDataMissing(
            "scikit-image is not installed; it provides the photographs for the parity gate "
            "(pip install scikit-image, part of the 'export' extra)"
        ) from exc
    out = []
    for i in range(count):
        photo = getattr(skimage.data, PHOTO_NAMES[i % len(PHOTO_NAMES)])()[..., :3]
        h, w = photo.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        crop = photo[top : top + side, left : left + side]
        tensor = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 255.0
        out.append(_resize(tensor[None], size))
    return torch.cat(out, dim=0)


def parity_images(count: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """`count` real images alternating Fashion-MNIST and photos, with a provenance tag per image.

    Alternating puts both kinds in every batch of two or more, so a batch-1 check sees a digit-like
    image and an odd batch sees both.
    """
    n_fmnist = (count + 1) // 2
    n_photo = count // 2
    fmnist = fashion_mnist_images(n_fmnist, size)
    photos = photo_images(n_photo, size) if n_photo else torch.empty(0, 3, size, size)
    images, tags = [], []
    for i in range(count):
        if i % 2 == 0:
            images.append(fmnist[i // 2])
            tags.append(f"fashion-mnist/t10k/{i // 2}")
        else:
            images.append(photos[i // 2])
            tags.append(f"skimage/{PHOTO_NAMES[(i // 2) % len(PHOTO_NAMES)]}")
    return torch.stack(images).contiguous(), tags
