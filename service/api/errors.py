"""Exceptions → HTTP answers: every error is JSON `{"detail": ...}` with the status its type carries.

Codecs, body readers and the broker raise typed `ServiceError`s where they find the problem; this
module is the one place that turns them (and FastAPI's own validation errors, and a client that
goes away mid-upload) into responses, with the headers a client needs to react: Retry-After on
429/503, WWW-Authenticate on 401, `Connection: close` where the connection is not worth keeping.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from service.errors import ClientGone, PayloadTooLarge, QueueFull, RequestTimeout, ServiceError, Unavailable

log = logging.getLogger(__name__)


def error_response(status: int, detail: object, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one shape of every error body."""
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def summarise(errors: Sequence[Any]) -> list[dict[str, object]]:
    """pydantic's error list without the echoed input and context (they can be large or binary)."""
    return [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors
    ]


def _gone(request: Request, what: str) -> JSONResponse:
    """499: the client went away; one log line, no traceback (nobody reads the answer)."""
    log.info("client went away %s: %s %s", what, request.method, request.url.path)
    return error_response(ClientGone.status, f"the client closed the connection {what}")


async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
    if isinstance(exc, ClientGone):
        return _gone(request, "while its jobs ran; they were cancelled")
    headers = {}
    if isinstance(exc, QueueFull):
        headers["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, Unavailable):
        headers["Retry-After"] = "1"
    elif isinstance(exc, RequestTimeout | PayloadTooLarge):
        headers["Connection"] = "close"  # the rest of the body is not worth reading
    elif exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return error_response(exc.status, exc.message, headers)


async def client_disconnect(request: Request, _exc: ClientDisconnect) -> JSONResponse:
    """Starlette's ClientDisconnect: the client went away while its body was being read."""
    return _gone(request, "during the upload")


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own parameter validation (headers, path): 400 for undecodable JSON, else 422."""
    errors = summarise(list(exc.errors()))
    status = 400 if any(e["type"] == "json_invalid" for e in errors) else 422
    return error_response(status, errors)


async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
    """A bug: logged with its traceback; the client learns nothing about the internals.

    Starlette re-raises the exception once this answer is sent and the server then drops the
    connection, so the answer says `Connection: close` rather than leaving a keep-alive client to
    find a reset on its next request.
    """
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal error; see the server log", {"Connection": "close"})


def handler_for(handlers: Mapping[Any, Callable[..., Any]], exc: Exception) -> Callable[..., Any] | None:
    """The handler among an app's exception `handlers` that Starlette's exception middleware would
    give `exc`: an HTTPException's status first, then the nearest of its classes. None for what only
    the outermost error middleware answers (`Exception` and 500 handlers live there)."""
    if isinstance(exc, HTTPException) and exc.status_code != 500 and exc.status_code in handlers:
        return handlers[exc.status_code]
    return next(
        (handlers[cls] for cls in type(exc).__mro__ if cls in handlers and cls is not Exception), None
    )


HANDLERS: dict[type[Exception], Callable[[Request, Any], Coroutine[Any, Any, Response]]] = {
    ServiceError: service_error,
    ClientDisconnect: client_disconnect,
    RequestValidationError: validation_error,
    Exception: unexpected,
}
"""`FastAPI(exception_handlers=HANDLERS)`; `Exception` goes to Starlette's outermost error middleware."""
