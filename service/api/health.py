"""Probes and metrics: liveness, readiness (also in the Open Inference Protocol's spelling), /metrics.

None of these needs the API key: Kubernetes probes and Prometheus scrapes carry no secret, and the
answers hold no model output and cost no compute.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from service import metrics
from service.api.errors import error_response
from service.api.middleware import endpoint_label
from service.api.state import State
from service.schemas import Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
@router.get("/v2/health/live", summary="Liveness (Open Inference Protocol)")
@endpoint_label("healthz")
async def live() -> dict[str, str]:
    return {"status": "live"}


@router.get("/readyz", summary="Readiness: Redis reachable and a worker alive", response_model=Readiness)
@router.get("/v2/health/ready", summary="Readiness (Open Inference Protocol)", response_model=Readiness)
@endpoint_label("readyz")
async def ready(state: State) -> JSONResponse:
    readiness, _workers = await state.readiness()
    return readiness_response(readiness)


@router.get("/v2/models/{name}/ready", summary="Model readiness (Open Inference Protocol)")
@endpoint_label("readyz")
async def model_ready(name: str, state: State) -> JSONResponse:
    if name != state.config.name:
        return error_response(404, f"unknown model {name!r}; this server serves {state.config.name!r}")
    readiness, _workers = await state.readiness()
    return readiness_response(readiness)


def readiness_response(readiness: Readiness) -> JSONResponse:
    """200 when ready, 503 otherwise; the body says why in both cases."""
    return JSONResponse(readiness.model_dump(), status_code=200 if readiness.ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics_endpoint() -> Response:
    data, content_type = metrics.render()
    return Response(data, media_type=content_type)
