"""Reading a model-repository version: which version, its config, and its verified files.

The API needs only `config.json` (shapes, classes, sampler defaults, to validate requests); workers
also load the graphs, and only after every file they load matches the sha256 in `manifest.json` —
a corrupted, truncated or swapped file is refused with its name, never run.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_NAME = "config.json"
MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


class RepositoryError(RuntimeError):
    """The model repository is missing something or holds an invalid or unverified file."""


def is_plain_name(name: str) -> bool:
    """One folder name: not empty, not `.` or `..`, no path separator (either kind) or NUL."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def resolve_version_dir(repository: Path, name: str, version: str | None) -> Path:
    """`<repository>/<name>/<version>`; version None means the largest integer version folder.

    `name` must be one plain folder name and `version` an integer folder name, checked here as
    well as in the settings, so no caller can build a path outside the repository.
    """
    if not is_plain_name(name):
        raise RepositoryError(f"model name {name!r} is not a plain folder name")
    if version is not None and not (version.isascii() and version.isdigit()):
        raise RepositoryError(f"model version {version!r} is not an integer folder name")
    model_dir = repository / name
    if not model_dir.is_dir():
        raise RepositoryError(f"model {name!r} not found: {model_dir} is not a directory")
    if version is not None:
        path = model_dir / version
        if not path.is_dir():
            raise RepositoryError(f"model {name!r} has no version {version!r} ({path} is not a directory)")
        return path
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise RepositoryError(f"model {name!r} has no integer version folders under {model_dir}")
    return model_dir / str(versions[-1])


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
    def load(cls, version_dir: Path) -> ModelConfig:
        """Read and validate `config.json`; every problem names the key."""
        path = version_dir / CONFIG_NAME
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise RepositoryError(f"{path} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RepositoryError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise RepositoryError(f"{path} must hold a JSON object")

        def need(key: str) -> object:
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
            name=version_dir.parent.name,
            version=version_dir.name,
            image_size=size,
            latent_shape=(shape[0], shape[1], shape[2]),
            latent_mean=stats["latent_mean"],
            latent_std=stats["latent_std"],
            class_names=tuple(names),
            sampler=dict(sampler),
            sampler_presets={str(k): dict(v) for k, v in presets.items()},
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_files(version_dir: Path, relpaths: list[str]) -> None:
    """Check `config.json` and each file in `relpaths` against `manifest.json` (sha256 and size).

    Raises RepositoryError naming the first file that is missing, unlisted or different.
    """
    manifest_path = version_dir / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise RepositoryError(f"{manifest_path} is missing; refusing to load unverified files") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RepositoryError(f"{manifest_path} is not valid JSON: {exc}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise RepositoryError(f"{manifest_path} lacks a 'files' object of {{path: {{sha256, bytes}}}}")
    for rel in [CONFIG_NAME, *relpaths]:
        path = version_dir / rel
        entry = files.get(rel)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise RepositoryError(
                f"{path} is not listed in {manifest_path}; refusing to load an unverified file"
            )
        if not path.is_file():
            raise RepositoryError(f"{path} is listed in the manifest but missing")
        size = path.stat().st_size
        if isinstance(entry.get("bytes"), int) and entry["bytes"] != size:
            raise RepositoryError(
                f"{path} has {size} bytes but the manifest says {entry['bytes']}; refusing it"
            )
        actual = _sha256(path)
        if actual != entry["sha256"].lower():
            raise RepositoryError(
                f"{path} sha256 {actual} does not match the manifest ({entry['sha256']}); refusing to load it"
            )
