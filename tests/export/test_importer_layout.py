"""The importer against the release's full tensor tables (991 tokenizer + 351 generator tensors).

Full-size checkpoints are written cheaply (each large tensor one stored value broadcast to its
shape, or a sparse zero region in safetensors) with their fixed tables set to the true values, so
every name, shape and fixed table of the real layout is checked in seconds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from export.importer.check import TensorMismatch
from export.importer.infer import PresetMismatch
from export.importer.layout import dit_layout, pae_layout
from export.importer.release import Inputs, plan_import
from export.importer.synthetic import fixed_tables, random_state, write_diffusers_folder, write_release_files
from export.importer.vfm_folder import HF_PREFIX, dinov2_shapes, infer_dinov2
from model.presets import get_preset
from tests.export.release_fixtures import full_tables

PAPER = "imagenet256-dinov2l"


@pytest.fixture(scope="module")
def tables() -> tuple[dict, dict]:
    return full_tables()


def test_the_layout_of_the_paper_preset_is_the_release_table(tables: tuple[dict, dict]) -> None:
    pae_table, dit_table = tables
    preset = get_preset(PAPER)
    encoder = {n: s for n, s in pae_table.items() if n.startswith("encoder.")}
    assert len(pae_table) == 991 and len(encoder) == 438 and len(dit_table) == 351
    assert pae_layout(preset.pae).shapes() == {n: s for n, s in pae_table.items() if n not in encoder}
    assert dit_layout(preset.dit).shapes() == dit_table

    class Shape:
        def __init__(self, shape: tuple[int, ...]) -> None:
            self.shape = shape

    dino = {n[len(HF_PREFIX) :]: Shape(s) for n, s in encoder.items()}
    assert {HF_PREFIX + n: s for n, s in dinov2_shapes(infer_dinov2(dino)).items()} == encoder


@pytest.fixture(scope="module")
def release(tables: tuple[dict, dict], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_release_files(tmp_path_factory.mktemp("full"), *tables, get_preset(PAPER), cheap=True)


@pytest.fixture(scope="module")
def diffusers(tables: tuple[dict, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_diffusers_folder(
        tmp_path_factory.mktemp("port") / "PAE", *tables, get_preset(PAPER), cheap=True
    )


def _accounted(report: dict) -> None:
    assert report["preset"] == PAPER
    pae, dit = report["tensors"]["pae"], report["tensors"]["dit"]
    assert (pae["official"], dit["official"], report["vfm"]["tensors"]) == (991, 351, 438)
    assert set(pae["fixed_tables_max_abs_diff"]) == {"delta_encoder.pos_embed", "decoder.decoder_pos_embed"}
    assert set(dit["fixed_tables_max_abs_diff"]) == {
        "pos_embed",
        "feat_rope.freqs_cos",
        "feat_rope.freqs_sin",
    }
    assert report["architecture"]["dit"]["depth"] == 28 and report["architecture"]["pae"]["latent_dim"] == 32


def test_a_full_official_checkpoint_is_accounted_for_tensor_by_tensor(release: dict[str, Path]) -> None:
    plan = plan_import(Inputs(release["pae"], release["dit"], release["latent_stats"]))
    _accounted(plan.report)
    assert plan.stats[0].numel() == 32


def test_a_full_diffusers_port_is_accounted_for_tensor_by_tensor(
    diffusers: Path, release: dict[str, Path]
) -> None:
    plan = plan_import(Inputs(diffusers=diffusers, latent_stats=release["latent_stats"]))
    _accounted(plan.report)


def _edited(
    table: dict, removed: str | None = None, reshaped: str | None = None, extra: str | None = None
) -> dict:
    out = {n: s for n, s in table.items() if n != removed}
    if reshaped:
        out[reshaped] = (*out[reshaped][:-1], out[reshaped][-1] + 1)
    if extra:
        out[extra] = (4,)
    return out


# (edit, tensor, words the error must contain); each names the tensor it is about.
EDITS = [
    ({"removed": "decoder.decoder_layers.7.attention.attention.key.bias"}, "missing tensors"),
    ({"reshaped": "delta_encoder.layers.3.cross_attn.v_proj.weight"}, "wrong shapes"),
    ({"extra": "delta_encoder.layers.0.gamma"}, "unexpected tensors"),
]


@pytest.mark.parametrize(("edit", "words"), EDITS)
@pytest.mark.parametrize("layout", ["pt", "diffusers"])
def test_a_removed_reshaped_or_extra_tensor_is_named(
    tables: tuple[dict, dict], tmp_path: Path, edit: dict, words: str, layout: str
) -> None:
    pae_table, dit_table = tables
    edited = _edited(pae_table, **edit)
    if layout == "pt":
        files = write_release_files(tmp_path, edited, dit_table, get_preset(PAPER), cheap=True)
        inputs = Inputs(files["pae"], files["dit"])
    else:
        inputs = Inputs(
            diffusers=write_diffusers_folder(tmp_path, edited, dit_table, get_preset(PAPER), cheap=True)
        )
    with pytest.raises(TensorMismatch) as err:
        plan_import(inputs, preset=PAPER)
    message = str(err.value)
    assert words in message and next(iter(edit.values())) in message
    assert "does not match preset imagenet256-dinov2l" in message


@pytest.mark.parametrize("layout", ["pt", "diffusers"])
def test_a_dit_tensor_edit_is_named_too(tables: tuple[dict, dict], tmp_path: Path, layout: str) -> None:
    pae_table, dit_table = tables
    edited = _edited(dit_table, removed="blocks.13.mlp.w3.bias", extra="blocks.0.attn.extra")
    writer = write_release_files if layout == "pt" else write_diffusers_folder
    out = writer(tmp_path, pae_table, edited, get_preset(PAPER), cheap=True)
    inputs = Inputs(out["pae"], out["dit"]) if layout == "pt" else Inputs(diffusers=out)
    with pytest.raises(
        TensorMismatch,
        match=r"missing tensors \(1\): blocks\.13\.mlp\.w3\.bias.*unexpected.*blocks\.0\.attn\.extra",
    ):
        plan_import(inputs)


def test_an_encoder_tensor_missing_is_named(tables: tuple[dict, dict], tmp_path: Path) -> None:
    pae_table, dit_table = tables
    name = "encoder.encoder.encoder.layer.11.layer_scale2.lambda1"
    files = write_release_files(
        tmp_path, _edited(pae_table, removed=name), dit_table, get_preset(PAPER), cheap=True
    )
    with pytest.raises(
        TensorMismatch, match=r"frozen DINOv2.*missing tensors \(1\): " + name.replace(".", r"\.")
    ):
        plan_import(Inputs(files["pae"]))


def _layout_tables(preset_name: str) -> tuple[dict, dict]:
    preset = get_preset(preset_name)
    return pae_layout(preset.pae).shapes(), dit_layout(preset.dit).shapes()


def test_a_checkpoint_of_another_size_names_the_preset_that_fits(tmp_path: Path) -> None:
    pae_table, dit_table = _layout_tables("fmnist32-tiny")
    files = write_release_files(tmp_path, pae_table, dit_table, get_preset("fmnist32-tiny"))
    with pytest.raises(PresetMismatch) as err:
        plan_import(Inputs(files["pae"], files["dit"]), preset=PAPER)
    message = str(err.value)
    assert "latent_dim is 16 in the checkpoint (latent_compressor.1.weight (16, 112, 3, 3)) but 32" in message
    assert "depth 4, width 192, 10 classes" in message and "preset(s) that fit: fmnist32-tiny" in message


def test_a_smaller_dit_is_refused_with_its_size(tables: tuple[dict, dict], tmp_path: Path) -> None:
    preset = get_preset(PAPER)
    small = dit_layout(dataclasses.replace(preset.dit, depth=12, hidden=768, heads=12)).shapes()
    path = tmp_path / "dit.pt"
    torch.save({"ema": random_state(small, {}, 0, cheap=True)}, path)
    with pytest.raises(
        PresetMismatch, match=r"LightningDiT-B/1 \(depth 12, width 768, 1000 classes\).*no preset"
    ):
        plan_import(Inputs(dit=path), preset=PAPER)


def test_a_wrong_fixed_table_is_refused(tables: tuple[dict, dict], tmp_path: Path) -> None:
    _, dit_table = tables
    preset = get_preset(PAPER)
    fixed = fixed_tables(preset)
    dit = random_state(dit_table, fixed, 0, cheap=True)
    dit["feat_rope.freqs_cos"] = dit["feat_rope.freqs_cos"].flip(0)  # the rows of another token order
    torch.save({"ema": dit}, tmp_path / "dit.pt")
    with pytest.raises(TensorMismatch, match=r"fixed table feat_rope\.freqs_cos differs"):
        plan_import(Inputs(dit=tmp_path / "dit.pt"), preset=PAPER)


def test_a_qknorm_dit_is_the_800_epoch_variant(tables: tuple[dict, dict], tmp_path: Path) -> None:
    _, dit_table = tables
    qk = dict(dit_table)
    for i in range(28):
        qk[f"blocks.{i}.attn.q_norm.weight"] = qk[f"blocks.{i}.attn.k_norm.weight"] = (72,)
    torch.save({"ema": random_state(qk, fixed_tables(get_preset(PAPER)), 0, cheap=True)}, tmp_path / "dit.pt")
    plan = plan_import(Inputs(dit=tmp_path / "dit.pt"), preset=PAPER)
    assert plan.preset.dit.use_qknorm and plan.report["sampler"]["default"] == "release-800ep"
    assert plan.preset.sampler == plan.preset.sampler_presets["release-800ep"]


def test_a_checkpoint_of_the_default_size_keeps_its_presets_sampler(tmp_path: Path) -> None:
    preset = get_preset("fmnist32-tiny")
    torch.save(
        {"ema": random_state(dit_layout(preset.dit).shapes(), fixed_tables(preset), 0)}, tmp_path / "dit.pt"
    )
    plan = plan_import(Inputs(dit=tmp_path / "dit.pt"))
    assert plan.preset.name == "fmnist32-tiny" and plan.preset.sampler == preset.sampler
    assert plan.report["sampler"]["default"] is None
