"""Reconstruction metrics: PSNR and SSIM on batched torch images in [0, 1].

Both are computed per image and then averaged, so the result does not depend on how the evaluation
set is split into batches. SSIM follows Wang et al. (2004) with the Gaussian window used by
scikit-image (`gaussian_weights=True, sigma=1.5, use_sample_covariance=False`), which is the
reference the tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # scipy.ndimage's truncation as used by scikit-image: radius int(3.5*1.5+0.5) = 5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
PSNR_MIN_MSE = 1e-10  # identical images give 100 dB instead of inf, which would poison the mean


def _check_pair(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: expected two torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name}: expected images shaped B×C×H×W, got shape {tuple(x.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"{name}: image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: empty batch")


def _reduce(values: torch.Tensor, reduction: str, name: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"{name}: reduction must be 'mean' or 'none', got {reduction!r}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per image (``reduction='none'`` → (B,)) or its mean.

    The MSE is floored at ``PSNR_MIN_MSE`` so a perfect reconstruction counts as 100 dB rather than
    making the dataset mean infinite.
    """
    _check_pair(x, y, "psnr")
    if data_range <= 0:
        raise ValueError(f"psnr: data_range must be positive, got {data_range}")
    diff = x.detach().double() - y.detach().double()
    mse = diff.pow(2).flatten(1).mean(dim=1).clamp_min(PSNR_MIN_MSE)
    values = 10.0 * torch.log10(data_range**2 / mse)
    return _reduce(values, reduction, "psnr").float()


def gaussian_window(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> torch.Tensor:
    """The normalised 1-D Gaussian that scipy.ndimage.gaussian_filter applies along each axis."""
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Structural similarity, per channel with an 11-tap Gaussian window (σ = 1.5), then averaged.

    scikit-image filters with reflect padding and then discards a border of the window radius, so
    the padded values never reach the pixels that are averaged; a "valid" convolution therefore gives
    exactly the same number without padding. Computed in float64 because the local variances are
    differences of nearly equal second moments.
    """
    _check_pair(x, y, "ssim")
    if data_range <= 0:
        raise ValueError(f"ssim: data_range must be positive, got {data_range}")
    window = gaussian_window().to(x.device)
    size = window.numel()
    b, c, h, w = x.shape
    if h < size or w < size:
        raise ValueError(f"ssim: images must be at least {size}×{size} for the Gaussian window, got {h}×{w}")

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(b * c, 1, t.shape[2], t.shape[3])
        t = F.conv2d(t, window.view(1, 1, size, 1))
        t = F.conv2d(t, window.view(1, 1, 1, size))
        return t

    xd = x.detach().double()
    yd = y.detach().double()
    ux, uy = blur(xd), blur(yd)
    vx = blur(xd * xd) - ux * ux
    vy = blur(yd * yd) - uy * uy
    vxy = blur(xd * yd) - ux * uy
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    s_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    values = s_map.reshape(b, -1).mean(dim=1)
    return _reduce(values, reduction, "ssim").float()
