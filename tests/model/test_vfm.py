"""Frozen VFMs: real EfficientNet-Lite weights, and the Hugging Face loading path on tiny saved models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from model.vfm import VFMSpec, VFMWeightsMissing, build_vfm
from model.vfm.base import HALF

LITE0 = VFMSpec("efficientnet-lite0", 128, 112, 4, 8, stride=16, mean=HALF, std=HALF)
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


@pytest.fixture(scope="module")
def lite0():
    return build_vfm(LITE0)


@pytest.fixture(scope="module")
def chelsea() -> torch.Tensor:
    return torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255.0


def _randomise_final_norm(norm: torch.nn.LayerNorm) -> None:
    """Give the final LayerNorm a non-trivial affine so a test can tell whether it was dropped."""
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0.0, 0.5)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random models of every supported family, written with save_pretrained."""
    from transformers import (
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        DINOv3ViTConfig,
        DINOv3ViTModel,
        Siglip2Config,
        Siglip2Model,
        SiglipConfig,
        SiglipModel,
        ViTMAEConfig,
        ViTMAEModel,
    )

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    models = {
        "dinov2": Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(image_size=28, patch_size=14, num_register_tokens=4, **SMALL)
        ),
        "dinov3": DINOv3ViTModel(
            DINOv3ViTConfig(image_size=32, patch_size=16, num_register_tokens=2, **SMALL)
        ),
        "siglip": SiglipModel(
            SiglipConfig(
                vision_config={"image_size": 32, "patch_size": 16, **SMALL},
                text_config={
                    "vocab_size": 100,
                    "bos_token_id": 1,
                    "eos_token_id": 2,
                    "pad_token_id": 0,
                    **SMALL,
                },
            )
        ),
        "siglip2": Siglip2Model(
            Siglip2Config(
                vision_config={"num_patches": 9, "patch_size": 16, **SMALL},
                text_config={
                    "vocab_size": 100,
                    "bos_token_id": 1,
                    "eos_token_id": 2,
                    "pad_token_id": 0,
                    **SMALL,
                },
            )
        ),
        "mae": ViTMAEModel(ViTMAEConfig(image_size=32, patch_size=16, **SMALL)),
    }
    _randomise_final_norm(models["dinov2"].layernorm)
    _randomise_final_norm(models["dinov3"].norm)
    _randomise_final_norm(models["siglip"].vision_model.post_layernorm)
    dirs = {}
    for name, model in models.items():
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
    return dirs


def test_lite0_real_weights_classify_chelsea_as_a_cat(lite0, chelsea):
    with torch.no_grad():
        probs = lite0.classify(chelsea).softmax(-1)
    top = int(probs.argmax())
    assert 281 <= top <= 285, f"top class {top} is not an ImageNet cat"
    assert probs[0, top] > 0.5


def test_lite0_token_grid_and_freezing(lite0, chelsea):
    tokens = lite0(chelsea)
    assert tokens.shape == (1, 64, 112)
    assert torch.isfinite(tokens).all() and tokens.std() > 0.05
    assert not any(p.requires_grad for p in lite0.parameters())
    lite0.train()
    assert not lite0.training and not any(m.training for m in lite0.modules())
    # Tokens are the stride-16 map in row-major order.
    x = lite0.normalize(chelsea)
    fmap = lite0._stem(x)
    for block in lite0.net._blocks[: lite0.tap + 1]:
        fmap = block(fmap)
    assert fmap.shape == (1, 112, 8, 8)
    assert torch.equal(tokens[0, 8 * 3 + 5], fmap[0, :, 3, 5])


def test_lite0_normalize_resizes_and_scales_to_minus_one_one(lite0):
    x = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)])
    out = lite0.normalize(x)
    assert out.shape == (2, 3, 128, 128)
    assert torch.allclose(out[0], torch.full_like(out[0], -1.0))
    assert torch.allclose(out[1], torch.full_like(out[1], 1.0))
    with pytest.raises(ValueError, match="B×3×H×W"):
        lite0.normalize(torch.zeros(2, 1, 32, 32))


def test_fingerprint_tracks_weights_and_preprocessing(lite0, tmp_path):
    fp = lite0.fingerprint()
    assert len(fp) == 64 and fp == build_vfm(LITE0).fingerprint()
    other_size = VFMSpec("efficientnet-lite0", 160, 112, 4, 10, stride=16, mean=HALF, std=HALF)
    assert build_vfm(other_size).fingerprint() != fp
    # Same weights elsewhere on disk: same key.
    copy = tmp_path / "lite0.pth"
    copy.write_bytes(lite0.weights_path.read_bytes())
    moved = VFMSpec("efficientnet-lite0", 128, 112, 4, 8, path=str(copy), stride=16, mean=HALF, std=HALF)
    assert build_vfm(moved).fingerprint() == fp


def test_lite2_pooled_features_and_channel_check(chelsea):
    lite2 = build_vfm(VFMSpec("efficientnet-lite2", 128, 120, 4, 8, stride=16, mean=HALF, std=HALF))
    with torch.no_grad():
        assert lite2.pooled(chelsea).shape == (1, 1280)
        assert 281 <= int(lite2.classify(chelsea).argmax()) <= 285
    with pytest.raises(ValueError, match="120 channels at stride 16"):
        build_vfm(VFMSpec("efficientnet-lite2", 128, 112, 4, 8, stride=16, mean=HALF, std=HALF))


def test_efficientnet_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nothing.pth"
    spec = VFMSpec("efficientnet-lite0", 128, 112, 4, 8, path=str(missing), stride=16, mean=HALF, std=HALF)
    with pytest.raises(VFMWeightsMissing, match=re.escape(str(missing))):
        build_vfm(spec)


def test_spec_validation():
    with pytest.raises(ValueError, match="kind"):
        VFMSpec("resnet", 224, 1024, 16, 16)
    with pytest.raises(ValueError, match="multiple of grid"):
        VFMSpec("dinov2", 225, 1024, 16, 16)
    with pytest.raises(ValueError, match="stride"):
        VFMSpec("efficientnet-lite0", 128, 112, 4, 8)
    assert VFMSpec("dinov2", 224, 1024, 16, 16).patch == 14


def test_missing_hf_weights_name_path_and_layout(tmp_path):
    folder = tmp_path / "dinov2-with-registers-large"
    spec = VFMSpec("dinov2", 28, 32, 4, 2, path=str(folder))
    with pytest.raises(VFMWeightsMissing, match=r"config\.json") as err:
        build_vfm(spec)
    assert str(folder) in str(err.value) and "model.safetensors" in str(err.value)
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(VFMWeightsMissing, match=r"no model\.safetensors"):
        build_vfm(spec)
    with pytest.raises(VFMWeightsMissing, match="PAE_WEIGHTS_DIR"):
        build_vfm(VFMSpec("dinov2", 28, 32, 4, 2, path=None))


def test_dinov2_registers_drops_cls_and_registers_without_affine(hf_dirs):
    from transformers import Dinov2WithRegistersModel

    spec = VFMSpec("dinov2", 56, 32, 4, 4, path=str(hf_dirs["dinov2"]))
    vfm = build_vfm(spec)
    ref_model = Dinov2WithRegistersModel.from_pretrained(hf_dirs["dinov2"], local_files_only=True).eval()
    x = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        tokens = vfm(x)
        ref = ref_model(vfm.normalize(x), output_hidden_states=True)
    assert tokens.shape == (2, 16, 32)  # 4×4 patches; 1 CLS + 4 registers dropped
    pre_norm = ref.hidden_states[-1]
    assert pre_norm.shape[1] == 1 + 4 + 16
    expected = F.layer_norm(pre_norm, (32,), eps=ref_model.config.layer_norm_eps)[:, 5:]
    assert torch.allclose(tokens, expected, atol=1e-5)
    assert not torch.allclose(tokens, ref.last_hidden_state[:, 5:], atol=1e-2)  # affine really dropped
    assert not any(p.requires_grad for p in vfm.parameters()) and not vfm.training
    assert vfm.fingerprint() == build_vfm(spec).fingerprint()


def test_dinov3_drops_cls_and_registers(hf_dirs):
    from transformers import DINOv3ViTModel

    vfm = build_vfm(VFMSpec("dinov3", 48, 32, 4, 3, path=str(hf_dirs["dinov3"])))
    ref_model = DINOv3ViTModel.from_pretrained(hf_dirs["dinov3"], local_files_only=True).eval()
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        tokens = vfm(x)
        pre_norm = ref_model(vfm.normalize(x), output_hidden_states=True).hidden_states[-1]
    assert tokens.shape == (2, 9, 32) and pre_norm.shape[1] == 1 + 2 + 9
    assert torch.allclose(tokens, F.layer_norm(pre_norm, (32,), eps=1e-5)[:, 3:], atol=1e-5)


def test_siglip_keeps_every_token(hf_dirs):
    from transformers import SiglipVisionModel

    spec = VFMSpec("siglip2", 48, 32, 4, 3, path=str(hf_dirs["siglip"]), mean=HALF, std=HALF)
    vfm = build_vfm(spec)
    ref_model = SiglipVisionModel.from_pretrained(hf_dirs["siglip"], local_files_only=True).eval()
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        tokens = vfm(x)
        pre_norm = ref_model(vfm.normalize(x), interpolate_pos_encoding=True, output_hidden_states=True)
    pre_norm = pre_norm.hidden_states[-1]
    assert tokens.shape == (2, 9, 32) and pre_norm.shape[1] == 9
    assert torch.allclose(
        tokens, F.layer_norm(pre_norm, (32,), eps=ref_model.config.layer_norm_eps), atol=1e-5
    )


def test_siglip2_naflex_patches_match_the_processor_layout(hf_dirs):
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    vfm = build_vfm(VFMSpec("siglip2", 48, 32, 4, 3, path=str(hf_dirs["siglip2"]), mean=HALF, std=HALF))
    x = torch.rand(2, 3, 48, 48)
    inputs = vfm._naflex_inputs(vfm.normalize(x))
    expected = convert_image_to_patches(vfm.normalize(x)[1].numpy(), 16)
    np.testing.assert_array_equal(inputs["pixel_values"][1].numpy(), expected)
    assert vfm(x).shape == (2, 9, 32)


def test_mae_keeps_every_token_in_grid_order(hf_dirs):
    from transformers import ViTMAEModel

    vfm = build_vfm(VFMSpec("mae", 48, 32, 4, 3, path=str(hf_dirs["mae"])))
    shuffling = ViTMAEModel.from_pretrained(hf_dirs["mae"], local_files_only=True, mask_ratio=0.0).eval()
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        tokens = vfm(x)
        # Reference: HF's own random shuffle, undone with the ids_restore it reports.
        out = shuffling(vfm.normalize(x), noise=torch.rand(2, 9), interpolate_pos_encoding=True)
    restored = torch.gather(out.last_hidden_state[:, 1:], 1, out.ids_restore[..., None].expand(-1, -1, 32))
    assert tokens.shape == (2, 9, 32)
    assert torch.allclose(tokens, restored, atol=1e-5)


def test_hf_loader_rejects_mismatches(hf_dirs, tmp_path):
    with pytest.raises(ValueError, match="model_type 'vit_mae'"):
        build_vfm(VFMSpec("dinov2", 48, 32, 4, 3, path=str(hf_dirs["mae"])))
    with pytest.raises(ValueError, match="hidden_size 32"):
        build_vfm(VFMSpec("mae", 48, 64, 4, 3, path=str(hf_dirs["mae"])))
    with pytest.raises(ValueError, match="patch 16"):
        build_vfm(VFMSpec("mae", 48, 32, 4, 4, path=str(hf_dirs["mae"])))
    with_prep = tmp_path / "mae"
    with_prep.mkdir()
    for f in hf_dirs["mae"].iterdir():
        (with_prep / f.name).write_bytes(f.read_bytes())
    (with_prep / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    )
    with pytest.raises(ValueError, match="image_mean"):
        build_vfm(VFMSpec("mae", 48, 32, 4, 3, path=str(with_prep)))
