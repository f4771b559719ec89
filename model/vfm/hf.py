"""Hugging Face ViT encoders (DINOv2 with registers, DINOv3, SigLIP2, MAE) loaded from a local folder.

No model hub is reachable, so the weights must already sit in a `save_pretrained` folder
(`config.json` + `model.safetensors`, or a sharded `model.safetensors.index.json`) and are read with
`local_files_only=True` and safetensors only. Following PAE's encoder wrappers, the final LayerNorm keeps
its normalisation but loses its affine parameters, and only patch tokens are returned: CLS and register
tokens are dropped (DINOv2/v3, MAE), SigLIP2 keeps everything (it has no extra tokens), and MAE runs with
mask ratio 0 and identity-ordered noise so no token is masked or shuffled.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from model.hashing import sha256_files

from .base import FrozenVFM, VFMSpec, VFMWeightsMissing

HF_KINDS = ("dinov2", "dinov3", "siglip2", "mae")

# spec.kind → {config.json model_type → transformers class}
_CLASSES = {
    "dinov2": {"dinov2_with_registers": "Dinov2WithRegistersModel", "dinov2": "Dinov2Model"},
    "dinov3": {"dinov3_vit": "DINOv3ViTModel"},
    "siglip2": {
        "siglip": "SiglipVisionModel",
        "siglip_vision_model": "SiglipVisionModel",
        "siglip2": "Siglip2VisionModel",
        "siglip2_vision_model": "Siglip2VisionModel",
    },
    "mae": {"vit_mae": "ViTMAEModel"},
}
# Attribute holding each class's final LayerNorm.
_FINAL_NORM = {
    "Dinov2WithRegistersModel": "layernorm",
    "Dinov2Model": "layernorm",
    "DINOv3ViTModel": "norm",
    "SiglipVisionModel": "post_layernorm",
    "Siglip2VisionModel": "post_layernorm",
    "ViTMAEModel": "layernorm",
}
# Extra constructor arguments: no pooling head for SigLIP (unused), no masking for MAE.
_LOAD_KWARGS = {
    "SiglipVisionModel": {"vision_use_head": False},
    "Siglip2VisionModel": {"vision_use_head": False},
    "ViTMAEModel": {"mask_ratio": 0.0},
}
LAYOUT = "a Hugging Face save_pretrained folder: config.json + model.safetensors (or model.safetensors.index.json + shards)"


def weight_files(kind: str, path: str | None) -> tuple[Path, list[Path]]:
    """Check the folder layout and return (config.json, weight files), or raise VFMWeightsMissing."""
    if not path:
        raise VFMWeightsMissing(
            f"{kind}: VFMSpec.path is not set; point it (or $PAE_WEIGHTS_DIR) at {LAYOUT}"
        )
    folder = Path(path)
    if not folder.is_dir():
        raise VFMWeightsMissing(
            f"{kind}: weights folder {folder} does not exist (or is not a folder); expected {LAYOUT}"
        )
    config = folder / "config.json"
    if not config.is_file():
        raise VFMWeightsMissing(f"{kind}: {config} is missing; expected {LAYOUT}")
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return config, [single]
    if index.is_file():
        shards = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise VFMWeightsMissing(f"{kind}: shards listed in {index} are missing: {missing}")
        return config, [index, *shards]
    raise VFMWeightsMissing(f"{kind}: no model.safetensors in {folder}; expected {LAYOUT}")


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence loading reports and progress bars (expected unused keys, e.g. SigLIP's text tower)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _check_stats(folder: Path, spec: VFMSpec) -> None:
    """The spec's mean/std must match the model's own preprocessing when the folder records it."""
    prep_file = folder / "preprocessor_config.json"
    if not prep_file.is_file():
        return
    prep = json.loads(prep_file.read_text())
    for name, ours in (("image_mean", spec.mean), ("image_std", spec.std)):
        theirs = prep.get(name)
        if theirs is not None and any(abs(a - b) > 1e-4 for a, b in zip(ours, theirs, strict=True)):
            raise ValueError(f"{spec.kind}: spec {name} {ours} differs from {prep_file}'s {theirs}")


class HFVisionVFM(FrozenVFM):
    """A frozen transformers vision model returning no-affine-normalised patch tokens."""

    def __init__(self, spec: VFMSpec) -> None:
        if spec.kind not in HF_KINDS:
            raise ValueError(f"HFVisionVFM handles {HF_KINDS}, got {spec.kind!r}")
        super().__init__(spec)
        self.config_path, self.weights_files = weight_files(spec.kind, spec.path)
        model_type = json.loads(self.config_path.read_text()).get("model_type")
        classes = _CLASSES[spec.kind]
        if model_type not in classes:
            raise ValueError(
                f"{spec.kind}: {self.config_path} has model_type {model_type!r}; expected one of {tuple(classes)}"
            )
        _check_stats(self.config_path.parent, spec)
        try:
            import transformers
        except ImportError as err:
            raise ImportError(f"{spec.kind} needs `transformers` (install the 'hf' extra)") from err
        self.class_name = classes[model_type]
        with _quiet_transformers():
            model, info = getattr(transformers, self.class_name).from_pretrained(
                str(self.config_path.parent),
                local_files_only=True,
                use_safetensors=True,
                dtype=torch.float32,
                output_loading_info=True,
                **_LOAD_KWARGS.get(self.class_name, {}),
            )
        if info["missing_keys"] or info["mismatched_keys"]:
            raise ValueError(
                f"{spec.path} does not hold a complete {self.class_name}: "
                f"missing {sorted(info['missing_keys'])[:8]}, mismatched {sorted(info['mismatched_keys'])[:8]}"
            )
        cfg = model.config
        if cfg.hidden_size != spec.dim:
            raise ValueError(f"{spec.path}: hidden_size {cfg.hidden_size} but spec.dim is {spec.dim}")
        if cfg.patch_size * spec.grid != spec.input_size:
            raise ValueError(
                f"{spec.path}: patch {cfg.patch_size} × grid {spec.grid} != input_size {spec.input_size}"
            )
        norm_attr = _FINAL_NORM[self.class_name]
        setattr(
            model, norm_attr, nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, elementwise_affine=False)
        )
        self.model = model
        self.prefix = 0 if spec.kind == "siglip2" else 1 + getattr(cfg, "num_register_tokens", 0)
        native = getattr(cfg, "image_size", spec.input_size)
        self.interpolate_pos = native != spec.input_size
        self._freeze()

    def features(self, x_norm: torch.Tensor) -> torch.Tensor:
        batch, n = x_norm.shape[0], self.spec.grid * self.spec.grid
        if self.class_name == "ViTMAEModel":
            # argsort of an increasing sequence is the identity: every token kept, in grid order.
            noise = torch.arange(n, device=x_norm.device, dtype=x_norm.dtype).expand(batch, n)
            out = self.model(pixel_values=x_norm, noise=noise, interpolate_pos_encoding=self.interpolate_pos)
        elif self.class_name == "SiglipVisionModel":
            out = self.model(pixel_values=x_norm, interpolate_pos_encoding=self.interpolate_pos)
        elif self.class_name == "Siglip2VisionModel":
            out = self.model(**self._naflex_inputs(x_norm))
        else:
            out = self.model(pixel_values=x_norm)
        return out.last_hidden_state[:, self.prefix :]

    def _naflex_inputs(self, x_norm: torch.Tensor) -> dict[str, torch.Tensor]:
        """SigLIP2 NaFlex takes pre-cut patches, flattened (row, col, channel) as its processor does."""
        batch, p, g = x_norm.shape[0], self.spec.patch, self.spec.grid
        patches = (
            x_norm.reshape(batch, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(batch, g * g, p * p * 3)
        )
        mask = torch.ones(batch, g * g, dtype=torch.int32, device=x_norm.device)
        shapes = torch.tensor([[g, g]], dtype=torch.long, device=x_norm.device).expand(batch, 2)
        return {"pixel_values": patches, "pixel_attention_mask": mask, "spatial_shapes": shapes}

    def _weights_digest(self) -> str:
        return sha256_files([self.config_path, *self.weights_files])
