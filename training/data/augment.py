"""Horizontal-flip augmentation as dataset wrappers.

Two forms, because the pipeline needs both: `RandomHFlip` for plain image training, and
`WithFlips`, which doubles the index space (i < N: original, i ≥ N: mirrored) so the flip is a
deterministic function of the index. That is what lets the VFM feature cache and the latent shards
store flipped samples once and still serve "random flip" augmentation by sampling indices.
"""

from __future__ import annotations

import torch

from training.data.base import LabeledImages
from training.data.transforms import hflip


class WithFlips(LabeledImages):
    """Length 2N: item i is `base[i]`, item N + i is `base[i]` mirrored left-right."""

    def __init__(self, base: LabeledImages) -> None:
        self.base = base
        self.class_names = base.class_names
        self.image_size = base.image_size

    def __len__(self) -> int:
        return 2 * len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = self._check_index(index)
        n = len(self.base)
        image, label = self.base[i % n]
        return (hflip(image) if i >= n else image), label


class RandomHFlip(LabeledImages):
    """Mirror each item with probability `p`, drawn from torch's RNG (seeded per DataLoader worker)."""

    def __init__(self, base: LabeledImages, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must lie in [0, 1], got {p}")
        self.base, self.p = base, p
        self.class_names = base.class_names
        self.image_size = base.image_size

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[self._check_index(index)]
        if torch.rand(()).item() < self.p:
            image = hflip(image)
        return image, label
