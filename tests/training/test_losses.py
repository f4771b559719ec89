"""PAE losses: SSR, SCR, sphere perturbation and MCR, GAN terms, adaptive weight, the combiner."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from model.pae import sphere_norm
from training.discriminator import PatchDiscriminator, diff_augment
from training.losses import (
    LossWeights,
    PAELoss,
    adaptive_gan_weight,
    hinge_d_loss,
    mcr_loss,
    nonsat_g_loss,
    quantize_fake,
    scr_loss,
    sphere_perturb,
    ssr_loss,
)
from training.recipes import get_recipe


def _latent(seed: int, b: int = 2, d: int = 8, h: int = 4, w: int = 4) -> torch.Tensor:
    return sphere_norm(torch.randn(b, d, h, w, generator=torch.Generator().manual_seed(seed)))


def _rotate(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", q, z)


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return q


def _token_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).clamp(-1, 1)
    return torch.rad2deg(torch.acos(cos))


def test_ssr_zero_for_equal_grams_rotation_invariant_positive_otherwise() -> None:
    z, target = _latent(0), _latent(1)
    q = _orthogonal(8, 2)
    assert ssr_loss(z, z).item() < 1e-12
    assert ssr_loss(z, _rotate(z, q)).item() < 1e-10  # same Gram, different channel basis
    assert ssr_loss(z, 3.0 * z).item() < 1e-12  # cosine Gram ignores token norms
    base = ssr_loss(z, target)
    assert base.item() > 1e-2
    torch.testing.assert_close(ssr_loss(_rotate(z, q), _rotate(target, q)), base)
    # a B×N×D token target of another width is fine (only the N×N Gram matters); another N is not
    wide = torch.randn(2, 16, 32)
    assert ssr_loss(z, wide).item() > 0
    assert ssr_loss(_rotate(z, q), wide).item() == pytest.approx(ssr_loss(z, wide).item(), rel=1e-5)
    with pytest.raises(ValueError, match="tokens"):
        ssr_loss(z, torch.randn(2, 5, 32))


def test_ssr_gradient_reaches_only_z() -> None:
    z, target = _latent(0).requires_grad_(), _latent(1).requires_grad_()
    ssr_loss(z, target).backward()
    assert z.grad.abs().sum() > 0 and target.grad is None


def test_scr_zero_for_aligned_positive_otherwise() -> None:
    z = _latent(3)
    scale = torch.tensor([0.5, 4.0]).view(2, 1, 1, 1)
    assert scr_loss(z * scale, z).abs().item() < 1e-6
    assert scr_loss(z, _latent(4)).item() > 0.5
    torch.testing.assert_close(scr_loss(-z, z), torch.tensor(4.0))  # both terms at their maximum, 2
    with pytest.raises(ValueError, match="must match"):
        scr_loss(z, _latent(4, d=6))


def test_sphere_perturb_angles_and_geodesic() -> None:
    z = _latent(5, b=3, d=16)
    direction = torch.randn(z.shape, generator=torch.Generator().manual_seed(6))
    for angle in (0.0, 10.0, 42.5, 85.0, 120.0):
        moved = sphere_perturb(z, angle, direction)
        rms = moved.pow(2).mean(dim=1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-5)
        assert torch.allclose(
            _token_angles(moved, z), torch.full_like(rms, angle, dtype=torch.float64), atol=0.05
        )
    with pytest.raises(ValueError, match="angle_deg"):
        sphere_perturb(z, 200.0, direction)


class _Decoder(nn.Module):
    """Tiny latent → image decoder standing in for PAE.decode in these unit tests."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Conv2d(d, 3 * 16, 1)
        self.outputs: list[torch.Tensor] = []

    @property
    def last_layer(self) -> torch.Tensor:
        return self.proj.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.sigmoid(nn.functional.pixel_shuffle(self.proj(z), 4))
        self.outputs.append(x)
        return x


def _mse_perceptual(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).flatten(1).mean(dim=1)


def test_mcr_latents_on_sphere_at_angles_on_one_geodesic() -> None:
    z = _latent(7)
    out = mcr_loss(z, _Decoder(), _mse_perceptual, generator=torch.Generator().manual_seed(0))
    for zp, angle in ((out.z_medium, 42.5), (out.z_large, 85.0)):
        rms = zp.pow(2).mean(dim=1).sqrt()
        assert (rms - 1).abs().max() < 1e-5
        assert (_token_angles(zp, z) - angle).abs().max() < 0.5
    # medium lies on the great circle between anchor and large: angles add up and it is coplanar
    between = _token_angles(z, out.z_medium) + _token_angles(out.z_medium, out.z_large)
    assert (between - _token_angles(z, out.z_large)).abs().max() < 1e-3

    def tokens(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double()

    basis = torch.stack([tokens(z), tokens(out.z_large)], dim=2)
    coef = torch.linalg.lstsq(basis, tokens(out.z_medium).unsqueeze(2)).solution
    assert (basis @ coef - tokens(out.z_medium).unsqueeze(2)).abs().max() < 1e-4
    assert torch.all(coef > 0)
    again = mcr_loss(z, _Decoder(), _mse_perceptual, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.z_medium, out.z_medium)
    assert out.loss.item() > 0 and torch.isclose(out.loss, out.medium_term + out.large_term)


def test_mcr_stop_gradients_on_targets() -> None:
    decoder = _Decoder()
    z = _latent(8).requires_grad_()
    x_anchor = decoder(z)
    x_anchor.retain_grad()
    decoder.outputs.clear()
    out = mcr_loss(z, decoder, _mse_perceptual, generator=torch.Generator().manual_seed(1), x_anchor=x_anchor)
    (x_ml,) = decoder.outputs
    grad_total = torch.autograd.grad(out.loss, x_ml, retain_graph=True)[0]
    grad_medium_only = torch.autograd.grad(out.medium_term, x_ml, retain_graph=True)[0]
    b = z.shape[0]
    # x̂_m receives gradient only from its own term: as the large term's target it is stop-gradient
    torch.testing.assert_close(grad_total[:b], grad_medium_only[:b])
    assert grad_total[b:].abs().sum() > 0
    out.loss.backward()
    assert x_anchor.grad is None  # the anchor decode is a target only
    assert z.grad is not None and z.grad.abs().sum() > 0  # the encoder is trained via z_m, z_l

    decoder.outputs.clear()
    mcr_loss(z.detach().requires_grad_(), decoder, _mse_perceptual)
    anchor, _ = decoder.outputs
    assert not anchor.requires_grad  # decoded under no_grad when no anchor is passed
    with pytest.raises(ValueError, match="0 < medium < large"):
        mcr_loss(z, decoder, _mse_perceptual, angles=(85.0, 42.5))


def test_gan_losses_known_values() -> None:
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] → mean 5/6; relu(1 + fake) = [0, 1, 2] → mean 1
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (5 / 6 + 1)))
    torch.testing.assert_close(nonsat_g_loss(torch.zeros(4)), torch.tensor(math.log(2.0)))
    assert nonsat_g_loss(torch.full((4,), 10.0)).item() < 1e-4


def test_adaptive_gan_weight_matches_hand_computation() -> None:
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]]))
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]])
    target = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    out = layer(x)
    rec = (out - target).abs().mean()
    gan = -(out[:, 0] * 3.0).mean()
    # by hand: d rec/d out = sign(out - target)/4, d gan/d out = [-3/2, 0] per row; dL/dW = gᵀ x
    g_rec = torch.sign(out.detach() - target) / 4
    g_gan = torch.tensor([[-1.5, 0.0], [-1.5, 0.0]])
    expected = (g_rec.T @ x).norm() / ((g_gan.T @ x).norm() + 1e-6)
    weight = adaptive_gan_weight(rec, gan, layer.weight)
    assert torch.isfinite(weight) and not weight.requires_grad
    torch.testing.assert_close(weight, expected)
    tiny = adaptive_gan_weight(rec, 1e-12 * out.sum(), layer.weight)
    assert tiny.item() == 1e4  # clamped, still finite
    with pytest.raises(ValueError, match="gan_loss does not depend on last_layer"):
        adaptive_gan_weight(rec, torch.ones((), requires_grad=True) * 2, layer.weight)


def test_loss_weights_from_config() -> None:
    cfg = SimpleNamespace(
        l1_weight=1.0, lpips_weight=0.0, gan_weight=0.0, ssr_weight=0.2, mcr_weight=0.0, scr_weight=1.0
    )
    w = LossWeights.from_config(cfg)
    assert w.ssr_weight == 0.2 and w.mcr_angles == (42.5, 85.0)
    with pytest.raises(ValueError, match=r"lacks loss weights \['scr_weight'\]"):
        LossWeights.from_config(SimpleNamespace(**{k: v for k, v in vars(cfg).items() if k != "scr_weight"}))
    recipe_cfg = get_recipe("fmnist32-tiny").tokenizer
    from_recipe = LossWeights.from_config(recipe_cfg)
    assert from_recipe.mcr_weight == recipe_cfg.mcr_weight
    assert from_recipe.adaptive_gan_weight == recipe_cfg.adaptive_gan_weight
    with pytest.raises(ValueError, match=r"LossWeights\.gan_weight must be a finite number ≥ 0"):
        LossWeights(gan_weight=-1.0)


def test_paeloss_skips_zero_weight_terms() -> None:
    def never(*args):
        raise AssertionError("a zero-weight term was computed")

    weights = LossWeights(lpips_weight=0.0, gan_weight=0.0, ssr_weight=0.0, mcr_weight=0.0, scr_weight=0.0)
    loss = PAELoss(weights, lpips=never, discriminator=None)
    x, x_hat = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    total, parts = loss(x, x_hat, _latent(0), decode=never, z_target=None)
    assert set(parts) == {"l1", "total"}
    torch.testing.assert_close(total, (x - x_hat).abs().mean())
    with pytest.raises(ValueError, match="LPIPS module is required"):
        PAELoss(LossWeights(gan_weight=0.0))


def test_paeloss_all_terms_sum_to_total() -> None:
    torch.manual_seed(0)
    decoder = _Decoder()
    disc = PatchDiscriminator(16, base_channels=8)
    loss = PAELoss(LossWeights(), lpips=_mse_perceptual, discriminator=disc)
    z = _latent(9).requires_grad_()
    x, x_hat = torch.rand(2, 3, 16, 16), decoder(z)
    z_target = _latent(10)
    total, parts = loss(
        x,
        x_hat,
        z,
        decode=decoder,
        z_target=z_target,
        last_layer=decoder.last_layer,
        generator=torch.Generator().manual_seed(0),
    )
    assert {"l1", "lpips", "gan", "gan_adaptive", "ssr", "scr", "mcr", "total"} <= set(parts)
    w = loss.weights
    expected = (
        parts["l1"]
        + parts["lpips"]
        + w.gan_weight * parts["gan_adaptive"] * parts["gan"]
        + w.ssr_weight * parts["ssr"]
        + w.scr_weight * parts["scr"]
        + w.mcr_weight * parts["mcr"]
    )
    assert total.item() == pytest.approx(expected, rel=1e-4)
    total.backward()
    assert z.grad.abs().sum() > 0 and decoder.proj.weight.grad.abs().sum() > 0
    _, no_gan = loss(x, x_hat.detach(), z.detach(), decode=decoder, z_target=z_target, gan_active=False)
    assert "gan" not in no_gan
    with pytest.raises(ValueError, match="z_target"):
        loss(x, x_hat, z, decode=decoder, last_layer=decoder.last_layer)
    d_loss, d_parts = loss.discriminator_loss(x, x_hat)
    assert d_loss.item() > 0 and set(d_parts) == {"d_loss", "logits_real", "logits_fake"}


def test_quantize_fake() -> None:
    q = quantize_fake(torch.tensor([-0.2, 0.5, 0.9999, 1.3]))
    torch.testing.assert_close(q, torch.tensor([0.0, 128 / 255, 1.0, 1.0]))


def test_discriminator_shapes_and_diffaug() -> None:
    for size, grid in ((32, 8), (256, 32)):
        d = PatchDiscriminator(size, base_channels=8)
        assert d(torch.rand(1, 3, size, size)).shape == (1, 1, grid, grid)
    d = PatchDiscriminator(32, base_channels=8)
    assert any("parametrizations.weight.original" in n for n, _ in d.named_parameters())
    x = torch.rand(2, 3, 32, 32)
    assert not torch.equal(d(x), d(x))  # DiffAug draws new parameters each call in training mode
    d.eval()
    assert torch.equal(d(x), d(x))
    with pytest.raises(ValueError, match="power of two"):
        PatchDiscriminator(48)

    img = torch.rand(4, 3, 16, 16, requires_grad=True)
    aug = diff_augment(img, generator=torch.Generator().manual_seed(0))
    assert aug.shape == img.shape
    aug.sum().backward()
    assert img.grad.abs().sum() > 0
    shifted = diff_augment(torch.ones(8, 3, 16, 16), generator=torch.Generator().manual_seed(3))
    assert (shifted == 0).any()  # translation exposes a zero border somewhere in the batch
