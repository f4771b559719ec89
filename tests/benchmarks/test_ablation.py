"""The ablation harness (benchmarks/ablation/): budgets and arms resolve to the intended training configs, the
seed aggregation and the claim checks compute what they say, and the `micro` budget runs the real
pipeline end to end on MNIST-5k into a well-formed, finite report."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.ablation.aggregate import aggregate, combine
from benchmarks.ablation.budgets import ARMS, BUDGETS, Budget, budget_sets, curve_stops
from benchmarks.ablation.claims import evaluate_claims
from benchmarks.ablation.cli import main
from benchmarks.ablation.fd_probe import FDProbe, reference_stats
from benchmarks.ablation.plan import Plan, rae_dit_width, shipped_classifier
from benchmarks.ablation.report import (
    finite_json,
    plot_curves,
    render_claims,
    render_curves,
    render_table,
    write_report,
)
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
    assert plan.arms == ("baseline", "pae", "rae", "vae") == BUDGETS["quick"].seeded_arms
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


def test_aggregate_keeps_one_seed_and_summarises_several() -> None:
    assert aggregate([3.0]) == 3.0
    out = aggregate([1.0, 3.0])
    assert out == {"mean": 2.0, "std": pytest.approx(math.sqrt(2.0)), "values": [1.0, 3.0]}
    assert aggregate([None, None]) is None


def fake_run(scale: float, few: bool = True) -> dict[str, Any]:
    return {
        "recon": {"psnr": 25.0, "rfd": 3.0},
        "latent": {"ssc": 0.3 * scale, "lpc": 0.2 / scale, "gsq": 0.5 * scale, "erank": 0.4},
        "gen": {"fd": 40.0 / scale, "cond_acc": 0.8},
        "curve": [[150, 100.0 / scale], [300, 70.0 / scale], [450, 50.0 / scale], [600, 40.0 / scale]],
        "few_step": {s: 40.0 / scale * (1.5 if s == "5" else 1.0) for s in FEW} if few else {},
        "wall_s": {"dit": 10.0},
    }


def test_combine_aggregates_seeds_per_arm() -> None:
    arms, few = combine(
        {"baseline": {0: fake_run(1.0), 1: fake_run(2.0)}, "pae": {0: fake_run(3.0, few=False)}}
    )
    assert arms["baseline"]["seeds"] == [0, 1]
    assert arms["baseline"]["gen"]["fd"]["mean"] == pytest.approx(30.0)
    assert arms["baseline"]["curve"][0][0] == 150 and arms["baseline"]["curve"][0][1]["values"] == [
        100.0,
        50.0,
    ]
    assert arms["pae"]["gen"]["fd"] == pytest.approx(40.0 / 3)  # one seed: a plain number
    assert set(few) == {"baseline"} and few["baseline"]["5"]["mean"] == pytest.approx(45.0)


def test_combine_refuses_curves_on_different_grids() -> None:
    other = fake_run(1.0)
    other["curve"] = other["curve"][:-1]
    with pytest.raises(ValueError, match="different DiT steps"):
        combine({"baseline": {0: fake_run(1.0), 1: other}})


def test_claims_pass_when_pae_is_much_better() -> None:
    runs = {
        "baseline": {0: fake_run(1.0)},
        "ssr": {0: fake_run(1.1)},
        "mcr": {0: fake_run(1.1)},
        "scr": {0: fake_run(0.9)},
        "pae": {0: fake_run(2.5)},
    }
    arms, few = combine(runs)
    claims = evaluate_claims(arms, few, dit_steps=600)
    assert claims["gen_fd_halved"]["pass"] is True
    assert claims["gen_fd_halved"]["compared"]["ratio"] == pytest.approx(0.4)
    assert claims["ssr_raises_ssc"]["pass"] is True and claims["mcr_lowers_lpc"]["pass"] is True
    assert claims["scr_raises_gsq"]["pass"] is False  # scr's fake GSQ is lower than the baseline's
    conv = claims["converges_4x_faster"]
    # PAE's FD at step 150 is 40, the baseline's final FD is 40: reached at 150 = 600 / 4.
    assert conv["compared"]["pae_steps_to_reach"] == 150 and conv["pass"] is True
    assert claims["few_step_15_vs_100"]["pass"] is True
    assert claims["few_step_15_vs_100"]["compared"]["relative_difference"] == pytest.approx(0.0)


def test_claims_fail_or_stay_open_honestly() -> None:
    arms, few = combine({"baseline": {0: fake_run(1.0)}, "pae": {0: fake_run(1.2)}})
    few["pae"]["15"] = 60.0
    claims = evaluate_claims(arms, few, dit_steps=600)
    assert claims["gen_fd_halved"]["pass"] is False
    # PAE's curve (83, 58, 42, 33) first drops below the baseline's final 40 at the last step.
    assert claims["converges_4x_faster"]["compared"]["pae_steps_to_reach"] == 600
    assert claims["converges_4x_faster"]["pass"] is False
    assert claims["few_step_15_vs_100"]["pass"] is False
    for key in ("ssr_raises_ssc", "mcr_lowers_lpc", "scr_raises_gsq"):
        assert claims[key]["pass"] is None and "not measured" in claims[key]["note"]


def test_headline_claims_compare_pae_with_rae_and_vae() -> None:
    arms, few = combine({"pae": {0: fake_run(2.0), 1: fake_run(2.0)}, "rae": {0: fake_run(1.0)}})
    claims = evaluate_claims(arms, few, dit_steps=600)
    conv = claims["converges_4x_faster_than_rae"]
    # PAE's curve (50, 35, 25, 20) is below RAE's final 40 at step 300: twice as fast, not four times.
    assert conv["compared"]["pae_steps_to_reach"] == 300 and conv["compared"]["rae_final_fd"] == 40.0
    assert conv["pass"] is False and conv["compared"]["speedup_at_least"] == pytest.approx(2.0)
    assert claims["gen_fd_le_rae"]["pass"] is True
    assert claims["gen_fd_le_rae"]["compared"]["ratio"] == pytest.approx(0.5)
    assert claims["gen_fd_le_vae"]["pass"] is None and "vae" in claims["gen_fd_le_vae"]["note"]
    arms, few = combine({"pae": {0: fake_run(1.0)}, "vae": {0: fake_run(1.25)}})
    worse = evaluate_claims(arms, few, dit_steps=600)["gen_fd_le_vae"]
    assert worse["pass"] is False and worse["compared"]["ratio"] == pytest.approx(1.25)


def test_fd_claim_reports_the_excess_over_the_real_floor_but_judges_raw_fds() -> None:
    arms, few = combine({"baseline": {0: fake_run(1.0)}, "pae": {0: fake_run(1.25)}})
    claims = evaluate_claims(arms, few, dit_steps=600, floor=20.0)
    compared = claims["gen_fd_halved"]["compared"]
    # FDs 32 and 40 over a floor of 20: raw ratio 0.8, excess ratio 12 / 20 = 0.6.
    assert compared["ratio"] == pytest.approx(0.8) and compared["excess_ratio"] == pytest.approx(0.6)
    assert compared["real_floor"] == 20.0 and claims["gen_fd_halved"]["pass"] is False
    assert "excess_ratio" not in evaluate_claims(arms, few, dit_steps=600)["gen_fd_halved"]["compared"]


def test_missing_or_non_finite_values_never_pass_or_break_the_json() -> None:
    arms, few = combine({"baseline": {0: fake_run(1.0)}, "pae": {0: fake_run(2.0)}})
    arms["baseline"]["gen"]["fd"] = None
    few["pae"]["100"] = 0.0
    claims = evaluate_claims(arms, few, dit_steps=600)
    assert claims["gen_fd_halved"]["pass"] is None and claims["few_step_15_vs_100"]["pass"] is None
    # A budget that skips few-step FD (dit-long) leaves that claim open, saying why.
    arms, few = combine({"baseline": {0: fake_run(1.0)}, "pae": {0: fake_run(2.0, few=False)}})
    open_claim = evaluate_claims(arms, few, dit_steps=600)["few_step_15_vs_100"]
    assert open_claim["pass"] is None and "15 and 100 sampler steps" in open_claim["note"]
    cleaned = finite_json({"a": [1.0, math.inf], "b": {"c": math.nan}})
    assert json.loads(json.dumps(cleaned, allow_nan=False)) == {"a": [1.0, None], "b": {"c": None}}


def test_table_claims_and_plot_render(tmp_path: Path) -> None:
    arms, few = combine(
        {
            "baseline": {0: fake_run(1.0), 1: fake_run(1.2)},
            "pae": {0: fake_run(2.5)},
            "rae": {0: fake_run(2.0)},
        }
    )
    report = {
        "budget": {
            "name": "quick",
            "dataset": "fashion-mnist",
            "train_per_class": 2000,
            "tokenizer_steps": 400,
            "dit_steps": 600,
            "curve_steps": [150, 300, 450, 600],
            "latents": {"rae": {"latent_shape": [112, 8, 8], "dit_hidden": 192}},
            "seeds": {"baseline": [0, 1], "pae": [0], "rae": [0]},
            "fd": {
                "network": "efficientnet-lite2",
                "num_samples": 250,
                "seed": 0,
                "reference": {"split": "test", "num_samples": 500},
                "sampler": {"sampler": "euler", "steps": 25, "cfg_scale": 2.0},
                "real_floor": {"fd": 24.5, "images": "test[500:750]"},
            },
        },
        "arms": arms,
        "few_step": few,
        "claims": evaluate_claims(arms, few, 600),
    }
    table = render_table(report).splitlines()
    assert table[0].startswith(
        "| prior alignment | SSR | MCR | SCR | SSC ↑ | LPC ↓ | GSQ ↑ | PSNR ↑ | rFD ↓ | gFD ↓"
    )
    baseline_row = next(line for line in table if line.startswith("| none"))
    assert "36.67 ± 4.71" in baseline_row  # gFD mean ± sample std of 40 and 33.3
    assert table[3].startswith("| SSR + MCR + SCR (PAE) | ✓ | ✓ | ✓ |")
    assert table[4].startswith("| RAE: frozen VFM tokens + decoder |  |  |  |")
    assert "held-out real images (test[500:750]) score gFD 24.50" in table[-1]
    curves = render_curves(report).splitlines()
    assert curves[0] == "| arm | latent | DiT width | FD @ 150 | FD @ 300 | FD @ 450 | FD @ 600 |"
    assert curves[-1] == "| RAE: frozen VFM tokens + decoder | 112×8×8 | 192 | 50.0 | 35.0 | 25.0 | 20.0 |"
    claims = render_claims(report)
    assert "[PASS] gen_fd_halved" in claims and "[n/a ] ssr_raises_ssc" in claims
    plot_curves(report, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # An investigation keeps its own report next to the published one.
    (written,) = write_report(report, [tmp_path], "ablation_d32")
    assert written == tmp_path / "ablation_d32.json" and (tmp_path / "ablation_d32.png").is_file()
    assert json.loads(written.read_text())["arms"]["pae"]["gen"]["fd"] == pytest.approx(16.0)


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
