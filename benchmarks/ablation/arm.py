"""One arm at one seed: train it stage by stage (pausing the DiT at every curve point to measure FD),
evaluate it, measure few-step FD, and keep its raw numbers in `ablation_arm.json` so a rerun resumes."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.ablation.budgets import curve_stops
from benchmarks.ablation.fd_probe import FDProbe, ema_dit_at_resume
from benchmarks.ablation.plan import AblationError, Plan, needs_refine, say
from model import checkpoint
from model.checkpoint import CheckpointError, read_json, update_json, write_json
from training.checkpoint import resume_step
from training.stages import assets
from training.stages.context import METRICS_FILE, StageContext
from training.stages.pipeline import run_stage

ARM_FILE = "ablation_arm.json"


def _copy_if_changed(src: Path, dst: Path) -> None:
    if not dst.is_file() or dst.read_bytes() != src.read_bytes():
        shutil.copyfile(src, dst)


def share_refine(plan: Plan, seed: int, directory: Path) -> bool:
    """Run `refine` once per seed in `<out>/seed<s>/refine` and hand its record and P_t/Q_t weights
    to the arm directory, so every arm that reads refined targets reads the very same ones.
    Returns whether refine ran now (False: an earlier arm or invocation ran it)."""
    source = plan.out / f"seed{seed}" / "refine"
    refine_ctx = plan.context(source, "pae", "refine", seed)
    ran = not refine_ctx.is_done("refine")
    run_stage(refine_ctx, "refine")
    record = read_json(source / "config.json")["stages"]["refine"]
    directory.mkdir(parents=True, exist_ok=True)
    _copy_if_changed(source / checkpoint.REFINE_FILE, directory / checkpoint.REFINE_FILE)
    config = directory / "config.json"
    current = read_json(config).get("stages", {}).get("refine") if config.is_file() else None
    if current != record:
        update_json(config, {"stages": {"refine": record}})
    return ran


def _load_arm_state(directory: Path, settings: dict[str, Any]) -> dict[str, Any]:
    path = directory / ARM_FILE
    if not path.is_file():
        return {"settings": settings, "curve": {}, "few_step": {}, "wall_s": {}}
    state = read_json(path)
    if state.get("settings") != json.loads(json.dumps(settings)):
        raise AblationError(
            f"{directory} holds an ablation run with other settings; use a new --out (or delete it)"
        )
    return state


def run_arm(plan: Plan, seed: int, arm: str, probe_for: Any) -> dict[str, Any]:
    """Train and measure one arm at one seed; returns its raw numbers (also kept in `ablation_arm.json`)."""
    directory = plan.arm_dir(seed, arm)
    settings = {"arm": arm, "seed": seed, **plan.settings(), "sets": plan.sets(arm)}
    directory.mkdir(parents=True, exist_ok=True)
    state = _load_arm_state(directory, settings)
    arm_file = directory / ARM_FILE

    def save() -> None:
        write_json(arm_file, state)

    def timed(key: str, started: float) -> None:
        state["wall_s"][key] = state["wall_s"].get(key, 0.0) + time.perf_counter() - started
        save()

    def run_timed(stage_ctx: StageContext, stage: str) -> None:
        """Run (or skip) a stage; only a stage that really runs adds to the arm's cost."""
        skipped = stage_ctx.is_done(stage)
        t0 = time.perf_counter()
        run_stage(stage_ctx, stage)
        if not skipped:
            timed(stage, t0)

    ctx = plan.context(directory, arm, "tokenizer", seed)
    if needs_refine(ctx):
        t0 = time.perf_counter()
        if share_refine(plan, seed, directory):
            timed("refine", t0)
    for stage in ("tokenizer", "latents"):
        run_timed(plan.context(directory, arm, stage, seed), stage)

    dit_ctx = plan.context(directory, arm, "generator", seed)
    total = dit_ctx.recipe.generator.steps
    probe: FDProbe = probe_for(dit_ctx)
    for stop in curve_stops(total, plan.budget.curve_points):
        if str(stop) in state["curve"]:
            continue
        if dit_ctx.is_done("generator") or (resume_step(directory, "generator") or 0) > stop:
            raise AblationError(
                f"{directory}: the DiT is already past step {stop} but its FD there was not measured; "
                "use a new --out"
            )
        t0 = time.perf_counter()
        run_stage(plan.context(directory, arm, "generator", seed, stop_at=stop), "generator")
        timed("generator", t0)
        if resume_step(directory, "generator") != stop:
            raise CheckpointError(f"{directory}: the DiT did not pause at step {stop}")
        t0 = time.perf_counter()
        pae = assets.load_autoencoder(dit_ctx, ema=True)
        mean, std = assets.load_latent_stats(dit_ctx)
        state["curve"][str(stop)] = probe(ema_dit_at_resume(dit_ctx), pae, dit_ctx.preset.sampler, mean, std)
        say(f"seed {seed} {arm}: DiT step {stop}: FD {state['curve'][str(stop)]:.4g}")
        timed("curve_fd", t0)
    run_timed(dit_ctx, "generator")

    eval_ctx = plan.context(directory, arm, "evaluate", seed)
    if plan.classifier.is_file():
        _copy_if_changed(plan.classifier, directory / checkpoint.CLASSIFIER_FILE)
    run_timed(eval_ctx, "evaluate")
    if not plan.classifier.is_file() and (directory / checkpoint.CLASSIFIER_FILE).is_file():
        shutil.copyfile(directory / checkpoint.CLASSIFIER_FILE, plan.classifier)
    metrics = read_json(directory / METRICS_FILE)
    gen = metrics["gen"]
    if gen["num_samples"] != probe.num_samples or gen["seed"] != probe.seed:
        raise CheckpointError(f"{directory}: evaluate's generation protocol differs from the harness's")
    state["curve"][str(total)] = gen["fd"]

    sampler = eval_ctx.preset.sampler
    dit = pae = None
    few_arms = plan.budget.few_step_arms
    for steps in plan.budget.few_steps if few_arms is None or arm in few_arms else ():
        if str(steps) in state["few_step"]:
            continue
        if steps == sampler.steps:
            state["few_step"][str(steps)] = gen["fd"]  # the evaluate stage's own measurement
            save()
            continue
        t0 = time.perf_counter()
        if dit is None:
            dit, pae = assets.load_dit_ema(eval_ctx), assets.load_autoencoder(eval_ctx, ema=True)
            mean, std = assets.load_latent_stats(eval_ctx)
        state["few_step"][str(steps)] = probe(dit, pae, dataclasses.replace(sampler, steps=steps), mean, std)
        say(f"seed {seed} {arm}: {steps} sampler steps: FD {state['few_step'][str(steps)]:.4g}")
        timed("few_step_fd", t0)

    state["result"] = {
        "recon": {"psnr": metrics["recon"]["psnr"], "rfd": metrics["recon"]["fd"]},
        "latent": {k: metrics["latent"].get(k) for k in ("ssc", "lpc", "gsq", "erank")},
        "gen": {"fd": gen["fd"], "cond_acc": gen.get("cond_acc")},
        "curve": sorted([int(k), v] for k, v in state["curve"].items()),
        "few_step": dict(sorted(state["few_step"].items(), key=lambda kv: int(kv[0]))),
        "wall_s": dict(state["wall_s"]),
    }
    save()
    return state["result"]
