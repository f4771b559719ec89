"""From the sweep's raw points to the issue's figures, a markdown table and a plot.

Every figure pairs numbers of the same repetition (the service against a peer measured minutes
apart, a throughput against the ceiling measured just before), then reports each repetition's
value and their mean, so one disturbed repetition shows instead of hiding in an average.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.machine import save_figure

GRAPH = {"encode": "encoder", "decode": "decoder"}
TARGETS = {
    "c1_vs_plain": 0.95,
    "c1_overhead_ms": 2.0,
    "ceiling_fraction_c32": {"encode": 0.90, "decode": 0.70},
    "server_cores_c32": 1.8,
}


def _per_rep(values: list[float]) -> dict[str, object]:
    return {"per_repetition": [round(v, 3) for v in values], "mean": round(statistics.fmean(values), 3)}


def figures(runs: dict, ceilings: list[dict], batch: int) -> dict[str, object]:
    """The issue's "must show" figures, each per repetition and on average."""
    out: dict[str, object] = {}
    service = runs.get("service", {})
    top = str(max(int(c) for e in service.values() for c in e)) if service else None
    for endpoint, points in service.items():
        graph = GRAPH[endpoint]
        fig: dict[str, object] = {}
        if "1" in points:
            one = points["1"]
            own = [c[graph]["1"]["ms_per_batch"] for c in ceilings]
            fig["c1_p50_overhead_ms"] = _per_rep([p["p50_ms"] - g for p, g in zip(one, own, strict=True)])
            if "plain" in runs:
                plain = runs["plain"][endpoint]["1"]
                fig["c1_vs_plain"] = _per_rep([s["rps"] / p["rps"] for s, p in zip(one, plain, strict=True)])
                fig["c1_plain_p50_overhead_ms"] = _per_rep(
                    [p["p50_ms"] - g for p, g in zip(plain, own, strict=True)]
                )
        if top is not None:
            high = points[top]
            ceiling = [c[graph][str(batch)]["img_per_s"] for c in ceilings]
            fig[f"c{top}_ceiling_fraction"] = _per_rep(
                [p["rps"] / c for p, c in zip(high, ceiling, strict=True)]
            )
            machine = [c[graph]["all_cores"]["img_per_s"] for c in ceilings]
            fig[f"c{top}_all_cores_fraction"] = _per_rep(
                [p["rps"] / c for p, c in zip(high, machine, strict=True)]
            )
            fig[f"c{top}_server_cores"] = _per_rep([p["server_cores"] for p in high])
            for peer in ("plain", "ray"):
                if peer in runs:
                    theirs = runs[peer][endpoint][top]
                    fig[f"c{top}_vs_{peer}"] = _per_rep(
                        [s["rps"] / p["rps"] for s, p in zip(high, theirs, strict=True)]
                    )
            fig["ahead_at_every_concurrency"] = (
                all(
                    statistics.fmean(p["rps"] for p in points[c])
                    > max(
                        statistics.fmean(q["rps"] for q in runs[peer][endpoint][c])
                        for peer in runs
                        if peer != "service"
                    )
                    for c in points
                )
                if len(runs) > 1
                else None
            )
        fig["errors"] = {
            name: sum(p["errors"] for c in runs[name][endpoint].values() for p in c) for name in runs
        }
        out[endpoint] = fig
    return out


def markdown_table(runs: dict, ceilings: list[dict], batch: int) -> str:
    """req/s per server (each repetition, low–high) for every endpoint and concurrency, with the ceiling."""
    names = list(runs)
    endpoints = list(next(iter(runs.values())))
    lines = [
        "| endpoint | c | "
        + " | ".join(names)
        + f" | graph alone, batch 1 / {batch} / {batch} on every core (img/s) |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for endpoint in endpoints:
        graph = GRAPH[endpoint]
        one = [c[graph]["1"]["img_per_s"] for c in ceilings]
        full = [c[graph][str(batch)]["img_per_s"] for c in ceilings]
        every = [c[graph]["all_cores"]["img_per_s"] for c in ceilings]
        ceiling = f"{_span(one)} / {_span(full)} / {_span(every)}"
        for c in runs[names[0]][endpoint]:
            cells = [_span([p["rps"] for p in runs[name][endpoint][c]]) for name in names]
            lines.append(f"| {endpoint} | {c} | " + " | ".join(cells) + f" | {ceiling} |")
    return "\n".join(lines)


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.0f}" if round(lo) == round(hi) else f"{lo:.0f}–{hi:.0f}"


def plot(result: dict, path: Path) -> None:
    """Throughput and p50 latency against concurrency per endpoint, one line per server, with the
    graph's batched ceiling as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, ceilings, batch = result["runs"], result["ceilings"], result["plan"]["batch"]
    endpoints = list(next(iter(runs.values())))
    fig, axes = plt.subplots(2, len(endpoints), figsize=(5 * len(endpoints), 7), squeeze=False)
    for col, endpoint in enumerate(endpoints):
        for name, per_endpoint in runs.items():
            points = per_endpoint[endpoint]
            cs = sorted(int(c) for c in points)
            rps = [statistics.fmean(p["rps"] for p in points[str(c)]) for c in cs]
            p50 = [
                statistics.median(p["p50_ms"] for p in points[str(c)] if p["p50_ms"] is not None) for c in cs
            ]
            axes[0][col].plot(cs, rps, "-o", label=name)
            axes[1][col].plot(cs, p50, "-o", label=name)
        ceiling = statistics.fmean(c[GRAPH[endpoint]][str(batch)]["img_per_s"] for c in ceilings)
        axes[0][col].axhline(ceiling, ls="--", c="grey", label=f"graph alone, batch {batch}")
        axes[0][col].set_title(f"/v1/{endpoint}")
        axes[0][col].set_ylabel("verified answers / s")
        axes[1][col].set_ylabel("p50 latency (ms)")
        axes[1][col].set_yscale("log")
        for row in (0, 1):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_xticks(cs, [str(c) for c in cs])
            axes[row][col].set_xlabel("concurrent requests")
            axes[row][col].grid(alpha=0.3)
            axes[row][col].legend(fontsize=8)
    machine = result["machine"]
    save_figure(fig, path, f"{result['model']} — {machine['logical_cores']} cores", result)
