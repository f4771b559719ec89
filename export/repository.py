"""The model repository format: export writes it and the service reads it, both through this module.

```
<repository>/<name>/<version>/
  <graph>.onnx [+ external-data files]  [<graph>.fp16.onnx]  [<graph>.<sm_arch>.plan]
  config.json    # what the service validates requests with (`ModelConfig`)
  torch/         # a checkpoint directory (model/checkpoint.py) of the served weights
  manifest.json  # `files`: {relative path: {sha256, bytes}} of every other file, and provenance
```

Versions are positive integers, like Triton's; "latest" is the largest. A version is assembled in a
hidden staging folder beside its final place and renamed into place only once complete and hashed,
so a reader never sees half a version and a failed export leaves the repository as it found it.
Every file a reader loads is checked against the manifest first, and so is the folder itself: a file
the manifest does not list, a listed path outside the version folder, a link, or a different size or
hash is refused with the file's name, never loaded.

Imports neither torch nor onnx at import time: the serving image runs without torch.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.hashing import sha256_file

CONFIG_NAME = "config.json"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "pae-model-repository/1"
TORCH_DIR = "torch"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_STAGING_PREFIX = ".staging-"


class RepositoryError(RuntimeError):
    """A model repository, name, version or file is unusable: missing, malformed or not verified."""


# --- names and versions -------------------------------------------------------------------------


def validate_name(name: str) -> str:
    """Model names become folder names: letters, digits, `.`, `_`, `-`, not starting with `.` or `-`,
    so no name can climb out of the repository or hide as a dot-folder."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise RepositoryError(
            f"model name {name!r} is not a plain folder name; use letters, digits, '.', '_' and '-' "
            "(not starting with '.' or '-')"
        )
    return name


def is_version_name(text: str) -> bool:
    """A version folder name: a positive integer in plain ASCII digits, without leading zeros."""
    return text.isascii() and text.isdigit() and text == str(int(text)) and int(text) >= 1


def list_versions(model_dir: Path) -> list[int]:
    """Published versions under `model_dir`, ascending (staging folders and stray files ignored)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and is_version_name(p.name))


def resolve_version_dir(repository: Path, name: str, version: str | None = None) -> Path:
    """The folder of `name` at `version` (an integer folder name; None means the latest)."""
    validate_name(name)
    if version is not None and not is_version_name(version):
        raise RepositoryError(f"model version {version!r} is not an integer folder name")
    model_dir = Path(repository) / name
    if not model_dir.is_dir():
        raise RepositoryError(f"model {name!r} not found: {model_dir} is not a directory")
    if version is not None:
        path = model_dir / version
        if not path.is_dir():
            raise RepositoryError(f"model {name!r} has no version {version!r} ({path} is not a directory)")
        return path
    versions = list_versions(model_dir)
    if not versions:
        raise RepositoryError(f"model {name!r} has no published versions under {model_dir}")
    return model_dir / str(versions[-1])


def new_version(model_dir: Path, requested: int | None) -> int:
    """The version to write: `requested` if free, else the next integer after the highest one."""
    existing = list_versions(model_dir)
    if requested is None:
        return (existing[-1] + 1) if existing else 1
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise RepositoryError(f"version must be a positive integer, got {requested!r}")
    if requested in existing:
        raise RepositoryError(
            f"version {requested} already exists in {model_dir}; versions are immutable, choose "
            f"another (next free: {existing[-1] + 1})"
        )
    return requested


# --- writing ------------------------------------------------------------------------------------


def write_json(path: Path, obj: Mapping[str, Any]) -> None:
    """A repository JSON file: indented, key-sorted, so versions diff cleanly."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def hash_tree(root: Path) -> dict[str, dict[str, Any]]:
    """`{relative posix path: {"sha256", "bytes"}}` for every file under `root` but the manifest.

    Links are refused: a version must be self-contained, and a link could point anywhere.
    """
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise RepositoryError(f"{root}: {rel} is a symbolic link; repository files must be regular files")
        if path.is_dir() or rel == MANIFEST_NAME:
            continue
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Write `manifest` into `folder` with the format tag and the hash of every other file added."""
    sealed = {**manifest, "format": MANIFEST_FORMAT, "files": hash_tree(folder)}
    write_json(folder / MANIFEST_NAME, sealed)
    return sealed


@contextmanager
def staged_version(repository: Path, name: str, version: int | None) -> Iterator[tuple[Path, int]]:
    """Yield `(staging_dir, version)`; on clean exit seal the manifest and rename it into place.

    The caller writes all files (graphs, config, `torch/`) and a `manifest.json` *without* the
    `files` table into `staging_dir`; on exit the file hashes are added, the files made read-only,
    and the folder renamed to `<repository>/<name>/<version>`. Any exception removes the staging
    folder and any folder this call created, so a failure writes nothing.
    """
    repository = Path(repository)
    model_dir = repository / validate_name(name)
    created = [p for p in (repository, model_dir) if not p.exists()]
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=model_dir))
    try:
        chosen = new_version(model_dir, version)
        yield staging, chosen
        manifest_path = staging / MANIFEST_NAME
        if not manifest_path.is_file():
            raise RepositoryError(f"staged version {staging} has no {MANIFEST_NAME}; refusing to publish it")
        write_manifest(staging, json.loads(manifest_path.read_text()))
        for path in staging.rglob("*"):
            if path.is_file():
                path.chmod(0o444)
        final = model_dir / str(chosen)
        if final.exists():
            raise RepositoryError(f"{final} appeared while exporting (a concurrent export?); nothing written")
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for path in reversed(created):
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise


# --- reading and verifying ----------------------------------------------------------------------


def read_manifest(folder: Path) -> dict[str, Any]:
    """Parse a version's manifest, with a clear error for a missing or malformed one."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise RepositoryError(f"{path} is missing; refusing to load unverified files")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RepositoryError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise RepositoryError(f"{path}: format {found!r} is not {MANIFEST_FORMAT!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise RepositoryError(f"{path} lacks a 'files' object of {{path: {{sha256, bytes}}}}")
    return manifest


def verify_version(folder: Path, load: Iterable[str] | None = None) -> dict[str, Any]:
    """Check a version against its manifest before anything is loaded; return the manifest.

    The whole folder is checked cheaply: every listed path stays inside it and exists with its
    listed size, and nothing is present that the manifest does not list (an unlisted graph or
    engine could be loaded by mistake). Contents are hashed for `config.json` and the files in
    `load` (each graph's external-data files included), or for every file when `load` is None:
    a runtime pays only for what it loads.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    files: dict[str, Any] = manifest["files"]
    root = folder.resolve()
    for rel, entry in files.items():
        path = folder / rel
        if Path(rel).is_absolute() or root not in path.resolve().parents:
            raise RepositoryError(f"{folder}: manifest entry {rel!r} points outside the version folder")
        if path.is_symlink():
            raise RepositoryError(f"{path} is a symbolic link; repository files must be regular files")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise RepositoryError(f"{folder}: manifest entry for {rel} has no sha256")
        if not path.is_file():
            raise RepositoryError(f"{path} is listed in the manifest but missing")
        size = path.stat().st_size
        if isinstance(entry.get("bytes"), int) and entry["bytes"] != size:
            raise RepositoryError(
                f"{path} is {size} bytes, the manifest says {entry['bytes']}; "
                "the file is corrupted or was replaced"
            )
    present = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    unlisted = sorted(set(present) - set(files) - {MANIFEST_NAME})
    if unlisted:
        raise RepositoryError(f"{folder}: files not listed in the manifest: {', '.join(unlisted)}")

    pending = list(files) if load is None else [CONFIG_NAME, *load]
    done: set[str] = set()
    while pending:
        rel = pending.pop(0)
        if rel in done:
            continue
        done.add(rel)
        if rel not in files:
            raise RepositoryError(
                f"{folder / rel} is not listed in {folder / MANIFEST_NAME}; refusing to load an unverified file"
            )
        actual = sha256_file(folder / rel)
        if actual != files[rel]["sha256"].lower():
            raise RepositoryError(
                f"{folder / rel} sha256 {actual} does not match the manifest ({files[rel]['sha256']}); "
                "the file is corrupted or was replaced"
            )
        if load is not None and rel.endswith(".onnx"):
            parent = Path(rel).parent
            pending += [(parent / f).as_posix() for f in external_data_files(folder / rel)]
    return manifest


def external_data_files(graph_path: Path) -> list[str]:
    """Files (relative to the graph's folder) that hold an ONNX graph's external tensors.

    Graphs over 2 GB keep their weights outside the protobuf; a swapped weights file must be caught
    like a swapped graph. Only the graph's structure is parsed (never the weights), after its hash
    was checked.
    """
    import onnx  # here, not at the top: the service imports this module without onnx's cost

    try:
        model = onnx.load(str(graph_path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: the file is no ONNX graph
        raise RepositoryError(f"{graph_path} is not a readable ONNX graph: {exc}") from None
    found: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        tensors = list(graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                tensors.extend([attr.t] if attr.HasField("t") else [])
                tensors.extend(attr.tensors)
                if attr.HasField("g"):
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                found.update(e.value for e in tensor.external_data if e.key == "location")

    visit(model.graph)
    return sorted(found)


# --- config.json --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """What the service needs to know about a model version (from its config.json)."""

    name: str
    version: str
    image_size: int
    latent_shape: tuple[int, int, int]
    latent_mean: tuple[float, ...]
    latent_std: tuple[float, ...]
    class_names: tuple[str, ...]
    sampler: dict[str, object]
    # Named sampler settings a request may choose (`sampler_preset`), e.g. the release's three.
    sampler_presets: dict[str, dict[str, object]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def null_class(self) -> int:
        """Label index meaning "unconditional" (the extra row of the DiT's label table)."""
        return len(self.class_names)

    @classmethod
    def load(cls, folder: Path) -> ModelConfig:
        """Read and validate `config.json`; every problem names the key."""
        folder = Path(folder)
        path = folder / CONFIG_NAME
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise RepositoryError(f"{path} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RepositoryError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise RepositoryError(f"{path} must hold a JSON object")

        def need(key: str) -> Any:
            if key not in raw:
                raise RepositoryError(f"{path} lacks the key {key!r}")
            return raw[key]

        size = need("image_size")
        if not isinstance(size, int) or size < 8:
            raise RepositoryError(f"{path}: image_size must be an int >= 8, got {size!r}")
        shape = need("latent_shape")
        if not (
            isinstance(shape, list) and len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in shape)
        ):
            raise RepositoryError(f"{path}: latent_shape must be [d, h, w] of positive ints, got {shape!r}")
        stats = {}
        for key in ("latent_mean", "latent_std"):
            values = need(key)
            if not (
                isinstance(values, list)
                and len(values) == shape[0]
                and all(isinstance(v, int | float) and math.isfinite(v) for v in values)
            ):
                raise RepositoryError(f"{path}: {key} must be {shape[0]} finite numbers, got {values!r}")
            stats[key] = tuple(float(v) for v in values)
        if any(v <= 0 for v in stats["latent_std"]):
            raise RepositoryError(f"{path}: latent_std values must be > 0")
        names = need("class_names")
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise RepositoryError(f"{path}: class_names must be a non-empty list of strings")
        sampler = need("sampler")
        if not isinstance(sampler, dict):
            raise RepositoryError(f"{path}: sampler must be an object of SamplerConfig defaults")
        presets = raw.get("sampler_presets", {})
        if not (isinstance(presets, dict) and all(isinstance(v, dict) for v in presets.values())):
            raise RepositoryError(f"{path}: sampler_presets must map names to SamplerConfig objects")
        return cls(
            name=folder.parent.name,
            version=folder.name,
            image_size=size,
            latent_shape=(shape[0], shape[1], shape[2]),
            latent_mean=stats["latent_mean"],
            latent_std=stats["latent_std"],
            class_names=tuple(names),
            sampler=dict(sampler),
            sampler_presets={str(k): dict(v) for k, v in presets.items()},
        )
