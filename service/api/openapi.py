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

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "malformed body (bad JSON, bad base64, not a .npy)",
        401: "API key missing or wrong",
        406: "the Accept header asks for a format that cannot hold the result",
        413: "body over MAX_BODY_BYTES, or image over MAX_IMAGE_PIXELS",
        415: "unsupported Content-Type or image format",
        422: "invalid content (shape, dtype, NaN/Inf, image too small or truncated, unknown class, limits)",
        429: "queue full; retry after the Retry-After header",
        503: "the job queue (Redis) is unreachable",
        504: "deadline passed; the jobs were cancelled",
    }.items()
}
"""The error statuses of the inference routes, each with the shared error body."""


def inference_responses(alternative: str) -> dict[int | str, dict[str, Any]]:
    """`responses` of an inference route: 200 as JSON (the response model) or `alternative`, and
    every error status."""
    return {**ERROR_RESPONSES, 200: {"content": {alternative: {}}}}


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
        "missing/wrong API key, 406 Accept cannot hold the result, 413 body or image too large, 415 "
        "unsupported content type, 422 invalid content, 429 queue full (Retry-After), 503 backend "
        "unavailable, 504 deadline passed. Send `X-Request-Timeout` (seconds) to shorten the "
        f"deadline (at most {settings.request_timeout_s:g} s)."
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
