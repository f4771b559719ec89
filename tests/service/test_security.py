"""Security properties, over real HTTP with a real redis-server and worker.

- With API_KEY set, every route needs `Authorization: Bearer <key>` except the liveness/readiness
  probes and /metrics (scraped by Prometheus inside the cluster) and the API's own description
  (/openapi.json, /docs, /redoc: they hold no model output and cost no compute, and the docs UI
  could not load its schema behind a bearer token). A refused request never reaches the queue, and
  odd Authorization headers are 401s, never 500s.
- Redis AUTH: a password in REDIS_URL works end to end; a wrong one is a 503 naming no secret.
- Model names and versions cannot reach outside the model repository, from the settings or a URL.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from export.repository import RepositoryError, resolve_version_dir
from service.broker_protocol import Keys
from service.embedded import WorkerThread
from service.redis_server import RedisServer
from service.settings import Settings, SettingsError
from tests.service.conftest import LiveServer, client, make_settings
from tests.service.payloads import image_bytes, latent_json

KEY = "k3y-for-the-security-tests-0123"
PUBLIC = {
    "/healthz",
    "/readyz",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/{name}/ready",
    "/metrics",
}
DESCRIPTION = {"/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"}


@pytest.fixture(scope="module")
def keyed(tiny_repository: Path, redis_url: str) -> Iterator[LiveServer]:
    config = make_settings(tiny_repository, redis_url, api_key=KEY)
    worker = WorkerThread(config, redis_url)
    worker.start()
    try:
        with LiveServer(config) as server:
            yield server
    finally:
        worker.stop()


def valid_call(path: str, method: str) -> dict:
    """Keyword arguments for an httpx request that succeeds on `path` when authorised."""
    if path == "/v1/encode":
        return {"content": image_bytes(16, 16), "headers": {"Content-Type": "image/png"}}
    if path == "/v1/decode":
        return {"json": latent_json(np.ones((4, 4, 4), np.float32))}
    if path == "/v1/generate":
        return {"json": {"class_label": 0, "steps": 1}}
    return {}


def routes(server: LiveServer) -> list[tuple[str, str]]:
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    return [(path, method.upper()) for path, ops in schema["paths"].items() for method in ops]


def test_every_route_but_probes_metrics_and_docs_needs_the_key(keyed: LiveServer) -> None:
    found = routes(keyed)
    assert {p for p, _ in found} >= {"/v1/encode", "/v1/decode", "/v1/generate", "/v1/models"}
    guarded = [(p, m) for p, m in found if p not in PUBLIC]
    assert guarded, "no guarded route found"
    with client(keyed) as http:
        for path, method in guarded:
            kwargs = valid_call(path, method)
            for auth in (None, "Bearer wrong-key-0123456789", f"Basic {KEY}", f"Bearer {KEY}x"):
                headers = {**kwargs.get("headers", {}), **({"Authorization": auth} if auth else {})}
                response = http.request(method, path, **{**kwargs, "headers": headers})
                assert response.status_code == 401, f"{method} {path} with {auth!r}: {response.status_code}"
                assert response.headers["WWW-Authenticate"] == "Bearer"
            headers = {**kwargs.get("headers", {}), "Authorization": f"bearer {KEY}"}  # scheme is case-blind
            response = http.request(method, path, **{**kwargs, "headers": headers})
            assert response.status_code == 200, f"{method} {path}: {response.status_code} {response.text}"
        for path, method in [(p, m) for p, m in found if p in PUBLIC]:
            response = http.request(method, path.replace("{name}", "tiny"))
            assert response.status_code == 200, f"{method} {path} must stay open: {response.status_code}"
        for path in DESCRIPTION - {"/docs/oauth2-redirect"}:
            assert http.get(path).status_code == 200, path


def test_refused_requests_never_reach_the_queue(keyed: LiveServer, redis_url: str) -> None:
    store = redis.Redis.from_url(redis_url)
    keys = Keys.for_model("tiny", "1")

    def added() -> int:
        total = 0
        for task in ("encode", "decode", "generate"):
            with contextlib.suppress(redis.ResponseError):
                total += int(store.xinfo_stream(keys.jobs(task))["entries-added"])
        return total

    before = added()
    with client(keyed) as http:
        for path in ("/v1/encode", "/v1/decode", "/v1/generate"):
            assert http.post(path, **valid_call(path, "POST")).status_code == 401
    assert added() == before
    store.close()


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"Bearer",
        b"Bearer " + KEY.encode() + b" trailing",
        b"Bearer " + b"x" * 20_000,
        b"Bearer \xff\xfe\xe9t\xe9",  # not UTF-8: Latin-1 bytes in the header
        b"Token " + KEY.encode(),
    ],
)
def test_odd_authorization_headers_are_401(keyed: LiveServer, value: bytes) -> None:
    with client(keyed) as http:
        response = http.get("/v1/models", headers={"Authorization": value})
    assert response.status_code == 401, (value[:40], response.status_code, response.text[:200])


def password_url(store: RedisServer, password: str | None) -> str:
    auth = f":{password}@" if password is not None else ""
    return f"redis://{auth}127.0.0.1:{store.port}/0"


def test_redis_auth_works_and_a_wrong_password_is_a_clean_503(tiny_repository: Path) -> None:
    secret = "redis-secret-Zq8vT2"
    store = RedisServer(password=secret)
    store.start()
    try:
        with pytest.raises(redis.AuthenticationError):  # the server really requires it
            redis.Redis.from_url(password_url(store, None)).ping()
        good = make_settings(tiny_repository, password_url(store, secret), redis_pool_timeout_s=1.0)
        assert secret not in repr(good) and KEY not in repr(make_settings(tiny_repository, None, api_key=KEY))
        worker = WorkerThread(good, password_url(store, secret))
        worker.start()
        try:
            with LiveServer(good) as server, client(server) as http:
                made = http.post("/v1/generate", json={"class_label": 1, "seed": 4, "steps": 2})
                assert made.status_code == 200 and made.json()["images"][0]["seed"] == 4
                assert http.get("/readyz").json()["workers"] == 1
            for wrong in ("not-the-password", None):
                bad = make_settings(tiny_repository, password_url(store, wrong), redis_pool_timeout_s=1.0)
                with LiveServer(bad) as server, client(server) as http:
                    refused = http.post("/v1/generate", json={"class_label": 1, "steps": 2})
                    assert refused.status_code == 503, refused.text
                    ready = http.get("/readyz")
                    assert ready.status_code == 503 and ready.json()["redis"] is False
                    for text in (refused.text, ready.text):
                        assert secret not in text and "not-the-password" not in text
        finally:
            worker.stop()
    finally:
        store.stop()


HOSTILE_NAMES = [
    "..",
    ".",
    "../..",
    "../outside",
    "a/../../outside",
    "/etc",
    "tiny/../../outside",
    "x\\..\\y",
    "",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_model_names_cannot_leave_the_repository(name: str, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    (repository / "tiny" / "1").mkdir(parents=True)
    decoy = tmp_path / "outside" / "1"  # a model-looking folder next to the repository
    decoy.mkdir(parents=True)
    (decoy / "config.json").write_text(json.dumps({"image_size": 16}))
    if name:
        with pytest.raises(SettingsError, match="MODEL_NAME"):
            Settings.from_env({"MODEL_NAME": name, "MODEL_REPOSITORY": str(repository)})
    with pytest.raises(RepositoryError, match="plain folder name"):
        resolve_version_dir(repository, name, None)


@pytest.mark.parametrize("version", ["../1", "1/../../outside/1", "-1", "1.0", "²", " 1"])
def test_model_versions_cannot_leave_the_repository(version: str, tmp_path: Path) -> None:
    (tmp_path / "repo" / "tiny" / "1").mkdir(parents=True)
    with pytest.raises(RepositoryError, match="integer folder name"):
        resolve_version_dir(tmp_path / "repo", "tiny", version)
    if version.strip().isascii() and not version.strip().isdigit():
        with pytest.raises(SettingsError, match="MODEL_VERSION"):
            Settings.from_env({"MODEL_VERSION": version})


def raw_get(port: int, target: bytes) -> tuple[int, bytes]:
    """A GET with the request target sent byte for byte (HTTP clients normalise `..` segments)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize(
    "target",
    [
        b"/v2/models/..%2F..%2Fetc%2Fpasswd/ready",
        b"/v2/models/..%2F../ready",
        b"/v2/models/%2e%2e/ready",
        b"/v2/models/../../ready",
        b"/v2/models/tiny%2F..%2F..%2Foutside/ready",
        b"/v2/models/..%5C..%5Cwindows/ready",
        b"/v2/models/%00/ready",
        b"/v2/models/" + b"A" * 4000 + b"/ready",
    ],
)
def test_model_ready_urls_cannot_escape(keyed: LiveServer, target: bytes) -> None:
    status, body = raw_get(keyed.port, target)
    assert status in (400, 404), (target[:60], status, body[:200])
    assert b"root:" not in body  # no file content, only a "not found" naming the model asked for
