"""Prometheus config and alert rules: promtool accepts them, the alerts fire on the right series,
and the Kubernetes PrometheusRule carries exactly the same rules."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.deploy.helpers import DEPLOY, K8S, REPO, tool

PROMTOOL = tool("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian package `prometheus`: apt-get install prometheus)",
)
CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


@needs_promtool
def test_promtool_accepts_the_config():
    result = _promtool("check", "config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


@needs_promtool
def test_promtool_accepts_the_rules():
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alerts_fire_on_synthetic_series():
    """promtool's rule unit tests: error ratio, p99 latency, queue depth, rejections, dead letters, down."""
    result = _promtool("test", "rules", str(REPO / "tests" / "deploy" / "rules_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_rejects_a_broken_rule(tmp_path):
    """The checks above can fail: a rule with a PromQL syntax error is refused."""
    groups = yaml.safe_load(RULES.read_text())
    groups["groups"][0]["rules"][0]["expr"] = "histogram_quantile(0.99, sum by (le) (rate(x[5m]))"
    broken = tmp_path / "rules.yml"
    broken.write_text(yaml.safe_dump(groups))
    assert _promtool("check", "rules", str(broken)).returncode != 0


def test_required_alerts_exist():
    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    exprs = " ".join(r["expr"] for r in rules.values())
    assert "histogram_quantile(0.99" in exprs and "pae_request_duration_seconds_bucket" in exprs
    assert 'status=~"5.."' in exprs
    assert "pae_queue_depth" in exprs
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_kubernetes_prometheusrule_matches_rules_file():
    rule = yaml.safe_load((K8S / "base" / "monitoring" / "prometheusrule.yaml").read_text())
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_config_scrapes_api_and_worker_ports():
    config = yaml.safe_load(CONFIG.read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["pae-api"]["dns_sd_configs"][0]["port"] == 8000
    assert jobs["pae-worker"]["dns_sd_configs"][0]["port"] == 9100
    assert config["rule_files"] == ["rules.yml"]
