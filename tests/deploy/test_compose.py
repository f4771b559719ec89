"""deploy/compose.yaml: parses, references files that exist, and wires the services to each other
(Prometheus discovers the replicas by service name, Grafana reads Prometheus and the dashboard)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import yaml

from service.settings import Settings
from tests.deploy.helpers import DEPLOY, REPO, contract_settings

COMPOSE = DEPLOY / "compose.yaml"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _resolve_env(env: dict) -> dict[str, str]:
    """Compose's ${VAR:-default} with nothing exported: the default; a key with no value passes the
    caller's variable through, so with nothing exported it is not set."""
    out = {}
    for key, value in env.items():
        if value is None:
            continue
        text = str(value)
        if text.startswith("${") and ":-" in text:
            text = text.split(":-", 1)[1].rstrip("}")
        out[key] = text
    return out


def test_services_and_replicas():
    services = _compose()["services"]
    assert set(services) == {"redis", "api", "worker", "prometheus", "grafana"}
    assert services["api"]["deploy"]["replicas"] == 2
    assert services["api"]["command"] == ["api"] and services["worker"]["command"] == ["worker"]
    assert services["api"]["image"] == services["worker"]["image"], "one image for both roles"


def test_nothing_relies_on_service_healthy():
    # podman-compose (podman 4) ignores `condition: service_healthy`; the services wait for Redis
    # themselves, and the start order is only a courtesy.
    for name, service in _compose()["services"].items():
        depends = service.get("depends_on", [])
        assert isinstance(depends, list), f"{name}: depends_on with conditions"


def test_replicas_publish_no_fixed_port_or_range():
    # A fixed host port or a range cannot be shared by replicas under every compose tool: each replica
    # takes a free port of its own on loopback.
    api = _compose()["services"]["api"]
    assert api["deploy"]["replicas"] > 1
    assert api["ports"] == ["127.0.0.1::8000"]


def test_variables_expand_in_every_compose_tool():
    # podman-compose 1.0 leaves `${VAR:-}` (an empty default) unexpanded, so the container sees the
    # literal text; a default must be non-empty, or the key must have no value (pass-through).
    def strings(node: object) -> list[str]:
        if isinstance(node, dict):
            return [s for k, v in node.items() for s in strings(k) + strings(v)]
        if isinstance(node, list):
            return [s for item in node for s in strings(item)]
        return [node] if isinstance(node, str) else []

    for text in strings(_compose()):
        for reference in re.findall(r"\$\{[^}]*\}", text):
            assert re.fullmatch(r"\$\{\w+:-[^}]+\}", reference), f"{reference} in {text!r}"


def test_images_built_here_match_the_dockerfile_target():
    services = _compose()["services"]
    build = services["api"]["build"]
    assert build["target"] == "cpu"
    dockerfile = (DEPLOY / build["context"] / build["dockerfile"]).read_text()
    assert re.search(r"^FROM \S+ AS cpu$", dockerfile, re.M)
    assert services["api"]["image"].endswith("pae-stack:cpu}")


def test_referenced_files_exist():
    compose = _compose()
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context == REPO, name
            assert (context / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: named volume {source} is not declared"


def test_service_environment_is_valid_settings():
    services = _compose()["services"]
    for name in ("api", "worker"):
        env = _resolve_env(services[name]["environment"])
        extra = set(env) - contract_settings() - {"PROMETHEUS_MULTIPROC_DIR"}
        assert not extra, f"{name}: {extra} are not service settings"
        settings = Settings.from_env(env)
        assert urlparse(settings.redis_url).hostname == "redis"
        assert str(settings.model_repository) == "/models"
    assert "PROMETHEUS_MULTIPROC_DIR" not in services["worker"]["environment"]


def test_prometheus_discovers_the_compose_services():
    compose = _compose()
    services = compose["services"]
    prom_service = services["prometheus"]
    mount = next(v for v in prom_service["volumes"] if v.startswith("./prometheus:"))
    config_dir = DEPLOY / mount.split(":")[0]
    config = yaml.safe_load((config_dir / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j["dns_sd_configs"][0] for j in config["scrape_configs"] if "dns_sd_configs" in j}
    assert jobs["pae-api"]["names"] == ["api"]
    assert jobs["pae-api"]["port"] == int(services["api"]["ports"][0].rsplit(":", 1)[1])
    worker_port = int(_resolve_env(services["worker"]["environment"])["WORKER_METRICS_PORT"])
    assert jobs["pae-worker"]["names"] == ["worker"] and jobs["pae-worker"]["port"] == worker_port
    assert f"--config.file={mount.split(':')[1]}/prometheus.yml" in prom_service["command"]


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard():
    grafana = _compose()["services"]["grafana"]
    mounts = {v.split(":")[1]: DEPLOY / v.split(":")[0] for v in grafana["volumes"] if v.startswith(".")}
    datasources = yaml.safe_load(
        (mounts["/etc/grafana/provisioning/datasources"] / "prometheus.yaml").read_text()
    )
    url = urlparse(datasources["datasources"][0]["url"])
    assert (url.hostname, url.port) == ("prometheus", 9090)
    providers = yaml.safe_load((mounts["/etc/grafana/provisioning/dashboards"] / "pae.yaml").read_text())
    dashboard_dir = providers["providers"][0]["options"]["path"]
    dashboard_mounts = [target for target in mounts if Path(target).parent == Path(dashboard_dir)]
    assert dashboard_mounts and mounts[dashboard_mounts[0]] == DEPLOY / "grafana" / "dashboard.json"


def test_published_ports_stay_on_loopback():
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
