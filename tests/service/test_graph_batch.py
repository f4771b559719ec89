"""The graph batch size: measured per graph on the machine, or configured; a batch runs in calls of it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from service import graph_batch
from service.batch import compute, in_chunks
from service.broker_protocol import Job
from service.graph_batch import graph_batches, preferred_batch
from service.runtimes.onnxruntime import OnnxRuntime
from service.settings import Settings


@pytest.fixture(autouse=True)
def short_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graph_batch, "BUDGET_S", 0.03)


def costed(per_call_s: float, per_image_s: dict[int, float]):
    """A graph whose call takes per_call_s plus per_image_s[batch] per image."""
    calls: list[int] = []

    def run(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        time.sleep(per_call_s + len(x) * per_image_s[len(x)])
        return x

    return run, calls


def test_the_size_with_the_least_time_per_image_wins() -> None:
    # per image: b1 2.5 ms, b2 1.5, b4 1.0, b8 3.25, b16 3.1
    run, _ = costed(0.002, {1: 0.0005, 2: 0.0005, 4: 0.0005, 8: 0.003, 16: 0.003})
    assert preferred_batch(run, np.zeros(3, np.float32), 16) == 4


def test_the_largest_batch_wins_when_batching_pays() -> None:
    run, _ = costed(0.004, {n: 0.0002 for n in (1, 2, 4, 8)})
    assert preferred_batch(run, np.zeros(3, np.float32), 8) == 8


def test_a_slow_graph_keeps_the_max_batch_unmeasured() -> None:
    run, calls = costed(graph_batch.SLOW_CALL_S * 1.5, {1: 0.0})
    assert preferred_batch(run, np.zeros(3, np.float32), 16) == 16
    assert calls == [1, 1]  # one untimed call, one timed: a slow graph is not timed for long


def test_configured_sizes_win_and_are_capped(tiny_repository: Path) -> None:
    runtime = OnnxRuntime(tiny_repository / "tiny" / "1", intra_op_threads=1)
    chosen = graph_batches(
        runtime, ("encode", "decode", "generate"), {"encode": 8, "decode": 8}, {"encode": 2, "decode": 64}
    )
    assert chosen == {"encode": 2, "decode": 8}


def test_measured_sizes_are_powers_of_two_up_to_the_max(tiny_repository: Path) -> None:
    runtime = OnnxRuntime(tiny_repository / "tiny" / "1", intra_op_threads=1)
    chosen = graph_batches(runtime, ("decode",), {"encode": 8, "decode": 8}, {})
    assert list(chosen) == ["decode"] and chosen["decode"] in (1, 2, 4, 8)


def test_settings_read_the_graph_batch_sizes() -> None:
    settings = Settings.from_env({"GRAPH_BATCH_SIZE_ENCODE": "4"})
    assert settings.graph_batch_size == {"encode": 4, "decode": 0}


def test_a_chunked_batch_gives_the_same_answers(tiny_repository: Path) -> None:
    runtime = OnnxRuntime(tiny_repository / "tiny" / "1", intra_op_threads=1)
    rng = np.random.default_rng(0)
    shape = runtime.config.latent_shape
    jobs = [
        Job.from_entry(
            "decode",
            f"{i}-0".encode(),
            {
                b"id": f"j{i}".encode(),
                b"rid": b"r",
                b"reply": b"",
                b"deadline": str(2**50).encode(),
                b"enq": b"0",
                b"data": rng.standard_normal(shape, np.float32).tobytes(),
            },
        )
        for i in range(5)
    ]
    whole, _ = compute("decode", jobs, runtime)
    chunked, _ = compute("decode", jobs, runtime, graph_batch=2)
    assert [r.data for r in whole] == [r.data for r in chunked]


def test_in_chunks_splits_calls() -> None:
    run, calls = costed(0.0, {n: 0.0 for n in range(1, 6)})
    out = in_chunks(run, np.arange(5), 2)
    assert calls == [2, 2, 1] and out.tolist() == list(range(5))
    assert in_chunks(run, np.arange(3), None).tolist() == [0, 1, 2] and calls[-1] == 3
