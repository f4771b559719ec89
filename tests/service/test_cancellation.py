"""Cooperative cancellation inside a running batch, and what a request costs, without HTTP.

A job that is abandoned (deadline passed, or client gone) must leave its batch at the next sampler
step while the other images come out byte-identical to an undisturbed run; a batch whose jobs are
all abandoned stops. The cost of a generate image is the sampler's network evaluations, doubled
when guided.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.sampling import SamplerConfig, generate, model_evaluations
from service import cost
from service.broker_protocol import Job, now_ms
from service.cancellation import Abandoned, BatchWatch, PrunedGeneration
from service.codecs import to_uint8
from service.runtimes.onnxruntime import OnnxRuntime


@pytest.fixture(scope="module")
def runtime(tiny_repository: Path) -> OnnxRuntime:
    return OnnxRuntime(tiny_repository / "tiny" / "1", intra_op_threads=1)


def job(i: int, deadline_ms: int) -> Job:
    fields = {b"id": f"r{i}.0".encode(), b"rid": f"r{i}".encode()}
    return Job(b"0-0", "generate", f"r{i}.0", f"r{i}", "reply", deadline_ms, now_ms(), fields)


class CountingNetworks:
    """The runtime's networks, recording how many rows each network call evaluates."""

    def __init__(self, runtime: OnnxRuntime) -> None:
        self.inner = runtime
        self.rows_per_call: list[int] = []

    def velocity(self, x, t, y):
        self.rows_per_call.append(x.shape[0])
        return self.inner.velocity(x, t, y)

    def guided(self, x, t, y, scale):
        self.rows_per_call.append(x.shape[0])
        return self.inner.guided(x, t, y, scale)

    def asarray(self, values):
        return values


@pytest.mark.parametrize("sampler", ["euler", "heun", "sde"])
def test_an_abandoned_job_leaves_at_the_next_step_and_the_rest_is_unchanged(
    runtime: OnnxRuntime, sampler: str
) -> None:
    cfg = SamplerConfig(sampler, 8, cfg_scale=2.0)
    labels, seeds = np.array([0, 1, 2]), np.array([5, 6, 7])
    undisturbed = to_uint8(runtime.generate(labels, seeds, cfg))
    far = now_ms() + 60_000
    watch = BatchWatch([job(i, far) for i in range(3)])
    pruning = PrunedGeneration(watch, [0, 1, 2])
    counting = CountingNetworks(runtime)
    networks, decode = pruning.wrap(counting, runtime.decode)

    def on_step(k: int) -> None:
        if k == 3:
            watch.cancel({"r1": now_ms()})
        pruning.on_step(k)

    config = runtime.config
    images = generate(
        networks,
        decode,
        labels,
        seeds,
        cfg,
        config.latent_shape,
        config.latent_mean,
        config.latent_std,
        config.null_class,
        on_step=on_step,
    )
    out = to_uint8(images)
    assert np.array_equal(out[[0, 2]], undisturbed[[0, 2]])  # byte-identical survivors
    assert not out[1].any() and set(watch.dropped) == {1} and watch.dropped[1].reason == "cancelled"
    per_step = {"euler": 1, "heun": 2, "sde": 1}[sampler]
    assert counting.rows_per_call[: 3 * per_step] == [3] * (3 * per_step)  # steps 0-2: whole batch
    assert set(counting.rows_per_call[3 * per_step :]) == {2}  # from step 3 on: the row is gone


def test_a_batch_nobody_waits_for_stops(runtime: OnnxRuntime) -> None:
    watch = BatchWatch([job(0, now_ms() - 1), job(1, now_ms() - 1)])
    with pytest.raises(Abandoned):
        runtime.generate(
            np.array([0, 1]), np.array([1, 2]), SamplerConfig("euler", 50), PrunedGeneration(watch, [0, 1])
        )
    assert {d.reason for d in watch.dropped.values()} == {"expired"}
    assert all(d.lag_s < 0.05 for d in watch.dropped.values())


def test_a_watch_lists_only_the_requests_still_waiting() -> None:
    watch = BatchWatch([job(0, now_ms() + 60_000), job(1, now_ms() + 60_000)])
    assert watch.waiting_request_ids() == ["r0", "r1"]
    watch.cancel({"r0": 0})  # a cancel key without a time counts from when it was seen
    assert watch.live([0, 1]).tolist() == [False, True]
    assert watch.waiting_request_ids() == ["r1"]


@pytest.mark.parametrize(
    "cfg",
    [
        SamplerConfig("euler", 25),
        SamplerConfig("heun", 25, cfg_scale=3.0, cfg_interval=(0.25, 1.0)),
        SamplerConfig("sde", 250, 0.4, 1.0, (0.0, 1.0), "release"),
        SamplerConfig("euler", 250, 0.37, 2.5, (0.25, 1.0), "release"),
    ],
)
def test_a_generated_image_costs_its_network_evaluations_guided_ones_twice(cfg: SamplerConfig) -> None:
    assert cost.generate_job(cfg) == model_evaluations(cfg) * (2 if cfg.guided else 1)


def test_decoding_costs_one_unit_per_started_megapixel() -> None:
    assert [cost.decoding(p) for p in (0, 1, 1 << 20, (1 << 20) + 1)] == [0, 1, 1, 2]
