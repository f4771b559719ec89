"""What a worker computes for one batch: parse each job's payload, run the runtime, one reply per job.

Kept apart from `service.worker` (which reads, schedules and answers batches) because it is the
only part that touches the model: pure given its jobs, a runtime and a `BatchWatch`, and so tested
and profiled on its own.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from model.sampling import SamplerConfig
from service.broker_protocol import Job, Reply
from service.cancellation import Abandoned, BatchWatch, PrunedGeneration
from service.codecs import to_uint8
from service.runtimes.base import Runtime


class JobInputError(ValueError):
    """A job's payload does not fit the model (a bug or a mismatched API); answered with an error."""


def _parse(task: str, job: Job, runtime: Runtime) -> np.ndarray | tuple[int, int]:
    cfg = runtime.config
    if task == "generate":
        label, seed = int(job.fields[b"label"]), int(job.fields[b"seed"])
        if not 0 <= label <= cfg.null_class:
            raise JobInputError(f"label {label} is outside [0, {cfg.null_class}]")
        return label, seed
    data = job.fields.get(b"data", b"")
    if task == "encode":
        shape, dtype = (3, cfg.image_size, cfg.image_size), np.uint8
    else:
        shape, dtype = cfg.latent_shape, np.dtype("<f4")
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise JobInputError(f"{task} job holds {len(data)} bytes, the model needs {expected} ({shape})")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def compute(
    task: str,
    jobs: Sequence[Job],
    runtime: Runtime,
    watch: BatchWatch | None = None,
    graph_batch: int | None = None,
) -> tuple[list[Reply | None], float]:
    """Run one batch (all jobs of one task, generate jobs sharing sampler settings), an encode or
    decode batch in graph calls of at most `graph_batch` (`service.graph_batch`).

    Returns one entry per job and the runtime's own time. A job whose payload cannot be parsed gets
    an error reply and is left out of the batch; a job `watch` finds abandoned (before the graph
    call, or between sampler steps) gets None: nobody waits for its answer. Runtime exceptions
    propagate.
    """
    replies: list[Reply | None] = [None] * len(jobs)
    parsed, index = [], []
    for i, job in enumerate(jobs):
        try:
            parsed.append(_parse(task, job, runtime))
            index.append(i)
        except (JobInputError, KeyError, ValueError) as exc:
            replies[i] = Reply(job.job_id, ok=False, status=500, error=f"malformed {task} job: {exc}")
    watch = watch or BatchWatch(jobs)
    watch.start()
    if task != "generate" and index:
        wanted = watch.live(index)
        parsed = [p for p, keep in zip(parsed, wanted, strict=True) if keep]
        index = [i for i, keep in zip(index, wanted, strict=True) if keep]
    elapsed = 0.0
    if parsed:
        start = time.perf_counter()
        out = None
        if task == "encode":
            images = np.stack(parsed).astype(np.float32) / 255.0
            out, dtype = in_chunks(runtime.encode, images, graph_batch).astype("<f4"), "float32"
        elif task == "decode":
            out, dtype = to_uint8(in_chunks(runtime.decode, np.stack(parsed), graph_batch)), "uint8"
        else:
            sampler = SamplerConfig.from_dict(json.loads(jobs[index[0]].fields[b"sampler"]))
            labels = np.array([p[0] for p in parsed], dtype=np.int64)
            seeds = np.array([p[1] for p in parsed], dtype=np.int64)
            dtype = "uint8"
            with contextlib.suppress(Abandoned):
                out = to_uint8(runtime.generate(labels, seeds, sampler, PrunedGeneration(watch, index)))
        elapsed = time.perf_counter() - start
        for k, i in enumerate(index):
            if out is None or i in watch.dropped:
                continue
            item = np.ascontiguousarray(out[k])
            replies[i] = Reply(
                jobs[i].job_id,
                ok=True,
                dtype=dtype,
                shape=item.shape,
                data=item.tobytes(),
                compute_ms=elapsed * 1000,
            )
    return replies, elapsed


def in_chunks(run: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, size: int | None) -> np.ndarray:
    """`run` over `inputs` in calls of at most `size` (all at once when None), outputs concatenated."""
    if size is None or len(inputs) <= size:
        return run(inputs)
    return np.concatenate([run(inputs[i : i + size]) for i in range(0, len(inputs), size)])


def group_jobs(task: str, jobs: Sequence[Job]) -> list[list[Job]]:
    """Batches that may run together: everything for encode/decode; equal sampler settings for generate."""
    if task != "generate":
        return [list(jobs)] if jobs else []
    groups: dict[bytes, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.fields.get(b"sampler", b""), []).append(job)
    return list(groups.values())
