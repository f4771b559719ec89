"""Production topology with real processes: 2 API replicas (pae-serve) + 2 workers (pae-worker) on one
redis-server. 200 mixed concurrent requests are all answered, each with its own correct result,
while one worker is SIGKILLed in the middle of a batch and the other takes over its jobs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis

from service.broker_protocol import GROUP, Keys
from service.launcher import Proc, free_port, start_api, start_worker, stop_process, stop_processes
from service.runtimes.onnxruntime import OnnxRuntime
from tests.service.mixed_traffic import MixedRequests

ROOT = Path(__file__).resolve().parents[2]
STEPS = 60
REQUESTS = 200


def metric_total(text: str, name: str, task: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'task="{task}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_two_replicas_two_workers_survive_a_killed_worker(
    tiny_repository: Path, clean_redis: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "REDIS_URL": clean_redis,
        "MODEL_REPOSITORY": str(tiny_repository),
        "MODEL_NAME": "tiny",
        "ORT_INTRA_OP_THREADS": "1",
        "QUEUE_MAX_LEN": "2000",
        "REQUEST_TIMEOUT_S": "60",
        "MAX_STEPS": str(STEPS),
        "MAX_WAIT_MS_GENERATE": "20",
        "MAX_WAIT_MS_ENCODE": "10",
        "MAX_WAIT_MS_DECODE": "10",
        "CLAIM_IDLE_MS": "1500",
    }
    api_ports = [free_port(), free_port()]
    metric_ports = [free_port(), free_port()]
    options = {"base_env": env, "cwd": ROOT, "lifetime_s": 600}
    quiet = ["--log-level", "warning"]
    processes = [
        start_api(f"api{i}", port, quiet, log=tmp_path / f"api{i}.log", **options)
        for i, port in enumerate(api_ports)
    ]
    workers = [
        start_worker(f"worker{i}", port, quiet, log=tmp_path / f"worker{i}.log", **options)
        for i, port in enumerate(metric_ports)
    ]
    processes += workers
    runtime = OnnxRuntime(tiny_repository / "tiny" / "1", intra_op_threads=1)
    try:
        _wait_ready(api_ports, processes)
        asyncio.run(_traffic(api_ports, workers, clean_redis, runtime))
        batches = [httpx.get(f"http://127.0.0.1:{metric_ports[1]}/metrics").text]
        survivor_reclaimed = metric_total(batches[0], "pae_jobs_reclaimed_total", "generate")
        assert survivor_reclaimed >= 1, "the surviving worker reclaimed none of the killed worker's jobs"
        sizes = {
            task: (
                metric_total(batches[0], "pae_batch_size_sum", task),
                metric_total(batches[0], "pae_batch_size_count", task),
            )
            for task in ("encode", "decode", "generate")
        }
        assert any(total > count > 0 for total, count in sizes.values()), f"no batch larger than 1: {sizes}"
    finally:
        stop_processes(processes)


def _wait_ready(api_ports: list[int], processes: list[Proc]) -> None:
    deadline = time.monotonic() + 90
    while True:
        for proc in processes:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited early: {proc.log_tail(40)}")
        try:
            states = [httpx.get(f"http://127.0.0.1:{p}/v1/models", timeout=2).json() for p in api_ports]
            if all(s["models"][0]["ready"] and len(s["models"][0]["workers"]) == 2 for s in states):
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        assert time.monotonic() < deadline, "the topology did not become ready"
        time.sleep(0.2)


async def _traffic(api_ports: list[int], workers: list[Proc], url: str, runtime: OnnxRuntime) -> None:
    mixed = MixedRequests(runtime, REQUESTS, STEPS)
    sending = asyncio.create_task(mixed.send([f"http://127.0.0.1:{port}" for port in api_ports]))
    await asyncio.to_thread(_kill_mid_batch, workers[0], url)
    mixed.check(await sending)


def _kill_mid_batch(worker: Proc, url: str) -> None:
    """SIGKILL `worker` while it holds unacknowledged generate jobs (a batch in flight)."""
    client = redis.Redis.from_url(url)
    stream = Keys.for_model("tiny", "1").jobs("generate")
    marker = f"-{worker.program_pid}-"
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            consumers = client.xinfo_consumers(stream, GROUP)
            mine = [c for c in consumers if marker in c["name"].decode() and c["pending"] > 0]
            if mine:
                stop_process(worker, signal.SIGKILL)
                return
            time.sleep(0.005)
        pytest.fail("the worker never held a generate batch to kill")
    finally:
        client.close()
