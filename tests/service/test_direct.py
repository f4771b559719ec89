"""The direct lane (service/direct.py): a replica with a free slot computes encode/decode itself.

The lane runs the real tiny model with ONNX Runtime; the HTTP tests put it in front of the
stand-in broker, so what went direct and what was queued is visible.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.state import AppState
from service.app import build_app
from service.broker_protocol import now_ms
from service.cli import embedded_direct_slots
from service.codecs import to_uint8
from service.direct import SLOTS_PER_CORE, SMALL_GRAPHS_BYTES, DirectLane, default_slots
from service.errors import DeadlineExceeded
from service.runtimes.onnxruntime import OnnxRuntime
from service.settings import Settings, SettingsError
from tests.service.api.conftest import StandInBroker
from tests.service.conftest import sample
from tests.service.payloads import image_bytes, latent_json


@pytest.fixture(scope="module")
def runtime(tiny_repository: Path) -> OnnxRuntime:
    return OnnxRuntime(tiny_repository / "tiny" / "1", intra_op_threads=1)


class Gated:
    """The runtime, with encode held until `release` is set (to see slots taken and freed)."""

    def __init__(self, runtime: OnnxRuntime, fail: bool = False) -> None:
        self.runtime, self.config, self.fail = runtime, runtime.config, fail
        self.started, self.release = threading.Event(), threading.Event()
        self.calls = 0

    def encode(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.started.set()
        self.release.wait(10)
        if self.fail:
            raise RuntimeError("graph failed")
        return self.runtime.encode(images)


def image_payload(runtime: OnnxRuntime, seed: int) -> dict[str, bytes | int]:
    size = runtime.config.image_size
    pixels = np.random.default_rng(seed).integers(0, 256, (3, size, size), dtype=np.uint8)
    return {"data": pixels.tobytes(), "cost": 1}


def latent_payload(runtime: OnnxRuntime, seed: int) -> dict[str, bytes | int]:
    z = np.random.default_rng(seed).standard_normal(runtime.config.latent_shape).astype("<f4")
    return {"data": z.tobytes(), "cost": 1}


def later(seconds: float = 30.0) -> int:
    return now_ms() + int(seconds * 1000)


def test_direct_answers_are_the_runtimes_own(runtime: OnnxRuntime) -> None:
    """What the runtime itself computes for the same inputs, bit for bit."""
    lane = DirectLane(runtime, slots=2)

    async def go() -> None:
        for task, payloads in (
            ("encode", [image_payload(runtime, 0), image_payload(runtime, 1)]),
            ("decode", [latent_payload(runtime, 2)]),
        ):
            direct = lane.try_submit(task, payloads, later())
            assert direct is not None
            replies = await direct
            sent = np.stack(
                [np.frombuffer(p["data"], np.uint8 if task == "encode" else "<f4") for p in payloads]
            )
            assert all(r.queue_ms == 0 and r.compute_ms > 0 for r in replies)
            got = np.stack([np.frombuffer(r.data, r.dtype).reshape(r.shape) for r in replies])
            if task == "encode":
                size = runtime.config.image_size
                expected = runtime.encode(sent.reshape(-1, 3, size, size).astype(np.float32) / 255)
            else:
                expected = to_uint8(runtime.decode(sent.reshape(-1, *runtime.config.latent_shape)))
            assert np.array_equal(got, expected)
        assert lane.busy == 0

    asyncio.run(go())


def test_slots_are_taken_per_job_and_freed_when_the_thread_ends(runtime: OnnxRuntime) -> None:
    gated = Gated(runtime)
    lane = DirectLane(gated, slots=1)  # type: ignore[arg-type]
    before = sample("pae_direct_jobs_total", {"task": "encode"})

    async def go() -> None:
        assert lane.try_submit("generate", [{"label": "1", "seed": "1"}], later()) is None
        two = [image_payload(runtime, 0), image_payload(runtime, 1)]
        assert lane.try_submit("encode", two, later()) is None  # more jobs than slots: queued whole
        first = asyncio.ensure_future(lane.try_submit("encode", [image_payload(runtime, 0)], later()))
        await asyncio.to_thread(gated.started.wait, 10)
        assert (
            not lane.free("encode")
            and lane.try_submit("decode", [latent_payload(runtime, 0)], later()) is None
        )
        first.cancel()  # the client went away: the graph call goes on, and so does its slot
        await asyncio.gather(first, return_exceptions=True)
        assert lane.busy == 1
        gated.release.set()
        for _ in range(500):
            if lane.busy == 0:
                break
            await asyncio.sleep(0.01)
        assert lane.busy == 0 and lane.free("encode")

    asyncio.run(go())
    assert sample("pae_direct_jobs_total", {"task": "encode"}) == before  # the cancelled job was not answered


def test_a_failing_graph_raises_and_frees_its_slot(runtime: OnnxRuntime) -> None:
    gated = Gated(runtime, fail=True)
    gated.release.set()
    lane = DirectLane(gated, slots=1)  # type: ignore[arg-type]

    async def go() -> None:
        with pytest.raises(RuntimeError, match="graph failed"):
            await lane.try_submit("encode", [image_payload(runtime, 0)], later())
        assert lane.busy == 0

    asyncio.run(go())


def test_a_job_past_its_deadline_is_a_504_and_not_computed(runtime: OnnxRuntime) -> None:
    lane = DirectLane(runtime, slots=1)
    before = sample("pae_jobs_expired_total", {"task": "decode"})

    async def go() -> None:
        with pytest.raises(DeadlineExceeded):
            await lane.try_submit("decode", [latent_payload(runtime, 0)], now_ms() - 1)
        assert lane.busy == 0

    asyncio.run(go())
    assert sample("pae_jobs_expired_total", {"task": "decode"}) == before + 1


def test_the_lane_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        DirectLane(object(), 0)  # type: ignore[arg-type]


def served(runtime: OnnxRuntime, repository: Path, slots: int) -> tuple[AppState, StandInBroker, TestClient]:
    """The app with a direct lane of `slots` over the stand-in broker (what was queued is visible)."""
    settings = Settings(redis_url="redis://unused", model_repository=repository, model_name="tiny")
    state = AppState.for_model(settings, runtime.config)
    broker = StandInBroker()
    state.broker = broker  # type: ignore[assignment]
    state.lane = DirectLane(runtime, slots=slots)
    return state, broker, TestClient(build_app(state))


def test_the_app_computes_a_lone_request_itself_and_queues_the_rest(
    runtime: OnnxRuntime, tiny_repository: Path
) -> None:
    _state, broker, http = served(runtime, tiny_repository, slots=1)
    size = runtime.config.image_size
    one = http.post("/v1/encode", files=[("file", image_bytes(size, size, seed=0))])
    assert one.status_code == 200 and broker.submitted == []
    z = np.frombuffer(base64.b64decode(one.json()["data"]), "<f4").reshape(1, *runtime.config.latent_shape)
    expected = runtime.encode(
        np.asarray(Image.open(io.BytesIO(image_bytes(size, size, seed=0))), np.float32).transpose(2, 0, 1)[
            None
        ]
        / 255
    )
    assert np.allclose(z, expected, atol=1e-5)
    timing = one.headers["server-timing"]
    assert "compute;dur=" in timing and one.headers["x-queue-ms"] == "0.0"
    decoded = http.post("/v1/decode", json=one.json(), headers={"Accept": "image/png"})
    assert decoded.status_code == 200 and decoded.headers["content-type"] == "image/png"
    assert broker.submitted == []
    two = http.post(
        "/v1/encode",
        files=[("file", image_bytes(size, size, seed=1)), ("file", image_bytes(size, size, seed=2))],
    )
    assert two.status_code == 200 and [task for task, *_ in broker.submitted] == ["encode"]
    generated = http.post("/v1/generate", json={"class_label": 0, "seed": 3})
    assert generated.status_code == 200 and [task for task, *_ in broker.submitted] == ["encode", "generate"]


def test_a_full_queue_still_refuses_with_the_lane_free(runtime: OnnxRuntime, tiny_repository: Path) -> None:
    """Overload protection does not depend on where a request would have run."""
    _state, broker, http = served(runtime, tiny_repository, slots=1)
    broker.full.add("decode")
    body = latent_json(np.ones(runtime.config.latent_shape, "<f4"))
    answer = http.post("/v1/decode", json=body)
    assert answer.status_code == 429 and "full" in answer.json()["detail"]


def test_direct_slots_setting() -> None:
    assert Settings.from_env({}).direct_slots == 0
    assert Settings.from_env({"DIRECT_SLOTS": "3"}).direct_slots == 3
    with pytest.raises(SettingsError, match="DIRECT_SLOTS"):
        Settings.from_env({"DIRECT_SLOTS": "-1"})
    with pytest.raises(SettingsError, match="DIRECT_SLOTS=2 needs the onnxruntime runtime"):
        Settings.from_env({"DIRECT_SLOTS": "2", "RUNTIME": "torch"})


def test_pae_serve_gives_small_graphs_a_slot_per_core_and_large_ones_none(
    tiny_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("service.cli.usable_cores", lambda: 4)
    small = Settings(model_repository=tiny_repository, model_name="tiny")
    assert embedded_direct_slots(small, replicas=1) == 4 * SLOTS_PER_CORE
    assert embedded_direct_slots(small, replicas=2) == 2 * SLOTS_PER_CORE
    assert (
        embedded_direct_slots(
            Settings(model_repository=tiny_repository, model_name="tiny", runtime="torch"), 1
        )
        == 1
    )
    large = tmp_path / "big" / "1"
    large.mkdir(parents=True)
    with open(large / "encoder.onnx", "wb") as sparse:
        sparse.truncate(SMALL_GRAPHS_BYTES + 1)
    (large / "dit.onnx").write_bytes(b"not counted")
    assert default_slots(large, 4) == 0
    assert default_slots(tiny_repository / "tiny" / "1", 4) == 4 * SLOTS_PER_CORE


def test_the_lanes_jobs_are_counted(runtime: OnnxRuntime) -> None:
    before = sample("pae_direct_jobs_total", {"task": "decode"})
    lane = DirectLane(runtime, slots=1)

    async def go() -> None:
        await lane.try_submit("decode", [latent_payload(runtime, 0)], later())

    asyncio.run(go())
    assert sample("pae_direct_jobs_total", {"task": "decode"}) == before + 1


def test_requests_follow_the_replicas_queued_jobs_into_the_queue(
    runtime: OnnxRuntime, tiny_repository: Path
) -> None:
    """While this replica has decode jobs queued, a new decode request queues behind them even
    with the lane free; encode, with nothing queued, still goes direct."""
    _state, broker, http = served(runtime, tiny_repository, slots=4)
    broker.queued = lambda task: 3 if task == "decode" else 0  # type: ignore[method-assign]
    body = latent_json(np.ones(runtime.config.latent_shape, "<f4"))
    assert http.post("/v1/decode", json=body).status_code == 200
    assert [task for task, *_ in broker.submitted] == ["decode"]
    assert (
        http.post(
            "/v1/encode",
            files=[("file", image_bytes(runtime.config.image_size, runtime.config.image_size, seed=0))],
        ).status_code
        == 200
    )
    assert [task for task, *_ in broker.submitted] == ["decode"]


def test_a_busy_replica_keeps_to_the_queue(runtime: OnnxRuntime, tiny_repository: Path) -> None:
    """With as many of its decode requests running as the lane has slots, the next one queues even
    though its queue has just drained (a batch boundary under load)."""
    state, broker, http = served(runtime, tiny_repository, slots=2)
    body = latent_json(np.ones(runtime.config.latent_shape, "<f4"))
    state.running["decode"] = 2
    assert http.post("/v1/decode", json=body).status_code == 200
    assert [task for task, *_ in broker.submitted] == ["decode"]
    assert state.running["decode"] == 2  # the request counted itself while it ran, then left
    state.running["decode"] = 1
    assert http.post("/v1/decode", json=body).status_code == 200
    assert [task for task, *_ in broker.submitted] == ["decode"]  # computed in the lane


def test_jobs_beyond_the_threads_wait_in_the_lane_and_run_in_order(runtime: OnnxRuntime) -> None:
    """Two slots, one thread: the second job is taken at once (its slot counted) and computed when
    the first one's graph call ends."""
    gated = Gated(runtime)
    lane = DirectLane(gated, slots=2, threads=1)  # type: ignore[arg-type]

    async def go() -> None:
        first = lane.try_submit("encode", [image_payload(runtime, 0)], later())
        second = lane.try_submit("encode", [image_payload(runtime, 1)], later())
        assert first is not None and second is not None and lane.busy == 2 and not lane.free("decode")
        waiting = asyncio.gather(first, second)
        await asyncio.to_thread(gated.started.wait, 10)
        assert gated.calls == 1
        gated.release.set()
        one, two = await waiting
        assert gated.calls == 2 and lane.busy == 0
        size = runtime.config.image_size
        images = np.stack([np.frombuffer(image_payload(runtime, s)["data"], np.uint8) for s in (0, 1)])
        expected = runtime.encode(images.reshape(-1, 3, size, size).astype(np.float32) / 255)
        got = [np.frombuffer(r.data, r.dtype).reshape(r.shape) for r in (*one, *two)]
        assert np.array_equal(np.stack(got), expected)

    asyncio.run(go())
