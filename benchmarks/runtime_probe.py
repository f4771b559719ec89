"""Why is ONNX Runtime not faster than eager on a graph? Profiles and knobs, for `benchmarks.runtime`.

Tried, all against eager at the same thread count: each graph-optimisation level, the other thread
count, and a re-export at opset 23 (native Attention and RMSNormalization ops instead of their
decompositions). The bound: if eager already attains a fraction f of the matmul peak measured at
this thread count, no runtime can beat it by more than 1/f.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.timing import THREADS, count_flops, interleaved, matmul_gflops, ort_session
from export.exporter import graph_modules
from export.onnx_graphs import GRAPHS as EXPORT_GRAPHS
from export.onnx_graphs import export_onnx
from export.samples import parity_images
from model.checkpoint import LoadedCheckpoint


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
