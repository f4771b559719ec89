"""The conditional-accuracy classifier: learns real digits, is seeded, round-trips through safetensors."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from model.idx import read_idx
from training.metrics.classifier import (
    ClassifierConfig,
    SmallCNN,
    accuracy,
    load_classifier,
    predict,
    save_classifier,
    train_classifier,
)

TINY = ClassifierConfig(widths=(8, 16, 32))
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 8×8 digits (0..16) upscaled to 3×32×32 in [0, 1]."""
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float()[:, None] / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    return images.contiguous(), torch.from_numpy(bunch.target).long()


@pytest.fixture(scope="module")
def trained(digits: tuple[torch.Tensor, torch.Tensor]) -> SmallCNN:
    images, labels = digits
    return train_classifier(
        TensorDataset(images[:1400], labels[:1400]), steps=60, seed=0, batch_size=64, lr=1e-2, cfg=TINY
    )


def test_beats_chance_clearly_on_held_out_digits(
    trained: SmallCNN, digits: tuple[torch.Tensor, torch.Tensor]
) -> None:
    images, labels = digits
    assert accuracy(trained, images[1400:], labels[1400:]) > 0.6  # chance is 0.1


def test_same_seed_same_model(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = digits
    data = TensorDataset(images[:256], labels[:256])
    a = train_classifier(data, steps=3, seed=4, batch_size=32, cfg=TINY)
    b = train_classifier(data, steps=3, seed=4, batch_size=32, cfg=TINY)
    c = train_classifier(data, steps=3, seed=5, batch_size=32, cfg=TINY)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(a.head.weight, c.head.weight)


def test_safetensors_round_trip(
    trained: SmallCNN, digits: tuple[torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    images, _ = digits
    path = tmp_path / "classifier.safetensors"
    save_classifier(trained, path)
    loaded = load_classifier(path)
    assert loaded.cfg == TINY
    assert torch.equal(predict(loaded, images[:200]), predict(trained, images[:200]))


def test_bad_inputs_are_named(trained: SmallCNN, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"B×3×32×32"):
        trained(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="one label per image"):
        accuracy(trained, torch.rand(4, 3, 32, 32), torch.zeros(3, dtype=torch.long))
    with pytest.raises(FileNotFoundError, match="classifier weights not found"):
        load_classifier(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, str(foreign))
    with pytest.raises(ValueError, match="classifier_config"):
        load_classifier(foreign)
    bad_labels = TensorDataset(torch.rand(8, 3, 32, 32), torch.full((8,), 12))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        train_classifier(bad_labels, steps=1, seed=0, batch_size=4, cfg=TINY)


def _fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """IDX files → 3×32×32 images in [0, 1] (28×28 zero-padded by 2, grey replicated) and labels."""
    prefix = "train" if split == "train" else "t10k"
    pixels = read_idx(FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz", (None, 28, 28))
    labels = read_idx(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz", (None,))
    images = F.pad(torch.from_numpy(pixels).float() / 255, (2, 2, 2, 2))[:, None].expand(-1, 3, -1, -1)
    return images.contiguous(), torch.from_numpy(labels.astype(np.int64))


@pytest.mark.slow
def test_default_classifier_reaches_88_percent_on_fashion_mnist() -> None:
    """The shipped recipe (default config, 600 steps of 128) trains in minutes on a CPU."""
    train_x, train_y = _fashion_mnist("train")
    test_x, test_y = _fashion_mnist("test")
    start = time.perf_counter()
    model = train_classifier(TensorDataset(train_x, train_y), steps=600, seed=0)
    seconds = time.perf_counter() - start
    acc = accuracy(model, test_x, test_y)
    print(f"fashion-mnist test accuracy {acc:.4f} after {seconds:.0f} s of training")
    assert acc >= 0.88
