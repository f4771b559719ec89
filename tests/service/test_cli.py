"""`pae-serve` in its embedded default: no REDIS_URL ⇒ a private redis-server and one worker process."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from service.cli import ensure_default_model
from service.embedded import WorkerThread
from service.launcher import free_port, start_api, stop_process, wait_until_ready
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def embedded_env(tiny_repository: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(
        {
            "MODEL_REPOSITORY": str(tiny_repository),
            "MODEL_NAME": "tiny",
            "OMP_NUM_THREADS": "1",
            "ORT_INTRA_OP_THREADS": "1",
        }
    )
    return env


def worker_pid(log: str) -> int:
    return int(re.search(r"embedded mode: redis at \S+, worker process (\d+)", log).group(1))


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_embedded_serve_is_ready_and_cleans_up(tiny_repository: Path, tmp_path: Path) -> None:
    port = free_port()
    env = embedded_env(tiny_repository)
    proc = start_api("api", port, log=tmp_path / "api.log", base_env=env, cwd=ROOT, lifetime_s=300)
    try:
        wait_until_ready([proc], timeout_s=60)
        made = httpx.post(
            f"http://127.0.0.1:{port}/v1/generate", json={"class_label": "stripe", "seed": 1}, timeout=30
        )
        assert made.status_code == 200 and made.json()["images"][0]["class_name"] == "stripe"
        assert "server-timing" in made.headers
        worker = worker_pid((tmp_path / "api.log").read_text())
        assert worker != proc.program_pid and alive(worker)  # the worker has a process (and a GIL) of its own
        encoded = httpx.post(
            f"http://127.0.0.1:{port}/v1/encode",
            content=base64.b64decode(made.json()["images"][0]["png"]),
            headers={"Content-Type": "image/png"},
            timeout=30,
        )
        assert encoded.status_code == 200
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert 'pae_batch_size_count{task="generate"} 1.0' in metrics  # the worker's metrics, seen by the API
        # The API's own, from the same multiprocess view: its requests and its direct lane's jobs.
        assert 'pae_requests_total{endpoint="generate",status="200"} 1.0' in metrics
        assert 'pae_direct_jobs_total{task="encode"} 1.0' in metrics
    finally:
        stop_process(proc, grace_s=20)
    log = (tmp_path / "api.log").read_text()
    assert proc.returncode == 0, log[-2000:]
    assert not alive(worker)
    url = re.search(r"embedded mode: redis at (\S+),", log).group(1)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()  # the private Redis is gone


def test_the_embedded_worker_stops_when_pae_serve_is_killed(tiny_repository: Path, tmp_path: Path) -> None:
    port = free_port()
    env = embedded_env(tiny_repository)
    proc = start_api("api", port, log=tmp_path / "api.log", base_env=env, cwd=ROOT, lifetime_s=300)
    try:
        wait_until_ready([proc], timeout_s=60)
        worker = worker_pid((tmp_path / "api.log").read_text())
        os.kill(proc.program_pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(worker), "the orphaned worker kept running"
    finally:
        stop_process(proc, grace_s=5)
        # redis-server outlives a SIGKILLed pae-serve (it cannot watch its parent): stop it here.
        found = re.search(r"embedded mode: redis at (\S+),", (tmp_path / "api.log").read_text())
        if found:
            with contextlib.suppress(redis.RedisError):
                redis.Redis.from_url(found.group(1), socket_connect_timeout=1).shutdown(nosave=True)


def test_a_missing_non_default_model_is_an_error(tmp_path: Path) -> None:
    settings = Settings(model_repository=tmp_path, model_name="elsewhere")
    with pytest.raises(SystemExit, match="not in"):
        ensure_default_model(settings)


def test_stopping_an_embedded_worker_reports_one_that_outlives_the_timeout(tiny_repository: Path) -> None:
    """A worker thread still running after `stop` keeps heartbeating; `stop` must say so."""
    never_started = WorkerThread(Settings(model_repository=tiny_repository), "redis://127.0.0.1:1/0")
    assert never_started.stop(timeout_s=0.01)
    release = threading.Event()
    stuck = WorkerThread(Settings(model_repository=tiny_repository), "redis://127.0.0.1:1/0")
    stuck.thread = threading.Thread(target=release.wait, daemon=True)
    stuck.thread.start()
    assert not stuck.stop(timeout_s=0.05)
    release.set()
    assert stuck.stop(timeout_s=5.0)
