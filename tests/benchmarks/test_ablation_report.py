"""The ablation report: seed aggregation, the claim checks (the paper's bars at this scale, the headline
against RAE and a KL autoencoder), and the table, curves and plot compute and render what they say."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.ablation.aggregate import aggregate, combine
from benchmarks.ablation.claims import evaluate_claims
from benchmarks.ablation.report import (
    finite_json,
    plot_curves,
    render_claims,
    render_curves,
    render_table,
    write_report,
)
from training.distributed import DistEnv

CPU1 = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
FEW = ("5", "10", "15", "25", "50", "100")


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
