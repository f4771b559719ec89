"""The routers over an AppState with a stand-in broker: what each handler asks the workers for,
and how it answers, without Redis, a worker or a model repository."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from dataclasses import replace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api import health, inference, models
from service.api.state import AppState
from service.app import build_app
from service.errors import BadInput
from tests.service.api.conftest import CONFIG
from tests.service.payloads import image_bytes, npy_bytes


def test_generate_sends_one_job_per_seed_with_the_effective_sampler(
    http: TestClient, state: AppState
) -> None:
    response = http.post(
        "/v1/generate", json={"class_label": "square", "seed": 7, "num_images": 2, "steps": 3}
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-Queue-Ms"] == "1.5" and response.headers["X-Compute-Ms"] == "2.5"
    body = response.json()
    assert [(i["seed"], i["class_label"], i["class_name"]) for i in body["images"]] == [
        (7, 1, "square"),
        (8, 1, "square"),
    ]
    assert body["sampler"] == {**CONFIG.sampler, "steps": 3}
    ((task, payloads, _deadline),) = state.broker.submitted
    assert task == "generate" and [p["seed"] for p in payloads] == ["7", "8"]
    assert {p["label"] for p in payloads} == {"1"}
    assert json.loads(payloads[0]["sampler"]) == body["sampler"]


def test_generate_as_png_carries_its_seed_and_refuses_several_images(http: TestClient) -> None:
    one = http.post("/v1/generate", json={"class_label": 0, "seed": 3}, headers={"Accept": "image/png"})
    assert one.headers["content-type"] == "image/png" and one.headers["X-Seed"] == "3"
    assert np.asarray(Image.open(io.BytesIO(one.content))).max() == 1
    two = http.post("/v1/generate", json={"class_label": 0, "num_images": 2}, headers={"Accept": "image/png"})
    assert two.status_code == 406 and "one image" in two.json()["detail"]
    either = http.post(
        "/v1/generate",
        json={"class_label": 0, "num_images": 2},
        headers={"Accept": "image/png, application/json;q=0.5"},
    )
    assert either.status_code == 200 and len(either.json()["images"]) == 2  # PNG cannot hold two: JSON


def test_refusals_that_need_no_body_come_before_it_is_read(http: TestClient, state: AppState) -> None:
    state.broker.full.add("generate")
    full = http.post("/v1/generate", content=b"not even json", headers={"Content-Type": "application/json"})
    assert full.status_code == 429 and full.headers["Retry-After"] == "1"
    unacceptable = http.post("/v1/decode", content=b"not json", headers={"Accept": "text/html"})
    assert unacceptable.status_code == 406
    assert state.broker.submitted == []


def test_a_full_queue_is_refused_before_routing_but_never_before_the_key(state: AppState) -> None:
    keyed = AppState.for_model(replace(state.settings, api_key="k" * 20), state.config)
    keyed.broker = state.broker
    state.broker.full.add("decode")
    http = TestClient(build_app(keyed))
    assert http.post("/v1/decode", json={}).status_code == 401  # no key: no word about the queue
    refused = http.post("/v1/decode", json={}, headers={"Authorization": "Bearer " + "k" * 20})
    assert refused.status_code == 429 and "queue is full" in refused.json()["detail"]
    assert refused.headers["Retry-After"] == "1" and refused.headers["content-length"]


def test_generate_payloads_carry_their_cost(http: TestClient, state: AppState) -> None:
    http.post("/v1/generate", json={"class_label": 0, "steps": 5, "sampler": "heun", "cfg_scale": 1.0})
    http.post("/v1/generate", json={"class_label": 0, "steps": 5, "sampler": "euler", "cfg_scale": 3.0})
    heun, guided = (payloads for _task, payloads, _ in state.broker.submitted)
    assert heun[0]["cost"] == 9  # 2·5 − 1 evaluations, unguided
    assert guided[0]["cost"] == 10  # 5 evaluations, both halves
    too_costly = http.post("/v1/generate", json={"class_label": 0, "num_images": 4, "steps": 50})
    assert too_costly.status_code == 200  # 4 × 50 × 2 = 400, under the default limit


def test_refused_input_never_reaches_the_queue(http: TestClient, state: AppState) -> None:
    assert http.post("/v1/generate", json={"class_label": "giraffe"}).status_code == 422
    assert http.post("/v1/generate", content=b"{}", headers={"Content-Type": "text/plain"}).status_code == 415
    assert http.post("/v1/decode", json={"shape": [4, 4, 4]}).status_code == 422
    assert state.broker.submitted == []


def test_encode_answers_latents_as_json_or_npy(http: TestClient, state: AppState) -> None:
    png = image_bytes(20, 20)
    as_json = http.post("/v1/encode", content=png, headers={"Content-Type": "image/png"}).json()
    assert as_json["shape"] == [1, *CONFIG.latent_shape] and as_json["model"] == "tiny"
    assert np.frombuffer(base64.b64decode(as_json["data"]), "<f4").tolist() == [1.0] * 64
    as_npy = http.post("/v1/encode", files={"file": png}, headers={"Accept": "application/x-npy"})
    assert np.load(io.BytesIO(as_npy.content)).shape == (1, *CONFIG.latent_shape)
    task, payloads, _ = state.broker.submitted[0]
    assert task == "encode" and len(payloads[0]["data"]) == 3 * 16 * 16  # resized to the model's size


def test_decode_sends_each_latent_as_one_job(http: TestClient, state: AppState) -> None:
    latents = np.arange(1, 2 * 64 + 1, dtype=np.float32).reshape(2, *CONFIG.latent_shape)
    latents /= np.sqrt(np.mean(latents**2, axis=1, keepdims=True))  # on the sphere, as encode answers
    response = http.post(
        "/v1/decode", content=npy_bytes(latents), headers={"Content-Type": "application/x-npy"}
    )
    assert len(response.json()["images"]) == 2
    _, payloads, _ = state.broker.submitted[0]
    assert [np.frombuffer(p["data"], "<f4").tolist() for p in payloads] == latents.reshape(2, -1).tolist()
    assert [p["cost"] for p in payloads] == [1, 1]


def test_generate_helpers_alone(state: AppState) -> None:
    assert inference.resolve_class(CONFIG, "stripe") == 2
    with pytest.raises(BadInput, match="match exactly"):
        inference.resolve_class(CONFIG, "Stripe")  # the documented rule: exact names
    with pytest.raises(BadInput, match="out of range"):
        inference.resolve_class(CONFIG, 3)
    request = state.schemas.generate(class_label=0, sampler="heun")
    assert inference.sampler_settings(state, request)["sampler"] == "heun"


def test_readiness_says_why_not(http: TestClient, state: AppState) -> None:
    not_ready = http.get("/readyz")
    assert not_ready.status_code == 503 and "no worker" in not_ready.json()["reasons"][0]
    state.broker.workers = [{"id": "w1", "runtime": "onnxruntime", "provider": "cpu"}]
    assert http.get("/v2/models/tiny/ready").status_code == 200
    assert http.get("/v2/models/other/ready").status_code == 404
    state.broker.redis.up = False
    down = http.get("/v2/health/ready").json()
    assert down["redis"] is False and "stand-in Redis is down" in down["reasons"][0]


def test_models_reports_configured_runtime_without_workers(http: TestClient) -> None:
    (entry,) = http.get("/v1/models").json()["models"]
    assert (entry["runtime"], entry["provider"], entry["ready"], entry["workers"]) == (
        "onnxruntime",
        "cpu",
        False,
        [],
    )
    assert entry["limits"]["max_num_images"] == 4


def test_handlers_are_plain_functions_of_the_state(state: AppState) -> None:
    assert asyncio.run(health.live()) == {"status": "live"}
    (entry,) = asyncio.run(models.models(state)).models
    assert entry.name == "tiny" and entry.classes == list(CONFIG.class_names)
