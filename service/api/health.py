"""Probes and metrics: liveness, readiness (also in the Open Inference Protocol's spelling), /metrics.

None of these needs the API key: Kubernetes probes and Prometheus scrapes carry no secret, and the
answers hold no model output and cost no compute. The probes answer HEAD as well as GET (HEAD
gives the status alone), for load balancers that probe with HEAD.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from service import metrics
from service.api.errors import error_response
from service.api.middleware import endpoint_label
from service.api.openapi import error_responses
from service.api.state import State
from service.schemas import Readiness

router = APIRouter(tags=["health"], responses=error_responses(500))

NOT_READY = {503: {"model": Readiness, "description": "not ready; `reasons` says why"}}


@router.get("/healthz", summary="Liveness")
@router.head("/healthz", summary="Liveness")
@router.get("/v2/health/live", summary="Liveness (Open Inference Protocol)")
@router.head("/v2/health/live", summary="Liveness (Open Inference Protocol)")
@endpoint_label("healthz")
async def live() -> dict[str, str]:
    return {"status": "live"}


@router.get(
    "/readyz",
    summary="Readiness: Redis reachable and a worker alive",
    response_model=Readiness,
    responses=NOT_READY,
)
@router.head("/readyz", summary="Readiness: Redis reachable and a worker alive", responses=NOT_READY)
@router.get(
    "/v2/health/ready",
    summary="Readiness (Open Inference Protocol)",
    response_model=Readiness,
    responses=NOT_READY,
)
@router.head("/v2/health/ready", summary="Readiness (Open Inference Protocol)", responses=NOT_READY)
@endpoint_label("readyz")
async def ready(state: State) -> JSONResponse:
    readiness, _workers = await state.readiness()
    return readiness_response(readiness)


@router.get(
    "/v2/models/{name}/ready",
    summary="Model readiness (Open Inference Protocol)",
    response_model=Readiness,
    responses={**NOT_READY, **error_responses(404)},
)
@router.head(
    "/v2/models/{name}/ready",
    summary="Model readiness (Open Inference Protocol)",
    responses={**NOT_READY, **error_responses(404)},
)
@endpoint_label("readyz")
async def model_ready(name: str, state: State) -> JSONResponse:
    if name != state.config.name:
        return error_response(404, f"unknown model '{name}'; this server serves '{state.config.name}'")
    readiness, _workers = await state.readiness()
    return readiness_response(readiness)


def readiness_response(readiness: Readiness) -> JSONResponse:
    """200 when ready, 503 otherwise; the body says why in both cases."""
    return JSONResponse(readiness.model_dump(), status_code=200 if readiness.ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics_endpoint() -> Response:
    data, content_type = metrics.render()
    return Response(data, media_type=content_type)
