"""Stage 3, `latents`: encode the training set (and its mirror images) with the trained tokenizer.

Output, under `<cache>/latents/<id>/` (regenerable, so outside the checkpoint dir): the shards of
`training.latent_shards`, whose id names the EMA tokenizer weights that made them. The checkpoint dir
gets `latent_stats.safetensors`: channel mean and std over (N, H, W) of the un-flipped latents,
computed in float64 from the unrounded values (the generator trains on latents normalised by them).

Mirror images are encoded when the recipe trains with flips (`tokenizer.hflip`), from the VFM
tokens the feature cache already holds. A recipe that never flips gets no `latents_flip`, which saves
a second VFM pass over the whole training set; the generator then never flips either (`meta.json`
says `"flips"`).

The EMA weights are encoded because they are what the service decodes with, so the DiT learns the
exact latent distribution that will be decoded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model.checkpoint import LATENT_STATS_FILE, CheckpointError, read_metadata, save_tensors
from training.distributed import barrier, broadcast_flag
from training.feature_cache import FeatureCache
from training.latent_shards import SHARD_SIZE, LatentShards, LatentShardWriter
from training.stages import assets
from training.stages.context import StageContext

STAGE = "latents"


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
        hflip = ctx.recipe.tokenizer.hflip
        feats = None
        if ctx.preset.autoencoder.uses_vfm:  # collective: every rank joins
            feats = assets.vfm_features(ctx, assets.frozen_vfm(ctx), train, "train", hflip)
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
    feats: FeatureCache | None,
    hflip: bool,
) -> None:
    from tqdm import tqdm

    device = ctx.env.device
    pae = assets.load_autoencoder(ctx, ema=True)
    n = len(train)
    d = ctx.preset.latent_shape[0]
    total = torch.zeros(d, dtype=torch.float64)
    total_sq = torch.zeros(d, dtype=torch.float64)
    cells = 0
    batch = 500
    with LatentShardWriter(directory, pae_sha, ctx.preset.latent_shape, hflip) as writer:
        bar = tqdm(total=n, desc="latents", unit="img", mininterval=2.0)
        for shard_start in range(0, n, SHARD_SIZE):
            count = min(SHARD_SIZE, n - shard_start)
            parts: dict[str, list[torch.Tensor]] = {"latents": [], "latents_flip": [], "labels": []}
            for start in range(shard_start, shard_start + count, batch):
                idx = list(range(start, min(start + batch, shard_start + count)))
                items = [train[i] for i in idx]
                x = torch.stack([it[0] for it in items]).to(device)
                labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
                z = pae.encode(x, None if feats is None else feats[idx].to(device)).float()
                if hflip:
                    h_flip = None if feats is None else feats[[i + n for i in idx]].to(device)
                    parts["latents_flip"].append(pae.encode(torch.flip(x, dims=(-1,)), h_flip).half().cpu())
                z64 = z.double().cpu()
                total += z64.sum(dim=(0, 2, 3))
                total_sq += z64.square().sum(dim=(0, 2, 3))
                cells += z.shape[0] * z.shape[2] * z.shape[3]
                parts["latents"].append(z.half().cpu())
                parts["labels"].append(labels)
                bar.update(len(idx))
            writer.write_shard(shard_start, {k: torch.cat(v) for k, v in parts.items() if v})
        bar.close()
        mean = total / cells
        std = (total_sq / cells - mean.square()).clamp_min(0).sqrt()
        writer.finish(n)
    save_tensors(
        ctx.out / LATENT_STATS_FILE,
        {"mean": mean.float(), "std": std.float()},
        {"source": "un-flipped training latents", "count": str(n), "pae_ema_sha256": pae_sha},
    )
