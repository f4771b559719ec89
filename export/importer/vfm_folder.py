"""The frozen DINOv2 stored inside a released tokenizer checkpoint, written as a Hugging Face folder.

The authors' tokenizer state dict carries its frozen encoder under `encoder.encoder.*`: the
transformers DINOv2-with-registers model, named as the transformers version that saved it names
it. transformers 5 calls the attention projections `attention.{q,k,v,o}_proj`; transformers 4
called them `attention.attention.{query,key,value}` and `attention.output.dense`. Both are read; the
folder is written with transformers 5 names (what this project installs), as `config.json` +
`model.safetensors` + `preprocessor_config.json`, i.e. what `model.vfm.hf` loads.

The encoder runs its final LayerNorm without affine parameters (paper §2.1), so the release does not
store them; the folder gets weight 1 and bias 0, which the loader replaces by the affine-free norm
anyway.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from export.importer.sources import TensorRef
from model.vfm.base import IMAGENET_MEAN, IMAGENET_STD, VFMSpec

HF_PREFIX = "encoder.encoder."
_V4_TO_V5 = (
    (re.compile(r"\.attention\.attention\.query\."), ".attention.q_proj."),
    (re.compile(r"\.attention\.attention\.key\."), ".attention.k_proj."),
    (re.compile(r"\.attention\.attention\.value\."), ".attention.v_proj."),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
)
# DINOv2's published configuration beyond what the tensors show (all sizes use 64-wide heads).
_HEAD_DIM = 64
_LAYER_NORM_EPS = 1e-6


class VFMMismatch(ValueError):
    """The checkpoint's frozen encoder is incomplete, mis-shaped, or not the preset's encoder."""


@dataclass(frozen=True)
class DinoV2Shape:
    """What the tensors say about a DINOv2: width, depth, MLP width, patch, registers, position table."""

    hidden: int
    layers: int
    mlp: int
    patch: int
    registers: int
    positions: int

    @property
    def image_size(self) -> int:
        """The native resolution its position table covers (one row is the CLS token)."""
        return math.isqrt(self.positions - 1) * self.patch


def to_v5(name: str) -> str:
    """A DINOv2 tensor name in transformers-5 form (names already in that form are unchanged)."""
    for pattern, replacement in _V4_TO_V5:
        name = pattern.sub(replacement, name)
    return name


def encoder_tensors(tensors: Mapping[str, TensorRef]) -> dict[str, TensorRef]:
    """The frozen encoder's tensors, keyed by their transformers-5 names inside the HF model."""
    out: dict[str, TensorRef] = {}
    for name, ref in tensors.items():
        if name.startswith(HF_PREFIX):
            out[to_v5(name[len(HF_PREFIX) :])] = ref
    return out


def _shape(tensors: Mapping[str, TensorRef], name: str) -> tuple[int, ...]:
    if name not in tensors:
        raise VFMMismatch(f"the frozen encoder lacks {HF_PREFIX}{name}")
    return tuple(tensors[name].shape)


def infer_dinov2(tensors: Mapping[str, TensorRef]) -> DinoV2Shape:
    """Read the encoder's architecture off its tensors (transformers-5 names, no prefix)."""
    hidden = _shape(tensors, "embeddings.cls_token")[-1]
    patch = _shape(tensors, "embeddings.patch_embeddings.projection.weight")[-1]
    positions = _shape(tensors, "embeddings.position_embeddings")[1]
    layers = len({int(m.group(1)) for n in tensors if (m := re.match(r"encoder\.layer\.(\d+)\.", n))})
    mlp = _shape(tensors, "encoder.layer.0.mlp.fc1.weight")[0]
    registers = (
        _shape(tensors, "embeddings.register_tokens")[1] if "embeddings.register_tokens" in tensors else 0
    )
    return DinoV2Shape(hidden, layers, mlp, patch, registers, positions)


def dinov2_shapes(shape: DinoV2Shape) -> dict[str, tuple[int, ...]]:
    """Every tensor (transformers-5 name → shape) a DINOv2 of `shape` stores in the release."""
    d, m, p = shape.hidden, shape.mlp, shape.patch
    out: dict[str, tuple[int, ...]] = {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.mask_token": (1, d),
        "embeddings.position_embeddings": (1, shape.positions, d),
        "embeddings.patch_embeddings.projection.weight": (d, 3, p, p),
        "embeddings.patch_embeddings.projection.bias": (d,),
    }
    if shape.registers:
        out["embeddings.register_tokens"] = (1, shape.registers, d)
    for i in range(shape.layers):
        layer = f"encoder.layer.{i}."
        for norm in ("norm1", "norm2"):
            out.update({f"{layer}{norm}.weight": (d,), f"{layer}{norm}.bias": (d,)})
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.update({f"{layer}attention.{proj}.weight": (d, d), f"{layer}attention.{proj}.bias": (d,)})
        out.update({f"{layer}layer_scale1.lambda1": (d,), f"{layer}layer_scale2.lambda1": (d,)})
        out.update({f"{layer}mlp.fc1.weight": (m, d), f"{layer}mlp.fc1.bias": (m,)})
        out.update({f"{layer}mlp.fc2.weight": (d, m), f"{layer}mlp.fc2.bias": (d,)})
    return out


def check_against_spec(shape: DinoV2Shape, spec: VFMSpec) -> None:
    """The encoder must be the preset's: same width and patch, and a grid of the preset's size."""
    problems = []
    if spec.kind != "dinov2":
        problems.append(f"the checkpoint holds a DINOv2 but the preset's encoder is {spec.kind!r}")
    if shape.hidden != spec.dim:
        problems.append(f"width {shape.hidden} (embeddings.cls_token) vs the preset's {spec.dim}")
    if shape.patch != spec.patch:
        problems.append(f"patch {shape.patch} (patch projection) vs the preset's {spec.patch}")
    if shape.mlp % shape.hidden:
        problems.append(f"MLP width {shape.mlp} is not a whole multiple of the width {shape.hidden}")
    if shape.hidden % _HEAD_DIM:
        problems.append(f"width {shape.hidden} is not a multiple of DINOv2's head width {_HEAD_DIM}")
    if problems:
        raise VFMMismatch("the frozen encoder does not fit the preset: " + "; ".join(problems))


def write_dinov2_folder(tensors: Mapping[str, TensorRef], shape: DinoV2Shape, folder: Path) -> Path:
    """Write the encoder as a transformers-5 `save_pretrained` folder; return the folder."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: tensors[name].load().to(torch.float32).contiguous() for name in dinov2_shapes(shape)}
    weights["layernorm.weight"] = torch.ones(shape.hidden)
    weights["layernorm.bias"] = torch.zeros(shape.hidden)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del weights
    config_class = transformers.Dinov2WithRegistersConfig if shape.registers else transformers.Dinov2Config
    extra = {"num_register_tokens": shape.registers} if shape.registers else {}
    config = config_class(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.hidden // _HEAD_DIM,
        mlp_ratio=shape.mlp // shape.hidden,
        patch_size=shape.patch,
        image_size=shape.image_size,
        layer_norm_eps=_LAYER_NORM_EPS,
        layerscale_value=1.0,
        qkv_bias=True,
        hidden_act="gelu",
        use_swiglu_ffn=False,
        **extra,
    )
    config.architectures = [
        "Dinov2WithRegistersModel" if shape.registers else "Dinov2Model",
    ]
    config.save_pretrained(str(folder))
    preprocessor = {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return folder
