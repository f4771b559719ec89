"""A real failover: a primary, its replica and three sentinels on loopback, an API server and a worker
that find the primary through the sentinels, generate requests in a steady stream, and the primary
SIGKILLed in the middle of it.

Requests in flight when the primary dies are answered once the replica is promoted (their jobs had
reached it); requests sent while the sentinels have not promoted it get a 503 with Retry-After; none
waits past its deadline; afterwards requests succeed again, on the new primary, without a restart.
`benchmarks/faults.py --only primary_killed` measures the same with two replicas and two workers.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx

from service.embedded import WorkerThread
from service.launcher import LOOPBACK, stop_process
from service.redis_topologies import SentinelGroup
from tests.service.conftest import LiveServer, make_settings

DEADLINE_S = 10.0
LOOPS = 6


def test_a_killed_primary_fails_over_and_no_request_hangs(tiny_repository: Path, tmp_path: Path) -> None:
    with SentinelGroup(tmp_path / "redis", lifetime_s=600) as group:
        settings = make_settings(
            tiny_repository,
            None,
            redis_sentinels=tuple((LOOPBACK, s.port) for s in group.sentinels),
            request_timeout_s=DEADLINE_S,
            redis_pool_timeout_s=1.0,
        )
        worker = WorkerThread(settings)
        worker.start()
        try:
            with LiveServer(settings) as server:
                outcomes, killed_at, promoted_at = _traffic_through_a_failover(server.url, group)
                assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
        finally:
            assert worker.stop(timeout_s=60.0)
    statuses = {status for _sent, status, _latency, _retry in outcomes}
    assert statuses <= {200, 503}, statuses
    assert all(retry == "1" for _s, status, _l, retry in outcomes if status == 503)
    assert max(latency for _s, _st, latency, _r in outcomes) < DEADLINE_S + 3, "a request hung"
    # A request in flight at the kill may get a 503 (its enqueue or reply met the dying primary).
    before = [status for sent, status, latency, _r in outcomes if sent + latency < killed_at]
    assert before and set(before) == {200}
    assert any(status == 503 for sent, status, _l, _r in outcomes if killed_at < sent < promoted_at)
    after = sorted((sent, status) for sent, status, _l, _r in outcomes if sent > promoted_at + 2.0)
    assert after and {status for _sent, status in after} == {200}, after[:10]


def _traffic_through_a_failover(
    url: str, group: SentinelGroup
) -> tuple[list[tuple[float, int, float, str | None]], float, float]:
    """LOOPS client loops send generate requests back to back; the primary is SIGKILLed after 2 s,
    two more loops start then (the others wait on requests in flight), and all go on until 4 s after
    the sentinels promoted the replica."""
    outcomes: list[tuple[float, int, float, str | None]] = []
    stop = threading.Event()

    def loop(n: int) -> None:
        with httpx.Client(base_url=url, timeout=DEADLINE_S + 20) as http:
            i = 0
            while not stop.is_set():
                sent = time.monotonic()
                body = {"class_label": n % 3, "seed": 100 * n + i, "steps": 2}
                response = http.post("/v1/generate", json=body)
                outcomes.append(
                    (sent, response.status_code, time.monotonic() - sent, response.headers.get("retry-after"))
                )
                i += 1
                if response.status_code != 200:
                    time.sleep(0.05)

    threads = [threading.Thread(target=loop, args=(n,), daemon=True) for n in range(LOOPS)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    old = group.primary.port
    killed_at = time.monotonic()
    stop_process(group.primary.proc, signal.SIGKILL)
    threads += [threading.Thread(target=loop, args=(n,), daemon=True) for n in range(LOOPS, LOOPS + 2)]
    for thread in threads[LOOPS:]:
        thread.start()
    new = group.wait_for_new_primary(old, timeout_s=60)
    promoted_at = time.monotonic()
    assert new != old and new == group.replicas[0].port
    time.sleep(4.0)
    stop.set()
    for thread in threads:
        thread.join(DEADLINE_S + 30)
    return outcomes, killed_at, promoted_at
