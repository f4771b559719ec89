"""Metrics labels come from the routes themselves, and agree with the metrics contract."""

from __future__ import annotations

from service import metrics
from service.api.middleware import endpoint_labels
from service.app import ROUTERS

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
