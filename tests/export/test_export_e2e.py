"""End to end: a tiny default-scale checkpoint through `pae-export`, then the published version checked
independently — onnx.checker, dynamic batch, parity with torch on real images at batch 1 and 3 (and 5),
manifest and config contents, integrity refusal, and the parity gate writing nothing on failure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file

from export.exporter import export_checkpoint, software_versions
from export.onnx_graphs import GRAPHS
from export.parity import TOLERANCES_FP16, TOLERANCES_FP32, ParityError, Tolerance, errors, ort_session
from export.repository import RepositoryError, verify_version
from export.samples import parity_images
from model.checkpoint import load_checkpoint, preset_from_config
from model.flow import guided_velocity
from model.hashing import sha256_file
from model.presets import FASHION_MNIST_CLASSES
from tests.model.checkpoints import tiny_preset

GRAPH_FILES = [f"{g}.onnx" for g in GRAPHS] + [f"{g}.fp16.onnx" for g in GRAPHS]


@pytest.mark.parametrize("file", GRAPH_FILES)
def test_graph_passes_checker_with_named_io_and_dynamic_batch(exported: Path, file: str) -> None:
    path = exported / file
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    spec = GRAPHS[file.split(".")[0]]
    assert tuple(i.name for i in model.graph.input) == spec.inputs
    assert tuple(o.name for o in model.graph.output) == spec.outputs
    for value in [*model.graph.input, *model.graph.output]:
        first = value.type.tensor_type.shape.dim[0]
        assert first.HasField("dim_param"), f"{file}: {value.name} has a fixed batch axis"
        if value.name != "y":
            assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp16 keeps float32 I/O
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    if file.endswith(".fp16.onnx"):
        dtypes = [init.data_type for init in model.graph.initializer if len(init.dims) >= 2]
        assert dtypes and all(d == onnx.TensorProto.FLOAT16 for d in dtypes)


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_graphs_reproduce_torch_on_real_images(exported: Path, tiny_checkpoint: Path, batch: int) -> None:
    ckpt = load_checkpoint(tiny_checkpoint)
    images, _ = parity_images(8, 32)
    x01 = images[8 - batch :].contiguous()  # other images than the export's own parity cases
    d = ckpt.preset.pae.latent_dim
    with torch.no_grad():
        z = ckpt.pae.encode(x01)
        decoded = ckpt.pae.decode(z).clamp(0, 1)
        gen = torch.Generator().manual_seed(batch)
        t = torch.linspace(0.1, 0.9, batch)
        x_t = t.reshape(-1, 1, 1, 1) * (z - ckpt.latent_mean.reshape(1, d, 1, 1)) / ckpt.latent_std.reshape(
            1, d, 1, 1
        ) + (1 - t.reshape(-1, 1, 1, 1)) * torch.randn(z.shape, generator=gen)
        y = torch.arange(batch, dtype=torch.int64) % 10
        y[-1] = ckpt.null_class if batch > 1 else y[-1]
        scale = torch.full((batch,), 3.0)
        v_guided = guided_velocity(ckpt.dit, x_t, t, y, scale, ckpt.null_class)
        v_cond = ckpt.dit(x_t, t, y)
    feeds = {
        "encoder": ({"images": x01.numpy()}, z),
        "decoder": ({"latents": z.numpy()}, decoded),
        "dit": ({"x": x_t.numpy(), "t": t.numpy(), "y": y.numpy(), "cfg_scale": scale.numpy()}, v_guided),
        "dit_cond": ({"x": x_t.numpy(), "t": t.numpy(), "y": y.numpy()}, v_cond),
    }
    for graph, (inputs, expected) in feeds.items():
        for suffix, tolerances in ((".onnx", TOLERANCES_FP32), (".fp16.onnx", TOLERANCES_FP16)):
            (out,) = ort_session(exported / f"{graph}{suffix}").run(None, inputs)
            max_abs, rel = errors(out, expected.numpy())
            tol = tolerances[graph]
            assert max_abs <= tol.max_abs and rel <= tol.rel, f"{graph}{suffix} @ {batch}: {max_abs}, {rel}"
        assert float(expected.abs().max()) > 1e-2, f"{graph}: trivial output proves nothing"
    assert float(decoded.min()) >= 0 and float(decoded.max()) <= 1
    assert float(v_guided.sub(v_cond).abs().max()) > 1e-3  # guidance really changed something


def test_manifest_records_parity_hashes_and_versions(exported: Path, tiny_checkpoint: Path) -> None:
    manifest = verify_version(exported)
    fp32, fp16 = manifest["parity"]["fp32"], manifest["parity"]["fp16"]
    for results, tolerances in ((fp32, TOLERANCES_FP32), (fp16, TOLERANCES_FP16)):
        assert {(r["graph"], r["batch"]) for r in results} == {(g, b) for g in GRAPHS for b in (1, 3)}
        for r in results:
            assert (
                r["passed"]
                and r["max_abs"] <= r["tolerance"]["max_abs"]
                and r["rel"] <= r["tolerance"]["rel"]
            )
            assert r["tolerance"] == {
                "max_abs": tolerances[r["graph"]].max_abs,
                "rel": tolerances[r["graph"]].rel,
            }
            assert "fashion-mnist" in r["inputs"]
    assert any("skimage/" in r["inputs"] for r in fp32 if r["batch"] == 3)
    source = manifest["source_checkpoint"]
    assert source["pae_weights"] == "pae_ema.safetensors"
    for name, digest in source["sha256"].items():
        assert digest == sha256_file(tiny_checkpoint / name)
    assert set(source["sha256"]) >= {"config.json", "pae_ema.safetensors", "dit_ema.safetensors"}
    assert manifest["opset"] >= 18
    versions = software_versions()
    for package in ("torch", "onnx", "onnxruntime"):
        assert manifest["software"][package] == versions[package] is not None
    assert set(manifest["files"]) == {
        p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()
    } - {"manifest.json"}
    assert manifest["tensorrt"] is None


def test_config_and_torch_files(exported: Path, tiny_checkpoint: Path) -> None:
    config = json.loads((exported / "config.json").read_text())
    stats = load_file(str(tiny_checkpoint / "latent_stats.safetensors"))
    assert config["image_size"] == 32 and config["latent_shape"] == [16, 8, 8]
    np.testing.assert_allclose(config["latent_mean"], stats["mean"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(config["latent_std"], stats["std"].numpy(), rtol=1e-6)
    assert config["class_names"] == list(FASHION_MNIST_CLASSES) and config["null_class"] == 10
    sampler = tiny_preset().sampler
    assert config["sampler"] == sampler.to_dict()  # every field, the time grid included
    assert config["sampler_presets"] == {} and config["default_sampler_preset"] is None
    assert (
        config["graphs"]["dit"]["file"] == "dit.onnx"
        and config["graphs"]["dit"]["fp16_file"] == "dit.fp16.onnx"
    )
    assert [i["name"] for i in config["graphs"]["dit"]["inputs"]] == ["x", "t", "y", "cfg_scale"]
    assert config["graphs"]["encoder"]["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    assert (exported / "torch" / "pae.safetensors").read_bytes() == (
        tiny_checkpoint / "pae_ema.safetensors"
    ).read_bytes()
    assert (exported / "torch" / "dit_ema.safetensors").read_bytes() == (
        tiny_checkpoint / "dit_ema.safetensors"
    ).read_bytes()
    rebuilt = preset_from_config(json.loads((exported / "torch" / "config.json").read_text()))
    assert rebuilt == load_checkpoint(tiny_checkpoint).preset


def test_corrupted_graph_in_a_published_version_is_refused(exported: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(exported, tmp_path / "tiny" / "1")
    verify_version(copy)
    target = copy / "dit_cond.onnx"
    target.chmod(0o644)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(RepositoryError, match=r"dit_cond\.onnx sha256 .* corrupted or was replaced"):
        verify_version(copy)


def test_parity_failure_writes_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    with pytest.raises(ParityError, match=r"decoder @ batch 1: max_abs .* \(tolerance 0\)"):
        export_checkpoint(
            tiny_checkpoint, repository, tolerances={"decoder": Tolerance(max_abs=0.0, rel=0.0)}
        )
    assert not repository.exists()


def test_cli_rejects_bad_arguments_and_reports_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from export.cli import main

    base = ["--checkpoint", str(tmp_path / "none"), "--repository", str(tmp_path / "repo")]
    for extra in (["--skip-parity"], ["--batch-sizes", "1,zero"], ["--version", "0"]):
        with pytest.raises(SystemExit) as info:
            main(base + extra)
        assert info.value.code == 2
    assert main(base) == 1
    err = capsys.readouterr().err
    assert "checkpoint directory" in err and "does not exist" in err and "nothing was written" in err
    assert not (tmp_path / "repo").exists()
