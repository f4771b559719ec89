"""An imported release exports like any trained checkpoint: parity-gated graphs, external weight
files hashed in the manifest and refused when tampered with, and the release's sampler presets.

The shrunken paper preset keeps the run to seconds; `external_data=True` forces the layout a graph
over 2 GiB gets (the full-size run, `benchmarks/release_e2e.py`, exercises the real threshold).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from export.exporter import export_checkpoint
from export.importer.release import Inputs, import_release
from export.importer.synthetic import write_release_files
from export.repository import RepositoryError, verify_version
from model.sampling import RELEASE_SAMPLERS
from tests.export.release_fixtures import small_preset, small_tables

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("release-export")
    preset = small_preset()
    files = write_release_files(root / "src", *small_tables(preset), preset, seed=5)
    import_release(root / "ckpt", Inputs(files["pae"], files["dit"], files["latent_stats"]), preset=preset)
    return export_checkpoint(
        root / "ckpt", root / "repo", name="release", fp16=True, parity_batches=(1, 2), external_data=True
    )


def test_external_weight_files_are_listed_and_hashed(version: Path) -> None:
    manifest = verify_version(version)
    config = json.loads((version / "config.json").read_text())
    for graph in ("encoder", "decoder", "dit", "dit_cond"):
        data = config["graphs"][graph]["external_data"]
        assert data == [f"{graph}.onnx.data"]
        assert manifest["files"][data[0]]["bytes"] == (version / data[0]).stat().st_size > 0
    assert all(r["passed"] for r in manifest["parity"]["fp32"] + manifest["parity"]["fp16"])


def test_the_release_sampler_presets_reach_the_repository(version: Path) -> None:
    config = json.loads((version / "config.json").read_text())
    assert config["sampler_presets"] == {name: cfg.to_dict() for name, cfg in RELEASE_SAMPLERS.items()}
    assert config["default_sampler_preset"] == "release-80ep"
    assert config["sampler"] == RELEASE_SAMPLERS["release-80ep"].to_dict()


def test_a_tampered_weight_file_is_refused_at_load(version: Path, tmp_path: Path) -> None:
    from service.runtimes.onnxruntime import OnnxRuntime

    copy = tmp_path / "release" / "1"
    copy.parent.mkdir()
    shutil.copytree(version, copy)  # a private copy to corrupt
    data = copy / "dit.onnx.data"
    data.chmod(0o644)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(RepositoryError, match=r"dit\.onnx\.data"):
        verify_version(copy)
    with pytest.raises(RepositoryError, match=r"dit\.onnx\.data"):
        OnnxRuntime(copy)


def test_the_service_runtime_generates_with_a_release_sampler(version: Path) -> None:
    from model.sampling import SamplerConfig
    from service.runtimes.onnxruntime import OnnxRuntime

    runtime = OnnxRuntime(version)
    images = runtime.generate(
        np.array([3, 1000]), np.array([0, 1]), SamplerConfig("sde", 4, 0.4, 1.0, (0.0, 1.0), "release")
    )
    assert images.shape == (2, 3, 32, 32) and np.isfinite(images).all()
    latents = runtime.encode(images)
    assert latents.shape == (2, 8, 4, 4)
    rms = np.sqrt((latents**2).mean(axis=1))
    assert (rms <= 1.0 + 1e-5).all() and (rms > 0.9).all()  # the RMS sphere (eps shrinks tiny tokens)
