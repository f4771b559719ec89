"""Stage 2, `tokenizer`: train PAE with L1 + LPIPS + GAN + λ·(SSR, MCR, SCR) (PAE_SPEC §2.5–2.8).

The frozen VFM never runs here: its tokens come from the feature cache (index N + i is image i
mirrored, so random flips stay exact), and the refined targets Z_T from the `refine` stage's cache.
A zero loss weight removes its term — with gan, ssr, mcr and scr all 0 this is the
reconstruction-only baseline, which needs neither the targets nor a discriminator.

Schedule: AdamW with the preset's betas and weight decay (none on biases, norms, 1-D parameters),
linear warmup then cosine to `lr_min`, an EMA of the weights, optional gradient clipping, and
`grad_accum` micro-batches per step. `batch_size` is the global batch, split evenly over ranks and
micro-batches. The GAN term joins at `gan_start_step` with the adaptive weight; the discriminator
(hinge loss on real vs 8-bit-quantised fakes, one forward on both halves so DDP sees one pass) is
updated from its own `disc_start_step`. bf16 autocast is used on CUDA only.

Under `torchrun` both networks are wrapped in DDP (gradients averaged across ranks every step) and
only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from model.checkpoint import PAE_EMA_FILE, PAE_FILE, REFINE_FILE, CheckpointError, read_metadata
from model.hashing import sha256_file
from model.pae import PAE
from training.discriminator import PatchDiscriminator
from training.distributed import DistEnv, ShardedBatches, barrier, unwrap, wrap_ddp
from training.losses import LossWeights, PAELoss, hinge_d_loss, quantize_fake
from training.lpips import LPIPS
from training.optim import EMA, build_adamw, build_scheduler, lr_factor
from training.stages import assets
from training.stages.common import (
    StageRun,
    Trainables,
    image_batches,
    restore_state,
    seed_init,
    seed_stream,
    train_loop,
    train_summary,
)
from training.stages.context import StageContext
from training.stages.refine import open_targets

STAGE = "tokenizer"


def micro_batch(global_batch: int, env: DistEnv, accum: int, what: str) -> int:
    """Per-rank micro-batch of a global batch; it must split evenly."""
    per = global_batch // (env.world_size * accum)
    if per < 1 or per * env.world_size * accum != global_batch:
        raise ValueError(
            f"{what}.batch_size {global_batch} must be a multiple of world size {env.world_size} × "
            f"grad_accum {accum}"
        )
    return per


def _clip(params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor | None:
    if max_norm is None:
        return None
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def run(ctx: StageContext) -> dict[str, Any]:
    """Train the tokenizer; writes `pae.safetensors`, `pae_ema.safetensors`; returns the stage record."""
    return fit(ctx)[0]


def fit(ctx: StageContext) -> tuple[dict[str, Any], Trainables]:
    """`run`, also returning this rank's trained objects (PAE, discriminator, optimisers, EMA)."""
    cfg, env, preset = ctx.preset.tokenizer_train, ctx.env, ctx.preset
    weights = LossWeights.from_config(cfg)
    needs_targets = weights.ssr_weight > 0 or weights.scr_weight > 0
    use_gan = weights.gan_weight > 0

    vfm = assets.frozen_vfm(ctx)
    fingerprint = vfm.fingerprint()
    ctx.write_config(fingerprint)
    train = assets.dataset(ctx, "train")
    n = len(train)
    feats = assets.vfm_features(ctx, vfm, train, "train", cfg.hflip)
    del vfm
    targets = None
    if needs_targets:
        rec = ctx.require("refine", STAGE)
        refine_meta = read_metadata(ctx.out / REFINE_FILE)
        if refine_meta.get("vfm_fingerprint") != fingerprint:
            raise CheckpointError(
                f"{ctx.out / REFINE_FILE} was trained on another VFM (fingerprint "
                f"{refine_meta.get('vfm_fingerprint')!r}, current {fingerprint!r}); rerun the refine stage"
            )
        if cfg.hflip and not rec.get("flips"):
            raise CheckpointError("the refined targets have no mirrored rows but hflip is on; rerun refine")
        targets = open_targets(rec["targets_dir"])

    seed_init(ctx.seed)
    pae = PAE(preset.pae).to(env.device)
    lpips = (
        LPIPS(net=cfg.lpips_net).to(env.device)
        if (weights.lpips_weight > 0 or weights.mcr_weight > 0)
        else None
    )
    disc = PatchDiscriminator(preset.pae.image_size).to(env.device) if use_gan else None
    criterion = PAELoss(weights, lpips, disc)
    opt_g = build_adamw(pae, cfg.lr, cfg.betas, cfg.weight_decay)
    min_ratio = min(1.0, cfg.lr_min / cfg.lr)
    sched_g = build_scheduler(opt_g, cfg.warmup_steps, cfg.steps, "cosine", min_ratio)
    ema = EMA(pae, cfg.ema_decay)
    state = Trainables({"pae": pae}, {"pae": opt_g}, {"pae": sched_g}, {"pae": ema})
    if disc is not None:
        opt_d = build_adamw(disc, cfg.disc_lr, cfg.betas, cfg.weight_decay)
        state.modules["disc"] = disc
        state.optimizers["disc"] = opt_d

    run_ = StageRun(STAGE, ctx.out, env)
    seed_stream(ctx.seed, env)
    start, _ = restore_state(run_, state)
    pae_ddp = wrap_ddp(pae, env)
    disc_ddp = wrap_ddp(disc, env) if disc is not None else None

    accum = cfg.grad_accum
    per_rank = micro_batch(cfg.batch_size, env, accum, "tokenizer")
    order = ShardedBatches(n, per_rank, env, seed=ctx.seed, flip_prob=0.5 if cfg.hflip else 0.0)
    batches = image_batches(train, order, start * accum, ctx.num_workers, ctx.seed)
    grid = preset.pae.latent_grid
    d = preset.pae.latent_dim

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        gan_active = use_gan and step >= cfg.gan_start_step
        disc_active = use_gan and step >= cfg.disc_start_step
        pae.train()
        if disc is not None:
            disc.train()
            disc.requires_grad_(False)
        opt_g.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        for k in range(accum):
            images, _, idx, flips = next(batches)
            rows = idx + n * flips.long()
            x = images.to(env.device, non_blocking=True)
            h = feats[rows].to(env.device, non_blocking=True)
            z_t = None
            if targets is not None:
                z_t = targets[rows].to(env.device).transpose(1, 2).reshape(-1, d, grid, grid)
            sync = pae_ddp.no_sync() if (env.distributed and k < accum - 1) else contextlib.nullcontext()
            with sync, run_.autocast(True):
                x_hat, z = pae_ddp(x, h)
                total, parts = criterion(
                    x,
                    x_hat.float(),
                    z.float(),
                    decode=unwrap(pae).decode,
                    z_target=z_t,
                    last_layer=unwrap(pae).decoder_last_layer,
                    gan_active=gan_active,
                )
                (total / accum).backward()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value / accum
            kept.append((x, x_hat.detach().float()))
        grad_norm = _clip(list(pae.parameters()), cfg.grad_clip)
        opt_g.step()
        sched_g.step()
        ema.update(pae)
        out = {k: torch.tensor(v) for k, v in sums.items()}
        if grad_norm is not None:
            out["grad_norm"] = grad_norm.detach().cpu()
        if disc is not None:
            disc.requires_grad_(True)
            opt_d.zero_grad(set_to_none=True)
            if disc_active:
                # D follows the generator's schedule by global step (its LR is a function of the step,
                # so it needs no scheduler state of its own).
                factor = lr_factor(step, cfg.warmup_steps, cfg.steps, "cosine", min_ratio)
                for group in opt_d.param_groups:
                    group["lr"] = cfg.disc_lr * factor
                d_total = 0.0
                for k, (x, x_hat) in enumerate(kept):
                    sync = (
                        disc_ddp.no_sync()
                        if (env.distributed and k < accum - 1)
                        else contextlib.nullcontext()
                    )
                    with sync, run_.autocast(True):
                        logits = disc_ddp(torch.cat([x, quantize_fake(x_hat)])).float()
                        real, fake = logits.chunk(2)
                        d_loss = hinge_d_loss(real, fake)
                        (d_loss / accum).backward()
                    d_total += float(d_loss.detach()) / accum
                _clip(list(disc.parameters()), cfg.grad_clip)
                opt_d.step()
                out["d_loss"] = torch.tensor(d_total)
        return out

    try:
        last = train_loop(
            run_,
            state,
            cfg.steps,
            step_fn,
            cfg.log_every,
            cfg.ckpt_every,
            start_step=start,
            stop_at=ctx.stop_at,
        )
    finally:
        run_.close()
    if last["step"] < cfg.steps:
        return {"finished": False, "step": int(last["step"])}, state

    if env.is_main:
        assets.save_weights(ctx.out / PAE_FILE, pae)
        assets.save_weights(ctx.out / PAE_EMA_FILE, ema.state_dict())
    barrier(env)
    ctx.write_metrics({"train": {STAGE: train_summary(last)}})
    record = {
        "finished": True,
        "steps": cfg.steps,
        "wall_s": last.get("wall_s"),
        "world_size": env.world_size,
        "pae_ema_sha256": sha256_file(ctx.out / PAE_EMA_FILE),
    }
    return record, state
