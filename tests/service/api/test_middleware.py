"""Metrics labels come from the routes themselves, and agree with the metrics contract; FastAPI's
own telemetry is opt-in."""

from __future__ import annotations

import pytest

from service import metrics
from service.api.middleware import endpoint_labels
from service.app import ROUTERS, fastapi_telemetry

ROUTES = [route for router in ROUTERS for route in router.routes]


def test_every_route_but_metrics_has_a_label_from_the_contract() -> None:
    label_of = endpoint_labels(ROUTES)
    labels = {route.path: label_of(route.path) for route in ROUTES}
    assert labels.pop("/metrics") is None
    assert set(labels.values()) == set(metrics.ENDPOINTS)


def test_aliases_and_path_parameters_share_their_endpoint() -> None:
    label_of = endpoint_labels(ROUTES)
    assert label_of("/healthz") == label_of("/v2/health/live") == "healthz"
    assert label_of("/readyz") == label_of("/v2/health/ready") == label_of("/v2/models/any/ready") == "readyz"
    assert label_of("/v2/models/a/b/ready") is None
    assert label_of("/openapi.json") is None and label_of("/v1/generate/") is None


def test_a_metric_child_is_the_labelled_series() -> None:
    assert metrics.child(metrics.REQUESTS, "encode", "200") is metrics.REQUESTS.labels("encode", "200")
    assert metrics.child(metrics.INFLIGHT, "decode") is metrics.child(metrics.INFLIGHT, "decode")


def test_fastapi_telemetry_is_off_unless_the_operator_opts_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FASTAPI_OTEL_AUTO_CONFIGURE", raising=False)
    assert fastapi_telemetry() == {"tracing": False, "metrics": False, "logs": False}
    monkeypatch.setenv("FASTAPI_OTEL_AUTO_CONFIGURE", "true")
    assert fastapi_telemetry() == {}
