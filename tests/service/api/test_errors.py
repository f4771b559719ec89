"""Exception → answer mapping for what the routers cannot produce on demand: a bug, a vanished client."""

from __future__ import annotations

import asyncio
import logging

import pytest
from fastapi.testclient import TestClient
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
