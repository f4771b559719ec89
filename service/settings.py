"""Service settings from environment variables, validated once at start.

Every variable of the "Service settings" contract (docs/INTERFACES.md) is read here and nowhere
else, so a typo or an out-of-range value stops the process at start with a message naming the
variable, instead of surfacing as a confusing failure under load.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from export.repository import RepositoryError, is_version_name, validate_name

TASKS: tuple[str, ...] = ("encode", "decode", "generate")
RUNTIMES: tuple[str, ...] = ("onnxruntime", "torch", "tensorrt")
ORT_PROVIDERS: tuple[str, ...] = ("cpu", "cuda", "tensorrt")

_DEFAULT_MAX_BATCH = {"encode": 16, "decode": 16, "generate": 8}
_DEFAULT_MAX_WAIT_MS = {"encode": 5, "decode": 5, "generate": 10}
GRAPH_TASKS: tuple[str, ...] = ("encode", "decode")
"""Tasks that are one graph call per image: a worker runs their batches in chunks
(`service.graph_batch`; GRAPH_BATCH_SIZE_<TASK>, 0 measures) and the direct lane takes them
(`service.direct`)."""


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup (v2) CPU quota, which is
    how a container's CPU limit shows (a pod on a 64-core node limited to 2 CPUs gets 2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, math.ceil(int(quota) / int(period))))


class SettingsError(ValueError):
    """An environment variable is missing a valid value; the message names the variable."""


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise SettingsError(f"{name} must be {bound}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not lo < value <= hi:
        raise SettingsError(f"{name} must be > {lo} and <= {hi}, got {value}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}; got {raw!r}")
    return value


def _optional(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name)
    return raw.strip() if raw is not None and raw.strip() else None


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise SettingsError(f"{name} must be true or false, got {env.get(name)!r}")


def _addresses(env: Mapping[str, str], name: str) -> tuple[tuple[str, int], ...]:
    """`host:port,host:port` (an IPv6 host in brackets) as (host, port) pairs."""
    raw = _optional(env, name)
    if raw is None:
        return ()
    out = []
    for item in (part.strip() for part in raw.split(",")):
        host, colon, port = item.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError(f"{name} must be a comma-separated list of host:port, got {item!r}")
        out.append((host, int(port)))
    return tuple(out)


@dataclass(frozen=True)
class Settings:
    """The validated configuration of an API replica or a worker (both read the same variables).

    The Redis URL (which may hold a password), the Redis passwords and the API key are left out of
    the repr, so a logged or printed Settings never shows a secret.

    Redis is one of: `redis_url` (one server, or with `redis_cluster` any node of a cluster), or
    `redis_sentinels` (the sentinels that know the primary named `redis_sentinel_master`, reached
    with `redis_username` / `redis_password`); neither means the embedded redis-server.
    """

    redis_url: str | None = field(default=None, repr=False)
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str = "pae"
    redis_username: str | None = None
    redis_password: str | None = field(default=None, repr=False)
    redis_sentinel_password: str | None = field(default=None, repr=False)
    redis_cluster: bool = False
    model_repository: Path = Path("model_repository")
    model_name: str = "fmnist32-tiny"
    model_version: str | None = None
    runtime: str = "onnxruntime"
    ort_provider: str = "cpu"
    ort_intra_op_threads: int = 0
    ort_inter_op_threads: int = 1
    max_batch_size: dict[str, int] = field(default_factory=lambda: dict(_DEFAULT_MAX_BATCH))
    max_wait_ms: dict[str, int] = field(default_factory=lambda: dict(_DEFAULT_MAX_WAIT_MS))
    graph_batch_size: dict[str, int] = field(default_factory=dict)
    queue_max_len: int = 256
    request_timeout_s: float = 60.0
    api_key: str | None = field(default=None, repr=False)
    max_body_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 16_777_216
    max_num_images: int = 16
    max_steps: int = 250
    worker_metrics_port: int = 9100
    claim_idle_ms: int = 30_000
    max_deliveries: int = 3
    redis_pool_size: int = 64
    redis_pool_timeout_s: float = 5.0
    max_request_cost: int = 8_000
    queue_max_cost: int = 16_000
    max_image_side: int = 16_384
    max_image_aspect: int = 16
    image_decode_threads: int = 2
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    compute_threads: int = 0
    direct_slots: int = 0

    @property
    def runs_concurrently(self) -> bool:
        """Whether the runtime takes several batches at once (ONNX Runtime sessions do; a TensorRT
        execution context or the torch backend are kept to one)."""
        return self.runtime == "onnxruntime"

    @property
    def batch_threads(self) -> int:
        """Batches one worker computes at once (COMPUTE_THREADS; 0 ⇒ automatic).

        Automatic: on ONNX Runtime's CPU provider with a fixed ORT_INTRA_OP_THREADS, as many batches
        as those threads fit in the cores this process may use, so each batch has cores of its own:
        independent single-threaded runs keep every core busy where one run's thread pool would wait
        at each operator for a thread whose core another process took. Otherwise one.
        """
        if self.compute_threads:
            return self.compute_threads
        if self.runtime == "onnxruntime" and self.ort_provider == "cpu" and self.ort_intra_op_threads:
            return max(1, usable_cores() // self.ort_intra_op_threads)
        return 1

    @property
    def redis_configured(self) -> bool:
        """Whether an external Redis is named (else `pae-serve` starts an embedded one)."""
        return self.redis_url is not None or bool(self.redis_sentinels)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable; raise SettingsError naming the first bad one."""
        env = os.environ if env is None else env
        max_batch = {
            task: _int(env, f"MAX_BATCH_SIZE_{task.upper()}", _DEFAULT_MAX_BATCH[task], 1, 1024)
            for task in TASKS
        }
        max_wait = {
            task: _int(env, f"MAX_WAIT_MS_{task.upper()}", _DEFAULT_MAX_WAIT_MS[task], 0, 10_000)
            for task in TASKS
        }
        graph_batch = {
            task: _int(env, f"GRAPH_BATCH_SIZE_{task.upper()}", 0, 0, 1024) for task in GRAPH_TASKS
        }
        redis_url = _optional(env, "REDIS_URL")
        if redis_url is not None and not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError(
                f"REDIS_URL must start with redis://, rediss:// or unix://, got {redis_url!r}"
            )
        sentinels = _addresses(env, "REDIS_SENTINELS")
        cluster = _flag(env, "REDIS_CLUSTER")
        if sentinels and redis_url is not None:
            raise SettingsError(
                "set REDIS_URL or REDIS_SENTINELS, not both (with sentinels, REDIS_USERNAME and "
                "REDIS_PASSWORD give the primary's credentials)"
            )
        if cluster and (redis_url is None or redis_url.startswith("unix://")):
            raise SettingsError("REDIS_CLUSTER needs REDIS_URL naming one node of the cluster (TCP)")
        model_name = _optional(env, "MODEL_NAME") or "fmnist32-tiny"
        try:
            validate_name(model_name)
        except RepositoryError as exc:
            raise SettingsError(f"MODEL_NAME: {exc}") from None
        version = _optional(env, "MODEL_VERSION")
        if version is not None and version.lower() == "latest":
            version = None
        if version is not None and not is_version_name(version):
            raise SettingsError(f"MODEL_VERSION must be an integer folder name or 'latest', got {version!r}")
        pixels = _int(env, "MAX_IMAGE_PIXELS", 16_777_216, 64, 89_478_485)
        settings = cls(
            redis_url=redis_url,
            redis_sentinels=sentinels,
            redis_sentinel_master=_optional(env, "REDIS_SENTINEL_MASTER") or "pae",
            redis_username=_optional(env, "REDIS_USERNAME"),
            redis_password=_optional(env, "REDIS_PASSWORD"),
            redis_sentinel_password=_optional(env, "REDIS_SENTINEL_PASSWORD"),
            redis_cluster=cluster,
            model_repository=Path(_optional(env, "MODEL_REPOSITORY") or "model_repository"),
            model_name=model_name,
            model_version=version,
            runtime=_choice(env, "RUNTIME", "onnxruntime", RUNTIMES),
            ort_provider=_choice(env, "ORT_PROVIDER", "cpu", ORT_PROVIDERS),
            ort_intra_op_threads=_int(env, "ORT_INTRA_OP_THREADS", 0, 0, 1024),
            ort_inter_op_threads=_int(env, "ORT_INTER_OP_THREADS", 1, 0, 1024),
            max_batch_size=max_batch,
            max_wait_ms=max_wait,
            graph_batch_size=graph_batch,
            queue_max_len=_int(env, "QUEUE_MAX_LEN", 256, 1, 10_000_000),
            request_timeout_s=_float(env, "REQUEST_TIMEOUT_S", 60.0, 0.0, 3600.0),
            api_key=_optional(env, "API_KEY"),
            max_body_bytes=_int(env, "MAX_BODY_BYTES", 8 * 1024 * 1024, 1024, 1 << 31),
            max_image_pixels=pixels,
            max_num_images=_int(env, "MAX_NUM_IMAGES", 16, 1, 1024),
            max_steps=_int(env, "MAX_STEPS", 250, 1, 10_000),
            worker_metrics_port=_int(env, "WORKER_METRICS_PORT", 9100, 0, 65535),
            claim_idle_ms=_int(env, "CLAIM_IDLE_MS", 30_000, 100, 86_400_000),
            max_deliveries=_int(env, "MAX_DELIVERIES", 3, 1, 1000),
            redis_pool_size=_int(env, "REDIS_POOL_SIZE", 64, 4, 10_000),
            redis_pool_timeout_s=_float(env, "REDIS_POOL_TIMEOUT_S", 5.0, 0.0, 600.0),
            max_request_cost=_int(env, "MAX_REQUEST_COST", 8_000, 1, 1 << 40),
            queue_max_cost=_int(env, "QUEUE_MAX_COST", 16_000, 1, 1 << 50),
            max_image_side=_int(env, "MAX_IMAGE_SIDE", 16_384, 8, 1 << 20),
            max_image_aspect=_int(env, "MAX_IMAGE_ASPECT", 16, 1, 1 << 20),
            image_decode_threads=_int(env, "IMAGE_DECODE_THREADS", 2, 1, 256),
            header_timeout_s=_float(env, "HEADER_TIMEOUT_S", 10.0, 0.0, 3600.0),
            body_timeout_s=_float(env, "BODY_TIMEOUT_S", 10.0, 0.0, 3600.0),
            compute_threads=_int(env, "COMPUTE_THREADS", 0, 0, 256),
            direct_slots=_int(env, "DIRECT_SLOTS", 0, 0, 256),
        )
        if settings.compute_threads > 1 and not settings.runs_concurrently:
            raise SettingsError(
                f"COMPUTE_THREADS={settings.compute_threads} needs the onnxruntime runtime (its sessions "
                f"take concurrent runs); RUNTIME={settings.runtime} computes one batch at a time"
            )
        if settings.direct_slots > 1 and not settings.runs_concurrently:
            raise SettingsError(
                f"DIRECT_SLOTS={settings.direct_slots} needs the onnxruntime runtime (its sessions take "
                f"concurrent runs); RUNTIME={settings.runtime} computes one call at a time"
            )
        if settings.api_key is not None and len(settings.api_key) < 16:
            raise SettingsError("API_KEY must be at least 16 characters when set")
        if settings.max_request_cost > settings.queue_max_cost:
            # A request the queue could never hold would be admitted by one limit and refused forever
            # by the other: a 429 its client would retry in vain.
            raise SettingsError(
                f"MAX_REQUEST_COST ({settings.max_request_cost}) must not exceed QUEUE_MAX_COST "
                f"({settings.queue_max_cost})"
            )
        return settings
