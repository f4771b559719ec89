"""The figure of `benchmarks.hostile`: cancelled work, 429 latency under a burst, slow connections."""

from __future__ import annotations

from pathlib import Path

from benchmarks.machine import save_figure


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    cancel = result["cancellation"]
    names = list(cancel)
    step = result["sampler_step_s_batch_of_8"]
    ax = axes[0]
    ax.bar(
        [f"{n}\nafter cancel" for n in names], [cancel[n]["worker_seconds_after_cancel"] or 0 for n in names]
    )
    ax.bar(
        [f"{n}\nlight wait" for n in names], [cancel[n]["light_wait_s"] for n in names], color="tab:orange"
    )
    ax.axhline(step, color="k", linestyle="--", label=f"one sampler step ({step * 1000:.0f} ms)")
    ax.set_ylabel("seconds")
    ax.set_title("16×250 heun abandoned after 0.5 s")
    ax.legend(fontsize=8)
    ax = axes[1]
    for name, data in result["burst"].items():
        if "latencies_429_ms" not in data:
            continue
        values = sorted(data["latencies_429_ms"])
        ax.plot(
            values,
            [i / max(len(values), 1) for i in range(len(values))],
            label=f"{name} (p50 {data['p50_429_ms']} ms)",
        )
    ax.axvline(20, color="k", linestyle="--", label="target 20 ms")
    ax.set_xscale("log")
    ax.set_xlabel("429 latency, ms (log)")
    ax.set_ylabel("fraction")
    ax.set_title(f"{next(iter(result['burst'].values()))['requests']} concurrent requests on a full queue")
    ax.legend(fontsize=8)
    ax = axes[2]
    slow = result["slowloris"]
    kinds = list(slow["per_kind"])
    for kind in kinds:
        times = [t for k, t in slow["close_times"] if k == kind]
        ax.scatter([kind] * len(times), times, s=8)
    timeline = slow["others"]["timeline"]
    ax.axhline(slow["timeout_s"], color="k", linestyle="--", label="HEADER/BODY_TIMEOUT_S")
    ax.set_ylabel("closed by the server after, s")
    ax.set_title(
        f"{slow['connections']} slow connections; others: {slow['others']['ok']}/{len(timeline)} ok, "
        f"p50 {slow['others']['p50_ms']} ms"
    )
    ax.tick_params(axis="x", labelrotation=15)
    ax.legend(fontsize=8)
    save_figure(fig, path, f"hostile traffic, {result['model']}", result)
