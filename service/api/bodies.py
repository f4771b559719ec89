"""Request bodies → validated inputs, one reader per endpoint.

Handlers read bodies here rather than through FastAPI's body parameters so that each accepted
Content-Type is parsed by code that checks it, and every malformed body is a 4xx whose message
says what was wrong: 400 for undecodable bytes, 415 for a format the endpoint does not take,
422 for content that breaks a rule or a limit. Every parser is bounded: JSON by nesting depth and
number length (`service.codecs.parse_json`), multipart by part count, latents by dimensions and
elements, images by their header (`service.codecs.open_image`).
"""

from __future__ import annotations

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ValidationError

from service import codecs
from service.api.errors import summarise
from service.api.negotiation import IMAGE_TYPES, JSON, MULTIPART, NPY, media_type
from service.api.state import AppState
from service.errors import BadInput, UnsupportedMedia

IMAGE_FIELD = "file"
"""The multipart field that carries images (one part per image), as the OpenAPI document says."""


def _media_type(request: Request) -> str:
    return media_type(request.headers.get("content-type", ""))


def parse_model(model: type[BaseModel], body: bytes) -> BaseModel:
    """Validate a JSON body against a request model: 400 when it is not JSON, 422 naming each field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = summarise(exc.errors())
        invalid = [e for e in errors if e["type"] == "json_invalid"]
        if invalid:
            raise BadInput(
                codecs.json_error(str(invalid[0]["msg"]).removeprefix("Invalid JSON: ")), 400
            ) from None
        raise BadInput(
            "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors)
        ) from None


def _field(name: str) -> str:
    return (
        name if len(name) <= 40 and name.isprintable() else name[:40].encode("unicode_escape").decode() + "…"
    )


async def read_images(request: Request, state: AppState) -> list[bytes]:
    """The encoded images of an encode request: multipart `file` parts, JSON base64, or one raw image."""
    limit = state.settings.max_num_images
    media = _media_type(request)
    if media == MULTIPART:
        form = await request.form(max_files=limit, max_fields=limit)
        uploads = []
        for name, value in form.multi_items():
            if name != IMAGE_FIELD or not hasattr(value, "read"):
                kind = "file" if hasattr(value, "read") else "text"
                raise BadInput(
                    f"multipart {kind} field '{_field(name)}' is not accepted; send each image as a file "
                    f"part named '{IMAGE_FIELD}'"
                )
            uploads.append(value)
        if not uploads:
            raise BadInput(
                f"multipart body has no file part; send the image(s) as file field(s) named '{IMAGE_FIELD}'"
            )
        return [await upload.read() for upload in uploads]
    body = await request.body()
    if media == JSON:
        payload = parse_model(state.schemas.encode_json, body)
        return [codecs.decode_base64(text, f"images[{i}]") for i, text in enumerate(payload.images)]
    if media in IMAGE_TYPES:
        return [body]
    raise UnsupportedMedia(
        f"Content-Type {media or '(none)'} is not accepted; send multipart/form-data, application/json "
        f"or one of {', '.join(IMAGE_TYPES)}"
    )


async def read_latents(request: Request, state: AppState) -> np.ndarray:
    """The latents of a decode request (JSON or .npy) as a checked B×d×h×w float32 batch."""
    shape, limit = state.config.latent_shape, state.settings.max_num_images
    media = _media_type(request)
    if media not in (JSON, NPY):
        raise UnsupportedMedia(
            f"Content-Type {media or '(none)'} is not accepted; send application/json or {NPY}"
        )
    body = await request.body()
    if media == JSON:
        latents = codecs.latents_from_json(codecs.parse_json(body), shape, limit)
    else:
        latents = codecs.latents_from_npy(body, shape, limit)
    codecs.check_on_sphere(latents)
    return latents


async def read_generate(request: Request, state: AppState) -> BaseModel:
    """A generate request validated against this app's model (limits and classes of the served model)."""
    media = _media_type(request)
    if media not in (JSON, ""):
        raise UnsupportedMedia(f"Content-Type {media} is not accepted; send application/json")
    return parse_model(state.schemas.generate, await request.body())
