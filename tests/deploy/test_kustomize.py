"""The Kubernetes manifests: every rendered variant validates, is secure, and agrees with the service.

Built-in kinds go through kubernetes-validate --strict; the custom resources (KEDA, prometheus-operator)
through this project's own schemas (crd_schemas.py). Cross-checks tie the manifests to the service's
code and the contract: the ScaledObject watches the streams service/broker.py writes, and the
ConfigMap passes service/settings.py's validation.
"""

from __future__ import annotations

import copy
import os
import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
from kubernetes_validate.utils import SchemaNotFoundError, latest_version

from service.broker_protocol import GROUP, Keys
from service.settings import Settings
from tests.deploy.crd_schemas import CRD_SCHEMAS
from tests.deploy.helpers import K8S, TASKS, by_kind, contract_settings, kustomize, tool

K8S_VERSIONS = ("1.32.0", latest_version())
VARIANTS = {
    "cpu": ("overlays/cpu", []),
    "gpu": ("overlays/gpu", []),
    "gpu+tensorrt": ("overlays/gpu", ["components/tensorrt"]),
    "cpu+external-redis": ("overlays/cpu", ["components/external-redis"]),
    "cpu+redis-sentinel": ("overlays/cpu", ["components/redis-sentinel"]),
    "cpu+models-volume": ("overlays/cpu", ["components/models-volume"]),
}
# Environment variables the manifests set that are not service settings, and who reads them.
INFRA_ENV = {
    "PORT": "entrypoint (pae-serve --port)",
    "PROMETHEUS_MULTIPROC_DIR": "prometheus-client in the API",
    "REDIS_ADDRESS": "KEDA redis-streams scaler (addressFromEnv)",
    "REDIS_PASSWORD": "KEDA scaler (passwordFromEnv), redis-server --requirepass, the service with sentinels",
    "REDISCLI_AUTH": "redis-cli in the Redis probes and start scripts",
}


@cache
def _render(variant: str, tmp_root: str) -> tuple[dict, ...]:
    overlay, components = VARIANTS[variant]
    if not components:
        return tuple(kustomize(K8S / overlay))
    work = Path(tmp_root) / variant.replace("+", "-")
    work.mkdir(parents=True, exist_ok=True)
    # kustomize refuses absolute paths to other kustomizations.
    rel = [os.path.relpath(K8S / part, work) for part in (overlay, *components)]
    lines = ["apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization", "resources:",
             f"  - {rel[0]}", "components:", *[f"  - {c}" for c in rel[1:]]]  # fmt: skip
    (work / "kustomization.yaml").write_text("\n".join(lines) + "\n")
    return tuple(kustomize(work))


@pytest.fixture(scope="module")
def render(tmp_path_factory):
    if tool("kubectl") is None:
        pytest.skip("kubectl not on PATH (it renders the overlays: `kubectl kustomize`)")
    root = str(tmp_path_factory.mktemp("kustomize"))
    return lambda variant: [copy.deepcopy(d) for d in _render(variant, root)]


def _pod_templates(docs: list[dict]) -> dict[str, dict]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }


def _container(docs: list[dict], workload: str) -> dict:
    return _pod_templates(docs)[workload]["spec"]["containers"][0]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and In/NotIn/Exists/DoesNotExist)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if (
            (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and labels.get(key) in values)
            or (op == "Exists" and key not in labels)
            or (op == "DoesNotExist" and key in labels)
        ):
            return False
    return True


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_resource_validates_strictly(render, variant, version):
    docs = render(variant)
    assert len(docs) >= 12
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if schema is not None:
            errors = list(jsonschema.Draft202012Validator(schema).iter_errors(doc))
            assert not errors, f"{variant}: {name}: {[e.message for e in errors]}"
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except SchemaNotFoundError as exc:
            pytest.fail(f"{variant}: {name} has neither a Kubernetes nor a CRD schema: {exc.message}")
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{variant}: {name} invalid for Kubernetes {version} at {path}: {exc.message}")


@pytest.mark.parametrize(
    ("kind", "mutate", "why"),
    [
        ("ScaledObject", lambda d: d["spec"].pop("scaleTargetRef"), "scaleTargetRef missing"),
        ("ScaledObject", lambda d: d["spec"].update(triggers=[]), "no triggers"),
        (
            "ScaledObject",
            lambda d: d["spec"]["triggers"][0]["metadata"].update(lagCount=64),
            "numeric metadata",
        ),
        ("ScaledObject", lambda d: d["spec"].update(maxReplicas=3), "misspelt field"),
        ("ServiceMonitor", lambda d: d["spec"].pop("selector"), "selector missing"),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(interval="15 seconds"), "bad duration"),
        ("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].pop("expr"), "expr missing"),
        (
            "PrometheusRule",
            lambda d: d["spec"]["groups"][0]["rules"][0].update(record="x"),
            "alert and record",
        ),
    ],
)
def test_crd_schemas_reject_broken_resources(render, kind, mutate, why):
    doc = next(d for d in render("cpu") if d["kind"] == kind)
    schema = CRD_SCHEMAS[(doc["apiVersion"], kind)]
    assert jsonschema.Draft202012Validator(schema).is_valid(doc)
    mutate(doc)
    assert not jsonschema.Draft202012Validator(schema).is_valid(doc), f"schema accepted a {kind} with {why}"


def test_cpu_overlay_has_the_whole_topology(render):
    docs = render("cpu")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for expected in [
        ("Namespace", "pae"), ("ConfigMap", "pae-config"), ("Secret", "pae-api-key"), ("Secret", "pae-redis"),
        ("Deployment", "pae-api"), ("Service", "pae-api"), ("HorizontalPodAutoscaler", "pae-api"),
        ("PodDisruptionBudget", "pae-api"), ("Deployment", "pae-worker"), ("ScaledObject", "pae-worker"),
        ("StatefulSet", "pae-redis"), ("Service", "pae-redis"), ("NetworkPolicy", "pae-redis"),
        ("ServiceMonitor", "pae-api"), ("ServiceMonitor", "pae-worker"), ("PrometheusRule", "pae"),
    ]:  # fmt: skip
        assert expected in kinds, f"{expected} missing from the cpu overlay"
    assert all(d["metadata"].get("namespace", "pae") == "pae" for d in docs)
    assert _container(docs, "pae-api")["image"] == "pae-stack:0.1.0-cpu"
    assert by_kind(docs, "Deployment")["pae-api"]["spec"]["replicas"] >= 2
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["pae-api"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pae-api"}
    assert hpa["minReplicas"] >= 2
    api_labels = _pod_templates(docs)["pae-api"]["metadata"]["labels"]
    assert _selects(by_kind(docs, "PodDisruptionBudget")["pae-api"]["spec"]["selector"], api_labels)
    assert by_kind(docs, "ScaledObject")["pae-worker"]["spec"]["scaleTargetRef"]["name"] == "pae-worker"
    assert "pae-worker" not in {h["spec"]["scaleTargetRef"]["name"] for h in by_kind(docs, "HorizontalPodAutoscaler").values()}  # fmt: skip


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pods_run_restricted(render, variant):
    for name, template in _pod_templates(render(variant)).items():
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod.get("automountServiceAccountToken") is False, name
        empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts.get("/tmp") in empty_dirs, f"{name}: /tmp must be a writable emptyDir"
            assert "memory" in container["resources"]["limits"], name


def test_api_metrics_dir_is_a_private_empty_dir(render):
    docs = render("cpu")
    pod = _pod_templates(docs)["pae-api"]["spec"]
    container = pod["containers"][0]
    path = _env(container)["PROMETHEUS_MULTIPROC_DIR"]["value"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == path)
    assert any(v["name"] == mount["name"] and "emptyDir" in v for v in pod["volumes"])
    assert "PROMETHEUS_MULTIPROC_DIR" not in _env(_container(docs, "pae-worker"))


def test_probes_hit_the_service_endpoints(render):
    docs = render("cpu")
    api = _container(docs, "pae-api")
    assert api["args"] == ["api"]
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert ports == {"http": 8000}
    assert api["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    worker = _container(docs, "pae-worker")
    assert worker["args"] == ["worker"]
    metrics_port = int(by_kind(docs, "ConfigMap")["pae-config"]["data"]["WORKER_METRICS_PORT"])
    assert {p["name"]: p["containerPort"] for p in worker["ports"]} == {"metrics": metrics_port}
    for probe in ("startupProbe", "livenessProbe"):
        assert worker[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    # The startup probe must outlast a cold model load before liveness may kill the pod.
    for container in (api, worker):
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_service_monitors_find_the_metrics_ports(render):
    docs = render("cpu")
    services = by_kind(docs, "Service")
    templates = _pod_templates(docs)
    for name, monitor in by_kind(docs, "ServiceMonitor").items():
        matched = [
            s for s in services.values() if _selects(monitor["spec"]["selector"], s["metadata"]["labels"])
        ]
        assert matched, f"ServiceMonitor {name} selects no Service"
        for service in matched:
            port_names = {p["name"] for p in service["spec"]["ports"]}
            assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names, name
            assert any(_selects({"matchLabels": service["spec"]["selector"]}, t["metadata"]["labels"]) for t in templates.values())  # fmt: skip
    assert {"pae-api", "pae-worker"} <= set(by_kind(docs, "ServiceMonitor"))


@pytest.mark.parametrize("variant", ["cpu", "gpu", "gpu+tensorrt", "cpu+models-volume", "cpu+redis-sentinel"])
def test_references_resolve_and_settings_are_valid(render, variant):
    docs = render(variant)
    config_maps = {n: d.get("data", {}) for n, d in by_kind(docs, "ConfigMap").items()}
    secrets = {n: d.get("stringData", {}) | d.get("data", {}) for n, d in by_kind(docs, "Secret").items()}
    settings = config_maps["pae-config"]
    assert set(settings) <= contract_settings(), set(settings) - contract_settings()
    for name, template in _pod_templates(docs).items():
        for container in template["spec"]["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps, name
            for var, entry in _env(container).items():
                assert var in contract_settings() or var in INFRA_ENV, (
                    f"{name}: {var} is neither a setting nor infra"
                )
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], {}), f"{name}: {ref} does not resolve"
        for volume in template["spec"].get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, name
    for workload in ("pae-api", "pae-worker"):
        env = dict(settings)
        for name, entry in _env(_container(docs, workload)).items():
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            env[name] = secrets[ref["name"]][ref["key"]] if ref else entry.get("value", "")
        parsed = Settings.from_env({k: v for k, v in env.items() if k in contract_settings()})
        assert str(parsed.model_repository) == "/models"
        assert parsed.redis_configured and (parsed.api_key is not None or workload == "pae-worker")


@pytest.mark.parametrize(
    ("variant", "scaler", "address"),
    [
        ("cpu", "redis-streams", "addressFromEnv"),
        ("cpu+redis-sentinel", "redis-sentinel-streams", "addressesFromEnv"),
    ],
)
def test_scaled_object_watches_the_streams_the_service_writes(render, variant, scaler, address):
    docs = render(variant)
    settings = by_kind(docs, "ConfigMap")["pae-config"]["data"]
    keys = Keys.for_model(settings["MODEL_NAME"], settings["MODEL_VERSION"])
    spec = by_kind(docs, "ScaledObject")["pae-worker"]["spec"]
    assert spec["minReplicaCount"] >= 1, "API readiness needs a live worker: never scale workers to zero"
    # KEDA resolves *FromEnv names from the container's env and envFrom ConfigMaps.
    worker_env = set(_env(_container(docs, "pae-worker"))) | set(settings)
    streams = {}
    for trigger in spec["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == scaler
        assert meta["consumerGroup"] == GROUP
        from_env = [v for k, v in meta.items() if k.endswith("FromEnv")]
        assert meta[address] in worker_env and set(from_env) <= worker_env, from_env
        streams[meta["stream"]] = int(meta["lagCount"])
    assert set(streams) == {keys.jobs(task) for task in TASKS}
    for task in TASKS:
        assert streams[keys.jobs(task)] >= int(settings[f"MAX_BATCH_SIZE_{task.upper()}"])


def test_only_api_and_worker_pods_reach_redis(render):
    docs = render("cpu")
    templates = _pod_templates(docs)
    policy = by_kind(docs, "NetworkPolicy")["pae-redis"]["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    assert _selects(policy["podSelector"], templates["pae-redis"]["metadata"]["labels"])
    same_namespace = [
        peer["podSelector"]
        for rule in policy["ingress"]
        for peer in rule["from"]
        if "namespaceSelector" not in peer
    ]

    def admitted(labels: dict[str, str]) -> bool:
        return any(_selects(selector, labels) for selector in same_namespace)

    assert admitted(templates["pae-api"]["metadata"]["labels"])
    assert admitted(templates["pae-worker"]["metadata"]["labels"])
    assert not admitted(templates["pae-redis"]["metadata"]["labels"])
    assert not admitted({"app.kubernetes.io/name": "pae", "app.kubernetes.io/component": "debug"})
    assert not admitted({"app": "something-else"})
    for rule in policy["ingress"]:
        assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
        for peer in rule["from"]:
            if "namespaceSelector" in peer:
                assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "keda-operator"}


def test_gpu_overlay_puts_workers_on_gpus(render):
    docs = render("gpu")
    pod = _pod_templates(docs)["pae-worker"]["spec"]
    worker = pod["containers"][0]
    assert worker["image"] == "pae-stack:0.1.0-cuda"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"]
    env = _env(worker)
    assert env["RUNTIME"]["value"] == "onnxruntime" and env["ORT_PROVIDER"]["value"] == "cuda"
    api = _container(docs, "pae-api")
    assert "nvidia.com/gpu" not in api["resources"]["limits"]
    assert "ORT_PROVIDER" not in _env(api)
    assert by_kind(docs, "ScaledObject")["pae-worker"]["spec"]["maxReplicaCount"] == 4


def test_tensorrt_component_switches_provider_and_waits_for_engines(render):
    worker = _container(render("gpu+tensorrt"), "pae-worker")
    assert _env(worker)["ORT_PROVIDER"]["value"] == "tensorrt"
    assert worker["image"] == "pae-stack:0.1.0-tensorrt"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    startup = worker["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    assert startup["httpGet"] == {"path": "/metrics", "port": "metrics"}


def test_external_redis_component_drops_in_cluster_redis(render):
    docs = render("cpu+external-redis")
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert not any(name.startswith("pae-redis") for _, name in names), names
    for workload in ("pae-api", "pae-worker"):
        ref = _env(_container(docs, workload))["REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "pae-redis", "key": "REDIS_URL"}


def test_models_volume_component_mounts_models_read_only(render):
    docs = render("cpu+models-volume")
    assert "pae-models" in by_kind(docs, "PersistentVolumeClaim")
    for workload in ("pae-api", "pae-worker"):
        pod = _pod_templates(docs)[workload]["spec"]
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/models")
        assert mount["readOnly"] is True
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["persistentVolumeClaim"]["claimName"] == "pae-models"


def test_redis_sentinel_component_replicates_across_nodes(render):
    docs = render("cpu+redis-sentinel")
    templates = _pod_templates(docs)
    sets = by_kind(docs, "StatefulSet")
    assert sets["pae-redis"]["spec"]["replicas"] == 2  # a primary and one replica
    assert sets["pae-redis-sentinel"]["spec"]["replicas"] == 3
    for name in ("pae-redis", "pae-redis-sentinel"):
        labels = templates[name]["metadata"]["labels"]
        [rule] = templates[name]["spec"]["affinity"]["podAntiAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        assert rule["topologyKey"] == "kubernetes.io/hostname" and _selects(rule["labelSelector"], labels), (
            name
        )
        budgets = [
            b
            for b in by_kind(docs, "PodDisruptionBudget").values()
            if _selects(b["spec"]["selector"], labels)
        ]
        assert len(budgets) == 1, name
    budgets = by_kind(docs, "PodDisruptionBudget")
    assert budgets["pae-redis"]["spec"]["maxUnavailable"] == 1
    assert budgets["pae-redis-sentinel"]["spec"]["minAvailable"] == 2  # a quorum and a majority stay

    settings = by_kind(docs, "ConfigMap")["pae-config"]["data"]
    parsed = Settings.from_env({**settings, "REDIS_PASSWORD": "x", "API_KEY": "k" * 32})
    sentinel_set = sets["pae-redis-sentinel"]
    headless = sentinel_set["spec"]["serviceName"]
    port = _container(docs, "pae-redis-sentinel")["ports"][0]["containerPort"]
    assert parsed.redis_sentinels == tuple((f"pae-redis-sentinel-{i}.{headless}", port) for i in range(3))
    assert by_kind(docs, "Service")[headless]["spec"]["clusterIP"] == "None"
    scripts = by_kind(docs, "ConfigMap")["pae-redis-scripts"]["data"]
    assert f"sentinel monitor {parsed.redis_sentinel_master} $primary 6379 2" in scripts["sentinel.sh"]
    for workload in ("pae-api", "pae-worker"):
        env = _env(_container(docs, workload))
        assert "REDIS_URL" not in env and "REDIS_SENTINEL_PASSWORD" in env, workload
    # Nothing may reach a random Redis pod through a ClusterIP: clients go through the sentinels.
    assert "pae-redis" not in by_kind(docs, "Service")

    def admitted(policy: str, component: str) -> bool:
        spec = by_kind(docs, "NetworkPolicy")[policy]["spec"]
        labels = {"app.kubernetes.io/name": "pae", "app.kubernetes.io/component": component}
        peers = [
            peer["podSelector"]
            for rule in spec["ingress"]
            for peer in rule["from"]
            if "namespaceSelector" not in peer
        ]
        return any(_selects(selector, labels) for selector in peers)

    for component in ("api", "worker", "redis", "redis-sentinel"):
        assert admitted("pae-redis", component) and admitted("pae-redis-sentinel", component), component
    assert not admitted("pae-redis", "debug") and not admitted("pae-redis-sentinel", "debug")


def test_redis_sentinel_scripts_are_valid_shell(render, tmp_path):
    scripts = by_kind(render("cpu+redis-sentinel"), "ConfigMap")["pae-redis-scripts"]["data"]
    for name, text in scripts.items():
        (tmp_path / name).write_text(text)
        checked = subprocess.run(["sh", "-n", str(tmp_path / name)], capture_output=True, text=True)
        assert checked.returncode == 0, f"{name}: {checked.stderr}"
