"""Real parity inputs: Fashion-MNIST as the loaders present it, and photos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from export.samples import (
    FASHION_MNIST_DIR,
    fashion_mnist_images,
    fashion_mnist_test,
    parity_images,
    photo_images,
)

needs_fmnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed"
)


def test_missing_fashion_mnist_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dataset-fashion-mnist"):
        fashion_mnist_test(2, root=tmp_path)


@needs_fmnist
def test_fashion_mnist_is_padded_grey_replicated_and_real() -> None:
    images, labels = fashion_mnist_test(4)
    assert images.shape == (4, 28, 28) and labels.tolist() == [9, 2, 1, 1]  # the t10k set's first labels
    x = fashion_mnist_images(4, 32)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    assert float(x[:, :, :2].abs().max()) == 0.0  # the 2-pixel pad is black
    assert torch.allclose(x[:, 0, 2:30, 2:30], torch.from_numpy(images / 255.0).float())
    assert fashion_mnist_images(2, 64).shape == (2, 3, 64, 64)


def test_photos_are_colour_and_in_range() -> None:
    photos = photo_images(3, 48)
    assert photos.shape == (3, 3, 48, 48)
    assert float(photos.min()) >= 0.0 and float(photos.max()) <= 1.0
    assert float((photos[:, 0] - photos[:, 2]).abs().mean()) > 0.02  # real colour, not grey
    assert float(photos.std()) > 0.1


@needs_fmnist
def test_parity_images_alternate_sources() -> None:
    images, tags = parity_images(4, 32)
    assert images.shape == (4, 3, 32, 32)
    assert tags[0].startswith("fashion-mnist/") and tags[1] == "skimage/astronaut"
    assert tags[2] == "fashion-mnist/t10k/1" and tags[3] == "skimage/chelsea"
