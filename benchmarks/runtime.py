"""ONNX Runtime vs eager torch, per graph and batch size, and the full generate pipeline.

    .venv/bin/python -m benchmarks.runtime [--checkpoint checkpoints/fmnist32-tiny] [--reps 7]

Everything that is compared is measured in the same process, interleaved (eager, ORT, eager, ORT, …)
so background load on a shared machine hits both sides alike, and summarised by the median. Both
runtimes get the same 2 intra-op threads; ORT's spinning is off (it starves other work on a small
machine). Attained GFLOP/s counts the matmul/conv FLOPs of each graph (torch's FlopCounterMode, with
attention forced through its math kernels so it is counted) and is set against a float32 matmul
measured in the same run, the machine's practical peak.

Writes `benchmarks/results/runtime.json` and `runtime.png`. With no trained checkpoint the default
preset is randomly initialised (the JSON says so): speed does not depend on the weights' values.
When ORT is below 1.3× eager at batch 8 on a graph, the run also profiles why (node-type profile,
graph-optimisation levels, thread settings) and records what it tried.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.machine import describe, mark_quotable
from export.exporter import export_checkpoint, graph_modules
from export.onnx_graphs import GRAPHS as EXPORT_GRAPHS
from export.onnx_graphs import export_onnx
from export.samples import parity_images
from model.checkpoint import LoadedCheckpoint, is_complete, load_checkpoint, write_checkpoint
from model.flow import TorchNetworks
from model.lightningdit import LightningDiT
from model.pae import PAE
from model.presets import get_preset
from model.sampling import SamplerConfig, generate

GRAPHS = ("encoder", "decoder", "dit")
BATCHES = (1, 8, 32)
PIPELINE_STEPS = (10, 25, 50)
PIPELINE_BATCH = 8
THREADS = 2
TARGET_RATIO = 1.3
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """The machine block, with the ONNX Runtime version and the thread count used."""
    import onnxruntime

    return describe(onnxruntime=onnxruntime.__version__, threads=THREADS)


def ort_session(path: Path, threads: int = THREADS, level: str = "all", profile_prefix: str | None = None):
    """The serving configuration: CPU EP, `threads` intra-op threads, no spinning, full optimisation."""
    import onnxruntime as ort

    levels = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation after `warmup` calls each.

    The order flips every repetition (A B, B A, …) so a load change on a shared machine does not
    always land on the same side. `paired_ratio` is the median over repetitions of
    time(first) / time(second) within a repetition: the most drift-robust ratio.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for rep in range(reps):
        for key in keys if rep % 2 == 0 else reversed(keys):
            start = time.perf_counter()
            fns[key]()
            times[key].append(time.perf_counter() - start)
    out = {k: statistics.median(v) for k, v in times.items()}
    if len(keys) == 2:
        a, b = (times[k] for k in keys)
        out["paired_ratio"] = statistics.median(x / y for x, y in zip(a, b, strict=True))
    return out


def matmul_gflops(workdir: Path, n: int = 1024, reps: int = 9, threads: int = THREADS) -> dict[str, float]:
    """float32 n×n matmul GFLOP/s at the benchmark's thread count, in torch and in ORT (a one-node graph).

    The best of `reps` calls: the peak is what the machine can do, and on a shared machine the
    median mostly measures the neighbours. The larger of the two is the practical limit.
    """
    from onnx import TensorProto, helper, save

    a, b = torch.randn(n, n), torch.randn(n, n)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    path = workdir / "matmul.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    session = ort_session(path, threads=threads)
    feeds = {"a": a.numpy(), "b": b.numpy()}
    best = {"torch": float("inf"), "onnxruntime": float("inf")}
    calls = {"torch": lambda: a @ b, "onnxruntime": lambda: session.run(None, feeds)}
    for _ in range(3):
        for fn in calls.values():
            fn()
    for _ in range(reps):
        for key, fn in calls.items():
            start = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - start)
    return {k: 2 * n**3 / v / 1e9 for k, v in best.items()}


def count_flops(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """matmul/conv FLOPs of one forward call (attention via its math kernel so it is counted)."""
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


def random_checkpoint(directory: Path, preset_name: str = "fmnist32-tiny", seed: int = 0) -> Path:
    """A randomly initialised checkpoint of `preset_name` in the training output format."""
    preset = get_preset(preset_name)
    torch.manual_seed(seed)
    pae, dit = PAE(preset.pae), LightningDiT(preset.dit)
    with torch.no_grad():
        for p in [*pae.parameters(), *dit.parameters()]:
            p.add_(0.02 * torch.randn_like(p))  # wake the zero-initialised layers up
    d = preset.pae.latent_dim
    return write_checkpoint(directory, preset, pae, dit, torch.zeros(d), torch.ones(d))


def graph_inputs(ckpt: LoadedCheckpoint, graph: str, batch: int) -> dict[str, np.ndarray]:
    """Realistic inputs: real images, their latents, noised latents with real-looking labels."""
    size = ckpt.preset.pae.image_size
    images, _ = parity_images(batch, size)
    if graph == "encoder":
        return {"images": images.numpy()}
    with torch.inference_mode():
        z = ckpt.pae.encode(images)
    if graph == "decoder":
        return {"latents": z.numpy()}
    gen = torch.Generator().manual_seed(batch)
    x = 0.5 * z + 0.5 * torch.randn(z.shape, generator=gen)
    return {
        "x": x.numpy(),
        "t": np.full(batch, 0.5, np.float32),
        "y": (np.arange(batch) % ckpt.preset.dit.num_classes).astype(np.int64),
        "cfg_scale": np.full(batch, ckpt.preset.sampler.cfg_scale, np.float32),
    }


def bench_graphs(ckpt: LoadedCheckpoint, version_dir: Path, reps: int, peak: float) -> dict:
    """Per graph and batch: eager vs ORT at the serving setting (2 threads) and, as a check on
    thread-pool effects on a shared machine, both at 1 thread."""
    modules = graph_modules(ckpt)
    out: dict[str, dict] = {}
    for graph in GRAPHS:
        sessions = {n: ort_session(version_dir / f"{graph}.onnx", threads=n) for n in (THREADS, 1)}
        module = modules[graph].eval()
        out[graph] = {}
        for batch in BATCHES:
            feeds = graph_inputs(ckpt, graph, batch)
            tensors = tuple(torch.from_numpy(v) for v in feeds.values())
            flops = count_flops(module, tensors)

            def eager(m=module, x=tensors):
                with torch.inference_mode():
                    return m(*x)

            med: dict[int, dict[str, float]] = {}
            for threads in (THREADS, 1):
                torch.set_num_threads(threads)
                session = sessions[threads]
                med[threads] = interleaved(
                    {"eager": eager, "ort": lambda s=session, f=feeds: s.run(None, f)}, reps
                )
            torch.set_num_threads(THREADS)
            m2, m1 = med[THREADS], med[1]
            ort_gflops = flops / m2["ort"] / 1e9
            out[graph][str(batch)] = {
                "eager_ips": batch / m2["eager"],
                "ort_ips": batch / m2["ort"],
                "ratio": m2["eager"] / m2["ort"],
                "ratio_paired": m2["paired_ratio"],
                "gflops": ort_gflops,
                "frac_of_matmul_peak": ort_gflops / peak,
                "eager_gflops": flops / m2["eager"] / 1e9,
                "eager_frac_of_matmul_peak": flops / m2["eager"] / 1e9 / peak,
                "flops_per_image": flops / batch,
                "eager_ms": 1e3 * m2["eager"],
                "ort_ms": 1e3 * m2["ort"],
                "threads_1": {
                    "eager_ips": batch / m1["eager"],
                    "ort_ips": batch / m1["ort"],
                    "ratio": m1["eager"] / m1["ort"],
                    "ratio_paired": m1["paired_ratio"],
                },
            }
            print(
                f"{graph:8s} b={batch:<3d} eager {batch / m2['eager']:8.1f} img/s  ort {batch / m2['ort']:8.1f} img/s"
                f"  ratio {m2['eager'] / m2['ort']:.2f}  (1 thread: {m1['eager'] / m1['ort']:.2f})",
                flush=True,
            )
        del sessions
    return out


class _OrtNetworks:
    """The exported DiT graphs as the sampler's `Networks` (numpy in and out)."""

    def __init__(self, sessions: dict) -> None:
        self.sessions = sessions

    def velocity(self, x: np.ndarray, t: float, y: np.ndarray) -> np.ndarray:
        feeds = {"x": x, "t": np.full(x.shape[0], t, np.float32), "y": y}
        return self.sessions["dit_cond"].run(None, feeds)[0]

    def guided(self, x: np.ndarray, t: float, y: np.ndarray, scale: float) -> np.ndarray:
        batch = x.shape[0]
        feeds = {
            "x": x,
            "t": np.full(batch, t, np.float32),
            "y": y,
            "cfg_scale": np.full(batch, scale, np.float32),
        }
        return self.sessions["dit"].run(None, feeds)[0]

    @staticmethod
    def asarray(values: np.ndarray) -> np.ndarray:
        return values


def bench_pipeline(ckpt: LoadedCheckpoint, version_dir: Path, reps: int) -> dict:
    """Full class-conditional generation (noise → DiT sampling loop with CFG → decode) on both runtimes."""
    preset = ckpt.preset
    sessions = {g: ort_session(version_dir / f"{g}.onnx") for g in ("dit", "dit_cond", "decoder")}
    labels = np.arange(PIPELINE_BATCH, dtype=np.int64) % preset.dit.num_classes
    seeds = np.arange(PIPELINE_BATCH, dtype=np.int64)
    stats = (preset.pae.latent_shape, ckpt.latent_mean.tolist(), ckpt.latent_std.tolist(), ckpt.null_class)
    torch_networks, ort_networks = TorchNetworks(ckpt.dit), _OrtNetworks(sessions)

    def eager_decode(z: torch.Tensor) -> torch.Tensor:
        return ckpt.pae.decode(z).clamp(0, 1)

    def ort_decode(z: np.ndarray) -> np.ndarray:
        return sessions["decoder"].run(None, {"latents": z})[0]

    out = {"batch": PIPELINE_BATCH, "sampler": {}, "steps": {}}
    for steps in PIPELINE_STEPS:
        cfg = SamplerConfig(
            sampler="euler",
            steps=steps,
            shift=preset.sampler.shift,
            cfg_scale=preset.sampler.cfg_scale,
            cfg_interval=preset.sampler.cfg_interval,
        )
        out["sampler"] = {k: v for k, v in asdict(cfg).items() if k != "steps"}

        def eager(cfg=cfg):
            with torch.inference_mode():
                return generate(torch_networks, eager_decode, labels, seeds, cfg, *stats)

        def onnx(cfg=cfg):
            return generate(ort_networks, ort_decode, labels, seeds, cfg, *stats)

        med = interleaved({"eager": eager, "ort": onnx}, max(3, reps // 2), warmup=1)
        out["steps"][str(steps)] = {
            "eager_ips": PIPELINE_BATCH / med["eager"],
            "ort_ips": PIPELINE_BATCH / med["ort"],
            "ratio": med["eager"] / med["ort"],
            "ratio_paired": med["paired_ratio"],
        }
        print(
            f"pipeline steps={steps:<3d} eager {PIPELINE_BATCH / med['eager']:7.2f} img/s  ort {PIPELINE_BATCH / med['ort']:7.2f} img/s  ratio {med['eager'] / med['ort']:.2f}",
            flush=True,
        )
    return out


def profile_nodes(
    path: Path, feeds: dict[str, np.ndarray], runs: int, workdir: Path, threads: int = THREADS
) -> list[dict]:
    """ORT's own profiler: share of kernel time per operator type, largest first."""
    session = ort_session(path, threads=threads, profile_prefix=str(workdir / path.stem))
    for _ in range(runs):
        session.run(None, feeds)
    trace = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + float(event.get("dur", 0))
    total = sum(per_op.values()) or 1.0
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])[:8]
    return [{"op": op, "share": round(us / total, 4)} for op, us in ranked]


def torch_profile(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], runs: int) -> list[dict]:
    """Eager's share of self CPU time per aten op, for comparison with ORT's node profile."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            module(*inputs)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return [{"op": e.key, "share": round(e.self_cpu_time_total / total, 4)} for e in ranked]


def investigate(ckpt: LoadedCheckpoint, version_dir: Path, graph: str, reps: int, threads: int) -> dict:
    """Why is ORT not ≥ 1.3× eager at batch 8 with `threads` threads? Profile, try knobs, bound it.

    Tried, all against eager at the same thread count: each graph-optimisation level, the other
    thread count, and a re-export at opset 23 (native Attention and RMSNormalization ops instead of
    their decompositions). The bound: if eager already attains a fraction f of the matmul peak
    measured at this thread count, no runtime can beat it by more than 1/f.
    """
    batch = 8
    feeds = graph_inputs(ckpt, graph, batch)
    module = graph_modules(ckpt)[graph].eval()
    tensors = tuple(torch.from_numpy(v) for v in feeds.values())
    path = version_dir / f"{graph}.onnx"
    other = 1 if threads != 1 else THREADS

    def eager():
        with torch.inference_mode():
            module(*tensors)

    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            opset23 = Path(tmp) / f"{graph}.opset23.onnx"
            export_onnx(module, tensors, EXPORT_GRAPHS[graph], opset23, opset=23)
            variants = {
                f"ort_{lvl}": ort_session(path, threads=threads, level=lvl)
                for lvl in ("basic", "extended", "all")
            }
            variants[f"ort_all_{other}thread"] = ort_session(path, threads=other)
            variants["ort_all_opset23"] = ort_session(opset23, threads=threads)
            fns: dict[str, Callable[[], object]] = {"eager": eager}
            fns.update({name: (lambda s=s: s.run(None, feeds)) for name, s in variants.items()})
            med = interleaved(fns, reps)
            ort_ops = profile_nodes(path, feeds, 5, Path(tmp), threads)
            peak = max(matmul_gflops(Path(tmp), threads=threads).values())
        eager_gflops = count_flops(module, tensors) / med["eager"] / 1e9
        eager_ops = torch_profile(module, tensors, 5)
    finally:
        torch.set_num_threads(THREADS)
    return {
        "batch": batch,
        "threads": threads,
        "ratio_eager_over_ort_by_setting": {
            k: med["eager"] / v for k, v in med.items() if k not in ("eager", "paired_ratio")
        },
        "matmul_peak_gflops": peak,
        "eager_frac_of_matmul_peak": eager_gflops / peak,
        "max_possible_ratio": peak / eager_gflops,
        "ort_kernel_time_by_op": ort_ops,
        "eager_self_time_by_op": eager_ops,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GRAPHS) + 1, figsize=(16, 4))
    for ax, graph in zip(axes, GRAPHS, strict=False):
        rows = results["graphs"][graph]
        xs = np.arange(len(BATCHES))
        eager = [rows[str(b)]["eager_ips"] for b in BATCHES]
        onnx = [rows[str(b)]["ort_ips"] for b in BATCHES]
        ax.bar(xs - 0.2, eager, 0.4, label="eager torch")
        ax.bar(xs + 0.2, onnx, 0.4, label="ONNX Runtime")
        for x, b in zip(xs, BATCHES, strict=True):
            row = rows[str(b)]
            label = f"×{row['ratio']:.2f}\n(1 thr ×{row['threads_1']['ratio']:.2f})"
            ax.annotate(label, (x + 0.2, onnx[x]), ha="center", va="bottom", fontsize=7)
        ax.margins(y=0.25)
        ax.set_xticks(xs, [str(b) for b in BATCHES])
        ax.set_xlabel("batch")
        ax.set_ylabel("images / s")
        ax.set_title(graph)
    pipe = results["pipeline"]["steps"]
    steps = list(pipe)
    xs = np.arange(len(steps))
    axes[-1].bar(xs - 0.2, [pipe[s]["eager_ips"] for s in steps], 0.4, label="eager torch")
    axes[-1].bar(xs + 0.2, [pipe[s]["ort_ips"] for s in steps], 0.4, label="ONNX Runtime")
    for x, s in zip(xs, steps, strict=True):
        top = pipe[s]["ort_ips"]
        axes[-1].annotate(f"×{pipe[s]['ratio']:.2f}", (x + 0.2, top), ha="center", va="bottom", fontsize=8)
    axes[-1].set_xticks(xs, steps)
    axes[-1].set_xlabel("sampling steps (CFG on)")
    axes[-1].set_ylabel("images / s")
    axes[-1].set_title(f"generate, batch {results['pipeline']['batch']}")
    axes[-1].margins(y=0.2)
    axes[-1].legend(loc="upper right", fontsize=8)
    load = (
        results["machine"]["load_average_start"][0],
        results["machine"].get("load_average_end", [float("nan")])[0],
    )
    fig.suptitle(
        f"{results['model']['preset']} ({results['model']['weights']}) on {results['machine']['cpu']}, "
        f"{THREADS} threads; ratio = ORT / eager throughput; 1-min load average {load[0]:.1f} → {load[1]:.1f}"
        + ("" if results.get("quotable") else "; NOT QUOTABLE (loaded at start)")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/fmnist32-tiny"))
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    results: dict = {"machine": machine()}

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if is_complete(checkpoint):
            weights = f"trained checkpoint {checkpoint}"
        else:
            checkpoint = random_checkpoint(Path(tmp) / "ckpt")
            weights = f"randomly initialised (no complete trained checkpoint at {args.checkpoint})"
        version_dir = export_checkpoint(checkpoint, Path(tmp) / "repo")
        ckpt = load_checkpoint(checkpoint)
        results["model"] = {
            "preset": ckpt.preset.name,
            "weights": weights,
            "exported_version": str(version_dir.relative_to(tmp)),
        }
        peaks = [matmul_gflops(Path(tmp))]
        results["graphs"] = bench_graphs(ckpt, version_dir, args.reps, max(peaks[0].values()))
        peaks.append(matmul_gflops(Path(tmp)))
        results["pipeline"] = bench_pipeline(ckpt, version_dir, args.reps)
        peaks.append(matmul_gflops(Path(tmp)))
        peak = max(max(p.values()) for p in peaks)
        for rows in results["graphs"].values():  # normalise by the best peak seen in the run
            for row in rows.values():
                row["frac_of_matmul_peak"] = row["gflops"] / peak
                row["eager_frac_of_matmul_peak"] = row["eager_gflops"] / peak
        results["matmul_peak"] = {
            "gflops": peak,
            "measurements": peaks,
            "op": f"float32 1024x1024 matmul, {THREADS} threads, best of 9 calls, torch and ORT",
        }
        # Investigate every graph below target at batch 8, at the serving thread count or at 1 thread
        # (where the thread pools' behaviour under a loaded machine does not enter the ratio).
        results["investigation"] = {}
        for graph in GRAPHS:
            row = results["graphs"][graph]["8"]
            for threads, ratio in ((THREADS, row["ratio"]), (1, row["threads_1"]["ratio"])):
                if ratio < TARGET_RATIO:
                    key = f"{graph}@{threads}thread"
                    results["investigation"][key] = investigate(ckpt, version_dir, graph, args.reps, threads)
    results["machine"]["load_average_end"] = list(os.getloadavg())
    results["method"] = {
        "timing": f"median of {args.reps} interleaved repetitions after 2 warm-up calls each, same process",
        "ort_session": "CPUExecutionProvider, ORT_ENABLE_ALL, intra_op 2 threads, inter_op 1, spinning off",
        "eager": "torch.inference_mode, torch.set_num_threads(2)",
        "gflops": "matmul/conv FLOPs (FlopCounterMode, SDPA via math kernel) / ORT median time",
        "threads_1": "the same comparison with 1 thread on both sides, interleaved in the same run",
        "note": "on a loaded shared machine eager torch's 2-thread OpenMP regions wait at every op for "
        "a descheduled worker, while ORT's pool (spinning off) lets the calling thread run unclaimed "
        "work, so the 2-thread ratio includes that contention; threads_1 is the contention-free ratio",
    }
    results = mark_quotable(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "runtime.png")
    print(f"wrote {args.out / 'runtime.json'} and runtime.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
