"""PyTorch eager backend: the `torch/` folder of a version run through the `model/` classes.

It is the reference the exported graphs are checked against and the fallback where no ONNX
runtime fits. `torch/` is a checkpoint directory (model/checkpoint.py) holding the resolved PAE and
DiT configs, so the modules are rebuilt exactly as trained; every file is verified against the
manifest first, and weights load strictly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from export.repository import TORCH_DIR, ModelConfig, RepositoryError, verify_version
from model import checkpoint
from model.flow import TorchNetworks
from model.sampling import SamplerConfig
from model.vfm import build_vfm
from service.cancellation import PrunedGeneration
from service.runtimes.base import generate_images, warm_up

FILES: tuple[str, ...] = tuple(
    f"{TORCH_DIR}/{name}" for name in (checkpoint.CONFIG_FILE, checkpoint.PAE_FILE, checkpoint.DIT_EMA_FILE)
)


class TorchRuntime:
    """Eager PAE + LightningDiT on one torch device."""

    def __init__(self, version_dir: Path, device: str = "cpu") -> None:
        self.version_dir = version_dir
        self.device = torch.device(device)
        self.config = ModelConfig.load(version_dir)
        verify_version(version_dir, FILES)
        torch_dir = version_dir / TORCH_DIR
        config_path = torch_dir / checkpoint.CONFIG_FILE
        try:
            raw = checkpoint.read_json(config_path)
            pae_cfg = checkpoint.read_section(raw, "pae", str(config_path))
            dit_cfg = checkpoint.read_section(raw, "dit", str(config_path))
        except checkpoint.CheckpointError as exc:
            raise RepositoryError(f"{torch_dir} does not describe a PAE and a LightningDiT: {exc}") from None
        if tuple(pae_cfg.latent_shape) != self.config.latent_shape:
            raise RepositoryError(
                f"{version_dir}: torch config latent shape {pae_cfg.latent_shape} differs from "
                f"config.json {self.config.latent_shape}"
            )
        if dit_cfg.num_classes != self.config.num_classes:
            raise RepositoryError(
                f"{version_dir}: the DiT has {dit_cfg.num_classes} classes, config.json names {self.config.num_classes}"
            )
        try:
            self.pae = checkpoint.load_pae(torch_dir / checkpoint.PAE_FILE, pae_cfg, build_vfm(pae_cfg.vfm))
            self.dit = checkpoint.load_dit(torch_dir / checkpoint.DIT_EMA_FILE, dit_cfg)
        except checkpoint.CheckpointError as exc:
            raise RepositoryError(str(exc)) from None
        self.pae.to(self.device)
        self.dit.to(self.device)
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
