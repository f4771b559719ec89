"""The model repository format on small hand-made versions: writer, version rules, the one verifier."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from export.repository import (
    MANIFEST_FORMAT,
    RepositoryError,
    hash_tree,
    is_version_name,
    list_versions,
    new_version,
    resolve_version_dir,
    staged_version,
    validate_name,
    verify_version,
)
from model.hashing import sha256_file


def _publish(repository: Path, name: str = "m", version: int | None = None) -> Path:
    with staged_version(repository, name, version) as (stage, chosen):
        (stage / "encoder.onnx").write_bytes(b"graph-bytes" * 10)
        (stage / "torch").mkdir()
        (stage / "torch" / "pae.safetensors").write_bytes(b"\x00\x01weights")
        (stage / "config.json").write_text(json.dumps({"version": chosen}))
        (stage / "manifest.json").write_text(json.dumps({"name": name, "version": chosen}))
    return repository / name / str(chosen)


def test_versions_are_integers_and_next_is_max_plus_one(tmp_path: Path) -> None:
    assert new_version(tmp_path / "absent", None) == 1
    for v in (1, 3):
        _publish(tmp_path, version=v)
    for stray in ("notes", "007", "0", "²"):
        (tmp_path / "m" / stray).mkdir()
    assert list_versions(tmp_path / "m") == [1, 3]
    assert _publish(tmp_path).name == "4"
    assert resolve_version_dir(tmp_path, "m").name == "4"
    assert resolve_version_dir(tmp_path, "m", "3").name == "3"
    assert all(is_version_name(v) for v in ("1", "12"))
    assert not any(is_version_name(v) for v in ("0", "01", "-1", "1.0", " 1", "²"))


def test_taken_or_invalid_version_is_refused(tmp_path: Path) -> None:
    _publish(tmp_path, version=2)
    with pytest.raises(RepositoryError, match=r"version 2 already exists.*next free: 3"):
        new_version(tmp_path / "m", 2)
    for bad in (0, -1, True):
        with pytest.raises(RepositoryError, match=r"positive integer"):
            new_version(tmp_path / "m", bad)


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "../x", "-x", "sp ace"])
def test_bad_model_names_are_refused(name: str) -> None:
    with pytest.raises(RepositoryError, match=r"not a plain folder name"):
        validate_name(name)


def test_published_manifest_hashes_every_file(tmp_path: Path) -> None:
    version_dir = _publish(tmp_path)
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["format"] == MANIFEST_FORMAT
    assert set(manifest["files"]) == {"encoder.onnx", "config.json", "torch/pae.safetensors"}
    for rel, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(version_dir / rel)
        assert entry["bytes"] == (version_dir / rel).stat().st_size
    assert verify_version(version_dir)["name"] == "m"
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]


def test_failure_inside_staging_writes_nothing(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    with pytest.raises(ZeroDivisionError), staged_version(repository, "m", None) as (stage, _):
        (stage / "encoder.onnx").write_bytes(b"half written")
        (stage / "manifest.json").write_text("{}")
        _ = 1 / 0
    assert not repository.exists()

    _publish(repository)
    before = sorted(p.relative_to(repository) for p in repository.rglob("*"))
    with (
        pytest.raises(RepositoryError, match=r"no manifest.json"),
        staged_version(repository, "m", None) as (stage, _),
    ):
        (stage / "decoder.onnx").write_bytes(b"x")
    assert sorted(p.relative_to(repository) for p in repository.rglob("*")) == before


def _flip_byte(path: Path, offset: int = 3) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_is_refused_naming_the_file(tmp_path: Path) -> None:
    version_dir = _publish(tmp_path)
    _flip_byte(version_dir / "torch" / "pae.safetensors")
    with pytest.raises(RepositoryError, match=r"torch/pae\.safetensors sha256 .* corrupted or was replaced"):
        verify_version(version_dir)
    verify_version(version_dir, [])  # a reader pays only for (and trusts only) what it loads
    with pytest.raises(RepositoryError, match=r"torch/pae\.safetensors sha256"):
        verify_version(version_dir, ["torch/pae.safetensors"])


def test_manifest_hash_mismatch_is_refused(tmp_path: Path) -> None:
    version_dir = _publish(tmp_path)
    path = version_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["encoder.onnx"]["sha256"] = "0" * 64
    path.chmod(0o644)
    path.write_text(json.dumps(manifest))
    with pytest.raises(
        RepositoryError, match=r"encoder\.onnx sha256 [0-9a-f]{64} does not match the manifest \(0{64}\)"
    ):
        verify_version(version_dir)


def test_missing_extra_truncated_and_escaping_files_are_refused(tmp_path: Path) -> None:
    version_dir = _publish(tmp_path)
    (version_dir / "dit.onnx").write_bytes(b"smuggled")
    for load in (None, ["encoder.onnx"]):  # refused even when the extra file is not one being loaded
        with pytest.raises(RepositoryError, match=r"not listed in the manifest: dit.onnx"):
            verify_version(version_dir, load)
    (version_dir / "dit.onnx").unlink()

    (version_dir / "encoder.onnx").chmod(0o644)
    (version_dir / "encoder.onnx").write_bytes(b"short")
    with pytest.raises(RepositoryError, match=r"encoder.onnx is 5 bytes, the manifest says 110"):
        verify_version(version_dir, [])

    (version_dir / "encoder.onnx").unlink()
    with pytest.raises(RepositoryError, match=r"encoder.onnx is listed in the manifest but missing"):
        verify_version(version_dir, [])

    other = _publish(tmp_path, name="escape")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["files"]["../../outside"] = {"sha256": "0" * 64}
    (other / "manifest.json").chmod(0o644)
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RepositoryError, match=r"points outside the version folder"):
        verify_version(other, [])


def test_unreadable_manifests_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match=r"manifest.json is missing"):
        verify_version(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(RepositoryError, match=r"not valid JSON"):
        verify_version(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/9", "files": {"a": {}}}))
    with pytest.raises(RepositoryError, match=r"is not 'pae-model-repository/1'"):
        verify_version(tmp_path)


def test_hash_tree_refuses_symlinks(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(RepositoryError, match=r"link is a symbolic link"):
        hash_tree(tmp_path)


def _graph_with_external_data(folder: Path) -> None:
    """A one-node ONNX graph whose weight lives in `weights.bin`, as large exported graphs do."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [weight],
    )
    model = helper.make_model(graph)
    onnx.save(
        model, str(folder / "dit.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0
    )


def test_tampered_external_data_of_a_loaded_graph_is_refused(tmp_path: Path) -> None:
    with staged_version(tmp_path, "m", None) as (stage, _):
        _graph_with_external_data(stage)
        (stage / "config.json").write_text("{}")
        (stage / "manifest.json").write_text("{}")
    version_dir = tmp_path / "m" / "1"
    assert verify_version(version_dir, ["dit.onnx"])["files"].keys() == {
        "dit.onnx",
        "weights.bin",
        "config.json",
    }
    _flip_byte(version_dir / "weights.bin", offset=40)
    verify_version(version_dir, ["config.json"])  # the graph is not loaded: its weights are not hashed
    with pytest.raises(RepositoryError, match=r"weights\.bin sha256 .* does not match the manifest"):
        verify_version(version_dir, ["dit.onnx"])


def test_the_reader_imports_neither_torch_nor_onnx() -> None:
    # The serving image has no torch: the service reads repositories through this module alone.
    code = (
        "import sys, export, export.repository; "
        "print(sorted(m for m in ('torch', 'onnx', 'safetensors') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
