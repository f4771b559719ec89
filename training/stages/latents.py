"""Stage 3, `latents`: encode the training set (and its mirror images) with the trained tokenizer.

Output, under `<cache>/latents/<id>/` (regenerable, so outside the checkpoint dir): safetensors shards
of up to `SHARD_SIZE` images with `latents`, `latents_flip` and `labels` (int64), plus `meta.json`.
Latents are float16 (sphere tokens have |z| ≤ √d, where float16 keeps 3 significant digits). The id
names the EMA tokenizer weights that made them. The checkpoint dir gets `latent_stats.safetensors`:
channel mean and std over (N, H, W) of the un-flipped latents, computed in float64 from the
unrounded values (PAE_SPEC §3.4).

Mirror images are encoded when the preset trains with flips (`tokenizer_train.hflip`), from the VFM
tokens the feature cache already holds. A preset that never flips (Fashion-MNIST: its shoes all face
one way, so mirrored samples would be off-distribution) gets no `latents_flip`, which saves a second
VFM pass over the whole training set; the DiT then never flips either (`meta.json` says `"flips"`).

The EMA weights are encoded because they are what the service decodes with, so the DiT learns the
exact latent distribution that will be decoded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from model.checkpoint import LATENT_STATS_FILE, CheckpointError, read_metadata, save_tensors
from training.distributed import barrier, broadcast_flag
from training.feature_cache import FeatureCache
from training.stages import assets
from training.stages.context import StageContext

STAGE = "latents"
SHARD_SIZE = 10_000
FORMAT = 1


def latents_dir(ctx: StageContext, pae_sha: str, count: int) -> Path:
    return ctx.cache / "latents" / f"{assets.dataset_key(ctx)}-train-{count}-{pae_sha[:20]}"


def run(ctx: StageContext) -> dict[str, Any]:
    """Encode (rank 0; other ranks wait), write shards and stats; returns the stage record."""
    rec = ctx.require("tokenizer", STAGE)
    pae_sha = rec["pae_ema_sha256"]
    ctx.write_config()
    train = assets.dataset(ctx, "train")
    directory = latents_dir(ctx, pae_sha, len(train))
    if broadcast_flag(ctx.env.is_main and not _complete(ctx, directory, pae_sha), ctx.env):
        vfm = assets.frozen_vfm(ctx)
        hflip = ctx.preset.tokenizer_train.hflip
        feats = assets.vfm_features(ctx, vfm, train, "train", hflip)  # collective: every rank joins
        if ctx.env.is_main:
            _encode(ctx, train, directory, pae_sha, feats, hflip)
    barrier(ctx.env)
    shards = LatentShards(directory)
    if shards.meta["pae_ema_sha256"] != pae_sha:
        raise CheckpointError(f"{directory} was encoded by other tokenizer weights; delete it and rerun")
    return {
        "finished": True,
        "latents_dir": str(directory),
        "latents_id": directory.name,
        "count": len(shards),
    }


def _complete(ctx: StageContext, directory: Path, pae_sha: str) -> bool:
    """Shards and matching stats already written by these tokenizer weights (and not forced to redo)."""
    stats = ctx.out / LATENT_STATS_FILE
    if ctx.force or not stats.is_file():
        return False
    try:
        LatentShards(directory)
        return read_metadata(stats).get("pae_ema_sha256") == pae_sha
    except CheckpointError:
        return False


@torch.no_grad()
def _encode(
    ctx: StageContext,
    train: Any,
    directory: Path,
    pae_sha: str,
    feats: FeatureCache,
    hflip: bool,
) -> None:
    from tqdm import tqdm

    if directory.exists():
        shutil.rmtree(directory)
    device = ctx.env.device
    pae = assets.load_pae(ctx, ema=True)
    n = len(train)
    d = ctx.preset.pae.latent_dim
    total = torch.zeros(d, dtype=torch.float64)
    total_sq = torch.zeros(d, dtype=torch.float64)
    cells = 0
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    shards = []
    batch = 500
    try:
        bar = tqdm(total=n, desc="latents", unit="img", mininterval=2.0)
        for shard_start in range(0, n, SHARD_SIZE):
            count = min(SHARD_SIZE, n - shard_start)
            parts: dict[str, list[torch.Tensor]] = {"latents": [], "latents_flip": [], "labels": []}
            for start in range(shard_start, shard_start + count, batch):
                idx = list(range(start, min(start + batch, shard_start + count)))
                items = [train[i] for i in idx]
                x = torch.stack([it[0] for it in items]).to(device)
                labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
                z = pae.encode(x, feats[idx].to(device)).float()
                if hflip:
                    h_flip = feats[[i + n for i in idx]].to(device)
                    parts["latents_flip"].append(pae.encode(torch.flip(x, dims=(-1,)), h_flip).half().cpu())
                z64 = z.double().cpu()
                total += z64.sum(dim=(0, 2, 3))
                total_sq += z64.square().sum(dim=(0, 2, 3))
                cells += z.shape[0] * z.shape[2] * z.shape[3]
                parts["latents"].append(z.half().cpu())
                parts["labels"].append(labels)
                bar.update(len(idx))
            name = f"shard_{len(shards):05d}.safetensors"
            save_tensors(staging / name, {k: torch.cat(v) for k, v in parts.items() if v})
            shards.append({"file": name, "start": shard_start, "count": count})
        bar.close()
        mean = total / cells
        std = (total_sq / cells - mean.square()).clamp_min(0).sqrt()
        meta = {
            "format": FORMAT,
            "pae_ema_sha256": pae_sha,
            "count": n,
            "latent_shape": list(ctx.preset.pae.latent_shape),
            "dtype": "float16",
            "flips": hflip,
            "shards": shards,
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    save_tensors(
        ctx.out / LATENT_STATS_FILE,
        {"mean": mean.float(), "std": std.float()},
        {"source": "un-flipped training latents", "count": str(n), "pae_ema_sha256": pae_sha},
    )


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
