"""The request deadline from REQUEST_TIMEOUT_S and X-Request-Timeout, and the cost limit."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.api.jobs import check_cost, request_deadline
from service.api.state import AppState
from service.broker_protocol import now_ms
from service.errors import BadInput


def test_deadline_defaults_to_the_setting_and_a_header_can_only_shorten_it(state: AppState) -> None:
    limit_ms = state.settings.request_timeout_s * 1000
    before = now_ms()
    assert before + limit_ms <= request_deadline(state, None) <= now_ms() + limit_ms
    assert request_deadline(state, 0.5) <= now_ms() + 500
    assert request_deadline(state, 10 * state.settings.request_timeout_s) <= now_ms() + limit_ms


@pytest.mark.parametrize("header", ["soon", "0", "-1", "inf", "nan", "1e400", ""])
def test_bad_timeout_header_is_422_naming_it(http: TestClient, header: str) -> None:
    response = http.post("/v1/generate", json={"class_label": 0}, headers={"X-Request-Timeout": header})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["header", "x-request-timeout"]


def test_the_timeout_header_is_a_number_in_the_schema(http: TestClient) -> None:
    operation = http.get("/openapi.json").json()["paths"]["/v1/generate"]["post"]
    (header,) = [p for p in operation["parameters"] if p["name"] == "x-request-timeout"]
    schema = header["schema"]["anyOf"][0]
    assert schema["type"] == "number" and schema["exclusiveMinimum"] == 0


def test_a_request_over_the_cost_limit_is_422_naming_it(state: AppState) -> None:
    check_cost(state, "generate", state.settings.max_request_cost, "all of it")
    with pytest.raises(BadInput, match="MAX_REQUEST_COST") as caught:
        check_cost(state, "generate", state.settings.max_request_cost + 1, "one too many")
    assert caught.value.status == 422 and "one too many" in caught.value.message
