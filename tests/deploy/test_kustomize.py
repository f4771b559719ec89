"""The Kubernetes manifests: every rendered variant validates, is secure, and agrees with the service.

Built-in kinds go through kubernetes-validate --strict; the custom resources (KEDA, prometheus-operator)
through this project's own schemas (crd_schemas.py). Cross-checks tie the manifests to the service's
code and the contract: the ConfigMap and every workload's environment pass service/settings.py's
validation. The Redis side (streams, policies, components) is test_kustomize_redis.py.
"""

from __future__ import annotations

import jsonschema
import kubernetes_validate
import pytest
from kubernetes_validate.utils import SchemaNotFoundError, latest_version

from service.settings import Settings
from tests.deploy.crd_schemas import CRD_SCHEMAS
from tests.deploy.helpers import (
    VARIANTS,
    by_kind,
    contract_settings,
    env_of,
    first_container,
    pod_templates,
    selects,
)

K8S_VERSIONS = ("1.32.0", latest_version())
# Environment variables the manifests set that are not service settings, and who reads them.
INFRA_ENV = {
    "PORT": "entrypoint (pae-serve --port)",
    "PROMETHEUS_MULTIPROC_DIR": "prometheus-client in the API",
    "REDIS_ADDRESS": "KEDA redis-streams scaler (addressFromEnv)",
    "REDIS_PASSWORD": "KEDA scaler (passwordFromEnv), redis-server --requirepass, the service with sentinels",
    "REDISCLI_AUTH": "redis-cli in the Redis probes and start scripts",
}


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
    assert first_container(docs, "pae-api")["image"] == "pae-stack:0.1.0-cpu"
    assert by_kind(docs, "Deployment")["pae-api"]["spec"]["replicas"] >= 2
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["pae-api"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pae-api"}
    assert hpa["minReplicas"] >= 2
    api_labels = pod_templates(docs)["pae-api"]["metadata"]["labels"]
    assert selects(by_kind(docs, "PodDisruptionBudget")["pae-api"]["spec"]["selector"], api_labels)
    assert by_kind(docs, "ScaledObject")["pae-worker"]["spec"]["scaleTargetRef"]["name"] == "pae-worker"
    assert "pae-worker" not in {h["spec"]["scaleTargetRef"]["name"] for h in by_kind(docs, "HorizontalPodAutoscaler").values()}  # fmt: skip


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pods_run_restricted(render, variant):
    for name, template in pod_templates(render(variant)).items():
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
    pod = pod_templates(docs)["pae-api"]["spec"]
    container = pod["containers"][0]
    path = env_of(container)["PROMETHEUS_MULTIPROC_DIR"]["value"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == path)
    assert any(v["name"] == mount["name"] and "emptyDir" in v for v in pod["volumes"])
    assert "PROMETHEUS_MULTIPROC_DIR" not in env_of(first_container(docs, "pae-worker"))


def test_probes_hit_the_service_endpoints(render):
    docs = render("cpu")
    api = first_container(docs, "pae-api")
    assert api["args"] == ["api"]
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert ports == {"http": 8000}
    assert api["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    worker = first_container(docs, "pae-worker")
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
    templates = pod_templates(docs)
    for name, monitor in by_kind(docs, "ServiceMonitor").items():
        matched = [
            s for s in services.values() if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
        ]
        assert matched, f"ServiceMonitor {name} selects no Service"
        for service in matched:
            port_names = {p["name"] for p in service["spec"]["ports"]}
            assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names, name
            assert any(selects({"matchLabels": service["spec"]["selector"]}, t["metadata"]["labels"]) for t in templates.values())  # fmt: skip
    assert {"pae-api", "pae-worker"} <= set(by_kind(docs, "ServiceMonitor"))


@pytest.mark.parametrize("variant", ["cpu", "gpu", "gpu+tensorrt", "cpu+models-volume", "cpu+redis-sentinel"])
def test_references_resolve_and_settings_are_valid(render, variant):
    docs = render(variant)
    config_maps = {n: d.get("data", {}) for n, d in by_kind(docs, "ConfigMap").items()}
    secrets = {n: d.get("stringData", {}) | d.get("data", {}) for n, d in by_kind(docs, "Secret").items()}
    settings = config_maps["pae-config"]
    assert set(settings) <= contract_settings(), set(settings) - contract_settings()
    for name, template in pod_templates(docs).items():
        for container in template["spec"]["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps, name
            for var, entry in env_of(container).items():
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
        for name, entry in env_of(first_container(docs, workload)).items():
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            env[name] = secrets[ref["name"]][ref["key"]] if ref else entry.get("value", "")
        parsed = Settings.from_env({k: v for k, v in env.items() if k in contract_settings()})
        assert str(parsed.model_repository) == "/models"
        assert parsed.redis_configured and (parsed.api_key is not None or workload == "pae-worker")


def test_gpu_overlay_puts_workers_on_gpus(render):
    docs = render("gpu")
    pod = pod_templates(docs)["pae-worker"]["spec"]
    worker = pod["containers"][0]
    assert worker["image"] == "pae-stack:0.1.0-cuda"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"]
    env = env_of(worker)
    assert env["RUNTIME"]["value"] == "onnxruntime" and env["ORT_PROVIDER"]["value"] == "cuda"
    api = first_container(docs, "pae-api")
    assert "nvidia.com/gpu" not in api["resources"]["limits"]
    assert "ORT_PROVIDER" not in env_of(api)
    assert by_kind(docs, "ScaledObject")["pae-worker"]["spec"]["maxReplicaCount"] == 4


def test_tensorrt_component_switches_provider_and_waits_for_engines(render):
    worker = first_container(render("gpu+tensorrt"), "pae-worker")
    assert env_of(worker)["ORT_PROVIDER"]["value"] == "tensorrt"
    assert worker["image"] == "pae-stack:0.1.0-tensorrt"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    startup = worker["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    assert startup["httpGet"] == {"path": "/metrics", "port": "metrics"}


def test_models_volume_component_mounts_models_read_only(render):
    docs = render("cpu+models-volume")
    assert "pae-models" in by_kind(docs, "PersistentVolumeClaim")
    for workload in ("pae-api", "pae-worker"):
        pod = pod_templates(docs)[workload]["spec"]
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/models")
        assert mount["readOnly"] is True
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["persistentVolumeClaim"]["claimName"] == "pae-models"
