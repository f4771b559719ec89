"""Running stages: skip-if-done bookkeeping for one stage, and `all` (refine → tokenizer → latents →
generator → evaluate) finishing with the shipped checkpoint layout of docs/INTERFACES.md.

A stage is skipped when config.json records it finished with the same settings and inputs;
`--force` reruns it from scratch (its resume state is discarded). `all` then copies the last
generator sample grid to `samples.png`, writes `MODEL_CARD.md` (keeping the hand-written notes of
the card it replaces), and, unless asked to keep it, removes the resume state (optimiser moments
and live weights), which is what keeps the directory small.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import safe_open

from model.checkpoint import (
    CLASSIFIER_FILE,
    CONFIG_FILE,
    DIT_EMA_FILE,
    LATENT_STATS_FILE,
    METRICS_FILE,
    PAE_EMA_FILE,
    PAE_FILE,
    autoencoder_files,
    read_json,
)
from training.checkpoint import RESUME_DIR, resume_dir
from training.distributed import barrier
from training.stages import evaluate, generator, latents, refine, tokenizer
from training.stages.context import STAGES, StageContext

MODEL_CARD_FILE = "MODEL_CARD.md"
# Everything from this heading on is written by people (how the recipe was chosen, what was measured
# on the way); `all` regenerates the card above it and carries this part over.
NOTES_HEADING = "## Notes"
RUNNERS: dict[str, Callable[[StageContext], dict[str, Any]]] = {
    "refine": refine.run,
    "tokenizer": tokenizer.run,
    "latents": latents.run,
    "generator": generator.run,
    "evaluate": evaluate.run,
}
SHIPPED = (
    CONFIG_FILE,
    PAE_FILE,
    PAE_EMA_FILE,
    DIT_EMA_FILE,
    LATENT_STATS_FILE,
    CLASSIFIER_FILE,
    METRICS_FILE,
    "samples.png",
    MODEL_CARD_FILE,
)
SIZE_LIMIT_MB = 20.0
_LATENT_WORDS = {
    "pae": "on the per-token RMS sphere",
    "rae": "RAE: the frozen VFM's token grid, standardised per channel",
    "vae": "KL autoencoder: the posterior mean",
}


def _say(ctx: StageContext, message: str) -> None:
    if ctx.env.is_main:
        print(f"[pae-train] {message}", file=sys.stderr, flush=True)


def run_stage(ctx: StageContext, stage: str) -> dict[str, Any]:
    """Run `stage` unless it is done with identical settings; returns its record."""
    if stage not in RUNNERS:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    if ctx.is_done(stage):
        _say(ctx, f"{stage}: already done in {ctx.out} with these settings; skipping (--force reruns it)")
        return ctx.record(stage) or {}
    if ctx.force and ctx.env.is_main:
        shutil.rmtree(resume_dir(ctx.out, stage), ignore_errors=True)
    barrier(ctx.env)
    _say(ctx, f"{stage}: starting ({ctx.preset.name}, world size {ctx.env.world_size}, {ctx.env.device})")
    started = time.perf_counter()
    record = RUNNERS[stage](ctx)
    elapsed = time.perf_counter() - started
    if not record.get("finished"):
        _say(
            ctx,
            f"{stage}: stopped at step {record.get('step')} after {elapsed:.1f} s (--stop-at); rerun to resume",
        )
        return record
    record["stage_wall_s"] = elapsed
    ctx.mark_done(stage, record)
    ctx.write_metrics({"wall_s": {stage: elapsed}})
    _say(ctx, f"{stage}: done in {elapsed:.1f} s")
    return record


def run_all(ctx: StageContext, keep_resume: bool = False) -> dict[str, dict[str, Any]]:
    """Every stage in order, then the shipped layout: samples.png, MODEL_CARD.md, no resume state."""
    records: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        records[stage] = run_stage(ctx, stage)
        if not records[stage].get("finished"):
            return records
    if ctx.env.is_main:
        grid = Path(records["generator"].get("samples", ""))
        if grid.is_file():
            shutil.copyfile(grid, ctx.out / "samples.png")
        if not keep_resume:
            shutil.rmtree(ctx.out / RESUME_DIR, ignore_errors=True)
            shutil.rmtree(ctx.out / "samples", ignore_errors=True)
        card = ctx.out / MODEL_CARD_FILE
        notes = kept_notes(card.read_text()) if card.is_file() else ""
        card.write_text(model_card(ctx) + notes)
        size = directory_mb(ctx.out)
        missing = [name for name in shipped_files(ctx) if not (ctx.out / name).is_file()]
        if missing:
            _say(ctx, f"warning: the checkpoint lacks {missing}")
        if size > SIZE_LIMIT_MB:
            _say(ctx, f"warning: {ctx.out} holds {size:.1f} MB, over the {SIZE_LIMIT_MB:.0f} MB budget")
        _say(ctx, f"all: {ctx.out} ready ({size:.1f} MB)")
    barrier(ctx.env)
    return records


def shipped_files(ctx: StageContext) -> tuple[str, ...]:
    """`SHIPPED`, with a comparison autoencoder's own weight files in place of PAE's."""
    kind = ctx.preset.autoencoder.kind
    if kind == "pae":
        return SHIPPED
    swap = dict(zip((PAE_FILE, PAE_EMA_FILE), autoencoder_files(kind), strict=True))
    return tuple(swap.get(name, name) for name in SHIPPED)


def directory_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def _param_count(path: Path) -> int | None:
    if not path.is_file():
        return None
    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            n = 1
            for size in f.get_slice(key).get_shape():
                n *= size
            total += n
    return total


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "n/a" if value is None else str(value)


def model_card(ctx: StageContext) -> str:
    """A Markdown model card from config.json and metrics.json (numbers are copied, never typed)."""
    config = read_json(ctx.out / CONFIG_FILE)
    metrics = read_json(ctx.out / METRICS_FILE) if (ctx.out / METRICS_FILE).is_file() else {}
    p, tok = ctx.preset, ctx.recipe.tokenizer
    recon, latent, gen = (metrics.get(k, {}) for k in ("recon", "latent", "gen"))
    walls = metrics.get("wall_s", {})
    stages = config.get("stages", {})
    vfm = config.get("vfm_reference", {})
    lines = [
        f"# Model card: {p.name}",
        "",
        "PAE tokenizer (frozen VFM → DAM → projector → RMS-sphere latent → ViT decoder) and a",
        "class-conditional LightningDiT trained on its latents, produced by `pae-train all` "
        f"(`pae-train all --preset {p.name} --out {ctx.out}`).",
        "",
        "## Data",
        f"- Dataset: {p.dataset}, {len(p.class_names)} classes, {p.pae.image_size}×{p.pae.image_size} RGB in [0, 1].",
        f"- Classes: {', '.join(p.class_names[:20])}{' …' if len(p.class_names) > 20 else ''}",
        "",
        "## Architecture",
        f"- Frozen VFM: {vfm.get('kind')} at {vfm.get('input_size')} px → {vfm.get('grid')}×{vfm.get('grid')} tokens; "
        f"weights referenced, not copied: {vfm.get('package') or vfm.get('path')}"
        + (f" (sha256 {vfm['weights_sha256'][:16]}…)" if vfm.get("weights_sha256") else ""),
        f"- Latent: {' × '.join(str(s) for s in p.latent_shape)} ({_LATENT_WORDS[p.autoencoder.kind]}).",
        f"- {p.autoencoder.kind.upper()} trainable parameters: "
        f"{_fmt(_param_count(ctx.out / autoencoder_files(p.autoencoder.kind)[1]))}; "
        f"LightningDiT parameters: {_fmt(_param_count(ctx.out / DIT_EMA_FILE))} "
        f"(depth {p.dit.depth}, width {p.dit.hidden}, heads {p.dit.heads}).",
        f"- Sampler defaults: {p.sampler.sampler}, {p.sampler.steps} steps, shift {p.sampler.shift}, "
        f"CFG {p.sampler.cfg_scale} on t ∈ {list(p.sampler.cfg_interval)}.",
        "",
        "## Training",
        "| stage | steps | wall time (s) |",
        "|---|---|---|",
    ]
    for stage in STAGES:
        rec = stages.get(stage, {})
        lines.append(f"| {stage} | {_fmt(rec.get('steps'))} | {_fmt(walls.get(stage), 5)} |")
    lines += [
        "",
        f"Tokenizer loss weights: L1 {tok.l1_weight}, LPIPS {tok.lpips_weight}, GAN {tok.gan_weight}, "
        f"SSR {tok.ssr_weight}, MCR {tok.mcr_weight}, SCR {tok.scr_weight}. Full configs: `config.json`.",
        "",
        f"## Evaluation ({recon.get('split', ctx.recipe.evaluate.split)} split)",
        "| metric | value | notes |",
        "|---|---|---|",
        f"| recon.psnr (dB) | {_fmt(recon.get('psnr'))} | {_fmt(recon.get('num_samples'))} images |",
        f"| recon.ssim | {_fmt(recon.get('ssim'))} | |",
        f"| recon.lpips | {_fmt(recon.get('lpips'))} | VGG16 LPIPS |",
        f"| recon.fd | {_fmt(recon.get('fd'))} | FD on {recon.get('fd_network')} features (not FID) |",
        f"| latent.ssc | {_fmt(latent.get('ssc'))} | {_fmt(latent.get('ssc_num_samples'))} images, {latent.get('ssc_segmentation', '')} |",
        f"| latent.lpc | {_fmt(latent.get('lpc'))} | {_fmt(latent.get('lpc_num_samples'))} latents |",
        f"| latent.gsq | {_fmt(latent.get('gsq'))} | |",
        f"| latent.erank | {_fmt(latent.get('erank'))} | |",
        f"| gen.fd | {_fmt(gen.get('fd'))} | FD on {gen.get('fd_network')}, {_fmt(gen.get('num_samples'))} samples, seed {_fmt(gen.get('seed'))} |",
        f"| gen.cond_acc | {_fmt(gen.get('cond_acc'))} | shipped classifier "
        f"(test accuracy {_fmt(metrics.get('classifier', {}).get('test_acc'))}) |",
        "",
        "`samples.png`: one row per class from the EMA DiT at the default sampler settings.",
        "",
        "## Limitations",
        "- FD numbers use EfficientNet-Lite2 features and few samples: compare them only with numbers",
        "  from the same network, sample count and seed — they are not FID.",
        "- A small research checkpoint trained in minutes on CPU; not for any real-world decision.",
        "",
        "Raw numbers: `metrics.json`. Settings: `config.json`.",
    ]
    return "\n".join(lines) + "\n"


def kept_notes(card: str) -> str:
    """The hand-written part of a model card: from `NOTES_HEADING` to the end ("" when it has none)."""
    start = card.find(f"\n{NOTES_HEADING}\n")
    return "" if start < 0 else card[start:]


def summary(ctx: StageContext) -> str:
    """One JSON line of the stage wall times (printed by the CLI)."""
    metrics = read_json(ctx.out / METRICS_FILE) if (ctx.out / METRICS_FILE).is_file() else {}
    return json.dumps({"out": str(ctx.out), "wall_s": metrics.get("wall_s", {})})
