"""Stage 4, `generator`: train the LightningDiT on normalised latents with SiT flow matching (the
LightningDiT recipe PAE trains its generator with).

Each step: pick the un-flipped or mirrored latent (p = 0.5 when the latents include mirror images),
normalise with the channel stats, draw logit-normal t with the training shift and Gaussian noise,
interpolate, and regress the velocity with MSE + cosine (`model.flow`). Labels are replaced by the null
class with the DiT's `class_dropout` probability (drawn here and passed as `force_drop`, so every
random draw comes from the saved RNG stream). AdamW (0.9, 0.95) with warmup then constant LR, an EMA
of the weights, optional gradient clipping, `grad_accum` micro-batches; `batch_size` is the global
batch.

Every `sample_every` steps rank 0 writes a class grid from the EMA model to `samples/`. The final
EMA weights go to `dit_ema.safetensors`; the live weights stay in the resume state only, keeping the
shipped checkpoint small.
"""

from __future__ import annotations

from typing import Any

import torch

from model.checkpoint import DIT_EMA_FILE
from model.flow import flow_loss, interpolate, sample_training_t
from model.hashing import sha256_file
from model.lightningdit import LightningDiT
from training.distributed import ShardedBatches, barrier, wrap_ddp
from training.latent_shards import LatentShards
from training.optim import EMA, build_adamw, build_scheduler
from training.stages import assets
from training.stages.common import (
    Trainables,
    begin_training,
    grad_sync,
    micro_batch,
    seed_init,
    train_and_record,
)
from training.stages.context import StageContext
from training.stages.grid import class_grid

STAGE = "generator"
GRID_PER_CLASS = 8
MAX_GRID_CLASSES = 16


def samples_path(ctx: StageContext, step: int) -> str:
    return str(ctx.out / "samples" / f"{STAGE}_step{step:07d}.png")


def run(ctx: StageContext) -> dict[str, Any]:
    """Train the DiT; writes `dit_ema.safetensors` and sample grids; returns the stage record."""
    return fit(ctx)[0]


def fit(ctx: StageContext) -> tuple[dict[str, Any], Trainables]:
    """`run`, also returning this rank's trained objects (DiT, optimiser, EMA)."""
    cfg, env, preset = ctx.recipe.generator, ctx.env, ctx.preset
    rec = ctx.require("latents", STAGE)
    ctx.write_config()
    latents, latents_flip, labels = LatentShards(rec["latents_dir"]).load()
    mean, std = assets.load_latent_stats(ctx)
    mean_g, std_g = assets.as_grid(mean).to(env.device), assets.as_grid(std).to(env.device)
    n = latents.shape[0]
    hflip = latents_flip is not None

    seed_init(ctx.seed)
    dit = LightningDiT(preset.dit).to(env.device)
    opt = build_adamw(dit, cfg.lr, cfg.betas, cfg.weight_decay)
    sched = build_scheduler(opt, cfg.warmup_steps, cfg.steps, "constant", 1.0)
    ema = EMA(dit, cfg.ema_decay)
    state = Trainables({"dit": dit}, {"dit": opt}, {"dit": sched}, {"dit": ema})
    pae = assets.load_autoencoder(ctx, ema=True) if env.is_main else None
    stage_run, start = begin_training(ctx, STAGE, state)
    model = wrap_ddp(dit, env)

    accum = cfg.grad_accum
    per_rank = micro_batch(cfg.batch_size, env, accum, STAGE)
    batches = ShardedBatches(n, per_rank, env, seed=ctx.seed, flip_prob=0.5 if hflip else 0.0)(start * accum)
    grid_classes = min(preset.dit.num_classes, MAX_GRID_CLASSES)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        dit.train()
        opt.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "mse": 0.0, "cos": 0.0}
        for k in range(accum):
            batch = next(batches)
            idx = torch.tensor([i for i, _ in batch])
            x = latents[idx]
            if latents_flip is not None:
                flip = torch.tensor([f for _, f in batch]).view(-1, 1, 1, 1)
                x = torch.where(flip, latents_flip[idx], x)
            x = x.to(env.device).float()
            x = (x - mean_g) / std_g
            y = labels[idx].to(env.device)
            noise = torch.randn_like(x)
            t = sample_training_t(x.shape[0], cfg.train_shift, device=env.device)
            drop = (torch.rand(x.shape[0]) < preset.dit.class_dropout).to(env.device)
            x_t, v_target = interpolate(x, noise, t)
            with grad_sync(model, env, k, accum), stage_run.autocast(True):
                v_pred = model(x_t, t, y, force_drop=drop)
                loss, parts = flow_loss(v_pred.float(), v_target)
                (loss / accum).backward()
            sums["loss"] += float(loss.detach()) / accum
            sums["mse"] += float(parts["mse"]) / accum
            sums["cos"] += float(parts["cos"]) / accum
        out = {k: torch.tensor(v) for k, v in sums.items()}
        if cfg.grad_clip is not None:
            out["grad_norm"] = torch.nn.utils.clip_grad_norm_(dit.parameters(), cfg.grad_clip).detach().cpu()
        opt.step()
        sched.step()
        ema.update(dit)
        return out

    def on_step_end(done: int) -> None:
        if done % cfg.sample_every == 0 or done == cfg.steps:
            _write_grid(ctx, ema, pae, grid_classes, mean, std, done)
            barrier(env)

    def save() -> None:
        assets.save_weights(ctx.out / DIT_EMA_FILE, ema.state_dict())

    record = train_and_record(
        ctx,
        stage_run,
        state,
        step_fn,
        steps=cfg.steps,
        log_every=cfg.log_every,
        ckpt_every=cfg.ckpt_every,
        start_step=start,
        save=save,
        outputs=lambda: {
            "dit_ema_sha256": sha256_file(ctx.out / DIT_EMA_FILE),
            "samples": samples_path(ctx, cfg.steps),
        },
        on_step_end=on_step_end,
    )
    return record, state


def _write_grid(
    ctx: StageContext, ema: EMA, pae: Any, classes: int, mean: torch.Tensor, std: torch.Tensor, step: int
) -> None:
    """Rank 0: an EMA copy of the DiT samples `classes` rows with the preset's sampler.

    Runs under `fork_rng`, so building the copy never advances the training's random stream.
    """
    if not ctx.env.is_main:
        return
    devices = [ctx.env.device] if ctx.env.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        dit = LightningDiT(ctx.preset.dit).to(ctx.env.device)
        ema.copy_to(dit)
        dit.eval()
        class_grid(
            dit, pae, classes, GRID_PER_CLASS, ctx.preset.sampler, mean, std, samples_path(ctx, step), seed=0
        )
