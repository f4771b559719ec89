"""The request deadline from REQUEST_TIMEOUT_S and X-Request-Timeout, the cost limit, and the
inference routes' direct call of their one dependency."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import pytest
from fastapi import APIRouter, Depends, Request
from fastapi.testclient import TestClient

from service.api import inference
from service.api.jobs import TIMEOUT_HEADER, Admitted, InferenceRoute, admitted, check_cost, request_deadline
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


def test_inference_routes_call_their_admission_directly(http: TestClient) -> None:
    """Each inference route is an InferenceRoute, and still FastAPI's: 405 for a wrong method, its
    API-key security scheme and timeout header in the OpenAPI document."""
    routes = {r.path: r for r in inference.router.routes}
    assert {p for p, r in routes.items() if isinstance(r, InferenceRoute)} == {
        "/v1/encode",
        "/v1/decode",
        "/v1/generate",
    }
    assert http.get("/v1/decode").status_code == 405
    operation = http.get("/openapi.json").json()["paths"]["/v1/encode"]["post"]
    assert operation["security"] and any(p["name"] == TIMEOUT_HEADER for p in operation["parameters"])


async def _other_dependency() -> int:
    return 1


async def _well_formed(request: Request, call: Annotated[Admitted, Depends(admitted("decode"))]) -> None: ...


async def _extra_parameter(
    request: Request, call: Annotated[Admitted, Depends(admitted("decode"))], n: int = 0
) -> None: ...


async def _other_dependency_only(
    request: Request, call: Annotated[int, Depends(_other_dependency)]
) -> None: ...


async def _no_request(call: Annotated[Admitted, Depends(admitted("decode"))]) -> None: ...


def _not_async(request: Request, call: Annotated[Admitted, Depends(admitted("decode"))]) -> None: ...


@pytest.mark.parametrize("endpoint", [_extra_parameter, _other_dependency_only, _no_request, _not_async])
def test_an_inference_route_refuses_an_endpoint_it_would_call_wrongly(
    endpoint: Callable[..., object],
) -> None:
    router = APIRouter(route_class=InferenceRoute)
    router.post("/ok")(_well_formed)
    with pytest.raises(TypeError, match="/bad: an InferenceRoute endpoint is `async def`"):
        router.post("/bad")(endpoint)
