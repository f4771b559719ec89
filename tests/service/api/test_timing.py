"""The Server-Timing header (service/timing.py) and the request path's dependencies running on the
event loop, against the real app over a stand-in broker."""

from __future__ import annotations

import base64
import inspect

import numpy as np
from fastapi.testclient import TestClient

from service import timing
from service.api import inference
from tests.service.api.conftest import CONFIG


def stages(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        out[name] = float(dur)
    return out


def test_decode_answers_its_stages(http: TestClient) -> None:
    z = np.ones(CONFIG.latent_shape, "<f4")
    body = {"shape": list(z.shape), "dtype": "float32", "data": base64.b64encode(z.tobytes()).decode()}
    answer = http.post("/v1/decode", json=body)
    assert answer.status_code == 200
    got = stages(answer.headers["server-timing"])
    assert set(got) == {
        "parse",
        "queue",
        "compute",
        "encode",
        "app",
    }  # the stand-in broker neither queues nor waits
    assert (
        got["queue"] == 1.5 and got["compute"] == 2.5
    )  # the worker's figures, as in X-Queue-Ms / X-Compute-Ms
    rounding = 3 * 0.005  # each figure is rounded to hundredths of a millisecond
    assert got["app"] >= got["parse"] + got["encode"] - rounding


def test_an_error_answer_still_says_how_long_it_took(http: TestClient) -> None:
    answer = http.post("/v1/decode", content=b"{", headers={"Content-Type": "application/json"})
    assert answer.status_code == 400
    assert set(stages(answer.headers["server-timing"])) == {"app"}


def test_marks_outside_a_request_do_nothing() -> None:
    timing.mark("parse")
    timing.note("queue", 1.0)


def test_wait_splits_into_queue_compute_and_transit() -> None:
    timer = timing.StageTimer()
    timer.stages.update({"wait": 10.0, "queue": 2.0, "compute": 5.0})
    got = stages(timer.header().decode())
    assert got["transit"] == 3.0 and got["app"] >= 0


def test_request_path_dependencies_run_on_the_event_loop() -> None:
    """A plain `def` dependency would run on FastAPI's thread pool: a thread hop per request."""
    decode = next(r for r in inference.router.routes if getattr(r, "path", "") == "/v1/decode")
    pending = list(decode.dependant.dependencies)
    while pending:
        dependency = pending.pop()
        pending.extend(dependency.dependencies)
        call = dependency.call
        assert inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(type(call).__call__), call
