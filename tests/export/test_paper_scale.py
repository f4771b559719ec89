"""The paper scale exports too: `imagenet256-dinov2l` shapes (256 px images, 16×16×32 latents, 1024-wide
VFM/DAM/decoder tokens, 1152-wide DiT-XL blocks, 1000 classes) with every stack cut to one layer, and a
random one-layer DINOv2-with-registers (patch 14 at 224 px → 16×16 tokens) loaded through the real
`save_pretrained` folder path. Proves the shapes and dynamic batch axes, not the quality."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.exporter import export_checkpoint
from export.parity import ort_session
from export.repository import verify_version
from model.presets import get_preset
from tests.model.checkpoints import random_checkpoint

pytestmark = pytest.mark.slow


def _tiny_dinov2(folder: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=1024,
        num_hidden_layers=1,
        num_attention_heads=16,
        intermediate_size=4096,
        patch_size=14,
        image_size=224,
        num_register_tokens=4,
    )
    transformers.Dinov2WithRegistersModel(config).save_pretrained(str(folder))
    return folder


def test_paper_shaped_graphs_export_with_dynamic_batch(tmp_path: Path) -> None:
    base = get_preset("imagenet256-dinov2l")
    vfm = dataclasses.replace(base.pae.vfm, path=str(_tiny_dinov2(tmp_path / "dinov2")))
    pae = dataclasses.replace(base.pae, vfm=vfm, dam_depth=1, decoder_depth=1)
    preset = dataclasses.replace(base, pae=pae, dit=dataclasses.replace(base.dit, depth=1))
    checkpoint = random_checkpoint(tmp_path / "ckpt", preset)

    out = export_checkpoint(checkpoint, tmp_path / "repo", batch_sizes=(1, 8, 32))
    manifest = verify_version(out)
    assert all(r["passed"] for r in manifest["parity"]["fp32"])
    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == 256 and config["latent_shape"] == [32, 16, 16]
    assert config["null_class"] == 1000 and len(config["class_names"]) == 1000
    shapes = {
        g: {v["name"]: v["shape"] for v in d["inputs"] + d["outputs"]} for g, d in config["graphs"].items()
    }
    assert shapes["encoder"] == {"images": ["batch", 3, 256, 256], "latents": ["batch", 32, 16, 16]}
    assert shapes["decoder"] == {"latents": ["batch", 32, 16, 16], "images": ["batch", 3, 256, 256]}
    assert shapes["dit"] == {
        "x": ["batch", 32, 16, 16],
        "t": ["batch"],
        "y": ["batch"],
        "cfg_scale": ["batch"],
        "v": ["batch", 32, 16, 16],
    }

    dit = onnx.load(str(out / "dit.onnx"), load_external_data=False)
    assert len(dit.graph.initializer) > 0
    rng = np.random.default_rng(0)
    for batch in (2, 4):  # batch sizes the export never saw
        x = rng.standard_normal((batch, 32, 16, 16)).astype(np.float32)
        feeds = {
            "x": x,
            "t": np.full(batch, 0.5, np.float32),
            "y": np.arange(batch, dtype=np.int64),
            "cfg_scale": np.full(batch, 2.5, np.float32),
        }
        (v,) = ort_session(out / "dit.onnx").run(None, feeds)
        assert v.shape == (batch, 32, 16, 16) and np.isfinite(v).all()
        (images,) = ort_session(out / "decoder.onnx").run(None, {"latents": x})
        assert images.shape == (batch, 3, 256, 256) and images.min() >= 0 and images.max() <= 1
