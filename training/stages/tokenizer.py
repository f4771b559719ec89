"""Stage 2, `tokenizer`: train PAE with L1 + LPIPS + GAN + λ·(SSR, MCR, SCR) (the paper's training
objective; schedule from the recipe).

The frozen VFM never runs here: its tokens come from the feature cache (index N + i is image i
mirrored, so random flips stay exact), and the refined targets Z_T from the `refine` stage's cache.
A zero loss weight removes its term — with gan, ssr, mcr and scr all 0 this is the
reconstruction-only baseline, which needs neither the targets nor a discriminator.

Schedule: AdamW with the recipe's betas and weight decay (none on biases, norms, 1-D parameters),
linear warmup then cosine to `lr_min`, an EMA of the weights, optional gradient clipping, and
`grad_accum` micro-batches per step. `batch_size` is the global batch, split evenly over ranks and
micro-batches. The GAN term joins at `gan_start_step` with the adaptive weight; the discriminator
(hinge loss on real vs 8-bit-quantised fakes, one forward on both halves so DDP sees one pass) is
updated from its own `disc_start_step`. bf16 autocast is used on CUDA only.

One step is a generator step (PAE on every micro-batch, then its optimiser, schedule and EMA) followed
by a discriminator step on the same real and reconstructed images. Under `torchrun` both networks are
wrapped in DDP (gradients averaged across ranks every step) and only rank 0 writes files.

The same loop trains the comparison autoencoders a preset may name instead of PAE
(`autoencoder.kind`), with the same L1 + LPIPS + GAN objective and schedule (the prior-alignment
weights must be 0: their targets and sphere geometry are PAE's): RAE's pixel decoder on the VFM's
standardised token grid, decoding noise-augmented latents (`rae.noise_tau`), and the KL autoencoder
from pixels with `vae.kl_weight`·KL added (no VFM pass at all).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from model.autoencoders import build_autoencoder
from model.checkpoint import REFINE_FILE, CheckpointError, autoencoder_files, read_metadata
from model.hashing import sha256_file
from model.rae import RAE
from training.discriminator import PatchDiscriminator
from training.distributed import DistEnv, ShardedBatches, unwrap, wrap_ddp
from training.feature_cache import FeatureCache
from training.losses import LossWeights, PAELoss, hinge_d_loss, quantize_fake
from training.lpips import LPIPS
from training.optim import EMA, build_adamw, build_scheduler, lr_factor
from training.recipes import Recipe, TokenizerTrainConfig
from training.stages import assets
from training.stages.common import (
    StageRun,
    Trainables,
    begin_training,
    grad_sync,
    image_batches,
    micro_batch,
    seed_init,
    train_and_record,
)
from training.stages.context import StageContext

STAGE = "tokenizer"

# (real images, detached reconstructions) of one micro-batch: what the discriminator step sees.
ImagePair = tuple[torch.Tensor, torch.Tensor]


class Reconstruction(NamedTuple):
    """One forward of the autoencoder being trained: x̂, the latent the loss terms see, and what this
    autoencoder adds to the objective (already weighted; None for nothing) with its logged parts."""

    x_hat: torch.Tensor
    z: torch.Tensor
    penalty: torch.Tensor | None = None
    parts: dict[str, float] | None = None


# (the DDP-wrapped autoencoder, images, cached VFM tokens or None) → its training forward
Reconstruct = Callable[[nn.Module, torch.Tensor, torch.Tensor | None], Reconstruction]


def reconstruct_for(kind: str, recipe: Recipe, image_size: int) -> Reconstruct:
    """The training forward of autoencoder `kind`: PAE as is, RAE decoding noise-augmented latents,
    the KL autoencoder from a posterior sample with LDM's KL term. LDM weighs the KL against a
    reconstruction loss summed over the image's pixels; ours is a per-pixel mean, hence the division
    by 3·H·W, which keeps `vae.kl_weight` on LDM's scale."""
    if kind == "rae":
        tau = recipe.rae.noise_tau
        return lambda model, x, h: Reconstruction(*model(x, h, noise_tau=tau))
    if kind == "vae":
        scale = recipe.vae.kl_weight / (3 * image_size * image_size)

        def vae(model: nn.Module, x: torch.Tensor, h: torch.Tensor | None) -> Reconstruction:
            x_hat, z, kl = model(x)
            return Reconstruction(x_hat, z, scale * kl, {"kl": float(kl.detach())})

        return vae
    return lambda model, x, h: Reconstruction(*model(x, h))


def _check_objective(kind: str, cfg: TokenizerTrainConfig) -> None:
    """Only PAE trains with the prior-alignment terms (refined targets of its latent width, sphere
    perturbations of its latent); a comparison autoencoder must have them switched off."""
    on = [t for t in ("ssr", "mcr", "scr") if getattr(cfg, f"{t}_weight") > 0]
    if kind != "pae" and on:
        raise ValueError(
            f"the {kind} autoencoder trains with L1 + LPIPS + GAN only; set "
            + ", ".join(f"tokenizer.{t}_weight=0" for t in on)
        )


@torch.no_grad()
def channel_stats(feats: FeatureCache, count: int, chunk: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over images `0 … count − 1` of cached B×N×D tokens and all their
    tokens, accumulated in float64 (RAE's latent standardisation; mirrored rows are left out)."""
    total = total_sq = None
    cells = 0
    for start in range(0, count, chunk):
        t = feats[list(range(start, min(start + chunk, count)))].double().flatten(0, 1)
        total = t.sum(0) if total is None else total + t.sum(0)
        total_sq = t.square().sum(0) if total_sq is None else total_sq + t.square().sum(0)
        cells += t.shape[0]
    if total is None or total_sq is None:
        raise ValueError("channel_stats needs at least one image")
    mean = total / cells
    std = (total_sq / cells - mean.square()).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


def _clip(params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor | None:
    if max_norm is None:
        return None
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def run(ctx: StageContext) -> dict[str, Any]:
    """Train the tokenizer; writes its live and EMA weights (`pae[_ema].safetensors`, or the comparison
    autoencoder's `autoencoder_files`); returns the stage record."""
    return fit(ctx)[0]


def _refined_targets(ctx: StageContext, fingerprint: str) -> FeatureCache:
    """The `refine` stage's Z_T, after checking they were made from this VFM (and with mirror rows
    when the tokenizer flips)."""
    rec = ctx.require("refine", STAGE)
    refine_meta = read_metadata(ctx.out / REFINE_FILE)
    if refine_meta.get("vfm_fingerprint") != fingerprint:
        raise CheckpointError(
            f"{ctx.out / REFINE_FILE} was trained on another VFM (fingerprint "
            f"{refine_meta.get('vfm_fingerprint')!r}, current {fingerprint!r}); rerun the refine stage"
        )
    if ctx.recipe.tokenizer.hflip and not rec.get("flips"):
        raise CheckpointError("the refined targets have no mirrored rows but hflip is on; rerun refine")
    return FeatureCache(rec["targets_dir"])


@dataclass
class TokenizerStep:
    """One optimiser step of both networks: `generator` (PAE) then `discriminator`.

    `batches` yields `(images, labels, indices, flips)`; the VFM tokens (and targets, when a term
    needs them) of image i are row i + N·flip of `feats` (and `targets`).
    """

    cfg: TokenizerTrainConfig
    env: DistEnv
    stage_run: StageRun
    pae: nn.Module
    pae_ddp: nn.Module
    reconstruct: Reconstruct
    criterion: PAELoss
    opt_g: torch.optim.Optimizer
    sched_g: torch.optim.lr_scheduler.LRScheduler
    ema: EMA
    disc: nn.Module | None
    disc_ddp: nn.Module | None
    opt_d: torch.optim.Optimizer | None
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    feats: FeatureCache | None
    targets: FeatureCache | None
    num_images: int

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        use_gan = self.disc is not None
        out, pairs = self.generator(step, gan_active=use_gan and step >= self.cfg.gan_start_step)
        if use_gan:
            d_loss = self.discriminator(step, pairs, active=step >= self.cfg.disc_start_step)
            if d_loss is not None:
                out["d_loss"] = d_loss
        return out

    def generator(self, step: int, gan_active: bool) -> tuple[dict[str, torch.Tensor], list[ImagePair]]:
        """PAE's update over `grad_accum` micro-batches (the discriminator frozen); returns the logged
        loss parts (and grad norm when clipping) and each micro-batch's images for the D step."""
        cfg, env = self.cfg, self.env
        self.pae.train()
        if self.disc is not None:
            self.disc.train()
            self.disc.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        pairs: list[ImagePair] = []
        for k in range(cfg.grad_accum):
            x, h, z_t = self._micro_batch()
            with grad_sync(self.pae_ddp, env, k, cfg.grad_accum), self.stage_run.autocast(True):
                x_hat, z, penalty, extra = self.reconstruct(self.pae_ddp, x, h)
                total, parts = self.criterion(
                    x,
                    x_hat.float(),
                    z.float(),
                    decode=unwrap(self.pae).decode,
                    z_target=z_t,
                    last_layer=unwrap(self.pae).decoder_last_layer,
                    gan_active=gan_active,
                )
                if penalty is not None:
                    total = total + penalty
                    parts = {**parts, **(extra or {}), "total": float(total.detach())}
                (total / cfg.grad_accum).backward()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value / cfg.grad_accum
            pairs.append((x, x_hat.detach().float()))
        grad_norm = _clip(list(self.pae.parameters()), cfg.grad_clip)
        self.opt_g.step()
        self.sched_g.step()
        self.ema.update(self.pae)
        out = {k: torch.tensor(v) for k, v in sums.items()}
        if grad_norm is not None:
            out["grad_norm"] = grad_norm.detach().cpu()
        return out, pairs

    def discriminator(self, step: int, pairs: list[ImagePair], active: bool) -> torch.Tensor | None:
        """The hinge-loss update of D on the generator step's real and (8-bit) reconstructed images;
        before `disc_start_step` only its gradients are cleared. Returns the loss when it trained."""
        cfg, env = self.cfg, self.env
        assert self.disc is not None and self.disc_ddp is not None and self.opt_d is not None
        self.disc.requires_grad_(True)
        self.opt_d.zero_grad(set_to_none=True)
        if not active:
            return None
        # D follows the generator's schedule by global step (its LR is a function of the step, so it
        # needs no scheduler state of its own).
        factor = lr_factor(step, cfg.warmup_steps, cfg.steps, "cosine", _min_lr_ratio(cfg))
        for group in self.opt_d.param_groups:
            group["lr"] = cfg.disc_lr * factor
        d_total = 0.0
        for k, (x, x_hat) in enumerate(pairs):
            with grad_sync(self.disc_ddp, env, k, cfg.grad_accum), self.stage_run.autocast(True):
                logits = self.disc_ddp(torch.cat([x, quantize_fake(x_hat)])).float()
                real, fake = logits.chunk(2)
                d_loss = hinge_d_loss(real, fake)
                (d_loss / cfg.grad_accum).backward()
            d_total += float(d_loss.detach()) / cfg.grad_accum
        _clip(list(self.disc.parameters()), cfg.grad_clip)
        self.opt_d.step()
        return torch.tensor(d_total)

    def _micro_batch(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The next images on the device, their cached VFM tokens (None without a VFM), and their
        targets as latent grids."""
        images, _, idx, flips = next(self.batches)
        rows = idx + self.num_images * flips.long()
        x = images.to(self.env.device, non_blocking=True)
        h = None if self.feats is None else self.feats[rows].to(self.env.device, non_blocking=True)
        z_t = None
        if self.targets is not None:
            d, grid = self.pae.cfg.latent_dim, self.pae.cfg.latent_grid
            z_t = self.targets[rows].to(self.env.device).transpose(1, 2).reshape(-1, d, grid, grid)
        return x, h, z_t


def _min_lr_ratio(cfg: TokenizerTrainConfig) -> float:
    return min(1.0, cfg.lr_min / cfg.lr)


def fit(ctx: StageContext) -> tuple[dict[str, Any], Trainables]:
    """`run`, also returning this rank's trained objects (autoencoder, discriminator, optimisers, EMA)."""
    cfg, env, preset = ctx.recipe.tokenizer, ctx.env, ctx.preset
    kind = preset.autoencoder.kind
    _check_objective(kind, cfg)
    weights = LossWeights.from_config(cfg)
    use_gan = weights.gan_weight > 0

    train = assets.dataset(ctx, "train")
    feats = targets = None
    if preset.autoencoder.uses_vfm:
        vfm = assets.frozen_vfm(ctx)
        fingerprint = vfm.fingerprint()
        ctx.write_config(fingerprint)
        feats = assets.vfm_features(ctx, vfm, train, "train", cfg.hflip)
        del vfm
        if weights.ssr_weight > 0 or weights.scr_weight > 0:
            targets = _refined_targets(ctx, fingerprint)
    else:
        ctx.write_config()

    seed_init(ctx.seed)
    pae = build_autoencoder(preset.autoencoder, preset.pae).to(env.device)
    if isinstance(pae, RAE):
        assert feats is not None
        pae.set_latent_stats(*channel_stats(feats, len(train)))
    needs_lpips = weights.lpips_weight > 0 or weights.mcr_weight > 0
    lpips = LPIPS(net=cfg.lpips_net).to(env.device) if needs_lpips else None
    disc = PatchDiscriminator(preset.pae.image_size).to(env.device) if use_gan else None
    criterion = PAELoss(weights, lpips, disc)
    opt_g = build_adamw(pae, cfg.lr, cfg.betas, cfg.weight_decay)
    sched_g = build_scheduler(opt_g, cfg.warmup_steps, cfg.steps, "cosine", _min_lr_ratio(cfg))
    ema = EMA(pae, cfg.ema_decay)
    state = Trainables({"pae": pae}, {"pae": opt_g}, {"pae": sched_g}, {"pae": ema})
    opt_d = None
    if disc is not None:
        opt_d = build_adamw(disc, cfg.disc_lr, cfg.betas, cfg.weight_decay)
        state.modules["disc"] = disc
        state.optimizers["disc"] = opt_d

    stage_run, start = begin_training(ctx, STAGE, state)
    per_rank = micro_batch(cfg.batch_size, env, cfg.grad_accum, "tokenizer")
    order = ShardedBatches(len(train), per_rank, env, seed=ctx.seed, flip_prob=0.5 if cfg.hflip else 0.0)
    step_fn = TokenizerStep(
        cfg=cfg,
        env=env,
        stage_run=stage_run,
        pae=pae,
        pae_ddp=wrap_ddp(pae, env),
        reconstruct=reconstruct_for(kind, ctx.recipe, preset.pae.image_size),
        criterion=criterion,
        opt_g=opt_g,
        sched_g=sched_g,
        ema=ema,
        disc=disc,
        disc_ddp=wrap_ddp(disc, env) if disc is not None else None,
        opt_d=opt_d,
        batches=image_batches(train, order, start * cfg.grad_accum, ctx.num_workers, ctx.seed),
        feats=feats,
        targets=targets,
        num_images=len(train),
    )

    live_file, ema_file = autoencoder_files(kind)

    def save() -> None:
        assets.save_weights(ctx.out / live_file, pae)
        assets.save_weights(ctx.out / ema_file, ema.state_dict())

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
        # The record names the tokenizer's EMA weights under this key whatever the autoencoder.
        outputs=lambda: {"pae_ema_sha256": sha256_file(ctx.out / ema_file)},
    )
    return record, state
