"""Loading what stages share: datasets, the cached VFM tokens, and trained weights in the output dir.

Rank 0 builds a feature cache while the other ranks wait, then everyone opens the same directory;
that keeps the expensive VFM pass from running once per process. The output dir is a checkpoint
directory: its file names and loaders are those of `model/checkpoint.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model import checkpoint
from model.autoencoders import Autoencoder
from model.checkpoint import CheckpointError, save_tensors
from model.lightningdit import LightningDiT
from model.vfm import FrozenVFM, build_vfm
from training.data import LabeledImages, WithFlips, build_dataset
from training.data.subset import ClassBalancedSubset
from training.distributed import barrier, unwrap
from training.feature_cache import FeatureCache, build_feature_cache
from training.stages.context import StageContext


def dataset(ctx: StageContext, split: str) -> LabeledImages:
    """The preset's dataset split at the tokenizer's image size (no augmentation: flips are explicit).

    The training split is cut to the recipe's `data.train_per_class` images per class when that is set.
    """
    data = build_dataset(ctx.preset.dataset, split, root=ctx.data_root, image_size=ctx.preset.pae.image_size)
    per_class = ctx.recipe.data.train_per_class
    if split == "train" and per_class:
        return ClassBalancedSubset(data, per_class)
    return data


def dataset_key(ctx: StageContext) -> str:
    """The dataset's name in cache keys: the subset size is part of it, so caches never mix."""
    per_class = ctx.recipe.data.train_per_class
    return f"{ctx.preset.dataset}-{per_class}pc" if per_class else ctx.preset.dataset


def vfm_features(
    ctx: StageContext, vfm: FrozenVFM, base: LabeledImages, split: str, flips: bool
) -> FeatureCache:
    """The VFM tokens of `base` (and of its mirror images at index N + i when `flips`), cached.

    Built once by rank 0 under `<cache>/features`, keyed by the VFM fingerprint and the data.
    """
    data = WithFlips(base) if flips else base
    kwargs = {
        "dataset_name": dataset_key(ctx),
        "split": split,
        "image_size": ctx.preset.pae.image_size,
        "flip": "both" if flips else "none",
        "root": str(ctx.cache / "features"),
        "device": ctx.env.device,
        "batch_size": 256,
    }
    if ctx.env.is_main:
        from tqdm import tqdm

        bar = tqdm(total=len(data), desc=f"vfm features ({split})", unit="img", mininterval=2.0)

        def progress(done: int, total: int) -> None:
            bar.n = done
            bar.refresh()

        try:
            build_feature_cache(vfm, data, progress=progress, **kwargs)
        finally:
            bar.close()
    barrier(ctx.env)
    return build_feature_cache(vfm, data, on_corrupt="error", **kwargs)


def frozen_vfm(ctx: StageContext) -> FrozenVFM:
    return build_vfm(ctx.preset.pae.vfm).to(ctx.env.device)


def save_weights(
    path: Path, module: nn.Module | dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """A module's state dict (or a tensor dict) as safetensors."""
    tensors = module if isinstance(module, dict) else unwrap(module).state_dict()
    save_tensors(path, tensors, metadata)


def autoencoder_path(ctx: StageContext, ema: bool = True) -> Path:
    """Where the tokenizer stage writes the preset's autoencoder (live or EMA weights)."""
    live, averaged = checkpoint.autoencoder_files(ctx.preset.autoencoder.kind)
    return ctx.out / (averaged if ema else live)


def load_autoencoder(ctx: StageContext, ema: bool = True, with_vfm: bool = False) -> Autoencoder:
    """The trained tokenizer (PAE, or the preset's comparison autoencoder) from the output dir, in
    eval mode on this rank's device."""
    path = autoencoder_path(ctx, ema)
    if not path.is_file():
        raise CheckpointError(f"{path} not found: run the tokenizer stage into {ctx.out} first")
    vfm = build_vfm(ctx.preset.pae.vfm) if with_vfm else None
    return checkpoint.load_autoencoder(path, ctx.preset, vfm).to(ctx.env.device)


def load_dit_ema(ctx: StageContext) -> LightningDiT:
    path = ctx.out / checkpoint.DIT_EMA_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: run the generator stage into {ctx.out} first")
    return checkpoint.load_dit(path, ctx.preset.dit).to(ctx.env.device)


def load_latent_stats(ctx: StageContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel mean and std (each shape d) of the un-flipped training latents."""
    return checkpoint.load_latent_stats(ctx.out / checkpoint.LATENT_STATS_FILE, ctx.preset.latent_shape[0])


def as_grid(t: torch.Tensor) -> torch.Tensor:
    """A d-vector as 1×d×1×1, to broadcast over B×d×h×w latents."""
    return t.reshape(1, -1, 1, 1)
