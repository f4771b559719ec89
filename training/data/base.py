"""The dataset contract every loader in this package fulfils."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class LabeledImages(Dataset):
    """A map-style dataset of (image 3×H×W float32 in [0, 1], label int) with `class_names`.

    `class_names[label]` is the human-readable name; the model repository's config.json carries
    them so the service can validate class-conditional requests.
    """

    class_names: tuple[str, ...]
    image_size: int

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def _check_index(self, index: int) -> int:
        """Normalise a possibly negative index; IndexError keeps Python's iteration protocol working."""
        n = len(self)
        if not isinstance(index, int):
            index = int(index)
        if index < -n or index >= n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {n}")
        return index % n
