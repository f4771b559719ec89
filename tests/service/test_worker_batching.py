"""Worker batching and delivery details that only show under load and faults.

- Redis times out a blocked XREADGROUP only on its `hz` tick (100 ms by default), so the batch-fill
  wait must not be a `BLOCK <max_wait_ms>`: it made a 5 ms wait cost up to 100 ms per request.
- A lone job on an idle queue runs at once; the fill wait applies only when traffic is concurrent.
- Replies computed while Redis is down are delivered once it is back, not thrown away.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from service.broker_protocol import GROUP, now_ms
from service.codecs import to_uint8
from service.redis_server import RedisServer
from service.runtimes.onnxruntime import OnnxRuntime
from service.worker import split
from tests.service.conftest import sample
from tests.service.test_broker import KEYS, Harness, latent_payload

WAITS = {"encode": 2, "decode": 2, "generate": 20}


@pytest.fixture(scope="module")
def runtime(tiny_repository: Path) -> OnnxRuntime:
    return OnnxRuntime(tiny_repository / "tiny" / "1", intra_op_threads=1)


def test_a_lone_job_runs_without_waiting_for_a_batch(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    wait_ms = 2000

    async def scenario() -> float:
        async with Harness(
            clean_redis, tiny_repository, runtime, max_wait_ms={"encode": 2, "decode": wait_ms, "generate": 2}
        ) as h:
            await h.start_worker()
            start = time.perf_counter()
            await asyncio.wait_for(h.client.submit("decode", [latent_payload(0)], now_ms() + 10_000), 10)
            return time.perf_counter() - start

    assert asyncio.run(scenario()) < wait_ms / 2000  # well under MAX_WAIT_MS: it never waited


def test_the_fill_wait_polls_with_non_blocking_reads(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    """Redis times out a blocked XREADGROUP only on its `hz` tick (every 100 ms by default), so a
    10 ms fill wait made of `BLOCK 10` reads would really last up to 100 ms. The fill must poll with
    non-blocking reads until its own deadline: checked on the reads it issues, not on wall time, so
    a loaded machine cannot fail it."""

    async def scenario() -> tuple[list[int | None], float]:
        async with Harness(
            clean_redis, tiny_repository, runtime, max_wait_ms={"encode": 2, "decode": 10, "generate": 2}
        ) as h:
            worker = await h.start_worker()
            me, blocks = asyncio.current_task(), []
            real_read = worker.broker.read

            async def spy(task: str, count: int, block_ms: int | None) -> list:
                if asyncio.current_task() is me:  # the fill's reads, not the worker loop's
                    blocks.append(block_ms)
                return await real_read(task, count, block_ms)

            worker.broker.read = spy
            start = time.monotonic()
            await worker._fill("decode", [], 8)
            return blocks, time.monotonic() - start

    blocks, waited = asyncio.run(scenario())
    assert blocks and all(block is None for block in blocks)
    assert waited >= 0.010  # it waited out its whole max wait for a batch to form


class SlowDecode:
    """The real runtime with a slow decode, so Redis can be stopped while a batch computes."""

    def __init__(self, runtime: OnnxRuntime, seconds: float) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.seconds = seconds

    def decode(self, latents: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds)
        return self.runtime.decode(latents)

    def __getattr__(self, name: str) -> object:
        return getattr(self.runtime, name)


def test_replies_computed_during_a_redis_outage_are_delivered(
    tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    store = RedisServer()
    url = store.start()
    payload = latent_payload(7)

    async def scenario() -> bytes:
        async with Harness(url, tiny_repository, SlowDecode(runtime, 0.8), redis_pool_timeout_s=1.0) as h:
            await h.start_worker()
            waiting = asyncio.create_task(h.client.submit("decode", [payload], now_ms() + 20_000))
            await asyncio.sleep(0.3)  # the worker is computing
            await asyncio.to_thread(store.stop)
            await asyncio.sleep(1.0)  # the batch finishes while Redis is down: answering fails
            # Back at the same address, empty: the reply goes to a fresh reply stream.
            await asyncio.to_thread(store.start)
            replies = await asyncio.wait_for(waiting, 15)
            return replies[0].data

    try:
        data = asyncio.run(scenario())
    finally:
        store.stop()
    z = np.frombuffer(payload["data"], "<f4").reshape(1, 4, 4, 4)
    assert data == to_uint8(runtime.decode(z))[0].tobytes()


class GatedRuntime:
    """The tiny runtime with its decode calls numbered `held` held at a gate until a test opens it."""

    def __init__(self, runtime: OnnxRuntime, held: set[int]) -> None:
        self.runtime, self.config, self.held = runtime, runtime.config, held
        self.gate, self.waiting = threading.Event(), threading.Event()
        self.batches: list[int] = []

    def decode(self, latents: np.ndarray) -> np.ndarray:
        self.batches.append(len(latents))
        if len(self.batches) in self.held:
            self.waiting.set()
            assert self.gate.wait(20), "the test never opened the gate"
        return self.runtime.decode(latents)

    def __getattr__(self, name: str) -> object:
        return getattr(self.runtime, name)


async def delivered(h: Harness, count: int) -> int:
    """Wait (up to 5 s) until `count` decode jobs are delivered to a worker and not yet acknowledged."""
    for _ in range(500):
        pending = (await h.redis.xpending(KEYS.jobs("decode"), GROUP))["pending"]
        if pending == count:
            break
        await asyncio.sleep(0.01)
    return pending


async def until(event: threading.Event) -> None:
    while not event.is_set():
        await asyncio.sleep(0.01)


def test_the_next_batch_is_read_while_one_computes(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    """While a batch computes, the worker already reads, screens and queues the next one, so no Redis
    round trip or fill wait leaves the compute thread idle between batches."""
    gated = GatedRuntime(runtime, held={1})

    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, gated, compute_threads=1) as h:  # type: ignore[arg-type]
            await h.start_worker()
            deadline = now_ms() + 20_000
            first = asyncio.create_task(h.client.submit("decode", [latent_payload(1)], deadline))
            await until(gated.waiting)
            second = asyncio.create_task(h.client.submit("decode", [latent_payload(2)] * 3, deadline))
            assert await delivered(h, 4) == 4 and not first.done()
            gated.gate.set()
            replies = await asyncio.wait_for(asyncio.gather(first, second), 15)
            assert [len(r) for r in replies] == [1, 3]

    asyncio.run(scenario())
    assert gated.batches == [1, 3]


def test_a_held_batch_is_not_claimed_back_and_run_twice(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    """A job can sit pending in this worker's hands past CLAIM_IDLE_MS (its batch queued behind
    another, or computing long); the worker's own reclaim must leave it to the batch it is in."""
    gated = GatedRuntime(runtime, held={2})

    async def scenario() -> None:
        async with Harness(  # type: ignore[arg-type]
            clean_redis, tiny_repository, gated, claim_idle_ms=200, compute_threads=1
        ) as h:
            await h.start_worker()
            deadline = now_ms() + 20_000
            await h.client.submit("decode", [latent_payload(1)], deadline)
            held = asyncio.create_task(h.client.submit("decode", [latent_payload(2)] * 2, deadline))
            await until(gated.waiting)
            await asyncio.sleep(1.0)  # several reclaim rounds of the worker's loop, each past CLAIM_IDLE_MS
            gated.gate.set()
            assert len(await asyncio.wait_for(held, 15)) == 2
            await h.drained("decode")

    asyncio.run(scenario())
    assert gated.batches == [1, 2]


def test_two_compute_threads_run_two_batches_at_once(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    """COMPUTE_THREADS=2: a second batch computes and answers while the first is still computing."""
    gated = GatedRuntime(runtime, held={1})

    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, gated, compute_threads=2) as h:  # type: ignore[arg-type]
            await h.start_worker()
            deadline = now_ms() + 20_000
            first = asyncio.create_task(h.client.submit("decode", [latent_payload(1)], deadline))
            await until(gated.waiting)
            second = await asyncio.wait_for(h.client.submit("decode", [latent_payload(2)] * 2, deadline), 10)
            assert len(second) == 2 and not first.done()
            gated.gate.set()
            assert len(await asyncio.wait_for(first, 10)) == 1

    asyncio.run(scenario())
    assert gated.batches == [1, 2]


def test_a_fresh_batch_computes_while_its_cancel_keys_are_read(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs queued moments ago are not held back by the cancel-key round trip; what it finds still
    holds: the cancelled request gets no answer, its job is acknowledged and counted cancelled, and
    the others of the batch are answered."""
    from service import worker as worker_module

    monkeypatch.setattr(worker_module, "FRESH_MS", 60_000)  # every batch counts as fresh
    cancelled = sample("pae_jobs_cancelled_total", {"task": "decode"})

    async def scenario() -> None:
        async with Harness(clean_redis, tiny_repository, runtime, max_wait_ms={**WAITS, "decode": 200}) as h:
            deadline = now_ms() + 20_000
            gone = asyncio.create_task(h.client.submit("decode", [latent_payload(1)], deadline))
            kept = asyncio.create_task(h.client.submit("decode", [latent_payload(2)], deadline))
            await h.queued("decode", 2)
            gone.cancel()  # what the API does when the client disconnects: it sets the cancel key
            with pytest.raises(asyncio.CancelledError):
                await gone
            await h.start_worker()
            assert len(await asyncio.wait_for(kept, 15)) == 1
            await h.drained("decode")
            replies = await h.redis.xrange(h.client.reply_key)
            assert len(replies) == 1  # the cancelled job's answer was never written

    asyncio.run(scenario())
    assert sample("pae_jobs_cancelled_total", {"task": "decode"}) - cancelled == 1


def test_while_the_compute_thread_is_busy_jobs_fill_one_batch(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    """With every compute thread busy, waiting costs nothing: the jobs read meanwhile keep filling one
    batch (up to MAX_WAIT_MS) and it starts when the thread frees."""
    gated = GatedRuntime(runtime, held={1})

    async def scenario() -> None:
        async with Harness(  # type: ignore[arg-type]
            clean_redis, tiny_repository, gated, compute_threads=1, max_wait_ms={**WAITS, "decode": 10_000}
        ) as h:
            await h.start_worker()
            deadline = now_ms() + 30_000
            first = asyncio.create_task(h.client.submit("decode", [latent_payload(1)], deadline))
            await until(gated.waiting)
            early = asyncio.create_task(h.client.submit("decode", [latent_payload(2)] * 2, deadline))
            assert await delivered(h, 3) == 3
            late = asyncio.create_task(h.client.submit("decode", [latent_payload(3)] * 3, deadline))
            assert await delivered(h, 6) == 6
            gated.gate.set()
            replies = await asyncio.wait_for(asyncio.gather(first, early, late), 15)
            assert [len(r) for r in replies] == [1, 2, 3]

    asyncio.run(scenario())
    assert gated.batches == [1, 5]


def test_an_idle_compute_thread_never_waits_for_company(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    """Jobs found with compute threads idle start at once, split over the idle threads, however long
    MAX_WAIT_MS is: on a CPU a bigger batch saves little per image, an idle core loses all of it."""
    gated = GatedRuntime(runtime, held=set())

    async def scenario() -> None:
        async with Harness(  # type: ignore[arg-type]
            clean_redis, tiny_repository, gated, compute_threads=2, max_wait_ms={**WAITS, "decode": 60_000}
        ) as h:
            deadline = now_ms() + 30_000
            queued = asyncio.create_task(
                h.client.submit("decode", [latent_payload(i) for i in range(3)], deadline)
            )
            await h.queued("decode", 3)
            await h.start_worker()  # its first read finds 3 jobs and two idle threads
            assert len(await asyncio.wait_for(queued, 15)) == 3

    asyncio.run(scenario())
    assert sorted(gated.batches) == [1, 2]


def test_split_keeps_arrival_order_in_even_runs() -> None:
    jobs = list(range(5))
    assert split(jobs, 2) == [[0, 1, 2], [3, 4]]  # type: ignore[arg-type]
    assert split(jobs, 9) == [[0], [1], [2], [3], [4]]  # type: ignore[arg-type]
    assert split(jobs, 0) == [jobs]  # type: ignore[arg-type]
