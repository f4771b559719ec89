"""The one interface every frozen vision foundation model (VFM) sits behind.

PAE only ever needs three things from its encoder: how to turn an image in [0, 1] into the encoder's
input (`normalize`), the grid of patch tokens it produces (`features`), and a stable key for caching
those tokens (`fingerprint`). Keeping that surface small lets a CNN (EfficientNet-Lite, the default
scale) and Hugging Face ViTs (DINOv2/v3, SigLIP2, MAE, the paper scale) be swapped by a preset alone.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

from model.validation import one_of, positive_ints

VFM_KINDS = ("efficientnet-lite0", "efficientnet-lite2", "dinov2", "dinov3", "siglip2", "mae")
CNN_KINDS = ("efficientnet-lite0", "efficientnet-lite2")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

# Bumped whenever the meaning of `features` changes (token selection, final norm), so cached tokens made
# by older code are never mistaken for current ones.
FEATURE_SEMANTICS = "patch-tokens/final-ln-no-affine/v1"


class VFMWeightsMissing(FileNotFoundError):
    """The frozen encoder's weights are not where the spec says; nothing is ever downloaded instead."""


@dataclass(frozen=True)
class VFMSpec:
    """What a frozen encoder is and how images are prepared for it.

    `grid` is the side of the token grid it yields at `input_size`; `stride` is the feature-map tap of a
    CNN (ignored by ViTs, whose stride is their patch size); `heads` is the head count the modules that
    attend over these tokens (DAM, projector) use.
    """

    kind: str
    input_size: int
    dim: int
    heads: int
    grid: int
    path: str | None = None
    stride: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        one_of(self, "kind", VFM_KINDS)
        positive_ints(self, "input_size", "dim", "heads", "grid")
        if self.input_size % self.grid:
            raise ValueError(f"VFMSpec.input_size {self.input_size} is not a multiple of grid {self.grid}")
        if self.dim % self.heads:
            raise ValueError(f"VFMSpec.dim {self.dim} is not divisible by heads {self.heads}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"VFMSpec.mean/std need 3 values (RGB), got {self.mean!r} / {self.std!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"VFMSpec.std must be positive, got {self.std!r}")
        if self.kind in CNN_KINDS:
            if self.stride is None:
                raise ValueError(f"VFMSpec.stride (the feature-map tap) is required for {self.kind}")
            if self.grid * self.stride != self.input_size:
                raise ValueError(
                    f"{self.kind}: grid {self.grid} × stride {self.stride} must equal input_size {self.input_size}"
                )

    @property
    def patch(self) -> int:
        """Input pixels per token side; also the kernel and stride of DAM's pixel patchify."""
        return self.input_size // self.grid


def normalize_image(x01: torch.Tensor, spec: VFMSpec, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Resize to the encoder's input size (bicubic, as PAE does) and standardise with its statistics.

    A free function because PAE's DAM needs the same normalised image even when cached VFM tokens let it
    skip the VFM itself. `mean`/`std` are 1×3×1×1 tensors already on the right device.
    """
    if x01.ndim != 4 or x01.shape[1] != 3:
        raise ValueError(f"images must be B×3×H×W in [0, 1], got shape {tuple(x01.shape)}")
    if x01.shape[-2] != spec.input_size or x01.shape[-1] != spec.input_size:
        x01 = F.interpolate(x01, size=(spec.input_size, spec.input_size), mode="bicubic", align_corners=False)
    return (x01 - mean) / std


def stats_tensor(values: tuple[float, float, float]) -> torch.Tensor:
    """RGB statistics as a broadcastable 1×3×1×1 float32 tensor."""
    return torch.tensor(values, dtype=torch.float32).reshape(1, 3, 1, 1)


class FrozenVFM(nn.Module, ABC):
    """Base class: a pretrained encoder that is always in eval mode and never receives gradients.

    Subclasses load their network in `__init__`, call `_freeze()` again once it is attached (new
    submodules start in training mode with gradients on), and implement `features` and
    `_weights_digest` (a hash of the weights they loaded).
    """

    def __init__(self, spec: VFMSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("mean", stats_tensor(spec.mean), persistent=False)
        self.register_buffer("std", stats_tensor(spec.std), persistent=False)
        self._fingerprint: str | None = None
        self._freeze()

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenVFM:
        """Ignores `mode`: BatchNorm statistics and dropout of a frozen encoder must never change."""
        return super().train(False)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """B×3×H×W in [0, 1] → B×3×S×S standardised encoder input (S = spec.input_size)."""
        return normalize_image(x01, self.spec, self.mean, self.std)

    @abstractmethod
    def features(self, x_norm: torch.Tensor) -> torch.Tensor:
        """Standardised B×3×S×S input → B×N×D patch tokens in row-major grid order (N = grid²)."""

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x01))

    @abstractmethod
    def _weights_digest(self) -> str:
        """sha256 of the loaded weights (file bytes)."""

    def fingerprint(self) -> str:
        """sha256 over the weights and everything that shapes the tokens: the feature-cache key.

        The weights' location and `heads` are left out on purpose: neither changes the tokens, so
        neither may split the cache.
        """
        if self._fingerprint is None:
            prep = asdict(self.spec)
            prep.pop("path")
            prep.pop("heads")  # a choice of the modules downstream; the tokens do not depend on it
            prep["resize"] = "bicubic/align_corners=False"
            prep["semantics"] = FEATURE_SEMANTICS
            payload = json.dumps({"weights": self._weights_digest(), "preprocessing": prep}, sort_keys=True)
            self._fingerprint = hashlib.sha256(payload.encode()).hexdigest()
        return self._fingerprint


class UsesFrozenVFM(nn.Module):
    """Base of the autoencoders built on a frozen VFM they use but do not own.

    The VFM sits outside the module tree, so it is never in `state_dict()`, an optimiser or an EMA
    copy, yet it follows `.to()` / `.cuda()` / `.half()` with its user. `vfm` may be None when VFM
    tokens are always passed in (the feature cache, parameter counting on the meta device). `mean`
    and `std` are the VFM's input statistics (buffers, not saved).
    """

    def __init__(self, spec: VFMSpec, vfm: FrozenVFM | None) -> None:
        super().__init__()
        if vfm is not None and vfm.spec != spec:
            raise ValueError(f"the VFM's spec {vfm.spec} differs from PAEConfig.vfm {spec}")
        self._vfm_holder: list[FrozenVFM] = [] if vfm is None else [vfm]
        self.register_buffer("mean", stats_tensor(spec.mean), persistent=False)
        self.register_buffer("std", stats_tensor(spec.std), persistent=False)

    @property
    def vfm(self) -> FrozenVFM | None:
        return self._vfm_holder[0] if self._vfm_holder else None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        super()._apply(fn, recurse)
        if self._vfm_holder:
            self._vfm_holder[0]._apply(fn, recurse)
        return self
