"""Generation FD at the evaluate stage's protocol, for any DiT weights and sampler, and the real-data floor
it is read against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model.autoencoders import Autoencoder
from model.checkpoint import CheckpointError, load_tensors, read_metadata, save_tensors
from model.lightningdit import LightningDiT
from model.sampling import SamplerConfig
from training.checkpoint import resume_dir
from training.data import LabeledImages
from training.metrics.frechet import EfficientNetLite2Features, GaussianStats, frechet_distance_from_stats
from training.stages import assets
from training.stages.context import StageContext
from training.stages.grid import generate


class FDProbe:
    """Generation FD exactly as the evaluate stage measures `gen.fd`, for any DiT weights and sampler.

    `num_samples` class-balanced labels (i mod C), image i from seed `seed + i`, decoded by the EMA
    tokenizer, EfficientNet-Lite2 features against the fixed real reference statistics.
    """

    def __init__(
        self, network: EfficientNetLite2Features, reference: GaussianStats, ctx: StageContext
    ) -> None:
        self.network = network
        self.reference = reference
        self.num_samples = ctx.recipe.evaluate.gen_num_samples
        self.seed = ctx.recipe.evaluate.gen_seed
        self.batch_size = ctx.recipe.evaluate.batch_size

    @torch.no_grad()
    def __call__(
        self,
        dit: LightningDiT,
        pae: Autoencoder,
        sampler: SamplerConfig,
        mean: torch.Tensor,
        std: torch.Tensor,
    ) -> float:
        labels = torch.arange(self.num_samples) % dit.cfg.num_classes
        seeds = torch.arange(self.num_samples, dtype=torch.int64) + self.seed
        images = generate(dit, pae, labels, seeds, sampler, mean, std, batch_size=self.batch_size)
        stats = GaussianStats(self.network.dim)
        device = next(self.network.parameters()).device
        for start in range(0, images.shape[0], self.batch_size):
            stats.update(self.network.features(images[start : start + self.batch_size].to(device)))
        return float(frechet_distance_from_stats(stats, self.reference, self.network.name)["fd"])


def _real_features(
    ctx: StageContext,
    data: LabeledImages,
    network: EfficientNetLite2Features,
    start: int,
    count: int,
    cache_file: Path,
) -> GaussianStats:
    """Statistics of evaluation images `start … start + count` of `data` (the evaluation split), their
    features cached as safetensors in `cache_file` so a resumed or repeated run does not recompute them."""
    meta = {
        "dataset": ctx.preset.dataset,
        "data_root": str(ctx.data_root),
        "split": ctx.recipe.evaluate.split,
        "start": str(start),
        "count": str(count),
        "network": network.name,
        "image_size": str(ctx.preset.pae.image_size),
    }
    feats = None
    if cache_file.is_file() and read_metadata(cache_file) == meta:
        feats = load_tensors(cache_file)["features"]
    if feats is None:
        device = next(network.parameters()).device
        rows = []
        for first in range(start, start + count, ctx.recipe.evaluate.batch_size):
            idx = range(first, min(first + ctx.recipe.evaluate.batch_size, start + count))
            x = torch.stack([data[i][0] for i in idx]).to(device)
            rows.append(network.features(x).cpu())
        feats = torch.cat(rows)
        save_tensors(cache_file, {"features": feats}, meta)
    stats = GaussianStats(network.dim)
    for first in range(0, feats.shape[0], ctx.recipe.evaluate.batch_size):
        stats.update(feats[first : first + ctx.recipe.evaluate.batch_size])
    return stats


def reference_count(ctx: StageContext, available: int) -> int:
    """How many of the `available` evaluation images form the real reference set (the evaluate stage's
    `fd_samples`)."""
    count = available if ctx.recipe.evaluate.num_recon == 0 else min(ctx.recipe.evaluate.num_recon, available)
    return count if ctx.recipe.evaluate.fd_samples == 0 else min(ctx.recipe.evaluate.fd_samples, count)


def reference_stats(ctx: StageContext, network: EfficientNetLite2Features, cache_file: Path) -> GaussianStats:
    """The evaluate stage's real set: the first `reference_count` evaluation images."""
    data = assets.dataset(ctx, ctx.recipe.evaluate.split)
    return _real_features(ctx, data, network, 0, reference_count(ctx, len(data)), cache_file)


def real_floor(probe: FDProbe, ctx: StageContext, directory: Path) -> dict[str, Any]:
    """FD of held-out real images, as many as the generator is scored with, against the reference.

    A Fréchet distance from a few hundred samples carries a large small-sample bias, so no generator
    scores 0; this is what perfect samples would score under the same protocol, and the excess of an
    arm's FD over it is the part a better latent can remove. The images are the evaluation split's
    next `num_samples` after the reference set (disjoint from it); None where the split is too small.
    """
    data = assets.dataset(ctx, ctx.recipe.evaluate.split)
    start, count = reference_count(ctx, len(data)), probe.num_samples
    images = f"{ctx.recipe.evaluate.split}[{start}:{start + count}]"
    if start + count > len(data):
        return {"fd": None, "images": images, "note": "the evaluation split has too few images"}
    cache = directory / f"floor_{ctx.recipe.evaluate.split}_{start}_{count}.safetensors"
    stats = _real_features(ctx, data, probe.network, start, count, cache)
    fd = float(frechet_distance_from_stats(stats, probe.reference, probe.network.name)["fd"])
    return {"fd": fd, "images": images}


def ema_dit_at_resume(ctx: StageContext) -> LightningDiT:
    """The DiT's EMA weights as saved in its resume state (the point where `stop_at` paused it)."""
    path = resume_dir(ctx.out, "generator") / "state.safetensors"
    prefix = "ema.dit."
    shadow = {k[len(prefix) :]: v for k, v in load_tensors(path).items() if k.startswith(prefix)}
    dit = LightningDiT(ctx.preset.dit)
    expected = set(dit.state_dict())
    if set(shadow) != expected:
        raise CheckpointError(
            f"{path}: EMA tensors do not match the DiT (missing {sorted(expected - set(shadow))[:3]}, "
            f"unexpected {sorted(set(shadow) - expected)[:3]})"
        )
    dit.load_state_dict(shadow, strict=True)
    return dit.to(ctx.env.device).eval()
