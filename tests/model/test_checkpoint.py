"""The checkpoint directory format: atomic files, weight choice, config resolution, clear errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from model.checkpoint import (
    CheckpointError,
    is_complete,
    load_checkpoint,
    load_tensors,
    preset_config,
    preset_from_config,
    read_json,
    save_tensors,
    update_json,
)
from model.presets import get_preset
from tests.model.checkpoints import random_checkpoint, tiny_preset


def test_tensors_roundtrip_and_missing_file(tmp_path: Path) -> None:
    a = torch.arange(6.0).reshape(2, 3)
    save_tensors(tmp_path / "x.safetensors", {"a": a, "b": a[0]}, {"k": "v"})
    back = load_tensors(tmp_path / "x.safetensors")
    assert torch.equal(back["a"], a) and torch.equal(back["b"], a[0])
    assert not list(tmp_path.glob(".*tmp")), "temporary file left behind"
    with pytest.raises(CheckpointError, match="not found"):
        load_tensors(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_tensors(tmp_path / "bad.safetensors")


def test_update_json_merges_nested(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    update_json(path, {"recon": {"psnr": 1.0}})
    update_json(path, {"recon": {"ssim": 0.5}, "gen": {"fd": 3.0}})
    assert read_json(path) == {"recon": {"psnr": 1.0, "ssim": 0.5}, "gen": {"fd": 3.0}}


def test_loads_weights_stats_and_resolved_configs(tmp_path: Path) -> None:
    preset = tiny_preset()
    ckpt = load_checkpoint(random_checkpoint(tmp_path / "c", preset, ema=False))
    assert ckpt.pae_file == "pae.safetensors"  # no EMA file: the plain weights are used
    assert ckpt.preset == preset and ckpt.null_class == 10
    assert ckpt.latent_mean.shape == ckpt.latent_std.shape == (preset.pae.latent_dim,)
    assert not ckpt.pae.training and not ckpt.dit.training and ckpt.pae.vfm is not None
    z = ckpt.pae.encode(torch.rand(2, 3, 32, 32))
    assert z.shape == (2, 16, 8, 8)
    assert torch.allclose(z.square().mean(dim=1), torch.ones(2, 8, 8), atol=1e-4)  # on the sphere


def test_preset_config_round_trips_and_missing_sections_fall_back() -> None:
    preset = tiny_preset()
    assert preset_from_config(json.loads(json.dumps(preset_config(preset)))) == preset
    assert preset_from_config({"preset": "fmnist32-tiny"}) == get_preset("fmnist32-tiny")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "has no 'preset' name"),
        ({"preset": "nope"}, "unknown preset 'nope'"),
        (
            {"preset": "fmnist32-tiny", "dit": {"hidden": 32, "colour": 1}},
            r"unknown DiTConfig field\(s\) \['colour'\]",
        ),
        ({"preset": "fmnist32-tiny", "sampler": {"steps": 0}}, "not a valid SamplerConfig: .*steps"),
        ({"preset": "fmnist32-tiny", "sampler": {"cfg_interval": 0.5}}, "cfg_interval must be a list"),
    ],
)
def test_bad_configs_are_named(config: dict, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        preset_from_config(config)


def test_incomplete_or_mismatched_checkpoints_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_checkpoint(tmp_path / "absent")
    directory = random_checkpoint(tmp_path / "c", tiny_preset())
    assert is_complete(directory)
    config = json.loads((directory / "config.json").read_text())
    config["dit"] = dataclasses.asdict(dataclasses.replace(tiny_preset().dit, hidden=64))
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"dit_ema.safetensors does not fit LightningDiT .*wrong shape"):
        load_checkpoint(directory)
    (directory / "latent_stats.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has no latent_stats.safetensors"):
        load_checkpoint(directory)
    assert not is_complete(directory)
