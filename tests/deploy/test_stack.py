"""deploy/stack.py, the local stack: its Prometheus config, pre-flight checks and state file.

These run real redis-server and Prometheus processes (no service needed); how processes are started
and stopped is tested with the launcher (tests/service/test_launcher.py), the full stack with API
replicas and workers by test_stack_live.py (slow).
"""

from __future__ import annotations

import json
import socket
from dataclasses import replace

import pytest
import yaml

from service.launcher import port_is_free, stop_process, wait_until_ready
from service.redis_server import RedisServer
from tests.deploy.helpers import DEPLOY, load_stack, tool

stack = load_stack()
needs_prometheus = pytest.mark.skipif(
    tool("prometheus") is None or tool("promtool") is None,
    reason="prometheus/promtool not installed (Debian package `prometheus`: apt-get install prometheus)",
)
needs_redis = pytest.mark.skipif(
    tool("redis-server") is None, reason="redis-server not installed (Debian redis-server)"
)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def cfg(tmp_path):
    redis, api1, api2, w1, w2, prom = free_ports(6)
    return stack.StackConfig(
        run_dir=tmp_path / "run", redis_port=redis, api_ports=(api1, api2), worker_ports=(w1, w2),
        prometheus_port=prom, lifetime_s=60, model_repository=tmp_path / "repo",
    )  # fmt: skip


def _shipped() -> dict:
    return yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())


def test_rendered_config_targets_local_processes_and_keeps_rules(cfg):
    rendered = stack.render_prometheus_config(_shipped(), cfg)
    jobs = {j["job_name"]: j for j in rendered["scrape_configs"]}
    assert jobs["pae-api"]["static_configs"] == [{"targets": [f"127.0.0.1:{p}" for p in cfg.api_ports]}]
    assert jobs["pae-worker"]["static_configs"] == [{"targets": [f"127.0.0.1:{p}" for p in cfg.worker_ports]}]
    assert not any("dns_sd_configs" in j for j in rendered["scrape_configs"])
    assert jobs["pae-api"]["relabel_configs"] == _shipped()["scrape_configs"][0]["relabel_configs"]
    assert rendered["rule_files"] == [str(DEPLOY / "prometheus" / "rules.yml")]
    assert rendered["global"]["scrape_interval"] == cfg.scrape_interval
    assert "dns_sd_configs" in _shipped()["scrape_configs"][0], "the shipped config must not be modified"


@needs_prometheus
def test_rendered_config_passes_promtool(cfg, tmp_path):
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(stack.render_prometheus_config(_shipped(), cfg)))
    stack.check_prometheus_config(path)
    path.write_text(path.read_text().replace("scrape_interval: 5s", "scrape_interval: often"))
    with pytest.raises(stack.StackError, match="promtool rejected"):
        stack.check_prometheus_config(path)


def test_render_refuses_a_config_without_the_jobs(cfg):
    with pytest.raises(stack.StackError, match="pae-worker"):
        stack.render_prometheus_config(
            {"scrape_configs": [{"job_name": "pae-api"}, {"job_name": "prometheus"}]}, cfg
        )


def test_parse_ports():
    assert stack.parse_ports("8101,8102") == (8101, 8102)
    for bad in ("", "80,x", "0", "70000"):
        with pytest.raises(Exception, match="port"):
            stack.parse_ports(bad)


def test_preflight_names_a_busy_port(cfg):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", cfg.api_ports[1]))
        busy.listen()
        with pytest.raises(stack.StackError, match=str(cfg.api_ports[1])):
            stack.preflight(cfg)


def test_preflight_requires_distinct_ports_and_a_model_repository(cfg):
    with pytest.raises(stack.StackError, match="distinct"):
        stack.preflight(replace(cfg, worker_ports=(cfg.api_ports[0],)))
    with pytest.raises(stack.StackError, match="make export"):
        stack.preflight(cfg)


@needs_redis
def test_redis_starts_answers_and_stops(cfg):
    cfg.run_dir.mkdir(parents=True)
    redis = RedisServer(cfg.redis_port, workdir=cfg.run_dir / "redis", lifetime_s=cfg.lifetime_s)
    redis.start(timeout_s=20)
    try:
        stack.save_state(cfg.run_dir, cfg, [redis.proc])
        assert stack.status(cfg.run_dir) == [("redis", redis.proc.pid, True, 0)]
    finally:
        stopped = stack.down(cfg.run_dir)
    assert stopped == ["redis"]
    assert not redis.proc.alive()
    assert not (cfg.run_dir / stack.STATE_FILE).exists()
    assert port_is_free(cfg.redis_port)


@needs_prometheus
def test_real_prometheus_loads_the_shipped_rules(cfg):
    """A real Prometheus on the rendered config: ready, the shipped alert rules loaded, queries answered."""
    cfg.run_dir.mkdir(parents=True)
    config = cfg.run_dir / "prometheus.yml"
    config.write_text(yaml.safe_dump(stack.render_prometheus_config(_shipped(), cfg)))
    prom = stack.start_prometheus(tool("prometheus"), config, cfg)
    try:
        wait_until_ready([prom], timeout_s=60)
        status, body = stack.http_get(f"http://127.0.0.1:{cfg.prometheus_port}/api/v1/rules")
        assert status == 200
        loaded = {r["name"] for g in json.loads(body)["data"]["groups"] for r in g["rules"]}
        shipped = {r["alert"] for g in yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"] for r in g["rules"]}  # fmt: skip
        assert loaded == shipped
        assert stack.prometheus_query(cfg.prometheus_port, "vector(2) * 3")[0]["value"][1] == "6"
        with pytest.raises(stack.StackError, match="400"):
            stack.prometheus_query(cfg.prometheus_port, "sum(")
    finally:
        stop_process(prom)
    assert not prom.alive()
