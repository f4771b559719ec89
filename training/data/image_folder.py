"""ImageFolder reader in the ImageNet layout (`<split>/<wnid>/<image>`), ADM centre crop, PIL only."""

from __future__ import annotations

import json
import os

import torch
from PIL import Image, UnidentifiedImageError

from training.data.base import LabeledImages
from training.data.transforms import adm_center_crop, pil_to_tensor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def read_class_index(path: str) -> dict[str, tuple[int, str]]:
    """Read a class-index JSON into {wnid: (index, name)}.

    Two layouts are accepted because both are common for ImageNet:
    `{"n01440764": 0, ...}` (wnid → index; the name is the wnid) and the Keras-style
    `{"0": ["n01440764", "tench"], ...}` (index → [wnid, name]).
    """
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read class-index JSON {path}: {exc}") from exc
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: class index must be a non-empty JSON object")
    out: dict[str, tuple[int, str]] = {}
    for key, value in raw.items():
        if isinstance(value, int) and not isinstance(value, bool):
            out[key] = (value, key)
        elif (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, str) for v in value)
            and key.isdigit()
        ):
            out[value[0]] = (int(key), value[1])
        else:
            raise ValueError(f"{path}: entry {key!r}: {value!r} is neither wnid→int nor index→[wnid, name]")
    indices = sorted(i for i, _ in out.values())
    if indices != list(range(len(indices))):
        raise ValueError(f"{path}: class indices must be exactly 0..{len(indices) - 1} without gaps")
    return out


class ImageFolder(LabeledImages):
    """Images under `root/<class dir>/`, labelled by class dir; centre-cropped the ADM way.

    Without a class index, classes are the sorted directory names (the ImageNet convention, which
    makes sorted wnids the standard 0..999 labels). With one, every class dir must appear in it.
    """

    def __init__(self, root: str, image_size: int = 256, class_index: str | None = None) -> None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        class_dirs = sorted(
            d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")
        )
        if not class_dirs:
            raise ValueError(f"{root}: no class sub-directories (expected <root>/<class>/<image>)")
        if class_index is None:
            mapping = {d: (i, d) for i, d in enumerate(class_dirs)}
        else:
            mapping = read_class_index(class_index)
            unknown = [d for d in class_dirs if d not in mapping]
            if unknown:
                raise ValueError(f"{root}: class dirs {unknown[:5]} are not in the class index {class_index}")
        names = [""] * len(mapping)
        for index, name in mapping.values():
            names[index] = name
        self.class_names = tuple(names)
        self.image_size = image_size
        self.samples: list[tuple[str, int]] = []
        for d in class_dirs:
            folder = os.path.join(root, d)
            for fname in sorted(os.listdir(folder)):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    self.samples.append((os.path.join(folder, fname), mapping[d][0]))
        if not self.samples:
            raise ValueError(f"{root}: no images with extensions {IMAGE_EXTENSIONS} in any class dir")
        self.root = root

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[self._check_index(index)]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"cannot decode image {path}: {exc}") from exc
        return pil_to_tensor(adm_center_crop(img, self.image_size)), label
