"""The API end to end over real HTTP: uvicorn, a real redis-server, a real worker on exported graphs."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from model.sampling import SamplerConfig
from service.broker_protocol import Keys
from service.codecs import decode_image, to_uint8
from service.runtimes.onnxruntime import OnnxRuntime
from tests.service.conftest import client, sample
from tests.service.payloads import huge_png_header, image_bytes, latent_json, npy_bytes


@pytest.fixture(scope="module")
def runtime(tiny_repository: Path) -> OnnxRuntime:
    return OnnxRuntime(tiny_repository / "tiny" / "1", intra_op_threads=1)


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)


def test_encode_decode_round_trip(live, runtime: OnnxRuntime) -> None:
    server, _ = live()
    images = [image_bytes(40, 30, "PNG", seed=1), image_bytes(20, 20, "JPEG", seed=2)]
    expected = runtime.encode(np.stack([decode_image(b, 16, 10**6) for b in images]).astype(np.float32) / 255)
    with client(server) as http:
        multipart = http.post(
            "/v1/encode", files=[("file", ("a.png", images[0])), ("file", ("b.jpg", images[1]))]
        )
        assert multipart.status_code == 200, multipart.text
        body = multipart.json()
        assert body["shape"] == [2, 4, 4, 4] and body["dtype"] == "float32" and body["version"] == "1"
        latents = np.frombuffer(base64.b64decode(body["data"]), "<f4").reshape(body["shape"])
        assert np.abs(latents - expected).max() < 1e-6

        as_json = http.post("/v1/encode", json={"images": [base64.b64encode(b).decode() for b in images]})
        assert as_json.json()["data"] == body["data"]
        raw = http.post("/v1/encode", content=images[0], headers={"Content-Type": "image/png"})
        assert raw.json()["shape"] == [1, 4, 4, 4]
        npy = http.post("/v1/encode", files={"file": images[0]}, headers={"Accept": "application/x-npy"})
        assert npy.headers["content-type"] == "application/x-npy"
        assert np.array_equal(np.load(io.BytesIO(npy.content)), latents[:1])

        decoded = http.post("/v1/decode", json=body)  # what encode returns is what decode takes
        assert decoded.status_code == 200, decoded.text
        pngs = [base64.b64decode(i["png"]) for i in decoded.json()["images"]]
        reference = to_uint8(runtime.decode(latents))
        assert all(np.array_equal(png_pixels(p), ref) for p, ref in zip(pngs, reference, strict=True))
        one = http.post(
            "/v1/decode",
            content=npy_bytes(latents[1]),
            headers={"Content-Type": "application/x-npy", "Accept": "image/png"},
        )
        assert one.headers["content-type"] == "image/png" and one.content == pngs[1]
        assert float(one.headers["X-Compute-Ms"]) >= 0


def test_generate_same_seed_alone_or_batched_is_byte_identical(live, runtime: OnnxRuntime) -> None:
    server, _ = live(max_wait_ms={"encode": 2, "decode": 2, "generate": 150})
    before = (
        sample("pae_batch_size_sum", {"task": "generate"}),
        sample("pae_batch_size_count", {"task": "generate"}),
    )
    request = {"class_label": "square", "seed": 42, "steps": 4, "sampler": "heun", "cfg_scale": 3.0}
    with client(server) as http:
        alone = http.post("/v1/generate", json=request, headers={"Accept": "image/png"})
        assert alone.status_code == 200, alone.text
        assert alone.headers["X-Seed"] == "42"

        def batched(seed: int) -> httpx.Response:
            with client(server) as other:
                return other.post("/v1/generate", json={**request, "seed": seed, "num_images": 3})

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(batched, [40, 100, 200, 300]))
    after = (
        sample("pae_batch_size_sum", {"task": "generate"}),
        sample("pae_batch_size_count", {"task": "generate"}),
    )
    batches, jobs = after[1] - before[1], after[0] - before[0]
    assert jobs == 13 and batches < 13 - 1, "requests were not batched together"
    first = responses[0].json()
    assert [i["seed"] for i in first["images"]] == [40, 41, 42]
    assert {i["class_name"] for i in first["images"]} == {"square"}
    assert first["sampler"] == {
        "sampler": "heun",
        "steps": 4,
        "shift": 1.0,
        "cfg_scale": 3.0,
        "cfg_interval": [0.0, 1.0],
    }
    assert base64.b64decode(first["images"][2]["png"]) == alone.content
    cfg = SamplerConfig(sampler="heun", steps=4, cfg_scale=3.0)
    reference = to_uint8(runtime.generate(np.array([1]), np.array([42]), cfg))[0]
    assert np.array_equal(png_pixels(alone.content), reference)


def wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_queue_full_is_429_with_retry_after(live, clean_redis: str) -> None:
    server, _ = live(worker=False, queue_max_len=2)
    store = redis.Redis.from_url(clean_redis)
    rejected = sample("pae_jobs_rejected_total", {"task": "generate", "reason": "queue_full"})
    with client(server) as http, concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(
            http.post,
            "/v1/generate",
            json={"class_label": 0, "num_images": 2},
            headers={"X-Request-Timeout": "1"},
        )
        wait_for(lambda: store.xlen(Keys.for_model("tiny", "1").jobs("generate")) == 2, "the first request")
        full = http.post("/v1/generate", json={"class_label": 0})
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
        assert "queue is full" in full.json()["detail"]
        assert held.result().status_code == 504
    assert sample("pae_jobs_rejected_total", {"task": "generate", "reason": "queue_full"}) - rejected == 1


def test_deadline_is_504_and_the_job_never_runs(live, tiny_repository: Path, clean_redis: str) -> None:
    from service.embedded import WorkerThread
    from tests.service.conftest import make_settings

    server, _ = live(worker=False)
    expired = sample("pae_jobs_expired_total", {"task": "decode"})
    cancelled = sample("pae_jobs_cancelled_total", {"task": "decode"})
    ran = sample("pae_batch_size_count", {"task": "decode"})
    latent = latent_json(np.ones((4, 4, 4), np.float32))
    with client(server) as http:
        late = http.post("/v1/decode", json=latent, headers={"X-Request-Timeout": "0.3"})
        assert late.status_code == 504 and "deadline" in late.json()["detail"]
    with client(server, timeout=0.3) as impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post("/v1/decode", json=latent)  # the client gives up and disconnects
    store = redis.Redis.from_url(clean_redis)
    wait_for(
        lambda: len(store.keys(Keys.for_model("tiny", "1").cancel("*"))) == 2, "both requests to be cancelled"
    )
    worker = WorkerThread(make_settings(tiny_repository, clean_redis), clean_redis)
    worker.start()
    try:
        wait_for(
            lambda: (
                sample("pae_jobs_expired_total", {"task": "decode"}) - expired >= 1
                and sample("pae_jobs_cancelled_total", {"task": "decode"}) - cancelled >= 1
            ),
            "the worker to drop the abandoned jobs",
        )
    finally:
        worker.stop()
    assert sample("pae_batch_size_count", {"task": "decode"}) == ran  # neither job was computed


BAD_INPUTS = [
    (
        "non-image bytes",
        "encode",
        {"content": b"hello, world", "headers": {"Content-Type": "image/png"}},
        415,
        "not a PNG",
    ),
    ("truncated PNG", "encode", {"files": {"file": image_bytes(64, 64)[:300]}}, 422, "truncated"),
    ("1x1 image", "encode", {"files": {"file": image_bytes(1, 1)}}, 422, "at least 8"),
    ("20000x20000 image", "encode", {"files": {"file": huge_png_header()}}, 413, "pixels"),
    ("bad base64", "encode", {"json": {"images": ["***"]}}, 400, "base64"),
    ("no images", "encode", {"json": {"images": []}}, 422, "images"),
    ("text body", "encode", {"content": b"x", "headers": {"Content-Type": "text/plain"}}, 415, "text/plain"),
    (
        "wrong latent shape",
        "decode",
        {"json": latent_json(np.zeros((1, 4, 4, 3), np.float32))},
        422,
        "shape must be",
    ),
    (
        "wrong latent dtype",
        "decode",
        {"json": latent_json(np.zeros((4, 4, 4), np.float64), "float64")},
        422,
        "float32",
    ),
    ("NaN latent", "decode", {"json": latent_json(np.full((4, 4, 4), np.nan, np.float32))}, 422, "NaN"),
    (
        "Inf npy",
        "decode",
        {
            "content": npy_bytes(np.full((4, 4, 4), np.inf, np.float32)),
            "headers": {"Content-Type": "application/x-npy"},
        },
        422,
        "NaN or Inf",
    ),
    (
        "malformed JSON",
        "decode",
        {"content": b'{"shape": [4,', "headers": {"Content-Type": "application/json"}},
        400,
        "not valid JSON",
    ),
    ("unknown class", "generate", {"json": {"class_label": "giraffe"}}, 422, "unknown class 'giraffe'"),
    ("class out of range", "generate", {"json": {"class_label": 3}}, 422, "out of range"),
    ("steps over limit", "generate", {"json": {"class_label": 0, "steps": 51}}, 422, "steps"),
    ("num_images over limit", "generate", {"json": {"class_label": 0, "num_images": 9}}, 422, "num_images"),
    ("sde with 2 steps", "generate", {"json": {"class_label": 0, "sampler": "sde", "steps": 2}}, 422, "sde"),
    (
        "bad cfg interval",
        "generate",
        {"json": {"class_label": 0, "cfg_interval": [0.8, 0.2]}},
        422,
        "cfg_interval",
    ),
    ("unknown field", "generate", {"json": {"class_label": 0, "stepz": 3}}, 422, "stepz"),
    (
        "malformed JSON body",
        "generate",
        {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
        400,
        "not valid JSON",
    ),
    (
        "oversized body",
        "decode",
        {"content": b"0" * ((1 << 20) + 1), "headers": {"Content-Type": "application/json"}},
        413,
        "MAX_BODY_BYTES",
    ),
    (
        "bad timeout header",
        "generate",
        {"json": {"class_label": 0}, "headers": {"X-Request-Timeout": "soon"}},
        422,
        "x-request-timeout",
    ),
    (
        "png for many images",
        "generate",
        {"json": {"class_label": 0, "num_images": 2}, "headers": {"Accept": "image/png"}},
        406,
        "one image",
    ),
]


def test_bad_inputs_are_4xx_naming_the_problem(live) -> None:
    server, _ = live()
    with client(server) as http:
        for name, endpoint, kwargs, status, message in BAD_INPUTS:
            response = http.post(f"/v1/{endpoint}", **kwargs)
            detail = json.dumps(response.json()["detail"])
            assert response.status_code == status, f"{name}: {response.status_code} {detail}"
            assert message in detail, f"{name}: {detail!r} does not mention {message!r}"
        chunked = http.post(
            "/v1/decode", content=iter([b"0" * (1 << 19)] * 3), headers={"Content-Type": "application/json"}
        )
        assert chunked.status_code == 413  # no Content-Length: counted while streaming


def test_api_key_guards_inference_but_not_probes(live) -> None:
    key = "s3cret-key-0123456789"
    server, _ = live(api_key=key)
    with client(server) as http:
        missing = http.post("/v1/generate", json={"class_label": 0, "steps": 1})
        assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
        wrong = http.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "invalid API key" in wrong.json()["detail"]
        ok = http.post(
            "/v1/generate", json={"class_label": 0, "steps": 1}, headers={"Authorization": f"Bearer {key}"}
        )
        assert ok.status_code == 200
        for probe in (
            "/healthz",
            "/readyz",
            "/v2/health/live",
            "/v2/health/ready",
            "/v2/models/tiny/ready",
            "/metrics",
        ):
            assert http.get(probe).status_code == 200, probe


def test_models_probes_and_openapi(live) -> None:
    server, _ = live()
    with client(server) as http:
        entry = http.get("/v1/models").json()["models"][0]
        assert (entry["name"], entry["version"], entry["image_size"]) == ("tiny", "1", 16)
        assert entry["latent_shape"] == [4, 4, 4] and entry["classes"] == ["circle", "square", "stripe"]
        assert entry["sampler_defaults"]["steps"] == 4 and entry["limits"]["max_steps"] == 50
        assert (entry["runtime"], entry["provider"], entry["ready"]) == ("onnxruntime", "cpu", True)
        assert len(entry["workers"]) == 1
        assert http.get("/v2/models/other/ready").status_code == 404
        schema = http.get("/openapi.json").json()
        generate = schema["paths"]["/v1/generate"]["post"]
        fields = generate["requestBody"]["content"]["application/json"]["schema"]["properties"]
        assert fields["steps"]["anyOf"][0]["maximum"] == 50 and fields["num_images"]["maximum"] == 8
        assert "square" in fields["class_label"]["description"]
        assert {"413", "422", "429", "504"} <= set(generate["responses"])
        assert "multipart/form-data" in schema["paths"]["/v1/encode"]["post"]["requestBody"]["content"]


def test_not_ready_without_a_worker_and_503_without_redis(live, tiny_repository: Path) -> None:
    from service.launcher import free_port
    from tests.service.conftest import LiveServer, make_settings

    server, _ = live(worker=False)
    with client(server) as http:
        state = http.get("/readyz")
        assert state.status_code == 503 and "no worker" in state.json()["reasons"][0]
        assert http.get("/healthz").status_code == 200
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    with (
        LiveServer(make_settings(tiny_repository, nowhere, redis_pool_timeout_s=1.0)) as down,
        client(down) as http,
    ):
        response = http.post("/v1/generate", json={"class_label": 0})
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert "unavailable" in response.json()["detail"]
        ready = http.get("/v2/health/ready")
        assert ready.status_code == 503 and ready.json()["redis"] is False


def test_metrics_match_known_traffic(live) -> None:
    server, _ = live()

    def scrape(http: httpx.Client) -> dict[tuple[str, frozenset], float]:
        values = {}
        for line in http.get("/metrics").text.splitlines():
            if line.startswith("pae_") and "{" in line:
                name, rest = line.split("{", 1)
                labels, value = rest.rsplit("} ", 1)
                pairs = frozenset(tuple(p.split("=", 1)) for p in labels.split(",") if p)
                values[(name, pairs)] = float(value)
        return values

    def get(values: dict, name: str, **labels: str) -> float:
        want = frozenset((k, f'"{v}"') for k, v in labels.items())
        return sum(v for (n, ls), v in values.items() if n == name and want <= ls)

    with client(server) as http:
        before = scrape(http)
        for _ in range(3):
            assert (
                http.post("/v1/generate", json={"class_label": 1, "steps": 2, "num_images": 2}).status_code
                == 200
            )
        for _ in range(2):
            assert http.post("/v1/decode", json={"shape": [1]}).status_code == 422
        after = scrape(http)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    assert get(delta, "pae_requests_total", endpoint="generate", status="200") == 3
    assert get(delta, "pae_requests_total", endpoint="decode", status="422") == 2
    assert get(delta, "pae_request_duration_seconds_count", endpoint="generate", status="200") == 3
    assert get(delta, "pae_request_duration_seconds_sum", endpoint="generate", status="200") > 0
    assert get(delta, "pae_batch_size_sum", task="generate") == 6  # every image computed once
    assert get(delta, "pae_queue_wait_seconds_count", task="generate") == 6
    assert get(delta, "pae_compute_seconds_count", task="generate") == get(
        delta, "pae_batch_size_count", task="generate"
    )
    assert get(after, "pae_inflight_requests", endpoint="generate") == 0
    assert get(after, "pae_model_info", model="tiny", version="1", runtime="onnxruntime", provider="cpu") == 1


def test_redis_restart_is_503_then_recovers(tiny_repository: Path) -> None:
    from tests.service.conftest import RestartableStack

    with RestartableStack(tiny_repository, redis_pool_timeout_s=1.0) as stack, client(stack.server) as http:
        request = {"class_label": 2, "seed": 3, "steps": 2}
        first = http.post("/v1/generate", json=request)
        assert first.status_code == 200
        stack.store.stop()
        down = http.post("/v1/generate", json=request)
        assert down.status_code == 503 and down.headers["Retry-After"] == "1"
        assert http.get("/readyz").status_code == 503
        stack.restart_redis()  # back, but empty: groups and streams are gone
        wait_for(lambda: http.get("/readyz").status_code == 200, "readiness after the restart")
        again = http.post("/v1/generate", json=request)
        assert again.status_code == 200 and again.json()["images"] == first.json()["images"]
