"""Per-seed results of every arm, aggregated over seeds into the report's `arms` and `few_step`."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def aggregate(values: Sequence[float | None]) -> float | dict[str, Any] | None:
    """One seed: the number itself. Several: `{mean, std, values}` (sample std, n − 1)."""
    if len(values) == 1:
        return values[0]
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {
        "mean": statistics.fmean(present),
        "std": statistics.stdev(present) if len(present) > 1 else 0.0,
        "values": list(values),
    }


def mean_of(value: float | dict[str, Any] | None) -> float | None:
    """The number a claim compares: a single seed's value, or the mean over seeds."""
    if isinstance(value, dict):
        return value["mean"]
    return value


def combine(per_seed: dict[str, dict[int, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-arm per-seed results → (`arms`, `few_step`) of the report, aggregated over seeds."""
    arms: dict[str, Any] = {}
    few: dict[str, Any] = {}
    for arm, by_seed in per_seed.items():
        seeds = sorted(by_seed)
        runs = [by_seed[s] for s in seeds]
        entry: dict[str, Any] = {"seeds": seeds}
        for group, keys in (
            ("recon", ("psnr", "rfd")),
            ("latent", ("ssc", "lpc", "gsq", "erank")),
            ("gen", ("fd", "cond_acc")),
        ):
            entry[group] = {k: aggregate([r[group][k] for r in runs]) for k in keys}
        steps = [p[0] for p in runs[0]["curve"]]
        for r in runs[1:]:
            if [p[0] for p in r["curve"]] != steps:
                raise ValueError(f"arm {arm!r}: seeds measured the curve at different DiT steps")
        entry["curve"] = [[step, aggregate([r["curve"][i][1] for r in runs])] for i, step in enumerate(steps)]
        entry["wall_s"] = aggregate([sum(r["wall_s"].values()) for r in runs])
        arms[arm] = entry
        if runs[0]["few_step"]:
            few[arm] = {s: aggregate([r["few_step"][s] for r in runs]) for s in runs[0]["few_step"]}
    return arms, few
