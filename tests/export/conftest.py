"""Tiny checkpoint directories for export tests, in the format training writes (docs/INTERFACES.md).

Until the training stage produces the default checkpoint, tests build their own from a randomly
initialised, shrunken `fmnist32-tiny` (real EfficientNet-Lite0 VFM, one block everywhere else).
Zero-initialised layers (adaLN-Zero, the DAM fusion, the DiT output) are perturbed so every graph
computes something non-trivial: parity on an all-zero output would prove nothing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.lightningdit import LightningDiT
from model.pae import PAE
from model.presets import Preset, get_preset


def tiny_preset() -> Preset:
    base = get_preset("fmnist32-tiny")
    pae = dataclasses.replace(base.pae, dam_depth=1, decoder_width=32, decoder_depth=1, decoder_heads=2)
    dit = dataclasses.replace(base.dit, hidden=32, depth=1, heads=2)
    return dataclasses.replace(base, pae=pae, dit=dit)


def _perturb(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.05) -> None:
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


def write_checkpoint(directory: Path, preset: Preset, ema: bool = True, seed: int = 0) -> Path:
    """Save random PAE / DiT weights, latent stats and config.json for `preset` into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pae = PAE(preset.pae)
    dit = LightningDiT(preset.dit)
    _perturb(pae, generator)
    _perturb(dit, generator)
    weights = {k: v.contiguous() for k, v in pae.trainable_state_dict().items()}
    save_file(weights, str(directory / ("pae_ema.safetensors" if ema else "pae.safetensors")))
    save_file(
        {k: v.contiguous() for k, v in dit.state_dict().items()}, str(directory / "dit_ema.safetensors")
    )
    d = preset.pae.latent_dim
    stats = {
        "mean": 0.1 * torch.randn(d, generator=generator),
        "std": 0.5 + torch.rand(d, generator=generator),
    }
    save_file(stats, str(directory / "latent_stats.safetensors"))
    config = {
        "preset": preset.name,
        "pae": dataclasses.asdict(preset.pae),
        "dit": dataclasses.asdict(preset.dit),
        "sampler": dataclasses.asdict(preset.sampler),
        "stage": "test-fixture",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "fmnist32-tiny", tiny_preset())


@pytest.fixture(scope="session")
def exported(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One version exported through the `pae-export` entry point (fp32 + fp16), shared read-only."""
    from export.cli import main

    repository = tmp_path_factory.mktemp("repo")
    argv = ["--checkpoint", str(tiny_checkpoint), "--repository", str(repository), "--fp16", "--name", "tiny"]
    assert main(argv) == 0
    return repository / "tiny" / "1"
