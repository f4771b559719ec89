"""The Redis side of the Kubernetes manifests: the streams KEDA watches are the service's, only the
service's pods reach Redis, and the external-Redis and Sentinel components do what they say."""

from __future__ import annotations

import subprocess

import pytest

from service.broker_protocol import GROUP, Keys
from service.settings import Settings
from tests.deploy.helpers import TASKS, by_kind, env_of, first_container, pod_templates, selects


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
    worker_env = set(env_of(first_container(docs, "pae-worker"))) | set(settings)
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
    templates = pod_templates(docs)
    policy = by_kind(docs, "NetworkPolicy")["pae-redis"]["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    assert selects(policy["podSelector"], templates["pae-redis"]["metadata"]["labels"])
    same_namespace = [
        peer["podSelector"]
        for rule in policy["ingress"]
        for peer in rule["from"]
        if "namespaceSelector" not in peer
    ]

    def admitted(labels: dict[str, str]) -> bool:
        return any(selects(selector, labels) for selector in same_namespace)

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


def test_external_redis_component_drops_in_cluster_redis(render):
    docs = render("cpu+external-redis")
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert not any(name.startswith("pae-redis") for _, name in names), names
    for workload in ("pae-api", "pae-worker"):
        ref = env_of(first_container(docs, workload))["REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "pae-redis", "key": "REDIS_URL"}


def test_redis_sentinel_component_replicates_across_nodes(render):
    docs = render("cpu+redis-sentinel")
    templates = pod_templates(docs)
    sets = by_kind(docs, "StatefulSet")
    assert sets["pae-redis"]["spec"]["replicas"] == 2  # a primary and one replica
    assert sets["pae-redis-sentinel"]["spec"]["replicas"] == 3
    for name in ("pae-redis", "pae-redis-sentinel"):
        labels = templates[name]["metadata"]["labels"]
        [rule] = templates[name]["spec"]["affinity"]["podAntiAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        assert rule["topologyKey"] == "kubernetes.io/hostname" and selects(rule["labelSelector"], labels), (
            name
        )
        budgets = [
            b for b in by_kind(docs, "PodDisruptionBudget").values() if selects(b["spec"]["selector"], labels)
        ]
        assert len(budgets) == 1, name
    budgets = by_kind(docs, "PodDisruptionBudget")
    assert budgets["pae-redis"]["spec"]["maxUnavailable"] == 1
    assert budgets["pae-redis-sentinel"]["spec"]["minAvailable"] == 2  # a quorum and a majority stay

    settings = by_kind(docs, "ConfigMap")["pae-config"]["data"]
    parsed = Settings.from_env({**settings, "REDIS_PASSWORD": "x", "API_KEY": "k" * 32})
    sentinel_set = sets["pae-redis-sentinel"]
    headless = sentinel_set["spec"]["serviceName"]
    port = first_container(docs, "pae-redis-sentinel")["ports"][0]["containerPort"]
    assert parsed.redis_sentinels == tuple((f"pae-redis-sentinel-{i}.{headless}", port) for i in range(3))
    assert by_kind(docs, "Service")[headless]["spec"]["clusterIP"] == "None"
    scripts = by_kind(docs, "ConfigMap")["pae-redis-scripts"]["data"]
    assert f"sentinel monitor {parsed.redis_sentinel_master} $primary 6379 2" in scripts["sentinel.sh"]
    for workload in ("pae-api", "pae-worker"):
        env = env_of(first_container(docs, workload))
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
        return any(selects(selector, labels) for selector in peers)

    for component in ("api", "worker", "redis", "redis-sentinel"):
        assert admitted("pae-redis", component) and admitted("pae-redis-sentinel", component), component
    assert not admitted("pae-redis", "debug") and not admitted("pae-redis-sentinel", "debug")


def test_redis_sentinel_scripts_are_valid_shell(render, tmp_path):
    scripts = by_kind(render("cpu+redis-sentinel"), "ConfigMap")["pae-redis-scripts"]["data"]
    for name, text in scripts.items():
        (tmp_path / name).write_text(text)
        checked = subprocess.run(["sh", "-n", str(tmp_path / name)], capture_output=True, text=True)
        assert checked.returncode == 0, f"{name}: {checked.stderr}"
