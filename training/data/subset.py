"""A class-balanced prefix of a dataset: the first `per_class` images of every class.

The default preset trains on such a subset so the whole pipeline fits a 2-core budget; taking a
prefix per class (not a random draw) keeps the subset identical across runs and machines.
"""

from __future__ import annotations

import torch

from training.data.base import LabeledImages


class ClassBalancedSubset(LabeledImages):
    """The first `per_class` items of each class of `base`, in `base` order."""

    def __init__(self, base: LabeledImages, per_class: int, labels: list[int] | None = None) -> None:
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        self.base = base
        self.class_names = base.class_names
        self.image_size = base.image_size
        all_labels = labels if labels is not None else _labels_of(base)
        counts = [0] * len(base.class_names)
        self.indices: list[int] = []
        for index, label in enumerate(all_labels):
            if counts[label] < per_class:
                counts[label] += 1
                self.indices.append(index)
        short = [base.class_names[c] for c, n in enumerate(counts) if n < per_class]
        if short:
            raise ValueError(f"classes {short} have fewer than {per_class} images; lower per_class")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.base[self.indices[self._check_index(index)]]


def _labels_of(base: LabeledImages) -> list[int]:
    """Labels without decoding images when the dataset keeps them as a tensor (the IDX loaders do)."""
    labels = getattr(base, "labels", None)
    if labels is not None:
        return [int(v) for v in labels]
    return [int(base[i][1]) for i in range(len(base))]
