"""The batch size each of the encoder and decoder runs fastest at, measured when a worker starts.

A worker reads up to MAX_BATCH_SIZE jobs at once to spread its Redis round trips and bookkeeping,
but a graph is not always cheapest per image at its largest batch. On a CPU this project's encoder
costs 5.6–5.7 ms of CPU per image at batch 1 and 5.9 ms at batch 16 (one ONNX Runtime thread, the
2-core VM, `benchmarks/results/peers.json`'s ceilings; 6.0–6.5 at batch 16 in earlier runs): caches
hold a small batch's activations, not a large one's. So the worker runs a batch's graph calls in chunks of the size
measured here (Triton calls the same idea a preferred batch size; its model analyzer measures it
offline, this measures on the machine that serves). On a GPU, larger batches are cheaper per image,
and graphs slower than `SLOW_CALL_S` at batch 1 (the released ImageNet encoder takes a second on
this CPU) would take too long to measure: both keep MAX_BATCH_SIZE.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from service.runtimes.base import Runtime

log = logging.getLogger(__name__)

BUDGET_S = 0.15
"""Time spent measuring each candidate size (after one untimed call)."""
SLOW_CALL_S = 0.02
TOLERANCE = 1.03
"""A smaller size within 3 % of the fastest per image is preferred: its batch answers sooner."""


def per_image_s(run: Callable[[np.ndarray], object], example: np.ndarray, batch: int) -> float:
    """Seconds per image of `run` on `batch` copies of `example`, over about BUDGET_S (one timed
    call for a graph slower than SLOW_CALL_S: the release's encoder takes a second per call here)."""
    inputs = np.repeat(example[None], batch, axis=0)
    run(inputs)
    calls, start = 0, time.perf_counter()
    while True:
        run(inputs)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= BUDGET_S and (calls >= 3 or elapsed / calls > SLOW_CALL_S):
            return elapsed / (calls * batch)


def preferred_batch(run: Callable[[np.ndarray], object], example: np.ndarray, max_batch: int) -> int:
    """The size (a power of two up to `max_batch`, or `max_batch`) with the lowest time per image,
    the smallest within TOLERANCE of it; `max_batch` when batch 1 is slower than SLOW_CALL_S."""
    single = per_image_s(run, example, 1)
    if single > SLOW_CALL_S or max_batch == 1:
        return max_batch
    sizes = sorted({*(2**k for k in range(1, max_batch.bit_length()) if 2**k <= max_batch), max_batch})
    times = {1: single, **{size: per_image_s(run, example, size) for size in sizes}}
    fastest = min(times.values())
    return min(size for size, seconds in times.items() if seconds <= fastest * TOLERANCE)


def graph_batches(
    runtime: Runtime, tasks: Sequence[str], max_batch: Mapping[str, int], configured: Mapping[str, int]
) -> dict[str, int]:
    """task → the batch size of each graph call, for the encode and decode among `tasks`:
    GRAPH_BATCH_SIZE_<TASK> when set (capped at MAX_BATCH_SIZE), else measured on a CPU runtime,
    else MAX_BATCH_SIZE."""
    config = runtime.config
    examples = {
        "encode": (runtime.encode, np.full((3, config.image_size, config.image_size), 0.5, np.float32)),
        "decode": (runtime.decode, np.random.default_rng(0).standard_normal(config.latent_shape, np.float32)),
    }
    on_cpu = runtime.info().get("provider") == "cpu"
    chosen = {}
    for task, (run, example) in examples.items():
        if task not in tasks:
            continue
        if configured.get(task):
            chosen[task] = min(configured[task], max_batch[task])
        elif on_cpu:
            chosen[task] = preferred_batch(run, example, max_batch[task])
        else:
            chosen[task] = max_batch[task]
    log.info("graph batch sizes: %s (of at most %s)", chosen, {t: max_batch[t] for t in chosen})
    return chosen
