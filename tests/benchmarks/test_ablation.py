"""The ablation harness (benchmarks/ablation/): budgets and arms resolve to the intended training
configs, and the `micro` budget runs the real pipeline end to end on MNIST-5k into a well-formed,
finite report (the report's own checks: test_ablation_report.py)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.ablation.budgets import ARMS, BUDGETS, Budget, budget_sets, curve_stops
from benchmarks.ablation.cli import main
from benchmarks.ablation.fd_probe import FDProbe, reference_stats
from benchmarks.ablation.plan import Plan, rae_dit_width, shipped_classifier
from model.autoencoders import AutoencoderConfig
from model.presets import get_preset
from training.distributed import DistEnv
from training.metrics.frechet import EfficientNetLite2Features
from training.recipes import get_recipe
from training.stages import assets
from training.stages.context import resolve_context

CPU1 = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
FEW = ("5", "10", "15", "25", "50", "100")


def plan_for(
    budget: str, tmp_path: Path, seeds: tuple[int, ...] = (0,), arms: tuple[str, ...] | None = None
) -> Plan:
    b = BUDGETS[budget]
    return Plan(budget=b, preset="fmnist32-tiny", out=tmp_path, env=CPU1, seeds=seeds, arms=arms or b.arms)


# --- budgets and arms ----------------------------------------------------------------------------


def test_budgets_scale_the_preset_schedule() -> None:
    recipe = get_recipe("fmnist32-tiny")
    tok, dit = recipe.tokenizer, recipe.generator
    half = Budget(
        name="half",
        arms=("pae",),
        seeds=(0,),
        seeded_arms=(),
        curve_points=4,
        gen_samples=50,
        reference_samples=60,
        tokenizer_scale=0.5,
        dit_scale=0.5,
        refine_scale=0.5,
    )
    sets = budget_sets(half, recipe)
    assert sets["tokenizer.steps"] == str(round(tok.steps / 2))
    assert sets["tokenizer.gan_start_step"] == str(round(tok.gan_start_step / 2))
    assert sets["tokenizer.disc_start_step"] == str(round(tok.disc_start_step / 2))
    assert sets["tokenizer.warmup_steps"] == str(round(tok.warmup_steps / 2))
    r_steps = round(recipe.refine.steps / 2)
    assert sets["refine.steps"] == str(r_steps)
    assert sets["refine.warmup_steps"] == str(min(round(tok.warmup_steps / 2), r_steps // 10))
    d_steps = round(dit.steps / 2)
    assert sets["generator.steps"] == str(d_steps) and sets["generator.ckpt_every"] == str(d_steps // 4)
    assert sets["evaluate.gen_num_samples"] == "50" and sets["evaluate.fd_samples"] == "60"
    assert sets["evaluate.fd_network"] == "efficientnet-lite2"
    quick = budget_sets(BUDGETS["quick"], recipe)
    q = BUDGETS["quick"]
    assert quick["tokenizer.steps"] == str(round(tok.steps * q.tokenizer_scale))
    assert quick["generator.steps"] == str(round(dit.steps * q.dit_scale))
    # quick's refine: the recipe's 300 steps, warming up like its 800-step tokenizer (16 steps)
    assert (quick["refine.steps"], quick["refine.warmup_steps"]) == ("300", "16")
    assert "data.train_per_class" not in quick  # the preset's subset, whose VFM features `make train` cached
    micro = budget_sets(BUDGETS["micro"], recipe)
    assert micro["tokenizer.steps"] == "3" and micro["generator.steps"] == "4"
    assert micro["generator.ckpt_every"] == "2" and micro["refine.warmup_steps"] == "0"


def test_budget_without_curve_points_is_refused() -> None:
    bad = Budget(
        name="bad",
        arms=("pae",),
        seeds=(0,),
        seeded_arms=(),
        curve_points=0,
        gen_samples=4,
        reference_samples=4,
    )
    with pytest.raises(ValueError, match="curve_points must be >= 1"):
        budget_sets(bad, get_recipe("fmnist32-tiny"))


@pytest.mark.parametrize(
    ("total", "points", "stops"),
    [
        (625, 4, [156, 312, 468]),  # not 624: the end (625) is the eval stage's own point
        (2500, 7, [357, 714, 1071, 1428, 1785, 2142]),
        (2500, 4, [625, 1250, 1875]),
        (4, 2, [2]),
        (3, 4, [1, 2]),
        (10, 1, []),
    ],
)
def test_curve_points_split_the_dit_run_evenly_and_end_at_its_end(
    total: int, points: int, stops: list[int]
) -> None:
    assert curve_stops(total, points) == stops


def test_the_committed_classifier_judges_only_runs_on_the_presets_own_data(tmp_path: Path) -> None:
    shipped = Path(__file__).resolve().parents[2] / "checkpoints" / "fmnist32-tiny" / "classifier.safetensors"
    assert shipped_classifier(plan_for("quick", tmp_path)) == shipped
    assert shipped_classifier(plan_for("micro", tmp_path)) is None  # MNIST-5k: another judge
    for key in ("data.train_per_class", "evaluate.classifier_steps"):
        plan = plan_for("quick", tmp_path)
        plan.extra_sets = {key: "100"}
        assert shipped_classifier(plan) is None, key
    plan = plan_for("quick", tmp_path)
    plan.data_root = str(tmp_path)
    assert shipped_classifier(plan) is None
    plan = plan_for("quick", tmp_path)
    plan.extra_sets = {"pae.latent_dim": "32"}  # the tokenizer's width does not change the judge
    assert shipped_classifier(plan) == shipped


def test_dit_long_trains_quicks_tokenizers_with_the_full_dit_budget() -> None:
    recipe = get_recipe("fmnist32-tiny")
    quick = budget_sets(BUDGETS["quick"], recipe)
    long = budget_sets(BUDGETS["dit-long"], recipe)
    tokenizer_keys = [k for k in quick if k.startswith("tokenizer.")]
    assert {k: long[k] for k in tokenizer_keys} == {k: quick[k] for k in tokenizer_keys}
    assert int(long["generator.steps"]) == recipe.generator.steps == 4 * int(quick["generator.steps"])
    assert long["generator.warmup_steps"] == str(recipe.generator.warmup_steps)
    assert int(long["generator.ckpt_every"]) == recipe.generator.steps // 4
    assert BUDGETS["dit-long"].results_name != BUDGETS["quick"].results_name


def test_arms_differ_only_in_their_loss_weights(tmp_path: Path) -> None:
    plan = plan_for("full", tmp_path, arms=tuple(ARMS))
    recipe = get_recipe("fmnist32-tiny").tokenizer
    ssr, mcr, scr = recipe.ssr_weight, recipe.mcr_weight, recipe.scr_weight
    assert min(ssr, mcr, scr) > 0
    weights = {}
    for arm in ARMS:
        ctx = plan.context(tmp_path / arm, arm, "tokenizer", 0)
        tok = ctx.recipe.tokenizer
        weights[arm] = (tok.ssr_weight, tok.mcr_weight, tok.scr_weight)
        # the reconstruction loss is the recipe's in every arm
        assert (tok.l1_weight, tok.lpips_weight, tok.gan_weight) == (
            recipe.l1_weight,
            recipe.lpips_weight,
            recipe.gan_weight,
        )
    assert weights == {
        "baseline": (0.0, 0.0, 0.0),
        "ssr": (ssr, 0.0, 0.0),
        "mcr": (0.0, mcr, 0.0),
        "scr": (0.0, 0.0, scr),
        "pae": (ssr, mcr, scr),
        "rae": (0.0, 0.0, 0.0),
        "vae": (0.0, 0.0, 0.0),
    }


def test_headline_arms_change_the_latent_and_nothing_else(tmp_path: Path) -> None:
    plan = plan_for("quick", tmp_path)
    assert plan.arms == ("baseline", "pae", "rae", "vae")
    assert BUDGETS["quick"].seeded_arms == ("pae", "rae", "vae")
    base = plan.context(tmp_path / "b", "baseline", "generator", 0)
    for arm, kind, shape in (("rae", "rae", (112, 8, 8)), ("vae", "vae", (16, 8, 8))):
        ctx = plan.context(tmp_path / arm, arm, "generator", 0)
        assert ctx.preset.autoencoder.kind == kind and ctx.preset.latent_shape == shape
        # The baseline's budget, schedule and loss weights; the VAE's learning rate is its own.
        lr = "1e-3" if arm == "vae" else str(base.recipe.tokenizer.lr)
        assert (
            ctx.recipe
            == resolve_context(
                "fmnist32-tiny", tmp_path, {**plan.sets("baseline"), "tokenizer.lr": lr}, "generator", CPU1
            ).recipe
        )
        # The same DiT: RAE's width rule (192 >= 112) needs no widening at this preset.
        assert dataclasses.replace(ctx.preset.dit, in_channels=16) == base.preset.dit
        assert "dit.hidden" not in plan.sets(arm)


def test_rae_width_rule_widens_a_narrow_dit_only() -> None:
    preset = get_preset("fmnist32-tiny")
    rae = dataclasses.replace(
        preset,
        autoencoder=AutoencoderConfig(kind="rae"),
        dit=dataclasses.replace(preset.dit, in_channels=112),
    )
    assert rae_dit_width(rae) == {}
    narrow = dataclasses.replace(rae, dit=dataclasses.replace(rae.dit, hidden=96))
    assert rae_dit_width(narrow) == {"dit.hidden": "120"}  # the next multiple of lcm(3 heads, 4) >= 112


def test_extra_weight_sets_never_switch_on_a_term_an_arm_lacks(tmp_path: Path) -> None:
    plan = plan_for("full", tmp_path, arms=tuple(ARMS))
    plan.extra_sets = {"tokenizer.ssr_weight": "0.7", "pae.latent_dim": "8"}
    base = plan.context(tmp_path / "b", "baseline", "tokenizer", 0)
    ssr = plan.context(tmp_path / "s", "ssr", "tokenizer", 0)
    assert base.recipe.tokenizer.ssr_weight == 0.0 and ssr.recipe.tokenizer.ssr_weight == 0.7
    assert base.preset.pae.latent_dim == ssr.preset.pae.latent_dim == 8  # shared changes reach every arm


def test_extra_seeds_train_only_the_seeded_arms(tmp_path: Path) -> None:
    plan = plan_for("full", tmp_path, seeds=(0, 1, 2))
    runs = plan.runs()
    assert runs[:7] == [(0, a) for a in ("baseline", "ssr", "mcr", "scr", "pae", "rae", "vae")]
    headline = ("baseline", "pae", "rae", "vae")
    assert runs[7:] == [(1, a) for a in headline] + [(2, a) for a in headline]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "0", "0"], "distinct"),
        (["--set", "steps=3"], "prefix the key"),
        (["--set", "tokenizer.nonsense=1"], "nonsense"),
        (["--threads", "0"], "threads"),
        (["--results-name", "../elsewhere"], "results-name"),
    ],
)
def test_bad_arguments_fail_before_training(tmp_path: Path, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(["--budget", "micro", "--out", str(tmp_path), *argv])


# --- aggregation and claims ----------------------------------------------------------------------


# --- the real pipeline, end to end ---------------------------------------------------------------


def finite_numbers(obj: Any) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in finite_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in finite_numbers(v)]
    return [obj] if isinstance(obj, float | int) and not isinstance(obj, bool) else []


@pytest.mark.slow
@pytest.mark.timeout(2400)  # four arms through every stage twice: ~6 min idle, far longer on a busy box
def test_micro_budget_end_to_end(tmp_path: Path) -> None:
    out, results = tmp_path / "run", tmp_path / "results"
    argv = [
        "--budget",
        "micro",
        "--out",
        str(out),
        "--cache",
        str(tmp_path / "cache"),
        "--threads",
        "1",
        "--results-dir",
        str(results),
    ]
    assert main(argv) == 0
    report = json.loads((out / "ablation.json").read_text())
    assert not results.exists()  # micro never writes the published results
    assert (out / "ablation.png").is_file()
    assert set(report) >= {"machine", "budget", "arms", "few_step", "claims"}
    assert report["budget"]["fd"]["num_samples"] == 4 and report["budget"]["fd"]["seed"] == 0
    assert report["budget"]["fd"]["network"] == "efficientnet-lite2"
    # The floor: the 4 test images after the 8 of the reference, scored like a generator.
    floor = report["budget"]["fd"]["real_floor"]
    assert floor["images"] == "test[8:12]" and math.isfinite(floor["fd"]) and floor["fd"] > 0
    assert report["claims"]["gen_fd_halved"]["compared"]["real_floor"] == floor["fd"]
    assert set(report["arms"]) == {"baseline", "pae", "rae", "vae"}
    latents = report["budget"]["latents"]
    assert latents["rae"]["latent_shape"] == [112, 8, 8] and latents["vae"]["latent_shape"] == [16, 8, 8]
    assert latents["rae"]["width_rule_holds"] and not latents["rae"]["dit_widened"]
    for arm, entry in report["arms"].items():
        assert set(entry["recon"]) == {"psnr", "rfd"}
        assert set(entry["latent"]) == {"ssc", "lpc", "gsq", "erank"}
        assert set(entry["gen"]) == {"fd", "cond_acc"}
        assert [p[0] for p in entry["curve"]] == [2, 4]
        # The curve's end, gen.fd and the preset-step few-step point are one measurement.
        assert entry["curve"][-1][1] == entry["gen"]["fd"] == report["few_step"][arm]["25"]
        assert list(report["few_step"][arm]) == list(FEW)
    numbers = finite_numbers({k: report[k] for k in ("arms", "few_step")})
    assert len(numbers) >= 40 and all(math.isfinite(x) for x in numbers)
    assert set(report["claims"]) == {
        "gen_fd_halved",
        "ssr_raises_ssc",
        "mcr_lowers_lpc",
        "scr_raises_gsq",
        "converges_4x_faster",
        "few_step_15_vs_100",
        "converges_4x_faster_than_rae",
        "gen_fd_le_rae",
        "gen_fd_le_vae",
    }
    assert all(
        c["pass"] in (True, False)
        for k, c in report["claims"].items()
        if k in ("gen_fd_halved", "few_step_15_vs_100", "gen_fd_le_rae", "gen_fd_le_vae")
    )
    # Only the arms that read refined targets got them, from one shared refine run.
    assert (out / "seed0" / "pae" / "refine.safetensors").is_file()
    assert not (out / "seed0" / "baseline" / "refine.safetensors").exists()
    assert not (out / "seed0" / "rae" / "refine.safetensors").exists()
    assert (out / "seed0" / "rae" / "rae_ema.safetensors").is_file()
    assert (out / "seed0" / "vae" / "vae_ema.safetensors").is_file()

    # The harness's FD probe reproduces the evaluate stage's gen.fd from the final DiT.
    plan = plan_for("micro", out)
    plan.cache = str(tmp_path / "cache")
    ctx = plan.context(out / "seed0" / "pae", "pae", "evaluate", 0)
    network = EfficientNetLite2Features()
    probe = FDProbe(network, reference_stats(ctx, network, out / "reference_test_8.safetensors"), ctx)
    mean, std = assets.load_latent_stats(ctx)
    fd = probe(assets.load_dit_ema(ctx), assets.load_autoencoder(ctx), ctx.preset.sampler, mean, std)
    assert fd == pytest.approx(report["arms"]["pae"]["gen"]["fd"], rel=1e-6)

    # Rerunning resumes: nothing retrains, the numbers are the same; other settings are refused.
    assert main(argv) == 0
    again = json.loads((out / "ablation.json").read_text())
    for arm, entry in report["arms"].items():
        for key in ("recon", "latent", "gen", "curve"):
            assert again["arms"][arm][key] == entry[key]
    assert again["few_step"] == report["few_step"]
    # The arms' cost is kept across invocations; the resumed invocation itself trained nothing.
    assert again["arms_wall_s"] == pytest.approx(report["arms_wall_s"]) and report["arms_wall_s"] > 0
    assert again["wall_s"] < report["wall_s"]
    with pytest.raises(SystemExit, match="other settings"):
        main([*argv, "--set", "generator.lr=7e-4"])
