"""Stage 1, `refine`: turn frozen VFM tokens into spatially clean d-channel targets Z_T (the paper's
prior refinement, which runs before tokenizer training).

A projector P_t (PAE's own projector design: residual-free attention, 3×3 conv to d channels, RMS
sphere) compresses the VFM tokens H; a small ViT Q_t must rebuild H from Z_T = P_t(H), so Z_T keeps
the VFM's content. The loss is

    λ_rep·‖Q_t(P_t(H)) − H‖² + λ_gram·‖Gram(Z_T) − Gram(H_ref)‖²

with cosine Grams over tokens (the `ssr_loss` form: rotation-invariant, mean over N² entries) and H
per-token standardised (LayerNorm without affine, as PAE's DAM sees it), so λ_rep does not depend on
the VFM's activation scale.

H_ref, the structural reference. The paper upsamples the VFM map to image resolution with AnyUp, a
learned feature upsampler, applies a low-pass "spatial normalisation" of strength 0.4 and bilinearly
downsamples back to the token grid. AnyUp's weights are not obtainable offline, so this stage uses a
fixed substitute (`lowpass_reference`): bilinear ×`upsample` upsampling, a Gaussian low-pass blended
in at `lowpass_strength` (σ in upsampled pixels), then area downsampling back to the grid. It keeps
the intent — a smoother token-affinity structure than the raw map's, without per-token noise — but not
AnyUp's edge-aware sharpening.

Outputs: `refine.safetensors` (P_t as `projector.*`, Q_t as `reconstructor.*`) in the checkpoint dir,
and the targets Z_T of every training image (and mirror image when the tokenizer flips) as a
feature cache under `<cache>/targets`, keyed by the VFM fingerprint and the P_t weights.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from model.checkpoint import REFINE_FILE
from model.pae import Projector, ViTBlock, init_weights, sphere_norm
from model.pos_embed import sincos_2d
from training.distributed import ShardedBatches, barrier, unwrap, wrap_ddp
from training.feature_cache import FeatureCache, build_feature_cache
from training.losses import ssr_loss
from training.optim import build_adamw, build_scheduler
from training.recipes import RefineConfig
from training.stages import assets
from training.stages.common import Trainables, begin_training, seed_init, train_and_record
from training.stages.context import StageContext

STAGE = "refine"


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


@functools.lru_cache(maxsize=8)
def lowpass_operators(grid: int, upsample: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`grid`×`grid` matrices (A_plain, A_blur), float64, such that per channel
    down(up(X)) = A_plain·X·A_plainᵀ and down(Gaussian(up(X))) = A_blur·X·A_blurᵀ.

    Bilinear upsampling, the reflect-padded Gaussian and area averaging are each linear and separable,
    so each path is one small matrix per axis, built by pushing the identity basis through the same
    torch ops.
    """
    size = grid * upsample
    eye = torch.eye(grid, dtype=torch.float64)
    up = F.interpolate(eye.view(grid, 1, grid), size=size, mode="linear", align_corners=False)[:, 0].T
    kernel = _gaussian_kernel(sigma)
    pad = min(kernel.numel() // 2, size - 1)
    kernel = kernel[kernel.numel() // 2 - pad : kernel.numel() // 2 + pad + 1]
    basis = torch.eye(size, dtype=torch.float64).view(size, 1, size)
    blur = F.conv1d(F.pad(basis, (pad, pad), mode="reflect"), (kernel / kernel.sum()).view(1, 1, -1))[:, 0].T
    down = F.adaptive_avg_pool1d(torch.eye(size, dtype=torch.float64).view(size, 1, size), grid)[:, 0].T
    return down @ up, down @ blur @ up


def lowpass_reference(
    h: torch.Tensor, grid: int, upsample: int, sigma: float, strength: float
) -> torch.Tensor:
    """H_ref from B×N×D tokens on a `grid`×`grid` map (the offline stand-in for AnyUp + low-pass).

    Bilinear ×`upsample`, then (1 − strength)·map + strength·Gaussian(map, σ) with reflect padding,
    then area-average back to `grid`×`grid`, evaluated exactly with `lowpass_operators`. Returns B×N×D.
    """
    b, n, d = h.shape
    if n != grid * grid:
        raise ValueError(f"lowpass_reference: {n} tokens do not form a {grid}×{grid} grid")
    plain, blur = (a.to(h.device, torch.float32) for a in lowpass_operators(grid, upsample, float(sigma)))
    fmap = h.float().reshape(b, grid, grid, d)
    out = (1.0 - strength) * torch.einsum("ij,bjkd,lk->bild", plain, fmap, plain)
    out = out + strength * torch.einsum("ij,bjkd,lk->bild", blur, fmap, blur)
    return out.reshape(b, n, d).to(h.dtype)


def standardize(h: torch.Tensor) -> torch.Tensor:
    """Per-token LayerNorm without affine: the scale-free form of VFM tokens both P_t and Q_t use."""
    return F.layer_norm(h.float(), (h.shape[-1],))


class Reconstructor(nn.Module):
    """Q_t: latent B×d×g×g → B×N×D VFM tokens. 3×3 conv up to D, sin-cos positions, `depth` pre-LN ViT
    blocks, LayerNorm and a linear head."""

    def __init__(
        self, latent_dim: int, dim: int, heads: int, grid: int, depth: int, mlp_ratio: float
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(latent_dim, dim, kernel_size=3, padding=1)
        self.register_buffer("pos", sincos_2d(dim, grid).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv(z).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class RefineNet(nn.Module):
    """P_t and Q_t together: standardised VFM tokens → (Z_T on the sphere, rebuilt tokens)."""

    def __init__(self, ctx_dim: int, heads: int, grid: int, latent_dim: int, cfg: RefineConfig) -> None:
        super().__init__()
        self.projector = Projector(ctx_dim, heads, latent_dim, grid)
        self.reconstructor = Reconstructor(latent_dim, ctx_dim, heads, grid, cfg.depth, cfg.mlp_ratio)
        # PAE's own init, so P_t starts like the tokenizer's projector: token magnitudes well above the
        # sphere norm's epsilon and a near-identity token mixer.
        self.apply(init_weights)
        self.projector.attn.init_near_identity()

    def forward(self, h_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = sphere_norm(self.projector(h_std))
        return z, self.reconstructor(z)


def build_refine_net(ctx: StageContext) -> RefineNet:
    spec = ctx.preset.pae.vfm
    return RefineNet(spec.dim, spec.heads, spec.grid, ctx.preset.pae.latent_dim, ctx.recipe.refine)


class TargetProjector(nn.Module):
    """Frozen P_t as a token "encoder" for the feature-cache builder: B×N×D VFM tokens → B×N×d Z_T.

    Its fingerprint combines the VFM's and the projector's weights, so targets are recomputed
    whenever either changes.
    """

    def __init__(self, projector: Projector, vfm_fingerprint: str) -> None:
        super().__init__()
        self.projector = projector.eval().requires_grad_(False)
        digest = hashlib.sha256(vfm_fingerprint.encode())
        for name, tensor in sorted(projector.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
        self._fingerprint = digest.hexdigest()

    def fingerprint(self) -> str:
        return self._fingerprint

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return sphere_norm(self.projector(standardize(h))).flatten(2).transpose(1, 2)


class CachedTokens(Dataset):
    """Rows of a feature cache as `(tokens, 0)` items, the input of the target builder."""

    def __init__(self, cache: FeatureCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.cache[int(index)], 0


def run(ctx: StageContext) -> dict[str, Any]:
    """Train P_t/Q_t, save them, write Z_T for the training set; returns the stage record."""
    cfg, env = ctx.recipe.refine, ctx.env
    spec = ctx.preset.pae.vfm
    flips = ctx.recipe.tokenizer.hflip
    vfm = assets.frozen_vfm(ctx)
    fingerprint = vfm.fingerprint()
    ctx.write_config(fingerprint)
    train = assets.dataset(ctx, "train")
    feats = assets.vfm_features(ctx, vfm, train, "train", flips)
    del vfm

    seed_init(ctx.seed)
    net = build_refine_net(ctx).to(env.device)
    opt = build_adamw(net, cfg.lr, weight_decay=cfg.weight_decay)
    sched = build_scheduler(opt, cfg.warmup_steps, cfg.steps, "cosine", cfg.lr_min / cfg.lr)
    state = Trainables({"net": net}, {"opt": opt}, {"opt": sched})
    stage_run, start = begin_training(ctx, STAGE, state)
    model = wrap_ddp(net, env)
    order = ShardedBatches(len(feats), cfg.batch_size, env, seed=ctx.seed)
    batches = order(start)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        idx = [i for i, _ in next(batches)]
        h = standardize(feats[idx].to(env.device))
        z, h_hat = model(h)
        parts: dict[str, torch.Tensor] = {}
        loss = h.new_zeros(())
        if cfg.rep_weight > 0:
            parts["rep"] = F.mse_loss(h_hat, h)
            loss = loss + cfg.rep_weight * parts["rep"]
        if cfg.gram_weight > 0:
            with torch.no_grad():
                h_ref = lowpass_reference(h, spec.grid, cfg.upsample, cfg.lowpass_sigma, cfg.lowpass_strength)
            parts["gram"] = ssr_loss(z, h_ref)
            loss = loss + cfg.gram_weight * parts["gram"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}

    def save() -> None:
        assets.save_weights(ctx.out / REFINE_FILE, net, {"vfm_fingerprint": fingerprint})

    def outputs() -> dict[str, Any]:
        targets = _write_targets(ctx, unwrap(net), feats, fingerprint, flips)
        return {"targets_dir": targets.directory, "targets_id": targets.key_fields["vfm"], "flips": flips}

    return train_and_record(
        ctx,
        stage_run,
        state,
        step_fn,
        steps=cfg.steps,
        log_every=cfg.log_every,
        ckpt_every=cfg.ckpt_every,
        start_step=start,
        save=save,
        outputs=outputs,
    )


def _write_targets(
    ctx: StageContext, net: RefineNet, feats: FeatureCache, fingerprint: str, flips: bool
) -> FeatureCache:
    """Z_T = P_t(H) for every cached row, as a float16 feature cache (built by rank 0)."""
    projector = TargetProjector(net.projector, fingerprint).to(ctx.env.device)
    kwargs = {
        "dataset_name": f"{assets.dataset_key(ctx)}-refined",
        "split": "train",
        "image_size": ctx.preset.pae.image_size,
        "flip": "both" if flips else "none",
        "root": str(ctx.cache / "targets"),
        "device": ctx.env.device,
        "batch_size": 512,
    }
    if ctx.env.is_main:
        build_feature_cache(projector, CachedTokens(feats), **kwargs)
    barrier(ctx.env)
    return build_feature_cache(projector, CachedTokens(feats), on_corrupt="error", **kwargs)
