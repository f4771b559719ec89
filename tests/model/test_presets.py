"""Presets: every one builds (paper scale on the meta device), values match the paper, overrides work."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from model.lightningdit import LightningDiT
from model.pae import PAE
from model.presets import PRESETS, Preset, get_preset
from model.vfm import build_vfm

PAPER = ("imagenet256-dinov2l", "imagenet256-dinov3l", "imagenet256-siglip2so", "imagenet256-mael")


def test_registry_lists_exactly_the_named_presets():
    assert set(PRESETS) == {*PAPER, "fmnist32-tiny"}
    assert len(PRESETS) == 5
    for name in PRESETS:
        preset = get_preset(name)
        assert isinstance(preset, Preset) and preset.name == name
    with pytest.raises(ValueError, match="known presets"):
        get_preset("imagenet512")


@pytest.mark.parametrize("name", PAPER)
def test_paper_presets_build_on_meta(name):
    preset = get_preset(name)
    with torch.device("meta"):
        pae = PAE(preset.pae)
        dit = LightningDiT(preset.dit)
    z = torch.empty(2, *preset.pae.latent_shape, device="meta")
    assert preset.pae.latent_shape == (32, 16, 16)
    assert pae.decode(z).shape == (2, 3, 256, 256)
    assert (
        dit(z, torch.empty(2, device="meta"), torch.zeros(2, dtype=torch.long, device="meta")).shape
        == z.shape
    )
    decoder = sum(p.numel() for p in pae.decoder.parameters())
    assert abs(decoder - 304e6) / 304e6 < 0.01
    assert preset.dataset == "imagenet" and len(preset.class_names) == 1000


def test_fmnist_preset_builds_for_real():
    preset = get_preset("fmnist32-tiny")
    vfm = build_vfm(preset.pae.vfm)
    pae = PAE(preset.pae, vfm)
    dit = LightningDiT(preset.dit)
    x = torch.rand(2, 3, 32, 32)
    z = pae.encode(x)
    assert z.shape == (2, 16, 8, 8)
    assert dit(z, torch.rand(2), torch.tensor([0, 9])).shape == z.shape
    assert vfm(x).shape == (2, 64, 112)
    assert preset.pae.vfm.heads == 4 and preset.pae.vfm.dim // preset.pae.vfm.heads == 28
    assert preset.class_names[0] == "T-shirt/top" and preset.class_names[9] == "Ankle boot"
    assert preset.dataset == "fashion-mnist"
    assert (preset.sampler.sampler, preset.sampler.steps, preset.sampler.shift) == ("euler", 25, 0.4)


def test_paper_values_follow_the_paper():
    preset = get_preset("imagenet256-dinov2l")
    vfm = preset.pae.vfm
    assert (vfm.kind, vfm.input_size, vfm.dim, vfm.heads, vfm.grid, vfm.patch) == (
        "dinov2",
        224,
        1024,
        16,
        16,
        14,
    )
    assert vfm.mean == (0.485, 0.456, 0.406) and vfm.std == (0.229, 0.224, 0.225)
    pae = preset.pae
    assert (pae.latent_dim, pae.dam_depth, pae.fusion, pae.decoder_patch, pae.image_size) == (
        32,
        6,
        "sft",
        16,
        256,
    )
    assert (pae.decoder_width, pae.decoder_depth, pae.decoder_heads, pae.decoder_mlp_ratio) == (
        1024,
        24,
        16,
        4.0,
    )
    assert (preset.dit.hidden, preset.dit.depth, preset.dit.in_channels, preset.dit.grid) == (
        1152,
        28,
        32,
        16,
    )
    s = preset.sampler
    assert (s.sampler, s.steps, s.shift, s.cfg_scale, s.cfg_interval) == ("euler", 250, 0.4, 2.5, (0.25, 1.0))
    assert preset.dit.class_dropout == 0.1  # label dropout of LightningDiT's recipe
    assert get_preset("imagenet256-siglip2so").pae.vfm.dim == 1152
    assert get_preset("imagenet256-siglip2so").pae.vfm.mean == (0.5, 0.5, 0.5)
    for name in ("imagenet256-dinov3l", "imagenet256-mael"):
        assert (get_preset(name).pae.vfm.input_size, get_preset(name).pae.vfm.patch) == (256, 16)


def test_weights_dir_is_read_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PAE_WEIGHTS_DIR", str(tmp_path))
    assert get_preset("imagenet256-dinov2l").pae.vfm.path == str(tmp_path / "dinov2-with-registers-large")
    monkeypatch.delenv("PAE_WEIGHTS_DIR")
    default = Path(get_preset("imagenet256-mael").pae.vfm.path)
    assert default.name == "vit-mae-large" and default.is_absolute()


def test_overrides_with_replace_and_consistency_checks():
    preset = get_preset("fmnist32-tiny")
    deeper = dataclasses.replace(preset, dit=dataclasses.replace(preset.dit, depth=2))
    assert deeper.dit.depth == 2 and preset.dit.depth != 2
    with pytest.raises(ValueError, match="in_channels 16 != latent_dim 8"):
        dataclasses.replace(preset, pae=dataclasses.replace(preset.pae, latent_dim=8))
    with pytest.raises(ValueError, match="class names"):
        dataclasses.replace(preset, class_names=preset.class_names[:9])
    with pytest.raises(ValueError, match="class_dropout"):
        dataclasses.replace(preset.dit, class_dropout=1.0)
