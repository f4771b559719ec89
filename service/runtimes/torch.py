"""PyTorch eager backend: the `torch/` safetensors of a version run through the `model/` classes.

It is the reference the exported graphs are checked against and the fallback where no ONNX
runtime fits. `torch/config.json` holds the resolved PAE and DiT configs (the checkpoint format),
so the modules are rebuilt exactly as trained; weights load strictly, and every file is verified
against the manifest first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from model.flow import TorchNetworks
from model.lightningdit import DiTConfig, LightningDiT
from model.pae import PAE, PAEConfig
from model.sampling import SamplerConfig
from model.vfm import build_vfm
from model.vfm.base import VFMSpec
from service.cancellation import PrunedGeneration
from service.repository import ModelConfig, RepositoryError, verify_files
from service.runtimes.base import generate_images, warm_up

FILES: tuple[str, ...] = ("torch/config.json", "torch/pae.safetensors", "torch/dit_ema.safetensors")


def _configs(path: Path) -> tuple[PAEConfig, DiTConfig]:
    """PAEConfig (with its VFMSpec) and DiTConfig from the checkpoint-format config.json."""
    try:
        raw = json.loads(path.read_text())
        pae = dict(raw["pae"])
        vfm = dict(pae.pop("vfm"))
        for key in ("mean", "std"):
            if key in vfm:
                vfm[key] = tuple(vfm[key])
        return PAEConfig(vfm=VFMSpec(**vfm), **pae), DiTConfig(**raw["dit"])
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise RepositoryError(f"{path} does not describe a PAE and a LightningDiT: {exc!r}") from None


def _load(module: torch.nn.Module, path: Path) -> None:
    tensors = load_file(str(path), device="cpu")
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise RepositoryError(f"{path} does not fit {type(module).__name__} of its config: {exc}") from None


class TorchRuntime:
    """Eager PAE + LightningDiT on one torch device."""

    def __init__(self, version_dir: Path, device: str = "cpu") -> None:
        self.version_dir = version_dir
        self.device = torch.device(device)
        self.config = ModelConfig.load(version_dir)
        verify_files(version_dir, list(FILES))
        pae_cfg, dit_cfg = _configs(version_dir / FILES[0])
        if tuple(pae_cfg.latent_shape) != self.config.latent_shape:
            raise RepositoryError(
                f"{version_dir}: torch config latent shape {pae_cfg.latent_shape} differs from "
                f"config.json {self.config.latent_shape}"
            )
        if dit_cfg.num_classes != self.config.num_classes:
            raise RepositoryError(
                f"{version_dir}: the DiT has {dit_cfg.num_classes} classes, config.json names {self.config.num_classes}"
            )
        self.pae = PAE(pae_cfg, build_vfm(pae_cfg.vfm))
        _load(self.pae, version_dir / FILES[1])
        self.dit = LightningDiT(dit_cfg)
        _load(self.dit, version_dir / FILES[2])
        self.pae.eval().to(self.device)
        self.dit.eval().to(self.device)
        self.networks = TorchNetworks(self.dit, device=self.device)

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        return self.pae.encode(x).cpu().numpy()

    @torch.no_grad()
    def _decode(self, z: torch.Tensor) -> np.ndarray:
        return self.pae.decode(z.to(self.device)).cpu().numpy()

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self._decode(torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32)))

    def generate(
        self,
        labels: np.ndarray,
        seeds: np.ndarray,
        sampler: SamplerConfig,
        pruning: PrunedGeneration | None = None,
    ) -> np.ndarray:
        return generate_images(self.config, self.networks, self._decode, labels, seeds, sampler, pruning)

    def warmup(self, max_batch: Mapping[str, int]) -> None:
        warm_up(self.config, max_batch, self.encode, self.decode, self.networks)

    def info(self) -> dict[str, object]:
        return {
            "runtime": "torch",
            "provider": self.device.type,
            "torch": torch.__version__,
            "model": self.config.name,
            "version": self.config.version,
        }
