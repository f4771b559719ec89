"""Fréchet distance: closed forms, float64 accumulation, the labelled helper, and EfficientNet-Lite2 on photos."""

import numpy as np
import pytest
import scipy.linalg
import torch
from skimage import data

from training.metrics.frechet import (
    EfficientNetLite2Features,
    FeatureNetwork,
    GaussianStats,
    feature_statistics,
    frechet_distance,
    image_set_frechet_distance,
)


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_diagonal_gaussians_closed_form() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_commuting_covariances_closed_form() -> None:
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu = rng.standard_normal(8)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(expected, rel=1e-9)


def test_general_case_matches_scipy_sqrtm() -> None:
    rng = np.random.default_rng(2)
    s1, s2 = _random_spd(rng, 10), _random_spd(rng, 10)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    reference = (
        np.sum((mu1 - mu2) ** 2)
        + np.trace(s1)
        + np.trace(s2)
        - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    )
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)


def test_identical_feature_sets_give_zero_even_when_singular() -> None:
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((20, 64)) * 5 + 3  # fewer samples than dims: a singular covariance
    stats = GaussianStats(64)
    stats.update(feats)
    value = frechet_distance(stats.mean, stats.cov, stats.mean, stats.cov)
    assert 0.0 <= value < 1e-8 * np.trace(stats.cov)


def test_running_stats_are_exact_in_float64_with_a_large_offset() -> None:
    rng = np.random.default_rng(4)
    feats = rng.standard_normal((300, 5)) * 1e-3 + 1e6
    stats = GaussianStats(5)
    for chunk in np.array_split(feats, 7):
        stats.update(torch.from_numpy(chunk))
    np.testing.assert_allclose(stats.mean, feats.mean(axis=0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        stats.cov, np.cov(feats, rowvar=False), rtol=0, atol=1e-12
    )  # 1e-6 of the variances
    assert stats.count == 300


def test_bad_inputs_are_named() -> None:
    eye = np.eye(3)
    with pytest.raises(ValueError, match="3×3"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), eye)
    with pytest.raises(ValueError, match="sigma2 contains NaN"):
        frechet_distance(np.zeros(3), eye, np.zeros(3), np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(np.zeros(3), np.triu(np.ones((3, 3))), np.zeros(3), eye)
    with pytest.raises(ValueError, match="at least 2 samples"):
        _ = GaussianStats(3).cov
    with pytest.raises(ValueError, match="N×3"):
        GaussianStats(3).update(np.zeros((2, 4)))


class _ChannelMoments:
    """A fake feature network (unit-test only): per-channel mean and std of the pixels."""

    name = "channel-moments"
    dim = 6

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        return torch.cat([x01.mean(dim=(2, 3)), x01.std(dim=(2, 3))], dim=1)


def test_image_set_helper_labels_the_network_and_counts() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 3, 8, 8, generator=g)
    net = _ChannelMoments()
    assert isinstance(net, FeatureNetwork)
    same = image_set_frechet_distance(images, images, net, batch_size=16)
    assert same["fd"] < 1e-10 and same["fd_network"] == "channel-moments"
    assert same["num_samples"] == 40 and same["num_reference_samples"] == 40
    darker = image_set_frechet_distance(list(images.split(9)), images * 0.5, net)
    assert darker["fd"] > 0.01 and darker["num_samples"] == 40
    cached = feature_statistics(images * 0.5, net)
    assert image_set_frechet_distance(images, cached, net)["fd"] == pytest.approx(darker["fd"], rel=1e-9)
    assert "fid" not in same


def _photo_crops(n: int, g: torch.Generator) -> torch.Tensor:
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    tensors = [torch.from_numpy(p.copy()).permute(2, 0, 1).float() / 255 for p in photos]
    crops = []
    for i in range(n):
        p = tensors[i % len(tensors)]
        r = int(torch.randint(0, p.shape[1] - 96, (1,), generator=g))
        c = int(torch.randint(0, p.shape[2] - 96, (1,), generator=g))
        crops.append(p[:, r : r + 96, c : c + 96])
    return torch.stack(crops)


def test_efficientnet_lite2_features_rank_noise_above_sampling() -> None:
    net = EfficientNetLite2Features()
    assert isinstance(net, FeatureNetwork) and net.name == "efficientnet-lite2"
    g = torch.Generator().manual_seed(0)
    a, b = _photo_crops(16, g), _photo_crops(16, g)
    noisy = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    fa = net.features(a)
    assert fa.shape == (16, 1280) and torch.isfinite(fa).all()
    assert torch.equal(net.features(a[:4]), net.features(a[:4]))  # deterministic call to call
    other = EfficientNetLite2Features().train()  # a fresh load; train() must not leave eval mode
    assert not other.training and torch.allclose(other.features(a[:2]), fa[:2], atol=1e-4)
    stats = {}
    for key, feats in (("a", fa), ("b", net.features(b)), ("noisy", net.features(noisy))):
        stats[key] = GaussianStats(1280)
        stats[key].update(feats)
    fd_same = frechet_distance(stats["a"].mean, stats["a"].cov, stats["b"].mean, stats["b"].cov)
    fd_noise = frechet_distance(stats["a"].mean, stats["a"].cov, stats["noisy"].mean, stats["noisy"].cov)
    assert 0 < fd_same < fd_noise / 1.3
    with pytest.raises(ValueError, match="B×3×H×W"):
        net.features(torch.rand(2, 1, 32, 32))
