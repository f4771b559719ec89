"""Timing pieces the runtime benchmarks share: the serving ORT session, interleaved medians, the
machine's practical matmul peak and a graph's FLOP count.

Compared functions are timed in alternation in one process, so background load on a shared machine
hits both sides alike; the matmul peak is the best of a few calls, since on a shared machine a
median mostly measures the neighbours.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

THREADS = 2


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
