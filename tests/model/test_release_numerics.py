"""The paper presets compute what the released models compute; the default preset is unchanged.

The release keeps PyTorch's default LayerNorm eps (1e-5) in the DAM and computes its fixed sin-cos
and RoPE tables in float32; the project's own models use 1e-6 and float64, and the committed default
checkpoint must keep answering exactly as before.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from model.lightningdit import LightningDiT, rope_tables
from model.pae import PAE
from model.pos_embed import sincos_2d
from model.presets import PRESETS, get_preset
from model.sampling import RELEASE_SAMPLERS

PAPER = [name for name in PRESETS if name.startswith("imagenet256-")]


@pytest.mark.parametrize("name", PAPER)
def test_paper_presets_use_the_release_eps_tables_and_samplers(name: str) -> None:
    preset = get_preset(name)
    assert (preset.pae.dam_ln_eps, preset.pae.table_dtype, preset.dit.table_dtype) == (
        1e-5,
        "float32",
        "float32",
    )
    assert dict(preset.sampler_presets) == RELEASE_SAMPLERS
    assert preset.sampler == RELEASE_SAMPLERS["release-80ep"]


def test_the_default_preset_keeps_its_numerics() -> None:
    preset = get_preset("fmnist32-tiny")
    assert (preset.pae.dam_ln_eps, preset.pae.table_dtype, preset.dit.table_dtype) == (
        1e-6,
        "float64",
        "float64",
    )
    assert dict(preset.sampler_presets) == {} and preset.sampler.grid == "updates"


def test_every_dam_layernorm_takes_the_configured_eps() -> None:
    with torch.device("meta"):
        dam = PAE(get_preset("imagenet256-dinov2l").pae).dam
    norms = [m for m in dam.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 6 * 4 + 1 and all(m.eps == 1e-5 for m in norms)


def test_float32_tables_follow_the_release_arithmetic() -> None:
    # RoPE as the release computes it (EVA): float32 frequencies, positions and products.
    axis = 36
    freqs = 1.0 / (10000.0 ** (torch.arange(0, axis, 2)[: axis // 2].float() / axis))
    angles = torch.einsum("i,f->if", torch.arange(16) / 16 * 16, freqs).repeat_interleave(2, dim=-1)
    table = torch.cat([angles[:, None, :].expand(16, 16, axis), angles[None, :, :].expand(16, 16, axis)], -1)
    cos32, sin32 = rope_tables(72, 16, dtype=torch.float32)
    assert torch.equal(cos32, table.reshape(256, 72).cos()) and torch.equal(
        sin32, table.reshape(256, 72).sin()
    )
    cos64, _ = rope_tables(72, 16)
    assert 0 < float((cos32 - cos64).abs().max()) <= 2e-6
    pos32, pos64 = sincos_2d(1152, 16, dtype=torch.float32), sincos_2d(1152, 16)
    assert 0 < float((pos32 - pos64).abs().max()) <= 2e-6


def test_models_build_their_tables_in_the_configured_precision() -> None:
    preset = get_preset("imagenet256-dinov2l")
    with torch.device("meta"):
        dit = LightningDiT(preset.dit)
    assert dit.pos_embed.device.type == "meta"  # built; the values are checked on a small config below
    small = dataclasses.replace(preset.dit, hidden=144, heads=2, depth=1)
    model = LightningDiT(small)
    assert torch.equal(model.rope_cos, rope_tables(72, 16, dtype=torch.float32)[0])
    assert torch.equal(model.pos_embed[0], sincos_2d(144, 16, dtype=torch.float32))


def test_an_unknown_table_dtype_is_refused() -> None:
    preset = get_preset("fmnist32-tiny")
    with pytest.raises(ValueError, match="table_dtype must be one of"):
        dataclasses.replace(preset.dit, table_dtype="float16")
    with pytest.raises(ValueError, match="dam_ln_eps"):
        dataclasses.replace(preset.pae, dam_ln_eps=0.0)
