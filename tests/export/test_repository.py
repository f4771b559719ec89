"""Repository writer and verifier on small hand-made versions (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.manifest import MANIFEST_FORMAT, hash_tree, sha256_file
from export.repository import (
    IntegrityError,
    RepositoryError,
    latest_version_dir,
    list_versions,
    resolve_version,
    staged_version,
    validate_name,
    verify_repository,
)


def _publish(repository: Path, name: str = "m", version: int | None = None) -> Path:
    with staged_version(repository, name, version) as (stage, chosen):
        (stage / "encoder.onnx").write_bytes(b"graph-bytes" * 10)
        (stage / "torch").mkdir()
        (stage / "torch" / "pae.safetensors").write_bytes(b"\x00\x01weights")
        (stage / "config.json").write_text(json.dumps({"version": chosen}))
        (stage / "manifest.json").write_text(json.dumps({"name": name, "version": chosen}))
    return repository / name / str(chosen)


def test_versions_are_integers_and_next_is_max_plus_one(tmp_path: Path) -> None:
    assert resolve_version(tmp_path / "absent", None) == 1
    for v in (1, 3):
        _publish(tmp_path, version=v)
    (tmp_path / "m" / "notes").mkdir()
    assert list_versions(tmp_path / "m") == [1, 3]
    assert _publish(tmp_path).name == "4"
    assert latest_version_dir(tmp_path, "m").name == "4"


def test_taken_or_invalid_version_is_refused(tmp_path: Path) -> None:
    _publish(tmp_path, version=2)
    with pytest.raises(RepositoryError, match=r"version 2 already exists.*next free: 3"):
        resolve_version(tmp_path / "m", 2)
    for bad in (0, -1, True):
        with pytest.raises(RepositoryError, match=r"positive integer"):
            resolve_version(tmp_path / "m", bad)


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "../x", "-x", "sp ace"])
def test_bad_model_names_are_refused(name: str) -> None:
    with pytest.raises(RepositoryError, match=r"not usable as a folder name"):
        validate_name(name)


def test_published_manifest_hashes_every_file(tmp_path: Path) -> None:
    version_dir = _publish(tmp_path)
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["format"] == MANIFEST_FORMAT
    assert set(manifest["files"]) == {"encoder.onnx", "config.json", "torch/pae.safetensors"}
    for rel, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(version_dir / rel)
        assert entry["bytes"] == (version_dir / rel).stat().st_size
    assert verify_repository(version_dir)["name"] == "m"
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
    with pytest.raises(
        IntegrityError, match=r"sha256 of torch/pae\.safetensors .* corrupted or was replaced"
    ):
        verify_repository(version_dir)


def test_manifest_hash_mismatch_is_refused(tmp_path: Path) -> None:
    version_dir = _publish(tmp_path)
    path = version_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["encoder.onnx"]["sha256"] = "0" * 64
    path.chmod(0o644)
    path.write_text(json.dumps(manifest))
    with pytest.raises(
        IntegrityError, match=r"sha256 of encoder\.onnx is [0-9a-f]{64}, the manifest says 0{64}"
    ):
        verify_repository(version_dir)


def test_missing_extra_truncated_and_escaping_files_are_refused(tmp_path: Path) -> None:
    version_dir = _publish(tmp_path)
    (version_dir / "dit.onnx").write_bytes(b"smuggled")
    with pytest.raises(IntegrityError, match=r"not listed in the manifest: dit.onnx"):
        verify_repository(version_dir)
    (version_dir / "dit.onnx").unlink()

    (version_dir / "encoder.onnx").chmod(0o644)
    (version_dir / "encoder.onnx").write_bytes(b"short")
    with pytest.raises(IntegrityError, match=r"encoder.onnx is 5 bytes, the manifest says 110"):
        verify_repository(version_dir)

    (version_dir / "encoder.onnx").unlink()
    with pytest.raises(IntegrityError, match=r"encoder.onnx is listed in the manifest but missing"):
        verify_repository(version_dir)

    other = _publish(tmp_path, name="escape")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["files"]["../../outside"] = {"sha256": "0" * 64}
    (other / "manifest.json").chmod(0o644)
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=r"points outside the version folder"):
        verify_repository(other)


def test_unreadable_manifests_are_refused(tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match=r"has no manifest.json"):
        verify_repository(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(IntegrityError, match=r"not valid JSON"):
        verify_repository(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/9", "files": {"a": {}}}))
    with pytest.raises(IntegrityError, match=r"is not 'pae-model-repository/1'"):
        verify_repository(tmp_path)


def test_hash_tree_refuses_symlinks(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ValueError, match=r"link is a symbolic link"):
        hash_tree(tmp_path)
