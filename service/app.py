"""The HTTP API: validate, enqueue on Redis, await the worker's reply, encode the answer.

An API replica never runs the model. It checks every input (bad input is a 4xx naming the
problem, never a 500), turns each image or latent into one queued job, and waits for the replies
through its single reply dispatcher, within the request's deadline. A full queue answers 429 with
Retry-After at once, a passed deadline 504 (the jobs are cancelled, so no worker runs them), a
client that goes away cancels its jobs, and an unreachable Redis answers 503.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable
from contextlib import asynccontextmanager

import numpy as np
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from export.repository import ModelConfig, resolve_version_dir
from model.flow import SamplerConfig
from service import codecs, metrics
from service.broker import BrokerClient, Keys, Reply, make_pool, now_ms
from service.errors import (
    BadInput,
    NotAcceptable,
    PayloadTooLarge,
    QueueFull,
    ServiceError,
    Unavailable,
    UnsupportedMedia,
)
from service.schemas import (
    EncodeResponse,
    ErrorResponse,
    ImageOut,
    ImagesResponse,
    LatentPayload,
    ModelEntry,
    ModelsResponse,
    Readiness,
    WorkerInfo,
    build_schemas,
)
from service.settings import TASKS, Settings, SettingsError
from service.worker import HEARTBEAT_TTL_MS

log = logging.getLogger(__name__)

PNG = "image/png"
JSON = "application/json"
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
STATUS_CLIENT_CLOSED = 499

_ENDPOINTS = {
    "/v1/encode": "encode",
    "/v1/decode": "decode",
    "/v1/generate": "generate",
    "/v1/models": "models",
    "/healthz": "healthz",
    "/v2/health/live": "healthz",
    "/readyz": "readyz",
    "/v2/health/ready": "readyz",
}


class ClientGone(ServiceError):
    """The client disconnected while its jobs were queued; they were cancelled."""

    status = STATUS_CLIENT_CLOSED


def _endpoint_label(path: str) -> str | None:
    if path in _ENDPOINTS:
        return _ENDPOINTS[path]
    if path.startswith("/v2/models/") and path.endswith("/ready"):
        return "readyz"
    return None


class RequestMetrics:
    """ASGI middleware: request count, latency and in-flight gauge per endpoint and status."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        endpoint = _endpoint_label(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        start = time.perf_counter()
        metrics.INFLIGHT.labels(endpoint).inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics.INFLIGHT.labels(endpoint).dec()
            code = str(status["code"])
            metrics.REQUESTS.labels(endpoint, code).inc()
            metrics.REQUEST_DURATION.labels(endpoint, code).observe(time.perf_counter() - start)


class BodyLimit:
    """ASGI middleware: refuse bodies over MAX_BODY_BYTES by header, or while streaming (chunked)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit:
                    body = json.dumps(
                        {
                            "detail": f"body of {declared} bytes exceeds the limit of {limit} bytes (MAX_BODY_BYTES)"
                        }
                    ).encode()
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 413,
                            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
                        }
                    )
                    await send({"type": "http.response.body", "body": body})
                    return
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes (MAX_BODY_BYTES)")
            return message

        await self.app(scope, limited_receive, send)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _accepts(request: Request, media: str) -> bool:
    """Whether `media` is the client's first explicit preference (wildcards keep the JSON default)."""
    accept = request.headers.get("accept", "")
    for part in accept.split(","):
        kind = part.split(";")[0].strip().lower()
        if kind and kind not in ("*/*", "application/*", "image/*"):
            return kind == media
    return False


def _error(status: int, detail: object, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _summarise(errors: list) -> list[dict[str, object]]:
    return [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors
    ]


async def _watch_disconnect(request: Request) -> None:
    """Return when the client disconnects (the body is already read, so receive() waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _until_done_or_gone(request: Request, work: Awaitable[list[Reply]]) -> list[Reply]:
    """Await the jobs, but give up (cancelling them) as soon as the client disconnects."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_watch_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone("the client closed the connection; its jobs were cancelled")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for the model version the settings name (its config.json must exist)."""
    settings = settings or Settings.from_env()
    if settings.redis_url is None:
        raise SettingsError("REDIS_URL is not set; pae-serve starts an embedded Redis when it is unset")
    version_dir = resolve_version_dir(settings.model_repository, settings.model_name, settings.model_version)
    config = ModelConfig.load(version_dir)
    schemas = build_schemas(settings, config)
    keys = Keys.for_model(config.name, config.version)
    size = config.image_size
    provider = settings.ort_provider if settings.runtime == "onnxruntime" else settings.runtime

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pool = make_pool(settings.redis_url, settings.redis_pool_size, settings.redis_pool_timeout_s)
        redis = Redis(connection_pool=pool)
        broker = BrokerClient(redis, keys, settings.queue_max_len)
        await broker.start(TASKS)
        app.state.redis, app.state.broker = redis, broker
        metrics.MODEL_INFO.labels(config.name, config.version, settings.runtime, provider).set(1)
        try:
            yield
        finally:
            await broker.close()
            await redis.aclose()
            await pool.disconnect()

    app = FastAPI(
        title="PAE service",
        version="1",
        summary="Encode images to PAE latents, decode latents, and generate class-conditional images.",
        description=(
            f"Serving **{config.name}** version {config.version}: {size}×{size} RGB images ↔ "
            f"{'×'.join(map(str, config.latent_shape))} float32 latents. Uploaded images are EXIF-rotated, "
            "alpha-composited over black, converted to RGB, resized (bicubic, antialiased) so the short side "
            f'is {size} and centre-cropped. Errors are JSON `{{"detail": ...}}`: 400 malformed body, 401 '
            "missing/wrong API key, 406 Accept cannot hold the result, 413 body or image too large, 415 "
            "unsupported content type, 422 invalid content, 429 queue full (Retry-After), 503 backend "
            "unavailable, 504 deadline passed. Send `X-Request-Timeout` (seconds) to shorten the "
            f"deadline (at most {settings.request_timeout_s:g} s)."
        ),
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics)
    bearer = HTTPBearer(auto_error=False, description="API key (when the server sets API_KEY)")

    async def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.api_key is None:
            return
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise ServiceError("missing API key: send 'Authorization: Bearer <key>'", status=401)
        if not hmac.compare_digest(credentials.credentials.encode(), settings.api_key.encode()):
            raise ServiceError("invalid API key", status=401)

    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        headers = {}
        if isinstance(exc, QueueFull):
            headers["Retry-After"] = str(exc.retry_after_s)
        elif isinstance(exc, Unavailable):
            headers["Retry-After"] = "1"
        elif exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return _error(exc.status, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _summarise(list(exc.errors()))
        status = 400 if any(e["type"] == "json_invalid" for e in errors) else 422
        return _error(status, errors)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _error(500, "internal error; see the server log")

    def deadline(timeout_header: str | None) -> int:
        timeout = settings.request_timeout_s
        if timeout_header is not None:
            try:
                asked = float(timeout_header)
            except ValueError:
                raise BadInput(
                    f"X-Request-Timeout must be a number of seconds, got {timeout_header!r}"
                ) from None
            if not 0 < asked < float("inf"):
                raise BadInput(f"X-Request-Timeout must be > 0 seconds, got {timeout_header!r}")
            timeout = min(timeout, asked)
        return now_ms() + int(timeout * 1000)

    async def run_jobs(request: Request, task: str, payloads: list[dict], deadline_ms: int) -> list[Reply]:
        broker: BrokerClient = request.app.state.broker
        try:
            return await _until_done_or_gone(request, broker.submit(task, payloads, deadline_ms))
        except QueueFull:
            metrics.REJECTED.labels(task, "queue_full").inc()
            raise

    def timing_headers(replies: list[Reply]) -> dict[str, str]:
        return {
            "X-Queue-Ms": f"{max(r.queue_ms for r in replies):.1f}",
            "X-Compute-Ms": f"{max(r.compute_ms for r in replies):.1f}",
        }

    def parse_model(model: type[BaseModel], body: bytes) -> BaseModel:
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            errors = _summarise(exc.errors())
            if any(e["type"] == "json_invalid" for e in errors):
                raise BadInput(f"body is not valid JSON: {errors[0]['msg']}", status=400) from None
            raise BadInput(
                "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors)
            ) from None

    errors_doc = {
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

    async def read_images(request: Request) -> list[bytes]:
        media = _media_type(request)
        if media == "multipart/form-data":
            form = await request.form(
                max_files=settings.max_num_images, max_fields=settings.max_num_images + 8
            )
            uploads = [v for _, v in form.multi_items() if hasattr(v, "read")]
            if not uploads:
                raise BadInput(
                    "multipart body has no file part; send the image(s) as file field(s) named 'file'"
                )
            if len(uploads) > settings.max_num_images:
                raise BadInput(f"at most {settings.max_num_images} images per request (MAX_NUM_IMAGES)")
            return [await upload.read() for upload in uploads]
        body = await request.body()
        if media == JSON:
            payload = parse_model(schemas.encode_json, body)
            return [codecs.decode_base64(text, f"images[{i}]") for i, text in enumerate(payload.images)]
        if media in IMAGE_TYPES:
            return [body]
        raise UnsupportedMedia(
            f"Content-Type {media or '(none)'} is not accepted; send multipart/form-data, application/json "
            f"or one of {', '.join(IMAGE_TYPES)}"
        )

    request_body_encode = {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["file"],
                }
            },
            JSON: {"schema": schemas.encode_json.model_json_schema()},
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES},
        },
    }

    @app.post(
        "/v1/encode",
        tags=["inference"],
        summary="Images → latents",
        description=(
            f"Upload 1 to {settings.max_num_images} PNG/JPEG/WebP images (multipart field `file`, JSON "
            f'`{{"images": [base64, ...]}}`, or one raw image body). Answers the latents as JSON '
            f"(shape [B, {', '.join(map(str, config.latent_shape))}], float32, base64) or, with "
            "`Accept: application/x-npy`, as a .npy file."
        ),
        dependencies=[Depends(require_key)],
        response_model=EncodeResponse,
        responses={**errors_doc, 200: {"content": {codecs.NPY_MEDIA_TYPE: {}}}},
        openapi_extra={"requestBody": request_body_encode},
    )
    async def encode(request: Request, x_request_timeout: str | None = Header(None)) -> Response:
        due = deadline(x_request_timeout)
        blobs = await read_images(request)
        images = []
        for blob in blobs:
            img = codecs.open_image(blob, settings.max_image_pixels)
            if img.width * img.height <= codecs.INLINE_PIXELS:
                images.append(codecs.finish_image(img, size))
            else:
                images.append(await run_in_threadpool(codecs.finish_image, img, size))
        replies = await run_jobs(request, "encode", [{"data": img.tobytes()} for img in images], due)
        latents = np.stack([np.frombuffer(r.data, dtype="<f4").reshape(r.shape) for r in replies])
        headers = timing_headers(replies)
        if _accepts(request, codecs.NPY_MEDIA_TYPE):
            return Response(codecs.latents_to_npy(latents), media_type=codecs.NPY_MEDIA_TYPE, headers=headers)
        body = {**codecs.latents_to_json(latents), "model": config.name, "version": config.version}
        return JSONResponse(body, headers=headers)

    def png_response(
        images: list[ImageOut], replies: list[Reply], request: Request, extra: dict | None = None
    ) -> Response:
        headers = timing_headers(replies)
        if _accepts(request, PNG):
            if len(images) != 1:
                raise NotAcceptable(
                    f"Accept: image/png holds one image, this request makes {len(images)}; ask for JSON"
                )
            if images[0].seed is not None:
                headers["X-Seed"] = str(images[0].seed)
            return Response(base64.b64decode(images[0].png), media_type=PNG, headers=headers)
        body = ImagesResponse(images=images, model=config.name, version=config.version, **(extra or {}))
        return JSONResponse(body.model_dump(exclude_none=True), headers=headers)

    async def pngs(replies: list[Reply]) -> list[str]:
        def encode_all() -> list[str]:
            return [
                base64.b64encode(codecs.encode_png(np.frombuffer(r.data, np.uint8).reshape(r.shape))).decode()
                for r in replies
            ]

        if size * size * len(replies) <= codecs.INLINE_PIXELS:
            return encode_all()
        return await run_in_threadpool(encode_all)

    @app.post(
        "/v1/decode",
        tags=["inference"],
        summary="Latents → images",
        description=(
            "Send latents as JSON `{shape, dtype: float32, data: base64}` (what /v1/encode answers) or as a "
            f".npy body (`Content-Type: application/x-npy`), shape [{', '.join(map(str, config.latent_shape))}] "
            f"or [B, ...] with B ≤ {settings.max_num_images}, all values finite. Answers JSON with base64 PNGs, "
            "or one `image/png` with `Accept: image/png`."
        ),
        dependencies=[Depends(require_key)],
        response_model=ImagesResponse,
        responses={**errors_doc, 200: {"content": {PNG: {}}}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    JSON: {"schema": LatentPayload.model_json_schema()},
                    codecs.NPY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
                },
            }
        },
    )
    async def decode(request: Request, x_request_timeout: str | None = Header(None)) -> Response:
        due = deadline(x_request_timeout)
        media = _media_type(request)
        body = await request.body()
        if media == JSON:
            payload = codecs.parse_json(body)
            latents = codecs.latents_from_json(payload, config.latent_shape, settings.max_num_images)
        elif media == codecs.NPY_MEDIA_TYPE:
            latents = codecs.latents_from_npy(body, config.latent_shape, settings.max_num_images)
        else:
            raise UnsupportedMedia(
                f"Content-Type {media or '(none)'} is not accepted; send application/json or {codecs.NPY_MEDIA_TYPE}"
            )
        replies = await run_jobs(request, "decode", [{"data": z.tobytes()} for z in latents], due)
        images = [ImageOut(png=p) for p in await pngs(replies)]
        return png_response(images, replies, request)

    GenerateRequest = schemas.generate
    defaults = dict(config.sampler)

    def resolve_class(value: int | str) -> int:
        if isinstance(value, int):
            if not 0 <= value < config.num_classes:
                raise BadInput(
                    f"class_label {value} is out of range; classes are 0..{config.num_classes - 1}"
                )
            return value
        lowered = {name.lower(): i for i, name in enumerate(config.class_names)}
        if value.lower() not in lowered:
            raise BadInput(f"unknown class {value!r}; classes are {list(config.class_names)}")
        return lowered[value.lower()]

    def sampler_settings(req: BaseModel) -> dict[str, object]:
        merged = {
            **defaults,
            **{
                k: getattr(req, k)
                for k in ("sampler", "steps", "shift", "cfg_scale", "cfg_interval")
                if getattr(req, k) is not None
            },
        }
        try:
            cfg = SamplerConfig(
                sampler=str(merged["sampler"]),
                steps=int(merged["steps"]),
                shift=float(merged["shift"]),
                cfg_scale=float(merged["cfg_scale"]),
                cfg_interval=tuple(float(v) for v in merged["cfg_interval"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"invalid sampler settings: {exc}") from None
        if cfg.steps > settings.max_steps:
            raise BadInput(f"steps {cfg.steps} exceeds the limit of {settings.max_steps} (MAX_STEPS)")
        return {
            "sampler": cfg.sampler,
            "steps": cfg.steps,
            "shift": cfg.shift,
            "cfg_scale": cfg.cfg_scale,
            "cfg_interval": list(cfg.cfg_interval),
        }

    @app.post(
        "/v1/generate",
        tags=["inference"],
        summary="Class label → generated images",
        description=(
            f"Generate 1 to {settings.max_num_images} images of one class. Image i uses seed + i, and the "
            "same seed and settings give byte-identical PNGs however requests are batched. Answers JSON "
            "with base64 PNGs and their seeds, or one `image/png` (seed in `X-Seed`) with `Accept: image/png`."
        ),
        dependencies=[Depends(require_key)],
        response_model=ImagesResponse,
        responses={**errors_doc, 200: {"content": {PNG: {}}}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": GenerateRequest.model_json_schema()}},
            }
        },
    )
    async def generate(request: Request, x_request_timeout: str | None = Header(None)) -> Response:
        due = deadline(x_request_timeout)
        if _media_type(request) not in (JSON, ""):
            raise UnsupportedMedia(
                f"Content-Type {_media_type(request)} is not accepted; send application/json"
            )
        body = parse_model(GenerateRequest, await request.body())
        label = resolve_class(body.class_label)
        sampler = sampler_settings(body)
        key = json.dumps(sampler, sort_keys=True, separators=(",", ":"))
        first = body.seed if body.seed is not None else secrets.randbelow(2**31)
        seeds = [first + i for i in range(body.num_images)]
        payloads = [{"label": str(label), "seed": str(s), "sampler": key} for s in seeds]
        replies = await run_jobs(request, "generate", payloads, due)
        images = [
            ImageOut(png=p, seed=s, class_label=label, class_name=config.class_names[label])
            for p, s in zip(await pngs(replies), seeds, strict=True)
        ]
        return png_response(images, replies, request, {"sampler": sampler})

    async def readiness(request: Request) -> tuple[Readiness, list[dict]]:
        broker: BrokerClient = request.app.state.broker
        reasons = []
        redis_ok, workers = True, []
        try:
            await request.app.state.redis.ping()
            workers = await broker.alive_workers(HEARTBEAT_TTL_MS)
        except (RedisError, OSError) as exc:
            redis_ok = False
            reasons.append(f"Redis unreachable: {exc}")
        if redis_ok and not workers:
            reasons.append(
                f"no worker has sent a heartbeat for {config.name} v{config.version} in the last {HEARTBEAT_TTL_MS} ms"
            )
        state = Readiness(
            ready=not reasons,
            redis=redis_ok,
            workers=len(workers),
            model=config.name,
            version=config.version,
            reasons=reasons,
        )
        return state, workers

    @app.get(
        "/v1/models", tags=["models"], response_model=ModelsResponse, dependencies=[Depends(require_key)]
    )
    async def models(request: Request) -> ModelsResponse:
        """The served model: shapes, classes, sampler defaults, limits, runtime and live workers."""
        ready, workers = await readiness(request)
        runtime = str(workers[0].get("runtime")) if workers else settings.runtime
        active = str(workers[0].get("provider")) if workers else provider
        entry = ModelEntry(
            name=config.name,
            version=config.version,
            image_size=size,
            latent_shape=list(config.latent_shape),
            classes=list(config.class_names),
            null_class=config.null_class,
            sampler_defaults=defaults,
            limits={
                "max_num_images": settings.max_num_images,
                "max_steps": settings.max_steps,
                "max_image_pixels": settings.max_image_pixels,
                "min_image_side": codecs.MIN_IMAGE_SIDE,
                "max_body_bytes": settings.max_body_bytes,
                "queue_max_len": settings.queue_max_len,
            },
            runtime=runtime,
            provider=active,
            ready=ready.ready,
            workers=[WorkerInfo(**w) for w in workers],
        )
        return ModelsResponse(models=[entry])

    @app.get("/healthz", tags=["health"], summary="Liveness")
    @app.get("/v2/health/live", tags=["health"], summary="Liveness (Open Inference Protocol)")
    async def live() -> dict[str, str]:
        return {"status": "live"}

    def ready_response(state: tuple[Readiness, list[dict]]) -> JSONResponse:
        return JSONResponse(state[0].model_dump(), status_code=200 if state[0].ready else 503)

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: Redis reachable and a worker alive",
        response_model=Readiness,
    )
    @app.get(
        "/v2/health/ready",
        tags=["health"],
        summary="Readiness (Open Inference Protocol)",
        response_model=Readiness,
    )
    async def ready(request: Request) -> JSONResponse:
        return ready_response(await readiness(request))

    @app.get("/v2/models/{name}/ready", tags=["health"], summary="Model readiness (Open Inference Protocol)")
    async def model_ready(name: str, request: Request) -> JSONResponse:
        if name != config.name:
            return _error(404, f"unknown model {name!r}; this server serves {config.name!r}")
        return ready_response(await readiness(request))

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
    async def metrics_endpoint() -> Response:
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    return app
