"""The torch runtime on a repository version holding the default preset's real model classes.

The weights are freshly initialised (training is not this package's job); what is tested is that the
`torch/` folder is verified, rebuilt from its config, and run through the shared generation path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from export.repository import RepositoryError, write_json
from export.tiny_repository import write_manifest
from model.checkpoint import write_checkpoint
from model.lightningdit import LightningDiT
from model.pae import PAE
from model.presets import get_preset
from model.sampling import SamplerConfig
from model.vfm import build_vfm
from service.runtimes.base import Runtime
from service.runtimes.torch import TorchRuntime


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    preset = get_preset("fmnist32-tiny")
    out = tmp_path_factory.mktemp("repo") / "fmnist32-tiny" / "1"
    d = preset.pae.latent_dim
    pae, dit = PAE(preset.pae, build_vfm(preset.pae.vfm)), LightningDiT(preset.dit)
    write_checkpoint(out / "torch", preset, pae, dit, torch.zeros(d), torch.ones(d), ema=False)
    config = {
        "image_size": preset.pae.image_size,
        "latent_shape": list(preset.pae.latent_shape),
        "latent_mean": [0.0] * d,
        "latent_std": [1.0] * d,
        "class_names": list(preset.class_names),
        "sampler": dataclasses.asdict(preset.sampler),
    }
    write_json(out / "config.json", config)
    write_manifest(out)
    return out


def test_torch_runtime_serves_the_model_classes(version_dir: Path) -> None:
    runtime = TorchRuntime(version_dir)
    assert isinstance(runtime, Runtime)
    assert runtime.info()["runtime"] == "torch"
    images = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    z = runtime.encode(images)
    assert z.shape == (2, 16, 8, 8)
    assert np.allclose(np.sqrt((z**2).mean(axis=1)), 1.0, atol=1e-3)
    assert runtime.decode(z).shape == (2, 3, 32, 32)
    cfg = SamplerConfig(steps=2, cfg_scale=2.0, cfg_interval=(0.4, 1.0))
    batch = runtime.generate(np.array([3, 5]), np.array([9, 10]), cfg)
    alone = runtime.generate(np.array([5]), np.array([10]), cfg)
    assert batch.shape == (2, 3, 32, 32)
    assert np.abs(batch[1] - alone[0]).max() < 1e-4  # an image depends on its seed, not its batch
    runtime.warmup({"encode": 1, "decode": 1, "generate": 1})


def test_torch_weights_are_verified(version_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "v"
    shutil.copytree(version_dir, copy)
    weights = copy / "torch" / "dit_ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(RepositoryError, match=r"dit_ema\.safetensors"):
        TorchRuntime(copy)
