"""Recovery details the fault campaign (benchmarks/faults.py) found, as fast tests on real processes.

After a Redis restart, connections that sat idle in the API's pool through the outage are dead;
each one used to fail the first request that drew it with a 503 ("Connection closed by server")
long after Redis was back. The pool now health-checks a connection idle for more than a second
(PING, reconnecting once on failure) before using it, so recovery is complete, not gradual.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import httpx

from tests.service.conftest import LiveServer, RestartableStack, client

BURST = 12


def burst(server: LiveServer, seed: int) -> list[httpx.Response]:
    """BURST concurrent generate requests, so the API's pool holds several connections."""

    def one(i: int) -> httpx.Response:
        with client(server) as http:
            return http.post("/v1/generate", json={"class_label": i % 3, "seed": seed + i, "steps": 1})

    with concurrent.futures.ThreadPoolExecutor(BURST) as pool:
        return list(pool.map(one, range(BURST)))


def test_no_503_from_stale_pooled_connections_after_a_redis_restart(tiny_repository: Path) -> None:
    with RestartableStack(tiny_repository, redis_pool_timeout_s=1.0) as stack, client(stack.server) as http:
        assert [r.status_code for r in burst(stack.server, 0)] == [200] * BURST
        stack.store.stop()
        assert http.post("/v1/generate", json={"class_label": 0}).status_code == 503
        time.sleep(1.5)  # longer than the pool's health-check interval
        stack.restart_redis()
        deadline = time.monotonic() + 20
        while http.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "not ready after the restart"
            time.sleep(0.05)
        answers = burst(stack.server, 100)
        assert [r.status_code for r in answers] == [200] * BURST, [r.text for r in answers]
