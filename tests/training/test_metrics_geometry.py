"""SSC, LPC, GSQ and eRank on latents whose geometry is known by construction."""

import pytest
import torch

from training.metrics.geometry import erank, foreground_masks, gsq, lpc, lpc_weights, ssc


def _clustered_tokens(masks: torch.Tensor, dim: int, noise: float, g: torch.Generator) -> torch.Tensor:
    """B×dim×h×w latents whose token is its mask label's prototype plus a little noise."""
    prototypes = torch.randn(int(masks.max()) + 1, dim, generator=g)
    tokens = prototypes[masks] + noise * torch.randn(*masks.shape, dim, generator=g)
    return tokens.permute(0, 3, 1, 2).contiguous()


def _region_masks(b: int, g: torch.Generator) -> torch.Tensor:
    """Per image, a rectangle of class 1 and a second one of class 2 on a background of 0 (8×8 grid)."""
    masks = torch.zeros(b, 8, 8, dtype=torch.long)
    for i in range(b):
        r, c = (int(v) for v in torch.randint(0, 4, (2,), generator=g))
        masks[i, r : r + 4, c : c + 3] = 1
        masks[i, 6:, :] = 2
    return masks


def test_ssc_high_when_tokens_cluster_by_mask_low_when_random() -> None:
    g = torch.Generator().manual_seed(0)
    masks = _region_masks(4, g)
    clustered = _clustered_tokens(masks, 16, 0.1, g)
    random_tokens = torch.randn(4, 16, 8, 8, generator=g)
    assert ssc(clustered, masks) > 0.8
    assert ssc(random_tokens, masks) < 0.3


def test_ssc_validates_masks() -> None:
    latents = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="2×8×8"):
        ssc(latents, torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        ssc(latents, torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="single label"):
        ssc(latents, torch.zeros(2, 8, 8, dtype=torch.long))


def test_foreground_masks_area_average_and_threshold() -> None:
    images = torch.zeros(1, 3, 32, 32)
    images[:, :, 4:16, 8:20] = 0.8  # exactly cells (1..3, 2..4) of the 8×8 grid (4-pixel cells)
    images[:, :, 28:30, 28:32] = 0.8  # half of cell (7, 7): object at threshold 0.5, not at 0.75
    masks = foreground_masks(images, 8)
    expected = torch.zeros(1, 8, 8, dtype=torch.long)
    expected[0, 1:4, 2:5] = 1
    expected[0, 7, 7] = 1
    assert masks.dtype == torch.long and torch.equal(masks, expected)
    assert foreground_masks(images, 8, threshold=0.75)[0, 7, 7] == 0
    assert foreground_masks(images, (4, 2)).shape == (1, 4, 2)
    with pytest.raises(ValueError, match="grid"):
        foreground_masks(images, 64)


def test_gsq_perfect_for_separated_classes_chance_for_random() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 10
    centres = torch.randn(10, 32, generator=g) * 3
    separated = (centres[labels] + 0.2 * torch.randn(400, 32, generator=g))[:, :, None, None].expand(
        -1, -1, 2, 2
    )
    assert gsq(separated, labels, chunk=128) == 1.0
    random_latents = torch.randn(400, 32, 2, 2, generator=g)
    assert abs(gsq(random_latents, labels) - 0.1) < 0.06
    with pytest.raises(ValueError, match="one label per latent"):
        gsq(random_latents, labels[:-1])


def test_erank_rank_one_and_isotropic() -> None:
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=g)
    rank_one = torch.randn(200, 1, generator=g) * direction  # pooled N×C
    assert erank(rank_one) == pytest.approx(1 / 16, abs=1e-6)
    isotropic = torch.randn(4000, 16, 2, 2, generator=g)
    assert erank(isotropic) > 0.97
    assert erank(rank_one[:, :, None, None].expand(-1, -1, 3, 3)) == pytest.approx(1 / 16, abs=1e-6)


class _LinearDecoder:
    """A fake decoder (unit-test only): 0.5 + gain·W z, kept inside [0, 1] so clamping never acts."""

    def __init__(self, gain: float) -> None:
        self.weight = torch.randn(3 * 8 * 8, 4 * 4 * 4, generator=torch.Generator().manual_seed(7))
        self.gain = gain

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return 0.5 + self.gain * (z.flatten(1) @ self.weight.T).view(-1, 3, 8, 8)


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A fake perceptual distance (unit-test only): per-image mean absolute difference."""
    return (a - b).abs().flatten(1).mean(dim=1)


def test_lpc_weights_scale_and_smoothness() -> None:
    weights = lpc_weights((0.1, 0.5, 1.0, 2.0))
    assert weights == pytest.approx([0.7407, 0.1481, 0.0741, 0.0370], abs=1e-4)
    latents = torch.randn(6, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    smooth = lpc(latents, _LinearDecoder(0.001), _mean_abs, generator=torch.Generator().manual_seed(2))
    rough = lpc(latents, _LinearDecoder(0.003), _mean_abs, generator=torch.Generator().manual_seed(2))
    assert rough["lpc"] == pytest.approx(3 * smooth["lpc"], rel=1e-6)
    per_rho = smooth["per_rho"]
    # A linear decoder moves by ε·|W u| with ε = ρ‖z‖, so each scale is proportional to ρ ...
    for rho in ("0.5", "1.0", "2.0"):
        assert per_rho[rho] == pytest.approx(per_rho["0.1"] * float(rho) / 0.1, rel=1e-5)
    # ... and the score is the 1/ρ-weighted sum of the scales.
    assert smooth["lpc"] == pytest.approx(
        sum(w * per_rho[r] for r, w in smooth["weights"].items()), rel=1e-12
    )


def test_lpc_is_seeded_and_validates_the_distance() -> None:
    latents = torch.randn(3, 4, 4, 4)
    decoder = _LinearDecoder(0.001)
    a = lpc(latents, decoder, _mean_abs, generator=torch.Generator().manual_seed(5), batch_size=2)
    b = lpc(latents, decoder, _mean_abs, generator=torch.Generator().manual_seed(5), batch_size=2)
    assert a == b
    with pytest.raises(ValueError, match="one distance per image"):
        lpc(latents, decoder, lambda x, y: (x - y).abs().mean())
    with pytest.raises(ValueError, match="positive scales"):
        lpc(latents, decoder, _mean_abs, rhos=(0.0, 1.0))
