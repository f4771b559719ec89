"""Exception → answer mapping: a bug, a vanished client, and the handler each error of an inference
route (dispatched by the request edge, not the router) is given."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from service.api import errors
from service.api.state import AppState
from service.app import build_app


def request(path: str = "/v1/decode") -> Request:
    return Request({"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""})


def test_a_bug_is_a_500_that_closes_the_connection(state: AppState, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*_args: object) -> None:
        raise RuntimeError("a bug with <object at 0x1234>")

    monkeypatch.setattr(state.broker, "admit", broken)
    http = TestClient(build_app(state), raise_server_exceptions=False)
    response = http.post("/v1/generate", json={"class_label": 0})
    assert response.status_code == 500 and response.headers["Connection"] == "close"
    assert response.json() == {"detail": "internal error; see the server log"}


def test_a_client_gone_mid_upload_is_499_in_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        response = asyncio.run(errors.client_disconnect(request(), ClientDisconnect()))
    assert response.status_code == 499
    (record,) = [r for r in caplog.records if r.name == errors.log.name]
    assert "during the upload" in record.getMessage() and record.exc_info is None


class Teapot(Exception):
    """An error type the app learns to answer after it is built."""


def test_the_edge_dispatches_an_inference_route_whose_errors_go_to_the_handlers_the_app_has_then(
    state: AppState, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def brewing(*_args: object) -> None:
        raise Teapot("short and stout")

    async def teapot(request: Request, exc: Teapot) -> JSONResponse:
        # Starlette's router marks the scopes it routes; the request edge hands these on itself.
        return JSONResponse({"detail": str(exc), "routed": "router" in request.scope}, status_code=418)

    monkeypatch.setattr(state.broker, "admit", brewing)
    app = build_app(state)
    http = TestClient(app, raise_server_exceptions=False)
    assert http.post("/v1/generate", json={"class_label": 0}).status_code == 500
    app.add_exception_handler(Teapot, teapot)
    response = http.post("/v1/generate", json={"class_label": 0})
    assert response.status_code == 418 and response.json() == {"detail": "short and stout", "routed": False}
    assert "server-timing" in response.headers  # still answered through the request edge


def test_handler_for_picks_as_starlette_does_and_leaves_bugs_to_the_outer_layer() -> None:
    def handler(name: str) -> Callable[..., str]:
        return lambda *_args: name

    handlers = {
        HTTPException: handler("http"),
        404: handler("404"),
        500: handler("500"),
        LookupError: handler("lookup"),
        Exception: handler("any"),
    }
    picked = {
        name: found() if (found := errors.handler_for(handlers, exc)) is not None else None
        for name, exc in {
            "404": HTTPException(404),
            "409": HTTPException(409),
            "500": HTTPException(500),
            "key": KeyError("k"),
            "bug": RuntimeError("x"),
        }.items()
    }
    assert picked == {"404": "404", "409": "http", "500": "http", "key": "lookup", "bug": None}
