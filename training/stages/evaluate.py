"""Stage 5, `evaluate`: reconstruction, latent geometry and generation metrics → `metrics.json`.

All measured on the evaluation split (Fashion-MNIST `test`, ImageNet `val`) with the EMA tokenizer
(the weights the service uses) and the EMA DiT:

- `recon`: PSNR, SSIM, LPIPS (VGG16) over `num_samples` images, and the Fréchet distance of the
  reconstructions to the originals in the named `fd_network`'s feature space (EfficientNet-Lite2
  pooled features by default: neither the VFM nor the LPIPS network; `inception-v3` is the real FID
  network and needs the user's weights file).
- `latent`: SSC (spectral clustering of each image's tokens against its object-vs-background mask —
  defined only for dark-background data such as Fashion-MNIST, reported as null otherwise), LPC,
  GSQ (1-NN label purity of pooled latents) and eRank, each with its sample count.
- `gen`: `gen.num_samples` class-balanced samples at the preset's sampler settings, image i from seed
  `gen.seed + i`; FD against the evaluation split, and `cond_acc`, the share of samples the shipped
  classifier assigns to the requested class (`classifier.safetensors`, trained on the training split
  here when absent).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from model.checkpoint import CLASSIFIER_FILE, to_jsonable
from training.distributed import barrier
from training.feature_cache import FeatureCache
from training.lpips import LPIPS
from training.metrics.classifier import (
    ClassifierConfig,
    accuracy,
    load_classifier,
    save_classifier,
    train_classifier,
)
from training.metrics.frechet import EfficientNetLite2Features, GaussianStats, frechet_distance_from_stats
from training.metrics.geometry import erank, foreground_masks, gsq, lpc, ssc
from training.metrics.recon import psnr, ssim
from training.stages import assets
from training.stages.context import StageContext
from training.stages.grid import generate

STAGE = "evaluate"
MASKED_DATASETS = ("fashion-mnist", "fmnist", "fashion_mnist", "mnist-5k", "mnist5k")
CLASSIFIER_MAX_SIZE = 64  # the small CNN is a sensible judge of small images only, not of ImageNet-256


def fd_network(name: str) -> Any:
    """The named feature network for Fréchet distances (see `EvaluateConfig.fd_network`)."""
    if name == "efficientnet-lite2":
        return EfficientNetLite2Features()
    if name == "inception-v3":
        from training.metrics.inception import load_fid_inception

        return load_fid_inception()
    raise ValueError(f"unknown FD network {name!r}")


def run(ctx: StageContext) -> dict[str, Any]:
    """Compute every metric (rank 0; other ranks wait) and merge them into metrics.json."""
    ctx.require("tokenizer", STAGE)
    ctx.require("generator", STAGE)
    ctx.write_config()
    split = ctx.recipe.evaluate.split
    data = assets.dataset(ctx, split)
    feats = None
    if ctx.preset.autoencoder.uses_vfm:  # collective
        feats = assets.vfm_features(ctx, assets.frozen_vfm(ctx), data, split, False)
    if ctx.env.is_main:
        ctx.write_metrics(compute_metrics(ctx, data, feats))
    barrier(ctx.env)
    return {"finished": True}


def _subset(requested: int, available: int) -> int:
    """`requested` images (0 = all `available`), never more than there are."""
    return available if requested == 0 else min(requested, available)


@torch.no_grad()
def compute_metrics(ctx: StageContext, data: Any, feats: FeatureCache | None) -> dict[str, Any]:
    """Every metric on the evaluation split `data` whose VFM tokens are `feats` (None for an
    autoencoder without a VFM)."""
    cfg, device, preset = ctx.recipe.evaluate, ctx.env.device, ctx.preset
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    pae = assets.load_autoencoder(ctx, ema=True)
    lpips_net = LPIPS().to(device)
    network = fd_network(cfg.fd_network).to(device)
    count = _subset(cfg.num_recon, len(data))
    n_lpips, n_fd = _subset(cfg.lpips_samples, count), _subset(cfg.fd_samples, count)

    real_stats, recon_stats = GaussianStats(network.dim), GaussianStats(network.dim)
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    latents, labels, images_kept = [], [], []
    keep = max(cfg.ssc_samples, cfg.lpc_samples)
    for start in range(0, count, cfg.batch_size):
        idx = list(range(start, min(start + cfg.batch_size, count)))
        items = [data[i] for i in idx]
        x = torch.stack([it[0] for it in items]).to(device)
        z = pae.encode(x, None if feats is None else feats[idx].to(device))
        x_hat = pae.decode(z).clamp(0, 1)
        sums["psnr"] += float(psnr(x_hat, x, reduction="none").sum())
        sums["ssim"] += float(ssim(x_hat, x, reduction="none").sum())
        if start < n_lpips:
            m = min(len(idx), n_lpips - start)
            sums["lpips"] += float(lpips_net(x_hat[:m], x[:m]).sum())
        if start < n_fd:
            m = min(len(idx), n_fd - start)
            real_stats.update(network.features(x[:m]))
            recon_stats.update(network.features(x_hat[:m]))
        latents.append(z.float().cpu())
        labels.append(torch.tensor([it[1] for it in items]))
        if sum(t.shape[0] for t in images_kept) < keep:
            images_kept.append(x.cpu())
    recon_fd = frechet_distance_from_stats(recon_stats, real_stats, network.name)
    recon = {
        "psnr": sums["psnr"] / count,
        "ssim": sums["ssim"] / count,
        "lpips": sums["lpips"] / n_lpips,
        "fd": recon_fd["fd"],
        "fd_network": network.name,
        "num_samples": count,
        "lpips_num_samples": n_lpips,
        "fd_num_samples": n_fd,
        "split": cfg.split,
    }
    timings["recon"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    z_all, y_all = torch.cat(latents), torch.cat(labels)
    kept = torch.cat(images_kept)
    latent: dict[str, Any] = {"num_samples": count}
    if preset.dataset in MASKED_DATASETS:
        n_ssc = min(cfg.ssc_samples, count)
        masks = foreground_masks(kept[:n_ssc], preset.latent_shape[1])
        latent["ssc"] = ssc(z_all[:n_ssc], masks, seed=ctx.seed)
        latent["ssc_num_samples"] = n_ssc
        latent["ssc_segmentation"] = "foreground mask (grey > 0.05, ≥ 50% of a cell)"
    else:
        latent["ssc"] = None
        latent["ssc_segmentation"] = "unavailable: needs per-image segmentations (e.g. COCO panoptic)"
    n_lpc = min(cfg.lpc_samples, count)
    gen_lpc = torch.Generator().manual_seed(ctx.seed)
    lpc_out = lpc(
        z_all[:n_lpc].to(device), pae.decode, lpips_net, generator=gen_lpc, batch_size=cfg.batch_size
    )
    latent.update({"lpc": lpc_out["lpc"], "lpc_per_rho": lpc_out["per_rho"], "lpc_num_samples": n_lpc})
    latent["gsq"] = gsq(z_all, y_all)
    latent["erank"] = erank(z_all)
    timings["latent"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    classifier, clf_acc = _classifier(ctx, data)
    dit = assets.load_dit_ema(ctx)
    mean, std = assets.load_latent_stats(ctx)
    num_classes = preset.dit.num_classes
    gen_labels = torch.arange(cfg.gen_num_samples) % num_classes
    seeds = torch.arange(cfg.gen_num_samples, dtype=torch.int64) + cfg.gen_seed
    samples = generate(dit, pae, gen_labels, seeds, preset.sampler, mean, std, batch_size=cfg.batch_size)
    gen_stats = GaussianStats(network.dim)
    for start in range(0, samples.shape[0], cfg.batch_size):
        gen_stats.update(network.features(samples[start : start + cfg.batch_size].to(device)))
    gen_fd = frechet_distance_from_stats(gen_stats, real_stats, network.name)
    gen = {
        "fd": gen_fd["fd"],
        "fd_network": network.name,
        "num_samples": cfg.gen_num_samples,
        "num_reference_samples": n_fd,
        "seed": cfg.gen_seed,
        "cond_acc": accuracy(classifier.to(device), samples.to(device), gen_labels)
        if classifier is not None
        else None,
        "sampler": to_jsonable(preset.sampler),
    }
    timings["gen"] = time.perf_counter() - t0
    out: dict[str, Any] = {
        "recon": recon,
        "latent": latent,
        "gen": gen,
        "wall_s": {f"{STAGE}_parts": timings},
    }
    if clf_acc is not None:
        out["classifier"] = {"test_acc": clf_acc, "split": cfg.split}
    return out


def _classifier(ctx: StageContext, test_data: Any) -> tuple[Any, float | None]:
    """The shipped classifier (trained on the training split when `classifier.safetensors` is absent)
    and its accuracy on the evaluation split; `(None, None)` for images above `CLASSIFIER_MAX_SIZE`."""
    size = ctx.preset.pae.image_size
    path = ctx.out / CLASSIFIER_FILE
    if path.is_file():
        model = load_classifier(path)
    else:
        if size > CLASSIFIER_MAX_SIZE:
            return None, None
        train = assets.dataset(ctx, "train")
        cfg = ClassifierConfig(num_classes=ctx.preset.dit.num_classes, image_size=size)
        steps, seed = ctx.recipe.evaluate.classifier_steps, ctx.recipe.evaluate.classifier_seed
        with torch.enable_grad():
            model = train_classifier(train, steps, seed, cfg=cfg)
        save_classifier(model, path)
        path.chmod(0o644)
    n = len(test_data)
    images = torch.stack([test_data[i][0] for i in range(n)])
    labels = torch.tensor([test_data[i][1] for i in range(n)])
    return model, accuracy(model, images, labels)
