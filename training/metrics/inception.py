"""The FID InceptionV3 (pool3, 2048-d) in pure torch, loading the user's converted TF weights file.

FID is only comparable across papers when it uses the 2015-12-05 TensorFlow Inception graph. Its
PyTorch conversion, ``pt_inception-2015-12-05-6726825d.pth``, differs from the stock ImageNet
InceptionV3 in three pooling details that this module reproduces: the average pools inside the
35×35, 17×17 and first 8×8 mixed blocks exclude padding from the mean, and the last 8×8 block max-pools
its pool branch. No registry package ships that file, so the path comes from the caller or the
``PAE_FID_INCEPTION`` environment variable, and without it FID cannot be computed (report an FD on
another network instead, under that network's name).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.hashing import sha256_file
from training.metrics.frechet import check_images01

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_ENV = "PAE_FID_INCEPTION"
FID_INPUT_SIZE = 299
FID_NUM_CLASSES = 1008  # the TF graph's classifier size; its weights are in the file but unused here
_IGNORED_KEYS = ("fc.weight", "fc.bias")


class FIDWeightsMissing(FileNotFoundError):
    """The FID Inception weights file is not where the caller or the environment said."""


class ConvBN(nn.Module):
    """Conv (no bias) → BatchNorm (eps 1e-3, as in the TF graph) → ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_no_pad(x: torch.Tensor) -> torch.Tensor:
    """3×3 stride-1 average pool whose border windows average only the real pixels (TF semantics)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class Block35(nn.Module):
    """35×35 mixed block (Mixed_5b/c/d): 1×1, 5×5, double 3×3 and pooled branches."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class Reduce35(nn.Module):
    """35×35 → 17×17 reduction (Mixed_6a)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, bd, bp], dim=1)


class Block17(nn.Module):
    """17×17 mixed block (Mixed_6b–e) with factorised 1×7 / 7×1 convolutions."""

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([b1, b7, bd, bp], dim=1)


class Reduce17(nn.Module):
    """17×17 → 8×8 reduction (Mixed_7a)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class Block8(nn.Module):
    """8×8 mixed block (Mixed_7b/c) with split 1×3 / 3×1 heads.

    ``max_pool_branch`` selects the FID graph's pooling: Mixed_7b average-pools (padding excluded),
    Mixed_7c max-pools.
    """

    def __init__(self, cin: int, max_pool_branch: bool) -> None:
        super().__init__()
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], dim=1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], dim=1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool_branch else _avg_pool_no_pad(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], dim=1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 trunk up to pool3 with the FID graph's pooling; implements `FeatureNetwork`.

    Parameter and buffer names follow the layout of the converted weights file, so its state dict
    (minus the unused 1008-way classifier) loads directly.
    """

    name = "inception-v3-fid"
    dim = 2048

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = Block35(192, pool_features=32)
        self.Mixed_5c = Block35(256, pool_features=64)
        self.Mixed_5d = Block35(288, pool_features=64)
        self.Mixed_6a = Reduce35(288)
        self.Mixed_6b = Block17(768, c7=128)
        self.Mixed_6c = Block17(768, c7=160)
        self.Mixed_6d = Block17(768, c7=160)
        self.Mixed_6e = Block17(768, c7=192)
        self.Mixed_7a = Reduce17(768)
        self.Mixed_7b = Block8(1280, max_pool_branch=False)
        self.Mixed_7c = Block8(2048, max_pool_branch=True)
        self.weights_sha256: str | None = None
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FIDInceptionV3:
        """Stay in eval mode: batch-norm statistics must never move during evaluation."""
        return super().train(False)

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """The 2048-d pool3 features of an already-resized, [-1, 1]-scaled 299×299 batch."""
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.Conv2d_2b_3x3(x)
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = F.max_pool2d(x, 3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return x.mean(dim=(2, 3))

    @torch.no_grad()
    def features(self, x01: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] of any size → (B, 2048). Bilinear resize to 299 (no antialias) and scaling
        to [-1, 1] reproduce the reference FID preprocessing."""
        check_images01(x01, "FID inception features")
        device = self.Conv2d_1a_3x3.conv.weight.device
        x = x01.to(device=device, dtype=torch.float32)
        if x.shape[-2:] != (FID_INPUT_SIZE, FID_INPUT_SIZE):
            x = F.interpolate(x, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False)
        return self.pool3(2.0 * x - 1.0)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.features(x01)


def resolve_fid_weights(path: str | os.PathLike | None = None) -> Path:
    """The weights file from the argument, else ``$PAE_FID_INCEPTION``; a directory means the file inside it."""
    source = path if path is not None else os.environ.get(FID_WEIGHTS_ENV)
    if not source:
        raise FIDWeightsMissing(
            f"FID needs the InceptionV3 weights file {FID_WEIGHTS_FILE}: pass its path or set "
            f"{FID_WEIGHTS_ENV}. Without it, report an FD on another network (e.g. efficientnet-lite2), "
            "never an FID."
        )
    candidate = Path(source).expanduser()
    if candidate.is_dir():
        candidate = candidate / FID_WEIGHTS_FILE
    if not candidate.is_file():
        raise FIDWeightsMissing(
            f"FID needs the InceptionV3 weights file {FID_WEIGHTS_FILE}, but {candidate} does not exist "
            f"(given by {'argument' if path is not None else FID_WEIGHTS_ENV})."
        )
    return candidate


def load_fid_inception(path: str | os.PathLike | None = None) -> FIDInceptionV3:
    """Build the FID Inception and load the user's weights (``torch.load(weights_only=True)``).

    Every trunk tensor must be present with the right shape; the file's classifier is ignored and
    batch-norm step counters, which the converted file may omit, are not required.
    """
    file = resolve_fid_weights(path)
    state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a state dict of tensors, got {type(state).__name__}")
    model = FIDInceptionV3()
    expected = model.state_dict()
    unexpected = sorted(k for k in state if k not in expected and k not in _IGNORED_KEYS)
    missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
    if unexpected or missing:
        raise ValueError(
            f"{file} is not the FID Inception state dict: missing {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}"
        )
    for key, tensor in state.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{file}: tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
            )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    model.weights_sha256 = sha256_file(file)
    return model.eval()
