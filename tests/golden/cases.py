"""The fixed requests of the golden test and where their answers are kept."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

GOLDEN_DIR = Path(__file__).with_name("fmnist32-tiny")

CASES: list[dict] = [
    {"class_label": 0, "seed": 0},
    {"class_label": "Sneaker", "seed": 7},
    {"class_label": 9, "seed": 123, "steps": 10, "sampler": "heun"},
    {"class_label": 3, "seed": 5, "steps": 12, "sampler": "sde"},
    {"class_label": 1, "seed": 42, "steps": 8, "cfg_scale": 1.0},
    {"class_label": 4, "seed": 2**40, "steps": 6, "shift": 1.0, "cfg_interval": [0.0, 1.0]},
]


def golden_name(case: dict) -> str:
    """`gen-<n>`, n the case's place in CASES (append new cases; never reorder)."""
    return f"gen-{CASES.index(case)}"


def encode_input() -> bytes:
    """A fixed 48×40 RGB PNG (a smooth pattern, no randomness from any library version)."""
    yy, xx = np.mgrid[0:40, 0:48]
    rgb = np.stack([(xx * 5) % 256, (yy * 6) % 256, ((xx + yy) * 3) % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()
