"""`pae-serve` in its embedded default: no REDIS_URL ⇒ a private redis-server and one in-process worker."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import httpx
import pytest
import redis

from service.cli import ensure_default_model
from service.embedded import WorkerThread
from service.launcher import free_port, start_api, stop_process, wait_until_ready
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_embedded_serve_is_ready_and_cleans_up(tiny_repository: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(
        {
            "MODEL_REPOSITORY": str(tiny_repository),
            "MODEL_NAME": "tiny",
            "OMP_NUM_THREADS": "1",
            "ORT_INTRA_OP_THREADS": "1",
        }
    )
    port = free_port()
    proc = start_api("api", port, log=tmp_path / "api.log", base_env=env, cwd=ROOT, lifetime_s=300)
    try:
        wait_until_ready([proc], timeout_s=60)
        made = httpx.post(
            f"http://127.0.0.1:{port}/v1/generate", json={"class_label": "stripe", "seed": 1}, timeout=30
        )
        assert made.status_code == 200 and made.json()["images"][0]["class_name"] == "stripe"
    finally:
        stop_process(proc, grace_s=20)
    log = (tmp_path / "api.log").read_text()
    assert proc.returncode == 0, log[-2000:]
    url = re.search(r"embedded mode: redis at (\S+)", log).group(1)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()  # the private Redis is gone


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
