"""Worker batching and delivery details that only show under load and faults.

- Redis times out a blocked XREADGROUP only on its `hz` tick (100 ms by default), so the batch-fill
  wait must not be a `BLOCK <max_wait_ms>`: it made a 5 ms wait cost up to 100 ms per request.
- A lone job on an idle queue runs at once; the fill wait applies only when traffic is concurrent.
- Replies computed while Redis is down are delivered once it is back, not thrown away.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from service.broker_protocol import now_ms
from service.codecs import to_uint8
from service.redis_server import RedisServer
from service.runtimes.onnxruntime import OnnxRuntime
from tests.service.conftest import sample
from tests.service.test_broker import Harness, latent_payload


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


def test_concurrent_jobs_fill_one_batch_within_max_wait(
    clean_redis: str, tiny_repository: Path, runtime: OnnxRuntime
) -> None:
    count = sample("pae_batch_size_count", {"task": "decode"})
    total = sample("pae_batch_size_sum", {"task": "decode"})

    async def scenario() -> None:
        async with Harness(
            clean_redis, tiny_repository, runtime, max_wait_ms={"encode": 2, "decode": 1500, "generate": 2}
        ) as h:
            deadline = now_ms() + 20_000
            early = asyncio.create_task(
                h.client.submit("decode", [latent_payload(1), latent_payload(2)], deadline)
            )
            await h.queued("decode", 2)
            await h.start_worker()  # its first read returns 2 jobs: concurrent traffic, so it waits
            late = asyncio.create_task(
                h.client.submit("decode", [latent_payload(i) for i in (3, 4, 5)], deadline)
            )
            await asyncio.wait_for(asyncio.gather(early, late), 15)

    asyncio.run(scenario())
    assert sample("pae_batch_size_count", {"task": "decode"}) - count == 1
    assert sample("pae_batch_size_sum", {"task": "decode"}) - total == 5


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
