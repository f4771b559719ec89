"""POST /v1/encode, /v1/decode, /v1/generate: input → one queued job per image → the answer.

An API replica runs the model only in its direct lane (`service.direct`, off unless DIRECT_SLOTS is
set). Each handler refuses what it can before reading the body (a
full queue is a 429, an Accept it cannot satisfy a 406), then checks its input (bad input is a 4xx
naming the problem, never a 500) and its cost (`service.cost`, at most MAX_REQUEST_COST), turns
every image or latent into one job, waits for the replies within the request's deadline
(`service.api.jobs`) and encodes the answer in the format Accept picks.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
import pydantic_core
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from export.repository import ModelConfig
from model.sampling import SamplerConfig
from service import codecs, cost, timing
from service.api import bodies
from service.api.jobs import (
    TIMEOUT_PARAMETER,
    Admitted,
    InferenceRoute,
    admitted,
    check_cost,
    run_jobs,
    timing_headers,
)
from service.api.middleware import endpoint_label
from service.api.negotiation import IMAGE_TYPES, JSON, MULTIPART, NPY, PNG, choose
from service.api.openapi import BINARY, app_model, inference_responses, request_body
from service.api.state import AppState
from service.broker_protocol import Reply
from service.errors import BadInput, NotAcceptable
from service.schemas import EncodeResponse, ImageOut, ImagesResponse, LatentPayload

router = APIRouter(tags=["inference"], route_class=InferenceRoute)

SAMPLER_FIELDS: tuple[str, ...] = ("sampler", "steps", "shift", "cfg_scale", "cfg_interval")

EncodeCall = Annotated[Admitted, Depends(admitted("encode"))]
DecodeCall = Annotated[Admitted, Depends(admitted("decode"))]
GenerateCall = Annotated[Admitted, Depends(admitted("generate"))]
"""Handler parameters: the API key, deadline and admission checks of each task's route."""


def inference_request(content: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`openapi_extra` of an inference route: its body's media types and the X-Request-Timeout
    header, which `admitted` reads itself."""
    return {**request_body(content), "parameters": [TIMEOUT_PARAMETER]}


@router.post(
    "/v1/encode",
    summary="Images → latents",
    description=(
        "Upload 1 to $max_num_images PNG/JPEG/WebP images (multipart field `file`, JSON "
        '`{"images": [base64, ...]}`, or one raw image body). Answers the latents as JSON '
        "(shape [B, $latent_dims], float32, base64) or, with `Accept: application/x-npy`, as a .npy file."
    ),
    response_model=EncodeResponse,
    responses=inference_responses(NPY),
    openapi_extra=inference_request(
        {
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "array", "items": BINARY}},
                    "required": ["file"],
                }
            },
            JSON: {"schema": app_model("encode_json")},
            **{media: {"schema": BINARY} for media in IMAGE_TYPES},
        }
    ),
)
@endpoint_label("encode")
async def encode(request: Request, call: EncodeCall) -> Response:
    state, due = call.state, call.due
    settings = state.settings
    answer = choose(request.headers.get("accept"), (JSON, NPY))
    limits = codecs.ImageLimits(settings.max_image_pixels, settings.max_image_side, settings.max_image_aspect)
    headers_only = [codecs.open_image(blob, limits) for blob in await bodies.read_images(request, state)]
    pixels = sum(img.width * img.height for img in headers_only)
    check_cost(
        state,
        "encode",
        len(headers_only) * cost.ENCODE_JOB + cost.decoding(pixels),
        f"{len(headers_only)} image(s) + {pixels} pixels to decode at 1 per started megapixel",
    )
    images = await state.images.finish(headers_only, state.config.image_size, due)
    payloads = [{"data": img.tobytes(), "cost": cost.ENCODE_JOB} for img in images]
    timing.mark("parse")
    replies = await run_jobs(request, state, "encode", payloads, due)
    latents = np.stack([np.frombuffer(r.data, dtype="<f4").reshape(r.shape) for r in replies])
    headers = timing_headers(replies)
    if answer == NPY:
        return Response(codecs.latents_to_npy(latents), media_type=NPY, headers=headers)
    body = {**codecs.latents_to_json(latents), "model": state.config.name, "version": state.config.version}
    return Response(pydantic_core.to_json(body), media_type=JSON, headers=headers)


@router.post(
    "/v1/decode",
    summary="Latents → images",
    description=(
        "Send latents as JSON `{shape, dtype: float32, data: base64}` (what /v1/encode answers) or as a "
        ".npy body (`Content-Type: application/x-npy`), shape [$latent_dims] "
        "or [B, ...] with B ≤ $max_num_images, all values finite. Answers JSON with base64 PNGs, "
        "or one `image/png` with `Accept: image/png`."
    ),
    response_model=ImagesResponse,
    responses=inference_responses(PNG),
    openapi_extra=inference_request(
        {JSON: {"schema": LatentPayload.model_json_schema()}, NPY: {"schema": BINARY}}
    ),
)
@endpoint_label("decode")
async def decode(request: Request, call: DecodeCall) -> Response:
    state, due = call.state, call.due
    answer_format(request, 1)
    latents = await bodies.read_latents(request, state)
    answer = answer_format(request, len(latents))
    check_cost(state, "decode", len(latents) * cost.DECODE_JOB, f"{len(latents)} latent(s)")
    payloads = [{"data": z.tobytes(), "cost": cost.DECODE_JOB} for z in latents]
    timing.mark("parse")
    replies = await run_jobs(request, state, "decode", payloads, due)
    images = [ImageOut(png=p) for p in await pngs(replies, state.config.image_size)]
    return png_response(answer, state, images, replies)


@router.post(
    "/v1/generate",
    summary="Class label → generated images",
    description=(
        "Generate 1 to $max_num_images images of one class. Image i uses seed + i, and the "
        "same seed and settings give byte-identical PNGs however requests are batched. Answers JSON "
        "with base64 PNGs and their seeds, or one `image/png` (seed in `X-Seed`) with `Accept: image/png`."
    ),
    response_model=ImagesResponse,
    responses=inference_responses(PNG),
    openapi_extra=inference_request({JSON: {"schema": app_model("generate")}}),
)
@endpoint_label("generate")
async def generate(request: Request, call: GenerateCall) -> Response:
    state, due = call.state, call.due
    config = state.config
    answer_format(request, 1)
    body = await bodies.read_generate(request, state)
    answer = answer_format(request, body.num_images)
    label = resolve_class(config, body.class_label)
    sampler = sampler_settings(state, body)
    per_image = cost.generate_job(SamplerConfig.from_dict(sampler))
    check_cost(
        state,
        "generate",
        body.num_images * per_image,
        f"{body.num_images} image(s) × {per_image} network evaluations, guided ones counted twice",
    )
    # One canonical string per settings: workers batch together only jobs whose strings match.
    key = json.dumps(sampler, sort_keys=True, separators=(",", ":"))
    first = body.seed if body.seed is not None else secrets.randbelow(2**31)
    seeds = [first + i for i in range(body.num_images)]
    payloads = [{"label": str(label), "seed": str(s), "sampler": key, "cost": per_image} for s in seeds]
    timing.mark("parse")
    replies = await run_jobs(request, state, "generate", payloads, due)
    images = [
        ImageOut(png=p, seed=s, class_label=label, class_name=config.class_names[label])
        for p, s in zip(await pngs(replies, config.image_size), seeds, strict=True)
    ]
    return png_response(answer, state, images, replies, {"sampler": sampler})


def answer_format(request: Request, count: int) -> str:
    """JSON or PNG as Accept asks (406 when it allows neither); PNG holds one image, so an answer
    of several is JSON, or a 406 when the client accepts PNG alone."""
    accept = request.headers.get("accept")
    if count == 1:
        return choose(accept, (JSON, PNG))
    try:
        return choose(accept, (JSON,))
    except NotAcceptable:
        raise NotAcceptable(
            f"Accept: image/png holds one image, this request makes {count}; accept application/json"
        ) from None


def resolve_class(config: ModelConfig, value: int | str) -> int:
    """A class index or an exact class name (case and spelling as /v1/models lists them) → the
    index; 422 when there is none."""
    if isinstance(value, int):
        if not 0 <= value < config.num_classes:
            raise BadInput(f"class_label {value} is out of range; classes are 0..{config.num_classes - 1}")
        return value
    if value not in config.class_names:
        shown = value if len(value) <= 60 else value[:59] + "…"
        raise BadInput(f"unknown class '{shown}'; class names match exactly: {', '.join(config.class_names)}")
    return config.class_names.index(value)


def sampler_settings(state: AppState, request: BaseModel) -> dict[str, object]:
    """The effective sampler settings: the request's fields over the named `sampler_preset` (or the
    model's defaults), checked by `SamplerConfig` and against MAX_STEPS, as the plain dict the
    workers and the answer carry."""
    asked = {k: getattr(request, k) for k in SAMPLER_FIELDS if getattr(request, k) is not None}
    base = state.sampler_defaults
    preset = getattr(request, "sampler_preset", None)
    if preset is not None:
        if preset not in state.config.sampler_presets:
            raise BadInput(
                f"unknown sampler_preset {preset!r}; this model has {sorted(state.config.sampler_presets)}"
            )
        base = state.config.sampler_presets[preset]
    try:
        cfg = SamplerConfig.from_dict({**base, **asked})
    except (TypeError, ValueError) as exc:
        raise BadInput(f"invalid sampler settings: {exc}") from None
    max_steps = state.settings.max_steps
    if cfg.steps > max_steps:
        raise BadInput(f"steps {cfg.steps} exceeds the limit of {max_steps} (MAX_STEPS)")
    settings = cfg.to_dict()
    # The release's time grid (paper §3.6) is named only when used, so other models' answers keep their form.
    if cfg.grid == "updates":
        del settings["grid"]
    return settings


async def pngs(replies: Sequence[Reply], size: int) -> list[str]:
    """The replies' uint8 images as base64 PNGs; large batches are encoded off the event loop."""

    def encode_all() -> list[str]:
        return [
            base64.b64encode(codecs.encode_png(np.frombuffer(r.data, np.uint8).reshape(r.shape))).decode()
            for r in replies
        ]

    if size * size * len(replies) <= codecs.INLINE_PIXELS:
        return encode_all()
    return await run_in_threadpool(encode_all)


def png_response(
    answer: str,
    state: AppState,
    images: list[ImageOut],
    replies: Sequence[Reply],
    extra: dict[str, object] | None = None,
) -> Response:
    """JSON with every image, or the one PNG itself when `answer` (from `answer_format`) is PNG."""
    headers = timing_headers(replies)
    if answer == PNG:
        if images[0].seed is not None:
            headers["X-Seed"] = str(images[0].seed)
        return Response(base64.b64decode(images[0].png), media_type=PNG, headers=headers)
    body = ImagesResponse(
        images=images, model=state.config.name, version=state.config.version, **(extra or {})
    )
    return Response(body.model_dump_json(exclude_none=True), media_type=JSON, headers=headers)
