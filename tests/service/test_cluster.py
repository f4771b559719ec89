"""The service on a real three-primary Redis Cluster on loopback: 200 mixed concurrent requests are all
answered with their own results, and every key of the model version lives on the one shard that owns
its hash tag (the enqueue and acknowledge scripts and the pipelines touch several keys at once).

The API and the worker are given a node that does NOT own the model's slot, so the client must follow
the cluster's redirection to reach its queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from service.broker import BrokerClient
from service.broker_protocol import Keys, now_ms
from service.embedded import WorkerThread
from service.redis_client import open_redis
from service.redis_topologies import LocalCluster
from service.runtimes.onnxruntime import OnnxRuntime
from service.settings import TASKS
from tests.service.conftest import LiveServer, make_settings
from tests.service.mixed_traffic import MixedRequests

KEYS = Keys.for_model("tiny", "1")


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(primaries=3, lifetime_s=600) as nodes:
        yield nodes


def test_200_mixed_requests_on_a_three_primary_cluster(cluster: LocalCluster, tiny_repository: Path) -> None:
    owner = cluster.owner(KEYS.jobs("encode"))
    elsewhere = next(port for port in cluster.ports if port != owner)
    settings = make_settings(
        tiny_repository, f"redis://127.0.0.1:{elsewhere}/0", redis_cluster=True, queue_max_len=1024
    )
    runtime = OnnxRuntime(tiny_repository / "tiny" / "1", intra_op_threads=1)
    mixed = MixedRequests(runtime, 200, steps=4)
    worker = WorkerThread(settings)
    worker.start()
    try:
        with LiveServer(settings) as server:
            assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
            mixed.check(asyncio.run(mixed.send([server.url])))
            for port in cluster.ports:
                node = redis.Redis(port=port)
                names = [k.decode() for k in node.scan_iter(f"{KEYS.prefix}:*")]
                node.close()
                if port == owner:
                    assert KEYS.jobs("generate") in names and KEYS.workers in names
                    assert any(name.startswith(KEYS.reply("")) for name in names)
                else:
                    assert names == [], f"node {port} holds keys of the model version: {names}"
    finally:
        assert worker.stop(timeout_s=60.0)


def test_a_lost_job_is_found_and_enqueued_again_on_the_cluster(
    cluster: LocalCluster, tiny_repository: Path
) -> None:
    """The lost-job check's script and the enqueue script run on the model's shard."""
    owner = redis.Redis(port=cluster.owner(KEYS.jobs("decode")))
    settings = make_settings(tiny_repository, f"redis://127.0.0.1:{cluster.ports[0]}/0", redis_cluster=True)

    async def scenario() -> None:
        async with open_redis(settings, max_connections=8) as client:
            broker = BrokerClient(client, KEYS, 64, audit_interval_s=0.05, audit_after_s=0.1)
            await broker.start(TASKS)
            waiting = asyncio.create_task(broker.submit("decode", [{"data": b"z"}], now_ms() + 20_000))
            await until(lambda: owner.xlen(KEYS.jobs("decode")) == 1)
            [(entry_id, _)] = owner.xrange(KEYS.jobs("decode"))
            owner.xdel(KEYS.jobs("decode"), entry_id)
            await until(lambda: owner.xlen(KEYS.jobs("decode")) == 1)
            assert owner.xrange(KEYS.jobs("decode"))[0][0] != entry_id
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            await broker.close()

    asyncio.run(scenario())
    owner.delete(KEYS.jobs("decode"), KEYS.cost("decode"))
    owner.close()


async def until(condition, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)
