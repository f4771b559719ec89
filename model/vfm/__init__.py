"""Frozen vision foundation models behind one interface: image in [0, 1] → B×N×D patch tokens."""

from __future__ import annotations

from .base import CNN_KINDS, VFM_KINDS, FrozenVFM, VFMSpec, VFMWeightsMissing, normalize_image
from .efficientnet import EfficientNetLiteVFM
from .hf import HF_KINDS, HFVisionVFM

__all__ = [
    "CNN_KINDS",
    "HF_KINDS",
    "VFM_KINDS",
    "EfficientNetLiteVFM",
    "FrozenVFM",
    "HFVisionVFM",
    "VFMSpec",
    "VFMWeightsMissing",
    "build_vfm",
    "normalize_image",
]


def build_vfm(spec: VFMSpec) -> FrozenVFM:
    """Load the frozen encoder `spec` names, from local files only (VFMWeightsMissing if absent)."""
    if spec.kind in CNN_KINDS:
        return EfficientNetLiteVFM(spec)
    if spec.kind in HF_KINDS:
        return HFVisionVFM(spec)
    raise ValueError(f"no loader for VFM kind {spec.kind!r}; known kinds: {VFM_KINDS}")
