"""What every arm trains and how finely it is measured: the arms (their loss weights, or another
latent) and the budgets (step counts scaled from the preset, curve points, sample counts), resolved
to `--set` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from training.recipes import Recipe

_NO_PRIOR = {"tokenizer.ssr_weight": "0", "tokenizer.mcr_weight": "0", "tokenizer.scr_weight": "0"}
# The ablation arms differ from PAE in their loss weights only; `rae` and `vae` are the headline
# comparison: another latent (RAE's VFM token grid, a KL autoencoder from pixels) under the same
# reconstruction objective, DiT, data, seeds and budget. RAE's decoder is PAE's, so it keeps the
# preset's learning rate; the convolutional VAE gets its own, the best of 3e-3 / 1e-3 / 3e-4 after
# 150 steps of L1 + LPIPS (PSNR 17.8 / 19.1 / 16.9 dB; measured with the default 32/64/96 widths).
ARMS: dict[str, dict[str, str]] = {
    "baseline": dict(_NO_PRIOR),
    "ssr": {"tokenizer.mcr_weight": "0", "tokenizer.scr_weight": "0"},
    "mcr": {"tokenizer.ssr_weight": "0", "tokenizer.scr_weight": "0"},
    "scr": {"tokenizer.ssr_weight": "0", "tokenizer.mcr_weight": "0"},
    "pae": {},
    "rae": {**_NO_PRIOR, "autoencoder.kind": "rae"},
    "vae": {**_NO_PRIOR, "autoencoder.kind": "vae", "tokenizer.lr": "1e-3"},
}
HEADLINE_ARMS = ("baseline", "pae", "rae", "vae")
# The headline's claims compare PAE with RAE and the VAE, so those three take a second seed; the
# reconstruction-only baseline is the earlier ablation's yardstick and trains at the first seed only.
HEADLINE_SEEDED = ("pae", "rae", "vae")
FEW_STEPS = (5, 10, 15, 25, 50, 100)
FD_NETWORK = "efficientnet-lite2"


@dataclass(frozen=True)
class Budget:
    """How much every arm trains and how finely it is measured.

    Step counts are the preset's times `*_scale` (so the budgets follow the preset when it changes),
    or the absolute `*_steps` when given. Tokenizer and DiT schedules (warmup, GAN and discriminator
    start) scale with the step count, so a shorter run keeps the preset's schedule shape. FD is
    measured at `curve_stops` and at the end. `seeded_arms` train at every
    seed, the other arms at the first seed only; few-step FD is measured on `few_step_arms` (None:
    every arm). `sets` are further `--set` overrides (for `micro`, the tiny shapes).
    """

    name: str
    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    seeded_arms: tuple[str, ...]
    curve_points: int
    gen_samples: int
    reference_samples: int
    tokenizer_scale: float = 1.0
    refine_scale: float = 1.0
    dit_scale: float = 1.0
    tokenizer_steps: int | None = None
    refine_steps: int | None = None
    dit_steps: int | None = None
    train_per_class: int | None = None
    dataset: str | None = None
    sets: tuple[tuple[str, str], ...] = ()
    few_steps: tuple[int, ...] = FEW_STEPS
    few_step_arms: tuple[str, ...] | None = None
    writes_results: bool = True
    results_name: str = "ablation"


# Costs on 2 cores, in 1-thread CPU seconds (measured; 2 threads give about 1.7x): a tokenizer step
# 0.4 (baseline) to 1.9 (PAE with the GAN on), a DiT step 0.5 (batch 32), sampling 0.0096 per image
# and Euler step (CFG interval on), EfficientNet-Lite2 0.18 per image, one 1280-d FD 0.7. With the
# preset at 2000 tokenizer + 2500 DiT steps, `quick` gives its two arms 40 % of the preset's
# tokenizer steps and a quarter of its DiT steps (800 + 625) and saves on measurement (250 samples,
# few-step FD on PAE alone). `full` trains with the preset's budget and measures with the eval
# stage's own sample counts. Both train the headline comparison's arms by default.
QUICK = Budget(
    name="quick",
    arms=HEADLINE_ARMS,
    seeds=(0,),
    seeded_arms=HEADLINE_SEEDED,
    curve_points=4,
    gen_samples=250,
    reference_samples=500,
    few_step_arms=("pae",),
    tokenizer_scale=0.4,
    dit_scale=0.25,
)
BUDGETS: dict[str, Budget] = {
    "quick": QUICK,
    "full": Budget(
        name="full",
        arms=tuple(ARMS),
        seeds=(0, 1),
        seeded_arms=HEADLINE_ARMS,
        curve_points=7,
        gen_samples=1000,
        reference_samples=1000,
    ),
    # Investigation: quick's tokenizers with the preset's whole DiT budget (4x quick's), to see
    # whether PAE's generation lead grows or shrinks as the DiT converges.
    "dit-long": dataclasses.replace(
        QUICK,
        name="dit-long",
        arms=("baseline", "pae"),
        seeded_arms=("baseline", "pae"),
        dit_scale=1.0,
        few_step_arms=(),
        results_name="ablation_dit_long",
    ),
    "micro": Budget(
        name="micro",
        arms=HEADLINE_ARMS,
        seeds=(0,),
        seeded_arms=HEADLINE_ARMS,
        curve_points=2,
        gen_samples=4,
        reference_samples=8,
        tokenizer_steps=3,
        refine_steps=2,
        dit_steps=4,
        train_per_class=20,
        dataset="mnist-5k",
        sets=(
            ("refine.batch_size", "8"),
            ("refine.depth", "1"),
            ("tokenizer.batch_size", "2"),
            ("generator.batch_size", "4"),
            ("dit.depth", "1"),
            ("evaluate.num_recon", "8"),
            ("evaluate.batch_size", "8"),
            ("evaluate.ssc_samples", "6"),
            ("evaluate.lpc_samples", "2"),
            ("evaluate.classifier_steps", "3"),
        ),
        writes_results=False,
    ),
}


def _steps(absolute: int | None, scale: float, preset_steps: int) -> int:
    return absolute if absolute is not None else max(1, round(preset_steps * scale))


def _scaled(value: int, ratio: float) -> int:
    return round(value * ratio)


def budget_sets(budget: Budget, recipe: Recipe) -> dict[str, str]:
    """The `--set` overrides every arm of `budget` shares (before the arm's own loss weights)."""
    tok, dit = recipe.tokenizer, recipe.generator
    t_steps = _steps(budget.tokenizer_steps, budget.tokenizer_scale, tok.steps)
    r = t_steps / tok.steps
    r_steps = _steps(budget.refine_steps, budget.refine_scale, recipe.refine.steps)
    d_steps = _steps(budget.dit_steps, budget.dit_scale, dit.steps)
    if budget.curve_points < 1:
        raise ValueError(f"budget {budget.name!r}: curve_points must be >= 1, got {budget.curve_points}")
    sets = {
        "tokenizer.steps": str(t_steps),
        "tokenizer.warmup_steps": str(_scaled(tok.warmup_steps, r)),
        "tokenizer.gan_start_step": str(_scaled(tok.gan_start_step, r)),
        "tokenizer.disc_start_step": str(_scaled(tok.disc_start_step, r)),
        "tokenizer.log_every": str(min(tok.log_every, t_steps)),
        "tokenizer.ckpt_every": str(min(tok.ckpt_every, t_steps)),
        "refine.steps": str(r_steps),
        # Refine warms up like the scaled tokenizer, for at most a tenth of its steps.
        "refine.warmup_steps": str(min(_scaled(tok.warmup_steps, r), r_steps // 10)),
        "refine.log_every": str(min(recipe.refine.log_every, r_steps)),
        "refine.ckpt_every": str(min(recipe.refine.ckpt_every, r_steps)),
        "generator.steps": str(d_steps),
        "generator.warmup_steps": str(_scaled(dit.warmup_steps, d_steps / dit.steps)),
        "generator.log_every": str(min(dit.log_every, d_steps)),
        # The DiT checkpoints (and pauses for an FD point) every curve interval.
        "generator.ckpt_every": str(max(1, d_steps // budget.curve_points)),
        "generator.sample_every": str(d_steps),
        "evaluate.gen_num_samples": str(budget.gen_samples),
        "evaluate.fd_samples": str(budget.reference_samples),
        "evaluate.fd_network": FD_NETWORK,
    }
    if budget.train_per_class is not None:
        sets["data.train_per_class"] = str(budget.train_per_class)
    sets.update(dict(budget.sets))
    return sets


def curve_stops(total: int, points: int) -> list[int]:
    """The DiT steps before the end where FD is measured: k·total // points for k = 1 … points − 1.
    The last of the `points` is the end itself (the evaluate stage's measurement), so no point lands a
    step before it, as `range(total // points, total, total // points)` would when points ∤ total."""
    return sorted({k * total // points for k in range(1, points)} - {0})
