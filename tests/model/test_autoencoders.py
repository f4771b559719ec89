"""The comparison autoencoders: RAE (frozen VFM tokens, standardised, + pixel decoder with noise
augmentation), the convolutional KL autoencoder, and how a preset and a checkpoint pick one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from model.autoencoders import AutoencoderConfig, build_autoencoder, latent_shape, vae_config
from model.checkpoint import (
    CheckpointError,
    autoencoder_files,
    load_autoencoder,
    load_checkpoint,
    preset_config,
    preset_from_config,
    save_tensors,
    write_json,
)
from model.kl_autoencoder import KLAutoencoder, KLAutoencoderConfig, kl_divergence
from model.presets import Preset, get_preset
from model.rae import RAE, decoder_noise
from model.vfm import build_vfm


def _preset(kind: str) -> Preset:
    base = get_preset("fmnist32-tiny")
    channels = latent_shape(AutoencoderConfig(kind=kind), base.pae)[0]
    return dataclasses.replace(
        base,
        autoencoder=AutoencoderConfig(kind=kind),
        dit=dataclasses.replace(base.dit, in_channels=channels),
    )


@pytest.fixture(scope="module")
def rae() -> RAE:
    torch.manual_seed(0)
    cfg = get_preset("fmnist32-tiny").pae
    return RAE(cfg, build_vfm(cfg.vfm)).eval()


# --- RAE ---------------------------------------------------------------------------------------


def test_rae_latent_is_the_standardised_vfm_token_grid(rae: RAE) -> None:
    x = torch.rand(2, 3, 32, 32)
    tokens = rae.vfm(x)  # B×64×112, final LayerNorm without affine
    assert rae.latent_shape == (112, 8, 8)
    z = rae.encode(x)
    assert z.shape == (2, 112, 8, 8)
    assert torch.allclose(z, rae.encode(x, tokens))  # cached tokens give the same latent
    # Row-major token order: token r·8 + c is grid cell (r, c).
    assert torch.equal(z[:, :, 2, 5], tokens[:, 2 * 8 + 5, :])  # stats are (0, 1) at init

    mean, std = torch.linspace(-1, 1, 112), torch.linspace(0.5, 2, 112)
    rae2 = RAE(rae.cfg)
    rae2.set_latent_stats(mean, std)
    expected = (tokens.transpose(1, 2).reshape(2, 112, 8, 8) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    assert torch.allclose(rae2.encode(x, tokens), expected, atol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        rae2.set_latent_stats(mean, -std)
    with pytest.raises(ValueError, match="h_vfm"):
        rae2.encode(x, tokens[:, :10])


def test_rae_checkpoint_holds_decoder_and_stats_but_never_the_vfm(rae: RAE, tmp_path: Path) -> None:
    state = rae.trainable_state_dict()
    assert {"latent_mean", "latent_std"} <= set(state)
    assert not any(k.startswith(("vfm", "_vfm")) for k in state)
    assert set(state) - {"latent_mean", "latent_std"} == {n for n, _ in rae.named_parameters()}
    rae.set_latent_stats(torch.full((112,), 0.25), torch.full((112,), 3.0))
    save_tensors(tmp_path / "rae_ema.safetensors", rae.trainable_state_dict())
    back = load_autoencoder(tmp_path / "rae_ema.safetensors", _preset("rae"))
    assert isinstance(back, RAE) and not back.training
    x, tokens = torch.rand(2, 3, 32, 32), torch.randn(2, 64, 112)
    assert torch.allclose(back.encode(x, tokens), rae.encode(x, tokens))
    assert torch.allclose(back.decode(rae.encode(x, tokens)), rae.decode(rae.encode(x, tokens)), atol=1e-6)
    rae.set_latent_stats(torch.zeros(112), torch.ones(112))


def test_decoder_noise_is_per_image_and_bounded_by_tau() -> None:
    z = torch.zeros(400, 8, 4, 4)
    assert decoder_noise(z, 0.0) is z
    g = torch.Generator().manual_seed(0)
    noisy = decoder_noise(z, 0.8, generator=g)
    per_image_std = noisy.flatten(1).std(dim=1)
    assert float(per_image_std.max()) < 0.8 * 1.35  # σ ≤ τ (sample std of 128 values wobbles)
    assert float(per_image_std.min()) < 0.1  # σ ~ U(0, τ): some images barely noised
    assert abs(float(per_image_std.mean()) - 0.4) < 0.05  # E[σ] = τ / 2
    with pytest.raises(ValueError, match="tau"):
        decoder_noise(z, -0.1)


def test_rae_forward_decodes_the_noised_latent_and_returns_the_clean_one(rae: RAE) -> None:
    x, tokens = torch.rand(3, 3, 32, 32), torch.randn(3, 64, 112)
    torch.manual_seed(3)
    x_hat, z = rae(x, tokens, noise_tau=0.8)
    assert torch.equal(z, rae.encode(x, tokens))
    assert x_hat.shape == (3, 3, 32, 32)
    assert not torch.allclose(x_hat, rae.decode(z))
    x_clean, _ = rae(x, tokens)
    assert torch.allclose(x_clean, rae.decode(z))


# --- KL autoencoder ----------------------------------------------------------------------------


def test_kl_autoencoder_config_follows_the_downsampling_factor() -> None:
    cfg = KLAutoencoderConfig(image_size=32, latent_dim=16, latent_grid=8, channels=(8, 16, 16))
    assert cfg.levels == 3 and cfg.latent_shape == (16, 8, 8)
    with pytest.raises(ValueError, match="one width per level"):
        KLAutoencoderConfig(image_size=32, latent_dim=16, latent_grid=8, channels=(8, 16))
    with pytest.raises(ValueError, match="power of two"):
        KLAutoencoderConfig(image_size=32, latent_dim=16, latent_grid=12, channels=(8, 16))
    with pytest.raises(ValueError, match="positive"):
        KLAutoencoderConfig(image_size=32, latent_dim=16, latent_grid=8, channels=(8, 0, 16))


def test_kl_autoencoder_shapes_determinism_and_gradients() -> None:
    torch.manual_seed(0)
    vae = KLAutoencoder(KLAutoencoderConfig(32, 16, 8, channels=(8, 16, 16)))
    x = torch.rand(2, 3, 32, 32)
    z = vae.encode(x, h_vfm=torch.randn(2, 64, 112))  # VFM tokens are ignored
    assert z.shape == (2, 16, 8, 8)
    assert torch.equal(z, vae.encode(x))  # the posterior mean: deterministic
    assert vae.decode(z).shape == (2, 3, 32, 32)
    x_hat, z_sample, kl = vae(x)
    assert not torch.equal(z_sample, z) and kl.ndim == 0 and float(kl.detach()) >= 0
    ((x_hat - x).abs().mean() + kl).backward()
    assert vae.decoder_last_layer.grad is not None
    assert all(p.grad is not None for p in vae.encoder.parameters())
    with pytest.raises(ValueError, match="latent must be"):
        vae.decode(torch.zeros(1, 8, 8, 8))


def test_kl_divergence_matches_the_closed_form() -> None:
    assert float(kl_divergence(torch.zeros(4, 2, 3, 3), torch.zeros(4, 2, 3, 3))) == 0.0
    mean, logvar = torch.full((2, 1, 2, 2), 1.0), torch.full((2, 1, 2, 2), 0.5)
    per_element = 0.5 * (1.0 + torch.exp(torch.tensor(0.5)) - 1.0 - 0.5)
    assert float(kl_divergence(mean, logvar)) == pytest.approx(4 * float(per_element), rel=1e-6)


# --- choosing one ------------------------------------------------------------------------------


def test_a_preset_picks_its_latent_and_checks_the_dit_fits() -> None:
    base = get_preset("fmnist32-tiny")
    assert base.autoencoder.kind == "pae" and base.latent_shape == (16, 8, 8)
    assert _preset("rae").latent_shape == (112, 8, 8)
    assert _preset("vae").latent_shape == (16, 8, 8)
    with pytest.raises(ValueError, match=r"in_channels 16 != latent_dim 112 \(the rae latent"):
        dataclasses.replace(base, autoencoder=AutoencoderConfig(kind="rae"))
    with pytest.raises(ValueError, match="kind"):
        AutoencoderConfig(kind="vqgan")
    assert vae_config(AutoencoderConfig(kind="vae"), base.pae).latent_shape == base.pae.latent_shape
    for kind, cls in (("rae", RAE), ("vae", KLAutoencoder)):
        assert isinstance(build_autoencoder(AutoencoderConfig(kind=kind), base.pae), cls)
    assert autoencoder_files("pae") == ("pae.safetensors", "pae_ema.safetensors")
    assert autoencoder_files("rae") == ("rae.safetensors", "rae_ema.safetensors")


def test_config_json_names_a_comparison_latent_and_serving_refuses_it(tmp_path: Path) -> None:
    assert "autoencoder" not in preset_config(get_preset("fmnist32-tiny"))  # PAE checkpoints unchanged
    rae = _preset("rae")
    config = preset_config(rae)
    assert config["autoencoder"]["kind"] == "rae"
    assert preset_from_config(config) == rae
    write_json(tmp_path / "config.json", config)
    for name in ("pae_ema.safetensors", "dit_ema.safetensors", "latent_stats.safetensors"):
        save_tensors(tmp_path / name, {"x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="only PAE checkpoints are served"):
        load_checkpoint(tmp_path)
