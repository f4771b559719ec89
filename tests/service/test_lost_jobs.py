"""Jobs and replies that a Redis failover loses are found and enqueued again, or failed with a 503,
well before their deadline; answered jobs are never mistaken for lost ones.

What an asynchronous-replication failover leaves behind is made here on one real redis-server: a
job's stream entry deleted (its XADD never reached the replica that took over), a job acknowledged
with no reply (the reply did not), a reply stream behind its dispatcher. `test_failover.py` kills a
real primary under sentinels.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from redis.asyncio import Redis

from service.broker import MAX_REQUEUES
from service.broker_protocol import Job, Keys, Reply, now_ms
from service.broker_worker import BrokerWorker
from service.codecs import to_uint8
from service.errors import Unavailable
from service.runtimes.onnxruntime import OnnxRuntime
from tests.service.broker_harness import KEYS, Harness, latent_payload
from tests.service.conftest import sample

FAST = {"audit_interval_s": 0.05, "audit_after_s": 0.1}
JOBS = KEYS.jobs("decode")


@pytest.fixture(scope="module")
def runtime(tiny_repository: Path) -> OnnxRuntime:
    return OnnxRuntime(tiny_repository / "tiny" / "1", intra_op_threads=1)


def lost(action: str) -> float:
    return sample("pae_jobs_lost_total", {"task": "decode", "action": action})


def decoded(runtime: OnnxRuntime, seed: int) -> bytes:
    z = np.frombuffer(latent_payload(seed)["data"], "<f4").reshape(1, 4, 4, 4)
    return to_uint8(runtime.decode(z))[0].tobytes()


async def vanish(redis: Redis, job: bytes = b"") -> bytes:
    """Delete the queued decode job (the one whose id ends with `job`), as a failover that lost its
    XADD would; its old entry id."""
    [entry_id] = [eid for eid, fields in await redis.xrange(JOBS) if fields[b"id"].endswith(job)]
    await redis.xdel(JOBS, entry_id)
    return entry_id


def test_keys_of_a_model_version_share_one_cluster_slot() -> None:
    from redis.crc import key_slot

    keys = Keys.for_model("fmnist32-tiny", "7")
    assert keys.prefix == "pae:{fmnist32-tiny:7}"
    names = [keys.jobs("encode"), keys.cost("generate"), keys.dead("decode"), keys.reply("r1")]
    names += [keys.cancel("abc"), keys.workers, keys.worker("w1")]
    assert {key_slot(name.encode()) for name in names} == {key_slot(b"fmnist32-tiny:7")}
    assert key_slot(Keys.for_model("other", "1").jobs("encode").encode()) != key_slot(names[0].encode())


def test_a_job_whose_entry_vanished_is_enqueued_again(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    before = lost("requeued")

    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, runtime, client=FAST) as h:
            waiting = asyncio.create_task(h.client.submit("decode", [latent_payload(3)], now_ms() + 20_000))
            await h.queued("decode", 1)
            old = await vanish(h.redis)
            await h.queued("decode", 1)  # the check put it back, same job id, new entry
            [(new, fields)] = await h.redis.xrange(JOBS)
            assert new != old and fields[b"id"].endswith(b".0")
            await h.start_worker()
            [reply] = await asyncio.wait_for(waiting, 10)
            assert reply.data == decoded(runtime, 3)

    asyncio.run(scenario())
    assert lost("requeued") - before == 1


def test_a_job_whose_reply_vanished_is_enqueued_again(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, runtime, client=FAST) as h:
            waiting = asyncio.create_task(h.client.submit("decode", [latent_payload(4)], now_ms() + 20_000))
            await h.queued("decode", 1)
            forgetful = BrokerWorker(h.redis, KEYS, "its-reply-was-lost", 30_000, 3)
            jobs = await forgetful.read("decode", 1, None)
            await forgetful.drop("decode", jobs)  # acknowledged and deleted; the reply never arrives
            await h.queued("decode", 1)
            await h.start_worker()
            [reply] = await asyncio.wait_for(waiting, 10)
            assert reply.data == decoded(runtime, 4)

    asyncio.run(scenario())


def test_a_job_lost_again_and_again_fails_with_a_503_long_before_its_deadline(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    before = lost("failed")

    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, runtime, client=FAST) as h:
            started = time.monotonic()
            payloads = [latent_payload(5), latent_payload(6)]  # the second job stays queued: no worker
            waiting = asyncio.create_task(h.client.submit("decode", payloads, now_ms() + 60_000))
            for _ in range(MAX_REQUEUES + 1):
                await h.queued("decode", 2)
                await vanish(h.redis, job=b".0")
            with pytest.raises(Unavailable, match="lost in a Redis failover 4 times; retry") as info:
                await asyncio.wait_for(waiting, 10)
            assert info.value.status == 503
            assert time.monotonic() - started < 10
            assert h.client.waiting == 0
            assert await h.redis.keys(KEYS.cancel("*")), "the request's other job was not cancelled"

    asyncio.run(scenario())
    assert lost("failed") - before == 1


def test_a_lost_job_the_full_queue_cannot_take_again_fails_with_a_503(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, runtime, client=FAST, queue_max_len=1) as h:
            deadline = now_ms() + 60_000
            first = asyncio.create_task(h.client.submit("decode", [latent_payload(6)], deadline))
            await h.queued("decode", 1)
            await vanish(h.redis)
            second = asyncio.create_task(h.client.submit("decode", [latent_payload(7)], deadline))
            await h.queued("decode", 1)  # the second request took the only place
            with pytest.raises(Unavailable, match=r"could not be enqueued again .*queue is full"):
                await asyncio.wait_for(first, 10)
            await h.start_worker()
            [reply] = await asyncio.wait_for(second, 10)
            assert reply.data == decoded(runtime, 7)

    asyncio.run(scenario())


def test_answered_jobs_are_never_taken_for_lost_ones(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    """Checked every 10 ms from the moment they are queued, jobs are answered (entry deleted, reply
    written) while the check runs: none may be enqueued again."""
    before = lost("requeued") + lost("failed")
    eager = {"audit_interval_s": 0.01, "audit_after_s": 0.0}

    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, runtime, client=eager) as h:
            await h.start_worker()
            deadline = now_ms() + 30_000
            requests = [h.client.submit("decode", [latent_payload(s)], deadline) for s in range(60)]
            answers = await asyncio.wait_for(asyncio.gather(*requests), 30)
            assert [r.data for [r] in answers] == [decoded(runtime, s) for s in range(60)]

    asyncio.run(scenario())
    assert lost("requeued") + lost("failed") == before


def test_a_vanished_entry_whose_reply_is_not_read_yet_is_not_lost(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    """Answered jobs (entries deleted, replies written) while the dispatcher lags: the check waits
    for it to read that far before it calls anything lost."""
    manual = {"audit_interval_s": 3600.0, "audit_after_s": 0.0}

    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, runtime, client=manual) as h:
            dispatcher = h.client._tasks[0]
            dispatcher.cancel()
            await asyncio.gather(dispatcher, return_exceptions=True)
            waiting = asyncio.create_task(
                h.client.submit("decode", [latent_payload(9), latent_payload(10)], now_ms() + 20_000)
            )
            await h.queued("decode", 2)
            await h.start_worker()
            await h.drained("decode")
            loop = asyncio.get_running_loop()
            loop.call_later(0.3, lambda: h.client._tasks.append(loop.create_task(h.client._dispatch())))
            assert await h.client.recover_lost() == 0
            replies = await asyncio.wait_for(waiting, 10)
            assert [r.data for r in replies] == [decoded(runtime, 9), decoded(runtime, 10)]

    asyncio.run(scenario())


def test_a_reply_stream_behind_its_dispatcher_is_read_again(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    """A new primary on a host whose clock is behind gives new replies ids below what the
    dispatcher had read from the old one; without rereading, it would never see them."""

    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, runtime, client=FAST) as h:
            h.client._read_to = b"%d-0" % (now_ms() + 3_600_000)  # read from a primary an hour ahead
            await h.start_worker()
            [reply] = await asyncio.wait_for(
                h.client.submit("decode", [latent_payload(8)], now_ms() + 20_000), 10
            )
            assert reply.data == decoded(runtime, 8)

    asyncio.run(scenario())


def test_acknowledging_survives_a_stream_that_lost_its_group(clean_redis: str) -> None:
    """After a failover the new primary may hold a job stream (recreated by an enqueue) without its
    consumer group: the worker's answer must still go out, once."""

    async def scenario() -> None:
        store = Redis.from_url(clean_redis)
        entry = await store.xadd(JOBS, {"x": "1"})
        job = Job(entry, "decode", "r.0", "r", KEYS.reply("api"), now_ms() + 1000, now_ms(), {})
        await BrokerWorker(store, KEYS, "w", 1000, 3).answer("decode", [job], [Reply("r.0", ok=True)])
        assert [f[b"id"] for _id, f in await store.xrange(KEYS.reply("api"))] == [b"r.0"]
        assert await store.xlen(JOBS) == 0
        await store.aclose()

    asyncio.run(scenario())
