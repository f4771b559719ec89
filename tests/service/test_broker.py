"""Broker and worker semantics on a real redis-server with the real ONNX Runtime backend."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from redis.asyncio import Redis

from model.sampling import SamplerConfig
from service.batch import group_jobs
from service.broker import ROOM_MEMORY_S
from service.broker_protocol import GROUP, Job, now_ms
from service.broker_worker import BrokerWorker
from service.codecs import to_uint8
from service.errors import DeadlineExceeded, JobFailed, QueueFull
from service.runtimes.onnxruntime import OnnxRuntime
from tests.service.broker_harness import KEYS, Harness, latent_payload, sampler_key
from tests.service.conftest import sample


@pytest.fixture(scope="module")
def runtime(tiny_repository: Path) -> OnnxRuntime:
    return OnnxRuntime(tiny_repository / "tiny" / "1", intra_op_threads=1)


def test_bounded_enqueue_is_atomic(clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime) -> None:
    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, runtime, queue_max_len=5) as h:
            soon = now_ms() + 400
            held = asyncio.create_task(h.client.submit("decode", [latent_payload(0)] * 3, soon))
            await h.queued("decode", 3)
            with pytest.raises(QueueFull, match="queue is full"):
                await h.client.submit("decode", [latent_payload(1)] * 3, soon)
            assert await h.redis.xlen(KEYS.jobs("decode")) == 3  # all-or-nothing: none of the 3 added
            outcomes = await asyncio.gather(
                *(h.client.submit("encode", [{"data": b"x"}], soon) for _ in range(20)),
                return_exceptions=True,
            )
            assert sum(isinstance(o, QueueFull) for o in outcomes) == 15
            assert sum(isinstance(o, DeadlineExceeded) for o in outcomes) == 5
            with pytest.raises(DeadlineExceeded):
                await held

    asyncio.run(scenario())


def test_the_queue_is_bounded_in_cost_and_gives_the_cost_back(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, runtime, queue_max_cost=100) as h:
            soon = now_ms() + 20_000
            costly = {"label": "0", "seed": "1", "sampler": sampler_key(), "cost": 60}
            held = asyncio.create_task(h.client.submit("generate", [costly], soon))
            await h.queued("generate", 1)
            assert int(await h.redis.get(KEYS.cost("generate"))) == 60
            with pytest.raises(QueueFull, match="QUEUE_MAX_COST=100"):
                await h.client.submit("generate", [costly], soon)  # 60 + 60 > 100
            await h.client.admit("generate")  # room for something cheaper: no early refusal
            await h.start_worker()
            await asyncio.wait_for(held, 20)
            await h.drained("generate")
            assert int(await h.redis.get(KEYS.cost("generate")) or 0) == 0

    asyncio.run(scenario())


def test_a_job_acknowledged_twice_gives_its_cost_back_once(clean_redis: str) -> None:
    """A slow worker and the one that reclaimed its job both acknowledge it."""

    async def scenario() -> None:
        store = Redis.from_url(clean_redis)
        await store.set(KEYS.cost("decode"), 7)
        entry = await store.xadd(KEYS.jobs("decode"), {"x": "1"})
        job = Job(entry, "decode", "j", "r", "reply", now_ms() + 1000, now_ms(), {}, cost=5)
        for consumer in ("slow", "reclaimer"):
            await BrokerWorker(store, KEYS, consumer, 1000, 3).drop("decode", [job])
        assert int(await store.get(KEYS.cost("decode"))) == 2
        await store.aclose()

    asyncio.run(scenario())


def test_a_full_queue_is_refused_before_a_body_is_read(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, runtime, queue_max_len=2, queue_max_cost=10) as h:
            await h.client.admit("decode")
            held = asyncio.create_task(
                h.client.submit("decode", [{**latent_payload(0), "cost": 10}], now_ms() + 500)
            )
            await h.queued("decode", 1)
            with pytest.raises(QueueFull, match="1 jobs costing 10 queued"):
                await h.client.admit("decode")  # no room for even the cheapest job
            with pytest.raises(DeadlineExceeded):
                await held

    asyncio.run(scenario())


def test_a_queue_seen_with_room_admits_without_a_round_trip(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    """Every enqueue reports the queue it left; while that is fresh and at most half full the early
    check asks Redis nothing, and once it is stale (or the queue was fuller) it asks again."""

    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, runtime, queue_max_len=4) as h:
            asked = []
            real = h.client.redis.pipeline
            h.client.redis.pipeline = lambda *a, **k: asked.append(1) or real(*a, **k)  # type: ignore[method-assign]
            await h.start_worker()
            await h.client.submit("decode", [latent_payload(0)], now_ms() + 10_000)  # left 1 of 4
            await h.client.admit("decode")
            assert asked == []
            await asyncio.sleep(ROOM_MEMORY_S * 2)
            await h.client.admit("decode")
            assert asked == [1]
            h.client._room.clear()
            held = asyncio.create_task(h.client.submit("decode", [latent_payload(1)] * 3, now_ms() + 10_000))
            await held  # left 3 of 4 (more than half): the next check asks again
            await h.client.admit("decode")
            assert len(asked) == 2

    asyncio.run(scenario())


def test_expired_jobs_are_dropped_unrun_and_counted(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    expired = sample("pae_jobs_expired_total", {"task": "decode"})
    batches = sample("pae_batch_size_count", {"task": "decode"})

    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, runtime) as h:
            with pytest.raises(DeadlineExceeded):
                await h.client.submit("decode", [latent_payload(i) for i in range(3)], now_ms() + 150)
            assert await h.redis.xlen(KEYS.jobs("decode")) == 3
            await h.start_worker()
            await h.drained("decode")

    asyncio.run(scenario())
    assert sample("pae_jobs_expired_total", {"task": "decode"}) - expired == 3
    assert sample("pae_batch_size_count", {"task": "decode"}) == batches  # never run


def test_cancelled_jobs_are_dropped(clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime) -> None:
    cancelled = sample("pae_jobs_cancelled_total", {"task": "generate"})
    batches = sample("pae_batch_size_count", {"task": "generate"})

    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, runtime) as h:
            payload = {"label": "1", "seed": "5", "sampler": sampler_key()}
            waiting = asyncio.create_task(h.client.submit("generate", [payload] * 2, now_ms() + 30_000))
            await h.queued("generate", 2)
            waiting.cancel()  # what the API does when the client disconnects
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert h.client.waiting == 0
            await h.start_worker()
            await h.drained("generate")

    asyncio.run(scenario())
    assert sample("pae_jobs_cancelled_total", {"task": "generate"}) - cancelled == 2
    assert sample("pae_batch_size_count", {"task": "generate"}) == batches


def test_dead_consumers_jobs_are_reclaimed(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    reclaimed = sample("pae_jobs_reclaimed_total", {"task": "decode"})
    payloads = [latent_payload(i) for i in range(2)]

    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, runtime, claim_idle_ms=300) as h:
            waiting = asyncio.create_task(h.client.submit("decode", payloads, now_ms() + 20_000))
            await h.queued("decode", 2)
            dead = BrokerWorker(h.redis, KEYS, "consumer-that-dies", 300, 3)
            assert len(await dead.read("decode", 10, None)) == 2  # taken, never answered
            await h.start_worker()
            replies = await asyncio.wait_for(waiting, 10)
            for payload, reply in zip(payloads, replies, strict=True):
                z = np.frombuffer(payload["data"], "<f4").reshape(1, 4, 4, 4)
                assert reply.data == to_uint8(runtime.decode(z))[0].tobytes()
            pending = await h.redis.xpending(KEYS.jobs("decode"), GROUP)
            assert pending["pending"] == 0

    asyncio.run(scenario())
    assert sample("pae_jobs_reclaimed_total", {"task": "decode"}) - reclaimed == 2


def test_poison_job_is_dead_lettered_with_an_error_reply(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    dead_lettered = sample("pae_jobs_dead_lettered_total", {"task": "encode"})

    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, runtime, claim_idle_ms=200, max_deliveries=2) as h:
            payload = {"data": np.zeros((3, 16, 16), np.uint8).tobytes()}
            waiting = asyncio.create_task(h.client.submit("encode", [payload], now_ms() + 20_000))
            await h.queued("encode", 1)
            first = BrokerWorker(h.redis, KEYS, "dies-first", 200, 2)
            assert len(await first.read("encode", 1, None)) == 1  # delivery 1
            await asyncio.sleep(0.25)
            second = BrokerWorker(h.redis, KEYS, "dies-second", 200, 2)
            claimed, dead = await second.reclaim("encode", 4)  # delivery 2, still allowed
            assert [j.deliveries for j in claimed] == [2] and dead == []
            await asyncio.sleep(0.25)
            await h.start_worker()  # delivery 3 > MAX_DELIVERIES=2
            with pytest.raises(JobFailed, match="delivered 3 times") as info:
                await asyncio.wait_for(waiting, 10)
            assert info.value.status == 500
            letters = await h.redis.xrange(KEYS.dead("encode"))
            assert len(letters) == 1 and b"MAX_DELIVERIES=2" in letters[0][1][b"reason"]
            await h.drained("encode")

    asyncio.run(scenario())
    assert sample("pae_jobs_dead_lettered_total", {"task": "encode"}) - dead_lettered == 1


def test_generate_batches_only_matching_sampler_settings(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    count = sample("pae_batch_size_count", {"task": "generate"})
    total = sample("pae_batch_size_sum", {"task": "generate"})
    key_a, key_b = sampler_key(), sampler_key(steps=4, sampler="heun")

    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, runtime) as h:
            jobs_a = [{"label": "0", "seed": str(s), "sampler": key_a} for s in (1, 2, 3)]
            jobs_b = [{"label": "2", "seed": str(s), "sampler": key_b} for s in (1, 2)]
            deadline = now_ms() + 20_000
            # A's jobs queued before B's: the worker splits what it reads over its idle compute
            # threads in arrival order, so an interleaving would split a setting across two batches.
            a = asyncio.create_task(h.client.submit("generate", jobs_a, deadline))
            await h.queued("generate", 3)
            b = asyncio.create_task(h.client.submit("generate", jobs_b, deadline))
            await h.queued("generate", 5)
            await h.start_worker()
            replies_a, replies_b = await asyncio.wait_for(asyncio.gather(a, b), 20)
        for replies, key, label in ((replies_a, key_a, 0), (replies_b, key_b, 2)):
            cfg = SamplerConfig(**json.loads(key))
            for seed, reply in enumerate(replies, start=1):
                alone = to_uint8(runtime.generate(np.array([label]), np.array([seed]), cfg))[0]
                assert reply.data == alone.tobytes()

    asyncio.run(scenario())
    assert sample("pae_batch_size_count", {"task": "generate"}) - count == 2  # one batch per setting
    assert sample("pae_batch_size_sum", {"task": "generate"}) - total == 5


def test_a_malformed_job_fails_alone(clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime) -> None:
    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, runtime) as h:
            deadline = now_ms() + 20_000
            good = asyncio.create_task(h.client.submit("decode", [latent_payload(1)], deadline))
            bad = asyncio.create_task(h.client.submit("decode", [{"data": b"\x00" * 12}], deadline))
            await h.queued("decode", 2)
            await h.start_worker()
            assert len((await asyncio.wait_for(good, 10))[0].data) == 3 * 16 * 16
            with pytest.raises(JobFailed, match="holds 12 bytes"):
                await asyncio.wait_for(bad, 10)

    asyncio.run(scenario())


def test_heartbeat_and_deregistration(clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime) -> None:
    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, runtime) as h:
            worker = await h.start_worker()
            alive = await h.client.alive_workers(5000)
            assert [w["id"] for w in alive] == [worker.worker_id]
            assert alive[0]["runtime"] == "onnxruntime" and alive[0]["provider"] == "cpu"
            worker.stop()
            await h.worker_task
            h.worker = None
            assert await h.client.alive_workers(5000) == []

    asyncio.run(scenario())


def test_group_jobs_splits_generate_by_settings() -> None:
    def job(i: int, key: str) -> Job:
        fields = {
            b"id": f"r.{i}".encode(),
            b"rid": b"r",
            b"reply": b"k",
            b"deadline": b"0",
            b"enq": b"0",
            b"sampler": key.encode(),
        }
        return Job.from_entry("generate", f"{i}-0".encode(), fields)

    jobs = [job(0, "a"), job(1, "b"), job(2, "a")]
    assert [[j.job_id for j in g] for g in group_jobs("generate", jobs)] == [["r.0", "r.2"], ["r.1"]]
    assert len(group_jobs("decode", jobs)) == 1 and group_jobs("decode", []) == []
