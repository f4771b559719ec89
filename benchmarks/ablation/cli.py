"""`python -m benchmarks.ablation`: arguments checked before anything trains, then the run and its
report (JSON + PNG, the README table and the claims on stdout)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from benchmarks.ablation.budgets import ARMS, BUDGETS
from benchmarks.ablation.plan import AblationError, Plan, say
from benchmarks.ablation.report import print_report, write_report
from benchmarks.ablation.runner import run
from benchmarks.machine import RESULTS
from model.presets import PRESETS
from training.distributed import init_distributed
from training.stages.overrides import parse_sets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ablation",
        description="SSR / MCR / SCR ablation: equal-budget tokenizers, DiT convergence, few-step FD.",
    )
    parser.add_argument("--budget", required=True, choices=sorted(BUDGETS))
    parser.add_argument(
        "--out", required=True, help="working directory (checkpoints of every arm; resumable)"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="training seeds (default: the budget's)"
    )
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=None, help="default: the budget's")
    parser.add_argument("--preset", default="fmnist32-tiny", choices=sorted(PRESETS))
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra override for every arm (e.g. pae.latent_dim=32); an arm's zeroed loss weights stay 0",
    )
    parser.add_argument("--cache", default=None, help="feature/latent cache (default: the pipeline's)")
    parser.add_argument("--dataset", default=None, help="replace the budget's dataset")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--results-dir", default=str(RESULTS), help="where the report is also written (not for micro)"
    )
    parser.add_argument(
        "--results-name",
        default=None,
        help="file name (no suffix) of the report, so an investigation with --set keeps its own "
        "(default: the budget's, `ablation` for quick and full)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    budget = BUDGETS[args.budget]
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("ablation: --threads must be >= 1")
        torch.set_num_threads(args.threads)
    results_name = args.results_name or budget.results_name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", results_name):
        raise SystemExit(
            f"ablation: --results-name {results_name!r}: use letters, digits, '_', '-' and '.' only"
        )
    seeds = tuple(args.seeds) if args.seeds else budget.seeds
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SystemExit(f"ablation: --seeds must be distinct non-negative integers, got {list(seeds)}")
    arms = tuple(a for a in ARMS if a in (args.arms or budget.arms))
    try:
        extra = parse_sets(args.sets)
    except ValueError as exc:
        raise SystemExit(f"ablation: {exc}") from None
    bare = [key for key in extra if "." not in key]
    if bare:
        raise SystemExit(
            f"ablation: --set {bare[0]}: prefix the key with its section (e.g. tokenizer.lr=1e-4)"
        )
    try:
        env = init_distributed(args.device)
    except ValueError as exc:
        raise SystemExit(f"ablation: {exc}") from None
    if env.world_size != 1:
        raise SystemExit("ablation: run the harness as one process (it is not a torchrun job)")
    plan = Plan(
        budget=budget,
        preset=args.preset,
        out=Path(args.out),
        env=env,
        seeds=seeds,
        arms=arms,
        cache=args.cache,
        dataset=args.dataset,
        data_root=args.data_root,
        extra_sets=extra,
    )
    try:
        for arm in arms:
            plan.context(plan.arm_dir(seeds[0], arm), arm, "generator", seeds[0])
        report = run(plan, torch.get_num_threads())
    except (ValueError, AblationError) as exc:
        raise SystemExit(f"ablation: {exc}") from None
    targets = [plan.out]
    if budget.writes_results:
        targets.append(Path(args.results_dir))
    for path in write_report(report, targets, results_name):
        say(f"wrote {path}")
    print_report(report)
    return 0
