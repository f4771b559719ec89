"""Exceptions → HTTP answers: every error is JSON `{"detail": ...}` with the status its type carries.

Codecs, body readers and the broker raise typed `ServiceError`s where they find the problem; this
module is the one place that turns them (and FastAPI's own validation errors) into responses, with
the headers a client needs to react: Retry-After on 429/503, WWW-Authenticate on 401.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from service.errors import QueueFull, ServiceError, Unavailable

log = logging.getLogger(__name__)


def error_response(status: int, detail: object, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one shape of every error body."""
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def summarise(errors: Sequence[Any]) -> list[dict[str, object]]:
    """pydantic's error list without the echoed input and context (they can be large or binary)."""
    return [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors
    ]


async def service_error(_request: Request, exc: ServiceError) -> JSONResponse:
    headers = {}
    if isinstance(exc, QueueFull):
        headers["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, Unavailable):
        headers["Retry-After"] = "1"
    elif exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return error_response(exc.status, exc.message, headers)


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own parameter validation (headers, path): 400 for undecodable JSON, else 422."""
    errors = summarise(list(exc.errors()))
    status = 400 if any(e["type"] == "json_invalid" for e in errors) else 422
    return error_response(status, errors)


async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
    """A bug: logged with its traceback; the client learns nothing about the internals."""
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal error; see the server log")


HANDLERS: dict[type[Exception], Callable[[Request, Any], Coroutine[Any, Any, Response]]] = {
    ServiceError: service_error,
    RequestValidationError: validation_error,
    Exception: unexpected,
}
"""`FastAPI(exception_handlers=HANDLERS)`; `Exception` goes to Starlette's outermost error middleware."""
