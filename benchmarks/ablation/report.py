"""Presenting an ablation report: the JSON (standard: no NaN), the FD-vs-DiT-steps plot, the README
table in the layout of the paper's Table 2a, and the claims as a checklist.

    python -m benchmarks.ablation.report [benchmarks/results/ablation.json]

re-renders the PNG next to a JSON and prints the table and claims, so the README can be refreshed
from the numbers without retraining anything.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.machine import RESULTS

ARM_LABELS = {
    "baseline": "none (reconstruction only)",
    "ssr": "SSR only",
    "mcr": "MCR only",
    "scr": "SCR only",
    "pae": "SSR + MCR + SCR (PAE)",
    "rae": "RAE: frozen VFM tokens + decoder",
    "vae": "KL-VAE from pixels",
}
ARM_ORDER = tuple(ARM_LABELS)
# One colour per arm in both panels (matplotlib's default cycle, in arm order).
ARM_COLORS = {arm: f"C{i}" for i, arm in enumerate(ARM_ORDER)}
ARM_TERMS = {"baseline": (), "ssr": ("ssr",), "mcr": ("mcr",), "scr": ("scr",), "pae": ("ssr", "mcr", "scr")}
# (header, group, key, decimals); the arrows say which way is better.
COLUMNS = (
    ("SSC ↑", "latent", "ssc", 3),
    ("LPC ↓", "latent", "lpc", 3),
    ("GSQ ↑", "latent", "gsq", 3),
    ("PSNR ↑", "recon", "psnr", 2),
    ("rFD ↓", "recon", "rfd", 2),
    ("gFD ↓", "gen", "fd", 2),
    ("cond-acc ↑", "gen", "cond_acc", 3),
)


def _mean_std(value: Any) -> tuple[float | None, float | None]:
    if isinstance(value, dict):
        return value["mean"], value["std"]
    return value, None


def format_value(value: Any, decimals: int) -> str:
    """A number, `mean ± std` over seeds, or `n/a`."""
    mean, std = _mean_std(value)
    if mean is None:
        return "n/a"
    if std is None:
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def render_table(report: dict[str, Any]) -> str:
    """Markdown table, one row per arm: which terms it trains with, latent metrics, recon, generation."""
    headers = ["prior alignment", "SSR", "MCR", "SCR", *(c[0] for c in COLUMNS)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for arm in ARM_ORDER:
        if arm not in report["arms"]:
            continue
        entry = report["arms"][arm]
        checks = ["✓" if t in ARM_TERMS.get(arm, ()) else "" for t in ("ssr", "mcr", "scr")]
        cells = [format_value(entry[group][key], dec) for _, group, key, dec in COLUMNS]
        lines.append("| " + " | ".join([ARM_LABELS[arm], *checks, *cells]) + " |")
    budget = report["budget"]
    fd = budget["fd"]
    seeds = ", ".join(f"{arm}: {len(s)}" for arm, s in budget["seeds"].items())
    lines += [
        "",
        f"Budget `{budget['name']}` on {budget['dataset']} ({budget['train_per_class'] or 'all'} images/class): "
        f"tokenizer {budget['tokenizer_steps']} steps, DiT {budget['dit_steps']} steps. "
        f"gFD: FD on {fd['network']} features (not FID), {fd['num_samples']} samples from seed {fd['seed']}, "
        f"against {fd['reference']['num_samples']} {fd['reference']['split']} images; "
        f"{fd['sampler']['sampler']} {fd['sampler']['steps']} steps, CFG {fd['sampler']['cfg_scale']}. "
        f"rFD: same network, reconstructions vs originals. Seeds per arm: {seeds} (mean ± sample std).",
    ]
    floor = fd.get("real_floor") or {}
    if floor.get("fd") is not None:
        lines[-1] += (
            f" Real-data floor: {fd['num_samples']} held-out real images ({floor['images']}) score "
            f"gFD {floor['fd']:.2f} under the same protocol."
        )
    return "\n".join(lines)


def render_curves(report: dict[str, Any]) -> str:
    """Markdown table of generation FD at every measured DiT step, one row per arm, with its latent
    (shape and autoencoder) and the DiT width it trained."""
    latents = report["budget"].get("latents", {})
    steps = report["budget"]["curve_steps"]
    headers = ["arm", "latent", "DiT width", *(f"FD @ {s}" for s in steps)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for arm in ARM_ORDER:
        if arm not in report["arms"]:
            continue
        info = latents.get(arm, {})
        shape = "×".join(str(v) for v in info.get("latent_shape", [])) or "n/a"
        by_step = dict((p[0], p[1]) for p in report["arms"][arm]["curve"])
        cells = [format_value(by_step.get(s), 1) for s in steps]
        lines.append(
            f"| {ARM_LABELS[arm]} | {shape} | {info.get('dit_hidden', 'n/a')} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def render_claims(report: dict[str, Any]) -> str:
    """The claims, one line each: PASS / FAIL / not measured, with the numbers compared."""
    lines = []
    for name, claim in report["claims"].items():
        status = {True: "PASS", False: "FAIL", None: "n/a "}[claim["pass"]]
        numbers = ", ".join(f"{k}={_short(v)}" for k, v in claim["compared"].items() if k != "pae_curve")
        note = f" ({claim['note']})" if "note" in claim else ""
        lines.append(
            f"[{status}] {name}: {claim['claim']} — {numbers or '-'}; threshold {claim['threshold']}{note}"
        )
    return "\n".join(lines)


def _short(value: Any) -> str:
    mean, std = _mean_std(value)
    if isinstance(mean, float):
        return f"{mean:.4g}" if std is None else f"{mean:.4g}±{std:.2g}"
    return str(mean)


def plot_curves(report: dict[str, Any], path: str | Path) -> None:
    """Left: generation FD against DiT training steps per arm (seed std as error bars). Right: FD of
    the final DiT against the number of sampler steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_curve, ax_few) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm in ARM_ORDER:
        if arm not in report["arms"]:
            continue
        curve = report["arms"][arm]["curve"]
        steps = [p[0] for p in curve]
        means, stds = zip(*(_mean_std(p[1]) for p in curve), strict=True)
        errs = None if all(s is None for s in stds) else [s or 0.0 for s in stds]
        ax_curve.errorbar(
            steps, means, yerr=errs, marker="o", capsize=3, color=ARM_COLORS[arm], label=ARM_LABELS[arm]
        )
        few = report["few_step"].get(arm, {})
        if few:
            xs = sorted(few, key=int)
            few_means, few_stds = zip(*(_mean_std(few[s]) for s in xs), strict=True)
            few_errs = None if all(s is None for s in few_stds) else [s or 0.0 for s in few_stds]
            ax_few.errorbar(
                [int(s) for s in xs],
                few_means,
                yerr=few_errs,
                marker="o",
                capsize=3,
                color=ARM_COLORS[arm],
                label=ARM_LABELS[arm],
            )
    rivals = [arm for arm in ("baseline", "rae") if arm in report["arms"]]
    for arm in rivals:
        # The convergence claims' picture: where PAE's curve meets a rival's final FD, against a
        # quarter of the budget.
        final = _mean_std(report["arms"][arm]["curve"][-1][1])[0]
        ax_curve.axhline(final, color=ARM_COLORS[arm], ls=":", lw=1, label=f"{arm} final FD")
    if rivals:
        ax_curve.axvline(
            report["budget"]["dit_steps"] / 4, color="grey", ls="--", lw=1, label="1/4 of DiT steps"
        )
    fd = report["budget"]["fd"]
    floor = (fd.get("real_floor") or {}).get("fd")
    measured_few = any(report["few_step"].get(arm) for arm in report["arms"])
    if not measured_few:
        ax_few.text(0.5, 0.5, "not measured in this budget", ha="center", transform=ax_few.transAxes)
    if floor is not None:
        for ax in (ax_curve, ax_few) if measured_few else (ax_curve,):
            ax.axhline(floor, color="black", ls="-.", lw=1, label="real-data floor")
    ylabel = f"FD ({fd['network']}, {fd['num_samples']} samples)"
    ax_curve.set(xlabel="DiT training steps", ylabel=ylabel, title="Generator convergence")
    ax_few.set(
        xlabel="Euler sampler steps", ylabel=ylabel, title="Few-step sampling (final DiT)", xscale="log"
    )
    for ax in (ax_curve, ax_few):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    budget = report["budget"]
    changed = ", ".join(f"{k}={v}" for k, v in budget.get("extra_sets", {}).items())
    fig.suptitle(
        f"PAE ablation, budget '{budget['name']}' ({budget['dataset']})" + (f"; {changed}" if changed else "")
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finite_json(obj: Any) -> Any:
    """The report with every non-finite float replaced by None, so the JSON stays standard."""
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_report(report: dict[str, Any], directories: Sequence[Path], name: str = "ablation") -> list[Path]:
    """`<name>.json` and `<name>.png` into each directory; returns the JSON paths."""
    report = finite_json(report)
    written = []
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}.json"
        path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        plot_curves(report, directory / f"{name}.png")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ablation.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("report", nargs="?", default=str(RESULTS / "ablation.json"))
    args = parser.parse_args(argv)
    path = Path(args.report)
    if not path.is_file():
        raise SystemExit(f"ablation.report: no report at {path}; run `python -m benchmarks.ablation` first")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"ablation.report: {path} is not valid JSON ({exc})") from None
    missing = [k for k in ("budget", "arms", "few_step", "claims") if k not in report]
    if missing:
        raise SystemExit(f"ablation.report: {path} is not an ablation report (missing {missing})")
    plot_curves(report, path.with_suffix(".png"))
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def print_report(report: dict[str, Any]) -> None:
    """The README table, the FD-versus-DiT-steps curves and the claims, on stdout."""
    print(render_table(report))
    print()
    print(render_curves(report))
    print()
    print(render_claims(report))
