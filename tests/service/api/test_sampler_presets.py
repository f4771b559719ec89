"""A request picks one of the model's named sampler settings (the release's three, for an imported
release) with `sampler_preset`; its own fields override the preset's."""

from __future__ import annotations

import dataclasses
import json

from fastapi.testclient import TestClient

from model.sampling import RELEASE_SAMPLERS
from service.api.state import AppState
from service.app import build_app
from tests.service.api.conftest import CONFIG, SETTINGS, StandInBroker

PRESETS = {name: cfg.to_dict() for name, cfg in RELEASE_SAMPLERS.items()}


def _client() -> tuple[TestClient, AppState]:
    state = AppState.for_model(SETTINGS, dataclasses.replace(CONFIG, sampler_presets=PRESETS))
    state.broker = StandInBroker()  # type: ignore[assignment]
    return TestClient(build_app(state)), state


def test_a_named_preset_with_an_override_reaches_the_worker() -> None:
    http, state = _client()
    response = http.post(
        "/v1/generate", json={"class_label": 1, "seed": 0, "sampler_preset": "release-sde", "steps": 5}
    )
    assert response.status_code == 200, response.text
    expected = {**PRESETS["release-sde"], "steps": 5}
    assert response.json()["sampler"] == expected
    ((_, payloads, _),) = state.broker.submitted
    assert json.loads(payloads[0]["sampler"]) == expected


def test_an_unknown_preset_is_refused_with_the_choices() -> None:
    http, state = _client()
    response = http.post("/v1/generate", json={"class_label": 1, "sampler_preset": "release-9000ep"})
    assert response.status_code == 422
    assert "release-80ep" in response.text and "release-9000ep" in response.text
    assert state.broker.submitted == []


def test_without_a_preset_the_defaults_keep_their_form(http: TestClient) -> None:
    body = http.post("/v1/generate", json={"class_label": 1, "seed": 0}).json()
    assert body["sampler"] == CONFIG.sampler  # no grid key for the default grid
