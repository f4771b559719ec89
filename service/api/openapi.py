"""The OpenAPI document: shared pieces the routes cite, and the per-app values it states.

Routes are declared once, at import, beside their handlers; but the document must state the real
limits and shapes of the model this app serves (MAX_NUM_IMAGES, the latent shape, the request
models whose bounds come from the settings). So a route's description may name `$max_num_images`
or `$latent_dims`, and a request-body schema may be `app_model("generate")`; `install` fills both
from the app's state when the document is first built. Nothing else is rewritten.
"""

from __future__ import annotations

import copy
from string import Template
from typing import Any

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.openapi.models import OpenAPI

from service.api.state import AppState
from service.schemas import ErrorResponse, Schemas


def _header(description: str, kind: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": kind}}


RETRY_AFTER = {"Retry-After": _header("seconds to wait before retrying", "integer")}
TIMING_HEADERS = {
    "X-Queue-Ms": _header("the slowest job's wait in the queue, ms", "number"),
    "X-Compute-Ms": _header("the slowest job's batch compute time, ms", "number"),
    "Server-Timing": _header(
        "the request's time by stage, ms (parse, enqueue, queue, compute, transit, wait, encode, app)",
        "string",
    ),
}
SEED_HEADER = {"X-Seed": _header("the seed of the image (generate answered as image/png)", "integer")}

ERROR_TEXT: dict[int, str] = {
    400: "malformed body (bad JSON, JSON nested too deep or with too long a number, bad base64, not a .npy)",
    401: "API key missing or wrong",
    404: "no such model",
    406: "the Accept header allows no format the answer comes in",
    408: "the request body stalled for BODY_TIMEOUT_S (or its headers took HEADER_TIMEOUT_S); the "
    "connection is closed",
    413: "body over MAX_BODY_BYTES, or image over MAX_IMAGE_PIXELS or MAX_IMAGE_SIDE",
    415: "unsupported Content-Type or image format",
    422: "invalid content (shape, dtype, NaN/Inf, latent off the sphere, image too small, truncated or too "
    "elongated, unknown class, wrong JSON type, limits, cost over MAX_REQUEST_COST, X-Request-Timeout)",
    429: "queue (QUEUE_MAX_LEN, QUEUE_MAX_COST) or image decoding full; retry after the Retry-After header",
    500: "internal error (a bug, logged by the server; or a job no worker could run)",
    503: "the job queue (Redis) is unreachable",
    504: "deadline passed; the jobs were cancelled",
}
"""Every error status the service answers, and when (499, a client that went away, is only counted)."""

_ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": _header("Bearer", "string")},
    429: RETRY_AFTER,
    503: RETRY_AFTER,
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses` entries for these error statuses, with the shared error body and their headers."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        out[code] = {"model": ErrorResponse, "description": ERROR_TEXT[code]}
        if code in _ERROR_HEADERS:
            out[code]["headers"] = _ERROR_HEADERS[code]
    return out


ERROR_RESPONSES = error_responses(400, 401, 406, 408, 413, 415, 422, 429, 500, 503, 504)
"""The error statuses of the inference routes, each with the shared error body."""


def inference_responses(alternative: str) -> dict[int | str, dict[str, Any]]:
    """`responses` of an inference route: 200 as JSON (the response model) or `alternative`, with
    the timing headers (and X-Seed for a PNG), and every error status."""
    headers = {**TIMING_HEADERS, **(SEED_HEADER if alternative == "image/png" else {})}
    return {**ERROR_RESPONSES, 200: {"content": {alternative: {}}, "headers": headers}}


BINARY: dict[str, str] = {"type": "string", "format": "binary"}
"""Schema of a raw binary body (an image file, a .npy file)."""

_APP_MODEL = "x-pae-app-model"


def app_model(name: str) -> dict[str, str]:
    """Placeholder for the JSON schema of this app's request model `AppState.schemas.<name>`."""
    return {_APP_MODEL: name}


def request_body(content: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`openapi_extra` of a route that reads its body itself: a required body in these media types."""
    return {"requestBody": {"required": True, "content": content}}


def service_description(state: AppState) -> str:
    """The document's top-level description: the served model, preprocessing, errors, deadline."""
    config, settings = state.config, state.settings
    size = config.image_size
    return (
        f"Serving **{config.name}** version {config.version}: {size}×{size} RGB images ↔ "
        f"{'×'.join(map(str, config.latent_shape))} float32 latents. Uploaded images are EXIF-rotated, "
        "alpha-composited over black, converted to RGB, resized (bicubic, antialiased) so the short side "
        f'is {size} and centre-cropped. Errors are JSON `{{"detail": ...}}`: 400 malformed body, 401 '
        "missing/wrong API key, 404 unknown model, 406 Accept allows no format of the answer, 408 request "
        "sent too slowly, 413 body or image too large, 415 unsupported content type, 422 invalid content "
        f"or a cost over {settings.max_request_cost} (MAX_REQUEST_COST; one unit is one network "
        "evaluation of one image), 429 queue full (Retry-After), 431 request line and headers over "
        "64 KiB, 500 internal error, 503 backend unavailable, 504 deadline passed. Send "
        "`X-Request-Timeout` (seconds) to shorten the deadline (at most "
        f"{settings.request_timeout_s:g} s)."
    )


def _values(state: AppState) -> dict[str, str]:
    return {
        "max_num_images": str(state.settings.max_num_images),
        "latent_dims": ", ".join(map(str, state.config.latent_shape)),
    }


def _with_models(node: Any, schemas: Schemas) -> Any:
    if isinstance(node, dict):
        if set(node) == {_APP_MODEL}:
            return getattr(schemas, node[_APP_MODEL]).model_json_schema()
        return {key: _with_models(value, schemas) for key, value in node.items()}
    if isinstance(node, list):
        return [_with_models(item, schemas) for item in node]
    return node


def render(document: dict[str, Any], state: AppState) -> dict[str, Any]:
    """A copy of FastAPI's document with this app's values in the route descriptions and bodies."""
    values = _values(state)
    rendered = copy.deepcopy(document)
    for operations in rendered.get("paths", {}).values():
        for method in list(operations):
            operation = _with_models(operations[method], state.schemas)
            if "description" in operation:
                operation["description"] = Template(operation["description"]).substitute(values)
            operations[method] = operation
    # Validated and serialised as FastAPI does its own document (which drops null-valued keywords).
    return jsonable_encoder(OpenAPI(**rendered), by_alias=True, exclude_none=True)


def install(app: FastAPI, state: AppState) -> None:
    """Serve `render`'s document at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = render(FastAPI.openapi(app), state)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
