"""The default model exported once per session and served for real (redis-server, worker, uvicorn)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.embedded import WorkerThread
from service.redis_server import RedisServer
from tests.service.conftest import LiveServer, make_settings

CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "fmnist32-tiny"


@pytest.fixture(scope="session")
def default_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.cli import main

    repository = tmp_path_factory.mktemp("default-repo")
    assert main(["--checkpoint", str(CHECKPOINT), "--repository", str(repository)]) == 0
    return repository


@pytest.fixture(scope="module")
def default_live(default_repository: Path) -> Iterator[LiveServer]:
    store = RedisServer()
    url = store.start()
    settings = make_settings(default_repository, url, model_name="fmnist32-tiny", max_steps=250)
    worker = WorkerThread(settings, url)
    worker.start()
    try:
        with LiveServer(settings) as server:
            yield server
    finally:
        assert worker.stop(timeout_s=60.0), "the embedded worker did not stop"
        store.stop()
