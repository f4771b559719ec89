"""The whole local stack, live: redis-server, 2 API replicas, 2 workers and a real Prometheus.

Slow (model load in four processes, several scrape intervals), so excluded from `make test`. Proves
the dashboard's latency panels have data: Prometheus's HTTP API answers histogram_quantile(0.99, ...)
per endpoint with a number; and that every metric the dashboard and rules query is exported live.
"""

from __future__ import annotations

import re

import pytest

from tests.deploy.helpers import (
    PROMETHEUS_SYNTHETIC,
    REPO,
    contract_base,
    load_stack,
    promql_metric_names,
    tool,
)
from tests.deploy.test_dashboard import ALL_EXPRS
from tests.deploy.test_stack import free_ports

stack = load_stack()
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory):
    missing = [
        b for b in ("pae-serve", "pae-worker", "redis-server", "prometheus", "promtool") if tool(b) is None
    ]
    if missing:
        pytest.skip(f"not installed: {missing} (make venv; apt-get install redis-server prometheus)")
    if not (REPO / "model_repository" / "fmnist32-tiny").is_dir():
        pytest.skip("no model_repository/fmnist32-tiny; run `make export` first")
    redis, a1, a2, w1, w2, prom = free_ports(6)
    cfg = stack.StackConfig(
        run_dir=tmp_path_factory.mktemp("stack"), redis_port=redis, api_ports=(a1, a2),
        worker_ports=(w1, w2), prometheus_port=prom, lifetime_s=600,
    )  # fmt: skip
    stack.up(cfg)
    try:
        yield cfg
    finally:
        stack.down(cfg.run_dir)


def test_prometheus_answers_p99_latency_per_endpoint(live_stack):
    p99 = stack.check(live_stack.run_dir)
    for endpoint in stack.ENDPOINTS:
        assert 0 < p99[endpoint] < 60, (endpoint, p99)


def test_every_queried_metric_is_exported_live(live_stack):
    exported: set[str] = set()
    for port in (*live_stack.api_ports, *live_stack.worker_ports):
        status, body = stack.http_get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200, port
        exported |= set(re.findall(r"^# TYPE (\w+) ", body.decode(), re.M))
    queried = {contract_base(n) for e in ALL_EXPRS for n in promql_metric_names(e)} - {None}
    queried -= PROMETHEUS_SYNTHETIC
    families = {n.removesuffix("_total") for n in exported} | exported
    missing = {q for q in queried if q not in families and q.removesuffix("_total") not in families}
    assert not missing, f"queried by the dashboard or rules but not exported live: {sorted(missing)}"


def test_all_targets_up_in_prometheus(live_stack):
    result = stack.prometheus_query(live_stack.prometheus_port, 'up{job=~"pae-.*"}')
    assert len(result) == len(live_stack.api_ports) + len(live_stack.worker_ports)
    assert all(r["value"][1] == "1" for r in result)
