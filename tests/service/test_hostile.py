"""Hostile input, one test per class, over real HTTP (uvicorn, redis-server, a worker on exported graphs).

Every answer must be a 4xx naming the problem (never a 5xx, never a Python repr), and the service
must still be ready afterwards: each test ends by asking /readyz. The classes follow what a
black-box attack on the service found: parser bombs (deep or huge JSON, many dimensions), image
headers that promise expensive decoding, costly work nobody waits for, clients that go away or
send slowly, and schema-valid requests that could only produce garbage.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from service.api.server import MAX_HEADER_BYTES
from service.broker_protocol import Keys
from service.embedded import WorkerThread
from service.redis_server import RedisServer
from tests.service.conftest import LiveServer, client, make_settings, sample
from tests.service.payloads import huge_png_header, image_bytes, latent_json, npy_bytes

TIMEOUT_S = 0.5  # HEADER_TIMEOUT_S and BODY_TIMEOUT_S of the server under attack
HEAVY = {"class_label": 0, "num_images": 8, "steps": 10_000, "sampler": "heun", "cfg_scale": 2.0}


@pytest.fixture(scope="module")
def server(tiny_repository: Path, redis_url: str) -> Iterator[LiveServer]:
    settings = make_settings(
        tiny_repository,
        redis_url,
        header_timeout_s=TIMEOUT_S,
        body_timeout_s=TIMEOUT_S,
        max_steps=10_000,
        max_request_cost=1_000_000,
        queue_max_cost=2_000_000,
        max_image_side=4096,
    )
    worker = WorkerThread(settings, redis_url)
    worker.start()
    try:
        with LiveServer(settings) as live:
            yield live
    finally:
        worker.stop()


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    """A client for the test; afterwards the service must still answer and be ready."""
    with client(server) as session:
        yield session
    with client(server) as after:
        ready = after.get("/readyz")
        assert ready.status_code == 200, ready.text
        made = after.post("/v1/generate", json={"class_label": 1, "steps": 2, "seed": 3})
        assert made.status_code == 200, made.text


def refused(response: httpx.Response, status: int, *words: str) -> None:
    """`status`, a JSON detail that names the problem, and no Python internals."""
    assert response.status_code == status, (response.status_code, response.text[:300])
    text = response.text
    for word in words:
        assert word in text, f"{word!r} not in {text[:300]!r}"
    assert "object at 0x" not in text and "Traceback" not in text and "np." not in text


def raw(port: int, data: bytes, read_s: float = 5.0) -> bytes:
    """Send bytes on a fresh connection and read until the server closes it (or `read_s` passes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_s) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return received


def wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_deep_json_is_400_naming_the_depth_limit(http: httpx.Client) -> None:
    deep = b'{"shape": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for path in ("/v1/decode", "/v1/generate", "/v1/encode"):
        response = http.post(path, content=deep, headers={"Content-Type": "application/json"})
        refused(response, 400, "nested deeper than 200 levels")


def test_huge_numbers_are_refused_naming_the_limit(http: httpx.Client) -> None:
    digits = b"9" * 5000
    for path, body in (
        ("/v1/decode", b'{"shape": [' + digits + b'], "dtype": "float32", "data": ""}'),
        ("/v1/generate", b'{"class_label": 0, "num_images": ' + digits + b"}"),
        ("/v1/generate", b'{"class_label": 0, "seed": 1' + b"0" * 4000 + b"}"),
    ):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code in (400, 422), response.text[:300]
        refused(response, response.status_code)
    refused(
        http.post(
            "/v1/decode",
            content=b'{"shape": [' + digits + b"]}",
            headers={"Content-Type": "application/json"},
        ),
        400,
        "4300 digits",
    )
    big = {"shape": [10**4000, 4, 4], "dtype": "float32", "data": ""}
    refused(http.post("/v1/decode", json=big), 422, "more elements than")


def test_latents_with_many_dimensions_are_422(http: httpx.Client) -> None:
    many = {"shape": [1] * 70, "dtype": "float32", "data": base64.b64encode(b"\0\0\x80\x3f").decode()}
    refused(http.post("/v1/decode", json=many), 422, "70 dimensions")
    npy = npy_bytes(np.ones((1,) * 40, np.float32)).replace(
        b"(" + b"1, " * 39 + b"1,)", b"(" + b"1, " * 69 + b"1,)"
    )
    response = http.post("/v1/decode", content=npy, headers={"Content-Type": "application/x-npy"})
    assert response.status_code in (400, 422)
    refused(response, response.status_code)


def test_image_headers_promising_costly_decoding_are_refused_fast(http: httpx.Client) -> None:
    cases = [
        (huge_png_header(8, 2_000_000), 413, "MAX_IMAGE_SIDE"),  # inside the pixel limit
        (huge_png_header(8, 4000), 422, "MAX_IMAGE_ASPECT"),  # inside the side limit, 500:1
        (huge_png_header(20_000, 20_000), 413, "MAX_IMAGE_PIXELS"),
        (huge_png_header(5000, 1000), 413, "MAX_IMAGE_SIDE"),
        (huge_png_header(70_000, 70_000), 413, "MAX_IMAGE_PIXELS"),  # past Pillow's own bomb guard
    ]
    for data, status, word in cases:
        start = time.perf_counter()
        refused(http.post("/v1/encode", files={"file": data}), status, word)
        assert time.perf_counter() - start < 2.0
    four = [("file", (f"{i}.png", huge_png_header(8, 4000))) for i in range(4)]
    start = time.perf_counter()
    refused(http.post("/v1/encode", files=four, headers={"X-Request-Timeout": "3"}), 422, "MAX_IMAGE_ASPECT")
    assert time.perf_counter() - start < 2.0
    bad_header = b"\x89PNG\r\n\x1a\n" + b"\0" * 40
    refused(
        http.post("/v1/encode", content=bad_header, headers={"Content-Type": "image/png"}), 422, "corrupt"
    )
    wide = image_bytes(600, 60)  # 10:1, inside every limit: decoded, resized and encoded
    assert http.post("/v1/encode", files={"file": wide}).status_code == 200


def test_a_costly_request_past_its_deadline_stops_at_the_next_step(http: httpx.Client) -> None:
    expired = sample("pae_jobs_expired_total", {"task": "generate"})
    lag = sample("pae_abandoned_compute_seconds_sum", {"task": "generate"})
    start = time.perf_counter()
    late = http.post("/v1/generate", json=HEAVY, headers={"X-Request-Timeout": "0.3"})
    refused(late, 504, "deadline")
    light = http.post("/v1/generate", json={"class_label": 2, "steps": 2})
    assert light.status_code == 200
    wait_for(lambda: sample("pae_jobs_expired_total", {"task": "generate"}) - expired == 8, "8 expired jobs")
    # The batch would have run ~1 s more; it stopped within a step of each job's deadline.
    assert (sample("pae_abandoned_compute_seconds_sum", {"task": "generate"}) - lag) / 8 < 0.05
    assert time.perf_counter() - start < 1.0 + 0.3


def test_a_client_that_goes_away_frees_the_worker_and_counts_as_499(
    http: httpx.Client, server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    gone = sample("pae_requests_total", {"endpoint": "generate", "status": "499"})
    cancelled = sample("pae_jobs_cancelled_total", {"task": "generate"})
    lag = sample("pae_abandoned_compute_seconds_sum", {"task": "generate"})
    with caplog.at_level(logging.INFO), client(server, timeout=0.3) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/generate", json=HEAVY)
        wait_for(lambda: sample("pae_jobs_cancelled_total", {"task": "generate"}) - cancelled == 8, "cancels")
    assert sample("pae_requests_total", {"endpoint": "generate", "status": "499"}) - gone == 1
    assert (sample("pae_abandoned_compute_seconds_sum", {"task": "generate"}) - lag) / 8 < 0.1
    tracebacks = [(r.name, r.getMessage(), r.exc_info) for r in caplog.records if r.exc_info]
    assert not tracebacks, tracebacks
    assert any("client went away" in r.getMessage() for r in caplog.records)


def test_a_client_that_drops_mid_upload_is_499_with_one_log_line(
    http: httpx.Client, server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    gone = sample("pae_requests_total", {"endpoint": "decode", "status": "499"})
    with caplog.at_level(logging.INFO), socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /v1/decode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n" + b'{"shape": [' + b" " * 1000
        )
        time.sleep(0.1)
        sock.close()
        wait_for(
            lambda: sample("pae_requests_total", {"endpoint": "decode", "status": "499"}) - gone == 1, "499"
        )
    assert sample("pae_requests_total", {"endpoint": "decode", "status": "500"}) == 0
    assert not any(r.exc_info for r in caplog.records), "a client going away logged a traceback"
    assert [r.getMessage() for r in caplog.records if "client went away" in r.getMessage()]


def test_requests_over_the_cost_limit_are_422_naming_it(tiny_repository: Path) -> None:
    with RedisServer() as store:
        settings = make_settings(tiny_repository, store.url, max_request_cost=100, queue_max_cost=100)
        with LiveServer(settings) as small, client(small) as http:
            costly = {"class_label": 0, "num_images": 2, "steps": 30, "cfg_scale": 2.0}  # 2 × 30 × 2
            refused(http.post("/v1/generate", json=costly), 422, "costs 120 units", "MAX_REQUEST_COST")
            assert sample("pae_jobs_rejected_total", {"task": "generate", "reason": "too_costly"}) >= 1


def test_a_full_queue_is_429_before_the_body_is_read(tiny_repository: Path) -> None:
    with RedisServer() as store:
        settings = make_settings(tiny_repository, store.url, queue_max_len=1, body_timeout_s=TIMEOUT_S)
        redis.Redis.from_url(store.url).xadd(Keys.for_model("tiny", "1").jobs("encode"), {"x": "1"})
        with LiveServer(settings) as full, socket.create_connection(("127.0.0.1", full.port)) as sock:
            start = time.perf_counter()
            sock.sendall(
                b"POST /v1/encode HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 900000\r\n\r\n"
            )
            answer = b""  # the body never comes: the answer cannot have waited for it
            while not answer.endswith(b"}"):
                answer += sock.recv(65536)
            answered = time.perf_counter() - start
            assert answer.startswith(b"HTTP/1.1 429") and b"retry-after: 1" in answer.lower()
            assert b"queue is full" in answer and answered < 1.0
            # The connection stays for the rest of the body (closing over unread bytes would reset
            # it and could cost the client its answer), but only for BODY_TIMEOUT_S.
            sock.settimeout(10 * TIMEOUT_S)
            assert sock.recv(1) == b""
            assert TIMEOUT_S * 0.8 < time.perf_counter() - start < TIMEOUT_S * 4
            # A client that does send its whole body gets the 429 and keeps its connection.
            body = image_bytes(64, 64)
            honest = (
                b"POST /v1/encode HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
                + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            both = raw(full.port, honest)
            assert both.startswith(b"HTTP/1.1 429") and b'{"status":"live"}' in both


def test_stalled_headers_and_bodies_are_closed_with_408(http: httpx.Client, server: LiveServer) -> None:
    attempts = {
        "nothing": b"",
        "half a request line": b"POST /v1/dec",
        "half the headers": b"POST /v1/decode HTTP/1.1\r\nHost: x\r\nContent-Type: applic",
        "half the body": b"POST /v1/decode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5000\r\n\r\n{",
    }
    answers: dict[str, tuple[bytes, float]] = {}

    def attack(name: str, data: bytes) -> None:
        start = time.perf_counter()
        answers[name] = (raw(server.port, data, read_s=5 * TIMEOUT_S), time.perf_counter() - start)

    threads = [threading.Thread(target=attack, args=item) for item in attempts.items()]
    for thread in threads:
        thread.start()
    assert http.get("/healthz").status_code == 200  # others are served meanwhile
    for thread in threads:
        thread.join()
    for name, (answer, took) in answers.items():
        assert answer.startswith(b"HTTP/1.1 408"), (name, answer[:200])
        assert b"connection: close" in answer.lower() and b"_TIMEOUT_S" in answer, name
        assert TIMEOUT_S * 0.8 < took < TIMEOUT_S * 4, (name, took)  # closed by the server, in time


def test_oversized_headers_are_431_and_never_buffered(http: httpx.Client, server: LiveServer) -> None:
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 10) + b"\r\n\r\n"
    answer = raw(server.port, big)
    assert answer.startswith(b"HTTP/1.1 431") and str(MAX_HEADER_BYTES).encode() in answer
    with socket.create_connection(("127.0.0.1", server.port)) as sock, pytest.raises(ConnectionError):
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 50_000_000)  # cut off, not stored
    fits = http.get("/healthz", headers={"X-Fits": "a" * (MAX_HEADER_BYTES // 2)})
    assert fits.status_code == 200


def test_a_body_trickled_for_longer_than_the_request_timeout_is_408(tiny_repository: Path) -> None:
    with RedisServer() as store:
        settings = make_settings(tiny_repository, store.url, body_timeout_s=1.0, request_timeout_s=1.5)
        with LiveServer(settings) as server, socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.settimeout(10)
            start = time.perf_counter()
            sock.sendall(
                b"POST /v1/decode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{"
            )
            answer = b""
            for _ in range(20):  # a byte every 0.3 s: never idle for BODY_TIMEOUT_S
                time.sleep(0.3)
                try:
                    sock.sendall(b" ")
                except OSError:
                    break
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 408") and b"REQUEST_TIMEOUT_S" in answer
            assert time.perf_counter() - start < 4.0


def test_a_slow_but_steady_large_upload_is_not_cut(http: httpx.Client, server: LiveServer) -> None:
    data = image_bytes(400, 400)  # ~480 KB of noise
    chunks = [data[i : i + 60_000] for i in range(0, len(data), 60_000)]

    def trickle() -> Iterator[bytes]:
        for chunk in chunks:
            time.sleep(TIMEOUT_S / 3)  # every gap well under BODY_TIMEOUT_S, the whole well over it
            yield chunk

    response = http.post("/v1/encode", content=trickle(), headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    assert len(chunks) * TIMEOUT_S / 3 > TIMEOUT_S


def test_an_error_never_drops_a_kept_alive_connection(server: LiveServer) -> None:
    deep = b"[" * 100_000
    bad = (
        b"POST /v1/decode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(deep)}\r\n\r\n".encode()
        + deep
    )
    good = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = raw(server.port, bad + good)
    assert answer.startswith(b"HTTP/1.1 400") and answer.count(b"HTTP/1.1 ") == 2
    assert b'{"status":"live"}' in answer


def test_the_contract_is_the_behaviour(http: httpx.Client) -> None:
    head = http.head("/healthz")
    assert head.status_code == 200 and head.content == b""
    assert http.head("/readyz").status_code == 200
    refused(http.post("/v1/generate", json={"class_label": True}), 422, "class_label")
    refused(http.post("/v1/generate", json={"class_label": 0, "num_images": True}), 422, "num_images")
    refused(http.post("/v1/generate", json={"class_label": "Circle"}), 422, "match exactly", "circle")
    refused(http.post("/v1/generate", json={"class_label": 0, "shift": 1e-300}), 422, "shift")
    refused(
        http.post("/v1/generate", json={"class_label": 0}, headers={"Accept": "text/html"}), 406, "text/html"
    )
    png = http.post("/v1/generate", json={"class_label": 0, "steps": 2}, headers={"Accept": "image/*"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    refused(
        http.post("/v1/encode", files={"image": image_bytes(16, 16)}),
        422,
        "'image' is not accepted",
        "'file'",
    )
    refused(http.post("/v1/encode", files={"file": image_bytes(16, 16)}, data={"note": "hi"}), 422, "'note'")
    far = latent_json(np.full((4, 4, 4), 1e38, np.float32))
    refused(http.post("/v1/decode", json=far), 422, "off the sphere")
    refused(http.post("/v1/decode", json=latent_json(np.zeros((4, 4, 4), np.float32))), 422, "off the sphere")
    no_dtype = {k: v for k, v in latent_json(np.ones((4, 4, 4), np.float32)).items() if k != "dtype"}
    refused(http.post("/v1/decode", json=no_dtype), 422, "dtype")
    schema = http.get("/openapi.json").json()
    decode_body = schema["paths"]["/v1/decode"]["post"]["requestBody"]["content"]["application/json"]
    assert "dtype" in decode_body["schema"]["required"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert "500" in operation["responses"], (method, path)
    generate = schema["paths"]["/v1/generate"]["post"]["responses"]
    assert set(generate["200"]["headers"]) == {"X-Queue-Ms", "X-Compute-Ms", "Server-Timing", "X-Seed"}
    assert "Retry-After" in generate["429"]["headers"] and "408" in generate
    assert set(schema["paths"]["/v2/models/{name}/ready"]["get"]["responses"]) >= {"200", "404", "503"}
    assert "401" in schema["paths"]["/v1/models"]["get"]["responses"]
    assert json.dumps(schema).count("object at 0x") == 0
