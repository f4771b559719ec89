"""PSNR and SSIM agree with scikit-image per image, on noise and on a real photograph."""

import numpy as np
import pytest
import torch
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from training.metrics.recon import gaussian_window, psnr, ssim


def _pairs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    photo = torch.from_numpy(data.astronaut()[::8, ::8].copy()).permute(2, 0, 1).float() / 255  # 3×64×64
    clean = torch.stack([photo[:, :40, :36], photo[:, 20:60, 10:46], torch.rand(3, 40, 36, generator=g)])
    noisy = (clean + 0.1 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    noisy[2] = torch.rand(3, 40, 36, generator=g)  # an unrelated pair, SSIM near 0
    return clean, noisy


def _np(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def test_psnr_matches_skimage_per_image_and_mean() -> None:
    x, y = _pairs()
    per_image = psnr(x, y, reduction="none")
    expected = [peak_signal_noise_ratio(_np(x[i]), _np(y[i]), data_range=1.0) for i in range(3)]
    np.testing.assert_allclose(per_image.numpy(), expected, atol=1e-4)
    assert psnr(x, y).item() == pytest.approx(np.mean(expected), abs=1e-4)


def test_ssim_matches_skimage_gaussian_population_covariance() -> None:
    x, y = _pairs()
    per_image = ssim(x, y, reduction="none")
    expected = [
        structural_similarity(
            _np(x[i]),
            _np(y[i]),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=0,
        )
        for i in range(3)
    ]
    np.testing.assert_allclose(per_image.numpy(), expected, atol=1e-4)
    assert ssim(x, y).item() == pytest.approx(np.mean(expected), abs=1e-4)
    assert expected[0] > 0.3 > abs(expected[2])  # the cases really differ, so agreement means something


def test_identical_images_and_window() -> None:
    x, _ = _pairs()
    assert psnr(x, x).item() == pytest.approx(100.0)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    window = gaussian_window()
    assert window.numel() == 11 and window.sum().item() == pytest.approx(1.0)


def test_bad_inputs_are_named() -> None:
    x, y = _pairs()
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(x, y[:, :, :-1])
    with pytest.raises(ValueError, match="at least 11"):
        ssim(x[:, :, :8, :8], y[:, :, :8, :8])
    with pytest.raises(ValueError, match="B×C×H×W"):
        ssim(x[0], y[0])
    with pytest.raises(ValueError, match="reduction"):
        psnr(x, y, reduction="sum")
