"""GET /v1/models: what this replica serves, with its limits and the workers serving it now."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service import codecs
from service.api.auth import require_key
from service.api.middleware import endpoint_label
from service.api.openapi import error_responses
from service.api.state import State
from service.schemas import ModelEntry, ModelsResponse, WorkerInfo

router = APIRouter(tags=["models"], dependencies=[Depends(require_key)], responses=error_responses(401, 500))


@router.get("/v1/models", response_model=ModelsResponse)
@endpoint_label("models")
async def models(state: State) -> ModelsResponse:
    """The served model: shapes, classes, sampler defaults, limits, runtime and live workers."""
    config, settings = state.config, state.settings
    ready, workers = await state.readiness()
    # A live worker reports what it actually runs on; without one, say what was configured.
    runtime = str(workers[0].get("runtime")) if workers else settings.runtime
    provider = str(workers[0].get("provider")) if workers else state.provider
    entry = ModelEntry(
        name=config.name,
        version=config.version,
        image_size=config.image_size,
        latent_shape=list(config.latent_shape),
        classes=list(config.class_names),
        null_class=config.null_class,
        sampler_defaults=state.sampler_defaults,
        limits={
            "max_num_images": settings.max_num_images,
            "max_steps": settings.max_steps,
            "max_image_pixels": settings.max_image_pixels,
            "max_image_side": settings.max_image_side,
            "max_image_aspect": settings.max_image_aspect,
            "min_image_side": codecs.MIN_IMAGE_SIDE,
            "max_body_bytes": settings.max_body_bytes,
            "queue_max_len": settings.queue_max_len,
            "queue_max_cost": settings.queue_max_cost,
            "max_request_cost": settings.max_request_cost,
        },
        runtime=runtime,
        provider=provider,
        ready=ready.ready,
        workers=[WorkerInfo(**w) for w in workers],
    )
    return ModelsResponse(models=[entry])
