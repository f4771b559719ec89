from pathlib import Path

import pytest

from service.settings import Settings, SettingsError


def test_defaults_follow_the_contract() -> None:
    s = Settings.from_env({})
    assert s.redis_url is None
    assert s.model_repository == Path("model_repository")
    assert s.model_name == "fmnist32-tiny"
    assert s.model_version is None
    assert (s.runtime, s.ort_provider) == ("onnxruntime", "cpu")
    assert s.worker_metrics_port == 9100
    assert set(s.max_batch_size) == set(s.max_wait_ms) == {"encode", "decode", "generate"}


def test_every_variable_is_read() -> None:
    env = {
        "REDIS_URL": "redis://r:6379/1",
        "MODEL_REPOSITORY": "/models",
        "MODEL_NAME": "m",
        "MODEL_VERSION": "3",
        "RUNTIME": "torch",
        "ORT_PROVIDER": "CUDA",
        "MAX_BATCH_SIZE_GENERATE": "4",
        "MAX_WAIT_MS_ENCODE": "0",
        "QUEUE_MAX_LEN": "10",
        "REQUEST_TIMEOUT_S": "2.5",
        "API_KEY": "k" * 20,
        "MAX_BODY_BYTES": "2048",
        "MAX_IMAGE_PIXELS": "1000",
        "MAX_NUM_IMAGES": "2",
        "MAX_STEPS": "7",
        "WORKER_METRICS_PORT": "0",
        "CLAIM_IDLE_MS": "500",
        "MAX_DELIVERIES": "5",
        "MAX_REQUEST_COST": "300",
        "QUEUE_MAX_COST": "900",
        "MAX_IMAGE_SIDE": "640",
        "MAX_IMAGE_ASPECT": "4",
        "IMAGE_DECODE_THREADS": "3",
        "HEADER_TIMEOUT_S": "2",
        "BODY_TIMEOUT_S": "4.5",
    }
    s = Settings.from_env(env)
    assert s.redis_url == "redis://r:6379/1" and s.model_repository == Path("/models")
    assert (s.model_name, s.model_version, s.runtime, s.ort_provider) == ("m", "3", "torch", "cuda")
    assert s.max_batch_size["generate"] == 4 and s.max_wait_ms["encode"] == 0
    assert (s.queue_max_len, s.request_timeout_s, s.api_key) == (10, 2.5, "k" * 20)
    assert (s.max_body_bytes, s.max_image_pixels, s.max_num_images, s.max_steps) == (2048, 1000, 2, 7)
    assert (s.worker_metrics_port, s.claim_idle_ms, s.max_deliveries) == (0, 500, 5)
    assert (s.max_request_cost, s.queue_max_cost, s.max_image_side, s.max_image_aspect) == (300, 900, 640, 4)
    assert (s.image_decode_threads, s.header_timeout_s, s.body_timeout_s) == (3, 2.0, 4.5)
    assert Settings.from_env({"MODEL_VERSION": "latest"}).model_version is None


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"MAX_BATCH_SIZE_GENERATE": "0"}, "MAX_BATCH_SIZE_GENERATE"),
        ({"MAX_WAIT_MS_DECODE": "soon"}, "MAX_WAIT_MS_DECODE"),
        ({"RUNTIME": "jax"}, "RUNTIME"),
        ({"ORT_PROVIDER": "rocm"}, "ORT_PROVIDER"),
        ({"REQUEST_TIMEOUT_S": "0"}, "REQUEST_TIMEOUT_S"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"MODEL_VERSION": "v2"}, "MODEL_VERSION"),
        ({"MODEL_NAME": "../etc"}, "MODEL_NAME"),
        ({"API_KEY": "short"}, "API_KEY"),
        ({"MAX_IMAGE_PIXELS": "999999999"}, "MAX_IMAGE_PIXELS"),
        ({"QUEUE_MAX_LEN": "-1"}, "QUEUE_MAX_LEN"),
        ({"MAX_REQUEST_COST": "20000"}, "MAX_REQUEST_COST"),  # more than the queue could ever hold
        ({"HEADER_TIMEOUT_S": "0"}, "HEADER_TIMEOUT_S"),
        ({"IMAGE_DECODE_THREADS": "0"}, "IMAGE_DECODE_THREADS"),
        ({"REDIS_SENTINELS": "s1:26379,s2"}, "REDIS_SENTINELS"),
        ({"REDIS_SENTINELS": "s1:99999"}, "REDIS_SENTINELS"),
        ({"REDIS_SENTINELS": "s1:26379", "REDIS_URL": "redis://r:6379/0"}, "REDIS_SENTINELS"),
        ({"REDIS_CLUSTER": "true"}, "REDIS_CLUSTER"),
        ({"REDIS_CLUSTER": "maybe", "REDIS_URL": "redis://r:6379/0"}, "REDIS_CLUSTER"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


def test_compute_threads_fill_the_cores_with_single_threaded_sessions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service import settings as module

    monkeypatch.setattr(module, "usable_cores", lambda: 4)
    assert Settings.from_env({}).batch_threads == 1  # ONNX Runtime's own pool spans the cores
    assert Settings.from_env({"ORT_INTRA_OP_THREADS": "1"}).batch_threads == 4
    assert Settings.from_env({"ORT_INTRA_OP_THREADS": "2"}).batch_threads == 2
    assert Settings.from_env({"ORT_INTRA_OP_THREADS": "1", "ORT_PROVIDER": "cuda"}).batch_threads == 1
    assert Settings.from_env({"ORT_INTRA_OP_THREADS": "1", "RUNTIME": "torch"}).batch_threads == 1
    assert Settings.from_env({"COMPUTE_THREADS": "3"}).batch_threads == 3
    with pytest.raises(SettingsError, match="COMPUTE_THREADS"):
        Settings.from_env({"COMPUTE_THREADS": "2", "RUNTIME": "tensorrt"})


def test_usable_cores_follow_a_cgroup_quota(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from service import settings as module

    assert module.usable_cores() >= 1
    quota = tmp_path / "cpu.max"
    real_path = module.Path

    def fake(path: str) -> Path:
        return quota if path == "/sys/fs/cgroup/cpu.max" else real_path(path)

    monkeypatch.setattr(module, "Path", fake)
    monkeypatch.setattr(module.os, "sched_getaffinity", lambda _pid: set(range(64)))
    quota.write_text("150000 100000\n")
    assert module.usable_cores() == 2
    quota.write_text("max 100000\n")
    assert module.usable_cores() == 64


def test_redis_through_sentinels_or_a_cluster() -> None:
    s = Settings.from_env(
        {
            "REDIS_SENTINELS": "s0:26379, [fd00::1]:26380,s2.redis.svc:26379",
            "REDIS_SENTINEL_MASTER": "primary",
            "REDIS_USERNAME": "pae",
            "REDIS_PASSWORD": "data-secret",
            "REDIS_SENTINEL_PASSWORD": "sentinel-secret",
        }
    )
    assert s.redis_sentinels == (("s0", 26379), ("fd00::1", 26380), ("s2.redis.svc", 26379))
    assert (s.redis_sentinel_master, s.redis_username, s.redis_url) == ("primary", "pae", None)
    assert s.redis_configured and not s.redis_cluster
    assert "data-secret" not in repr(s) and "sentinel-secret" not in repr(s)
    assert Settings.from_env({}).redis_sentinel_master == "pae"
    assert not Settings.from_env({}).redis_configured
    cluster = Settings.from_env({"REDIS_URL": "rediss://u:p@node-0:6379/0", "REDIS_CLUSTER": "yes"})
    assert cluster.redis_cluster and cluster.redis_configured
