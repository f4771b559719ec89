"""The on-disk form of a training set's latents: written by the `latents` stage, read by `generator`.

A latents directory holds safetensors shards of up to `SHARD_SIZE` images, each with `latents`
(float16: sphere tokens have |z| ≤ √d, where float16 keeps 3 significant digits), `labels` (int64)
and, when the tokenizer trains on mirror images, `latents_flip`; plus `meta.json` naming the shards,
the count, the latent shape, whether mirror rows exist (`flips`) and the sha256 of the EMA tokenizer
weights that made them. The directory is written under a temporary name and renamed into place once
complete, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

import torch
from safetensors import safe_open

from model.checkpoint import CheckpointError, save_tensors

SHARD_SIZE = 10_000
FORMAT = 1


class LatentShardWriter:
    """Write a latents directory shard by shard; `finish` publishes it (a `with` block that raises
    leaves nothing behind)."""

    def __init__(self, directory: Path, pae_sha: str, latent_shape: tuple[int, ...], flips: bool) -> None:
        self.directory = Path(directory)
        self.pae_sha, self.latent_shape, self.flips = pae_sha, tuple(latent_shape), flips
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.directory.name}.", dir=self.directory.parent))
        self.shards: list[dict[str, object]] = []

    def __enter__(self) -> LatentShardWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def write_shard(self, start: int, tensors: dict[str, torch.Tensor]) -> None:
        """One shard: images `start …` with `latents`, `labels` and (with flips) `latents_flip`."""
        name = f"shard_{len(self.shards):05d}.safetensors"
        save_tensors(self.staging / name, tensors)
        self.shards.append({"file": name, "start": start, "count": int(tensors["labels"].shape[0])})

    def finish(self, count: int) -> None:
        """Write `meta.json` and move the directory into place."""
        meta = {
            "format": FORMAT,
            "pae_ema_sha256": self.pae_sha,
            "count": count,
            "latent_shape": list(self.latent_shape),
            "dtype": "float16",
            "flips": self.flips,
            "shards": self.shards,
        }
        (self.staging / "meta.json").write_text(json.dumps(meta, indent=1))
        os.replace(self.staging, self.directory)


class LatentShards:
    """Read a latents directory; `load()` returns all `(latents, latents_flip | None, labels)` in memory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise CheckpointError(
                f"latents directory {self.directory} has no meta.json (missing or incomplete)"
            )
        try:
            self.meta = json.loads(meta_path.read_text())
            shards = self.meta["shards"]
            count = int(self.meta["count"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{meta_path}: unreadable latents metadata ({exc})") from exc
        if sum(s["count"] for s in shards) != count:
            raise CheckpointError(
                f"{meta_path}: shards hold {sum(s['count'] for s in shards)} items, expected {count}"
            )
        for s in shards:
            if not (self.directory / s["file"]).is_file():
                raise CheckpointError(f"latents shard missing: {self.directory / s['file']}")
        self.shards = shards
        self.count = count

    def __len__(self) -> int:
        return self.count

    def load(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        flips = bool(self.meta.get("flips", True))
        keys = ("latents", "latents_flip", "labels") if flips else ("latents", "labels")
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        shape = tuple(self.meta["latent_shape"])
        for s in self.shards:
            path = self.directory / s["file"]
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in parts:
                        parts[key].append(f.get_tensor(key))
            except Exception as exc:
                raise CheckpointError(f"cannot read latents shard {path}: {exc}") from exc
        latents, labels = torch.cat(parts["latents"]), torch.cat(parts["labels"])
        mirrored = torch.cat(parts["latents_flip"]) if flips else None
        if (
            tuple(latents.shape) != (self.count, *shape)
            or (mirrored is not None and mirrored.shape != latents.shape)
            or labels.shape != (self.count,)
        ):
            raise CheckpointError(
                f"{self.directory}: shards do not hold {self.count} latents of shape {shape}"
            )
        return latents, mirrored, labels
