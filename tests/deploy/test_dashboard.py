"""Grafana dashboard and PromQL names: every query parses, and names only contract metrics and labels.

The metric-name check runs on every PromQL expression in the dashboard and the alert rules, against
the "Service metrics" table of docs/INTERFACES.md. Syntax is checked by Prometheus's own parser:
each dashboard query (Grafana variables substituted) is handed to `promtool check rules` as a
recording rule.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from tests.deploy.helpers import (
    DEPLOY,
    IMPLICIT_LABELS,
    PROMETHEUS_SYNTHETIC,
    contract_base,
    contract_metrics,
    promql_labels,
    promql_metric_names,
    tool,
)

DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
RULES = DEPLOY / "prometheus" / "rules.yml"
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$endpoint": ".*", "$task": ".*"}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels() -> list[dict]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _panels() for t in p.get("targets", [])]


def variable_exprs() -> list[str]:
    """Metric selectors inside Grafana's label_values(metric, label) variable queries."""
    out = []
    for var in _dashboard()["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"])
            assert match, f"unexpected variable query {var['query']}"
            out.append(f'{match.group(1)}{{{match.group(2)}!=""}}')
    return out


def rule_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def substitute(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr}"
    return expr


ALL_EXPRS = dashboard_exprs() + variable_exprs() + rule_exprs()


def test_name_extraction_finds_metrics_not_functions_or_labels():
    expr = (
        'histogram_quantile(0.99, sum by (endpoint, le) (rate(foo_seconds_bucket{endpoint=~"a|b"}[5m]))) > 2 '
        'and on (job) up{job="x"} offset 5m / ignoring (instance) bar_total'
    )
    assert promql_metric_names(expr) == {"foo_seconds_bucket", "up", "bar_total"}
    assert promql_labels(expr) == {None: {"endpoint", "le", "job", "instance"}, "foo_seconds_bucket": {"endpoint"}, "up": {"job"}}  # fmt: skip
    assert promql_metric_names('sum(rate(x_total{a="sum(y_total)"}[1m])) * 1e3') == {"x_total"}


@pytest.mark.parametrize("expr", ALL_EXPRS)
def test_every_metric_is_in_the_contract(expr):
    names = promql_metric_names(expr)
    assert names, f"no metric found in {expr!r}"
    unknown = {n for n in names if contract_base(n) is None and n not in PROMETHEUS_SYNTHETIC}
    assert not unknown, f"{sorted(unknown)} not in the Service metrics table (docs/INTERFACES.md): {expr}"


@pytest.mark.parametrize("expr", ALL_EXPRS)
def test_every_label_is_in_the_contract(expr):
    table = contract_metrics()
    all_labels = set().union(*(labels for _, labels in table.values())) | IMPLICIT_LABELS
    for selector, labels in promql_labels(expr).items():
        if selector is None or selector in PROMETHEUS_SYNTHETIC:
            allowed = all_labels
        else:
            base = contract_base(selector)
            assert base is not None, selector
            allowed = set(table[base][1]) | IMPLICIT_LABELS
        assert labels <= allowed, f"labels {sorted(labels - allowed)} not exported with {selector}: {expr}"


def test_label_check_can_fail():
    labels = promql_labels('sum by (pod) (rate(pae_requests_total{route="x"}[1m]))')
    assert labels["pae_requests_total"] == {"route"} and labels[None] == {"pod"}
    assert contract_base("pae_requests_bucket") is None
    assert contract_base("pae_batch_size_bucket") == "pae_batch_size"


@pytest.mark.skipif(tool("promtool") is None, reason="promtool not installed (Debian package `prometheus`)")
def test_dashboard_queries_parse(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": substitute(e)}
        for i, e in enumerate(dashboard_exprs() + variable_exprs())
    ]}]}  # fmt: skip
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _find(title_words: str) -> dict:
    matches = [p for p in _panels() if all(w in p["title"].lower() for w in title_words.split())]
    assert len(matches) == 1, (
        f"expected one panel titled with {title_words!r}, found {[p['title'] for p in matches]}"
    )
    return matches[0]


def test_dashboard_has_the_required_panels():
    latency = _find("latency endpoint")
    exprs = [t["expr"] for t in latency["targets"]]
    for q in ("0.5", "0.95", "0.99"):
        assert any(e.startswith(f"histogram_quantile({q}, sum by (endpoint, le) (rate(pae_request_duration_seconds_bucket") for e in exprs), q  # fmt: skip
    assert latency["fieldConfig"]["defaults"]["unit"] == "s"
    assert "pae_requests_total" in _find("throughput")["targets"][0]["expr"]
    assert 'status=~"5.."' in _find("error ratio")["targets"][0]["expr"]
    assert "pae_queue_depth" in _find("queue depth")["targets"][0]["expr"]
    assert "pae_batch_size_bucket" in _find("batch size distribution")["targets"][0]["expr"]
    wait_compute = " ".join(t["expr"] for t in _find("queue wait compute")["targets"])
    assert "pae_queue_wait_seconds_bucket" in wait_compute and "pae_compute_seconds_bucket" in wait_compute
    jobs = " ".join(t["expr"] for t in _find("reclaimed dead-lettered expired")["targets"])
    for metric in ("pae_jobs_reclaimed_total", "pae_jobs_dead_lettered_total", "pae_jobs_expired_total"):
        assert metric in jobs


def test_dashboard_layout_and_datasource():
    dashboard = _dashboard()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert all(t["refId"] for t in panel["targets"])
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )
    default = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert default["current"]["value"] == provisioned["datasources"][0]["uid"]
