"""The whole run: every (seed, arm), the real-data floor, then the report with its claims."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import torch

from benchmarks.ablation.aggregate import combine
from benchmarks.ablation.arm import run_arm
from benchmarks.ablation.budgets import FD_NETWORK, curve_stops
from benchmarks.ablation.claims import evaluate_claims
from benchmarks.ablation.fd_probe import FDProbe, real_floor, reference_stats
from benchmarks.ablation.plan import CHECKPOINTS_DIR, Plan, say, shipped_classifier
from benchmarks.machine import describe, mark_quotable
from model.checkpoint import to_jsonable
from training.distributed import DistEnv
from training.metrics.frechet import EfficientNetLite2Features
from training.stages.context import StageContext

# Load slows the run down but changes none of its numbers (seeded, deterministic training and FD).
WALL_TIMES = "its wall times (wall_s, arms_wall_s); the FDs and metrics do not depend on load"


def machine(env: DistEnv, threads: int) -> dict[str, Any]:
    """The machine block, with the torch thread count and the device trained on."""
    info = describe(torch_threads=threads, device=str(env.device))
    if env.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(env.device)
    return info


def _loss_weights(plan: Plan, arm: str) -> dict[str, float]:
    tok = plan.context(plan.arm_dir(plan.seeds[0], arm), arm, "tokenizer", plan.seeds[0]).recipe.tokenizer
    return {"ssr": tok.ssr_weight, "mcr": tok.mcr_weight, "scr": tok.scr_weight}


def latent_info(plan: Plan, arm: str) -> dict[str, Any]:
    """The arm's latent and the DiT that models it: autoencoder, latent shape, DiT width and input
    channels, and RAE's width rule (DiT width >= latent channels; see `rae_dit_width`)."""
    ctx = plan.context(plan.arm_dir(plan.seeds[0], arm), arm, "generator", plan.seeds[0])
    p = ctx.preset
    channels = p.latent_shape[0]
    info: dict[str, Any] = {
        "autoencoder": p.autoencoder.kind,
        "latent_shape": list(p.latent_shape),
        "dit_hidden": p.dit.hidden,
        "dit_in_channels": p.dit.in_channels,
        "width_rule_holds": p.dit.hidden >= channels,
        "dit_widened": "dit.hidden" in plan.sets(arm) and "dit.hidden" not in plan.extra_sets,
    }
    if p.autoencoder.kind == "rae":
        info["noise_tau"] = ctx.recipe.rae.noise_tau
    if p.autoencoder.kind == "vae":
        info["kl_weight"] = ctx.recipe.vae.kl_weight
        info["vae_channels"] = list(p.autoencoder.vae_channels)
    return info


def run(plan: Plan, threads: int) -> dict[str, Any]:
    """Every (seed, arm), then the report: numbers, claims, protocol and wall times."""
    started = time.perf_counter()
    report: dict[str, Any] = {"machine": machine(plan.env, threads)}
    plan.out.mkdir(parents=True, exist_ok=True)
    probes: list[FDProbe] = []

    def probe_for(ctx: StageContext) -> FDProbe:
        """One probe for the whole run (built on first use): every arm is measured identically."""
        if not probes:
            network = EfficientNetLite2Features().to(plan.env.device)
            evaluation = ctx.recipe.evaluate
            cache = plan.out / f"reference_{evaluation.split}_{evaluation.fd_samples}.safetensors"
            probes.append(FDProbe(network, reference_stats(ctx, network, cache), ctx))
        return probes[0]

    shipped = shipped_classifier(plan)
    if shipped is not None and not plan.classifier.is_file():
        shutil.copyfile(shipped, plan.classifier)
    per_seed: dict[str, dict[int, dict[str, Any]]] = {}
    for seed, arm in plan.runs():
        say(f"seed {seed}, arm {arm}: training and measuring in {plan.arm_dir(seed, arm)}")
        per_seed.setdefault(arm, {})[seed] = run_arm(plan, seed, arm, probe_for)

    sample_ctx = plan.context(
        plan.arm_dir(plan.seeds[0], plan.arms[0]), plan.arms[0], "evaluate", plan.seeds[0]
    )
    floor = real_floor(probe_for(sample_ctx), sample_ctx, plan.out)
    say(f"real-data floor ({floor['images']}): FD {floor['fd']}")
    arms, few = combine(per_seed)
    p, recipe = sample_ctx.preset, sample_ctx.recipe
    dit_steps = recipe.generator.steps
    report["budget"] = {
        "name": plan.budget.name,
        "preset": plan.preset,
        "dataset": p.dataset,
        "train_per_class": recipe.data.train_per_class,
        "refine_steps": recipe.refine.steps,
        "tokenizer_steps": recipe.tokenizer.steps,
        "dit_steps": dit_steps,
        "curve_steps": [*curve_stops(dit_steps, plan.budget.curve_points), dit_steps],
        "seeds": {arm: sorted(per_seed[arm]) for arm in per_seed},
        "loss_weights": {arm: _loss_weights(plan, arm) for arm in plan.arms},
        "latents": {arm: latent_info(plan, arm) for arm in plan.arms},
        "fd": {
            "network": FD_NETWORK,
            "num_samples": recipe.evaluate.gen_num_samples,
            "seed": recipe.evaluate.gen_seed,
            "reference": {"split": recipe.evaluate.split, "num_samples": recipe.evaluate.fd_samples},
            "sampler": to_jsonable(p.sampler),
            "few_step_sampler": "the same, with only `steps` changed",
            "real_floor": floor,
        },
        "extra_sets": plan.extra_sets,
        "classifier": str(shipped.relative_to(CHECKPOINTS_DIR.parent))
        if shipped is not None and plan.classifier.read_bytes() == shipped.read_bytes()
        else "trained by the first arm's evaluate stage",
    }
    report["arms"] = arms
    report["few_step"] = few
    report["claims"] = evaluate_claims(arms, few, dit_steps, floor["fd"])
    report["machine"]["load_average_end"] = list(os.getloadavg())
    # `wall_s` is this invocation only (a resumed run skips what is done); `arms_wall_s` is what
    # training and measuring every arm cost, summed over all the invocations that built them.
    report["wall_s"] = time.perf_counter() - started
    report["arms_wall_s"] = sum(
        sum(r["wall_s"].values()) for runs in per_seed.values() for r in runs.values()
    )
    return mark_quotable(report, affects=WALL_TIMES)
