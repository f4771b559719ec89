"""`make image-test`: build the container image with podman/buildah and check it running, for real.

    python deploy/image-test/image_test.py [--cold] [--no-compose] [--json PATH]

From a machine with no container tools: apt-get installs podman, buildah, runc, podman-compose
(engine.py); debootstrap makes the base image (base-image.sh); the CPU torch wheel already on disk is
served to the build as a package index (wheelhouse.py); the `cpu` and `cpu-torch` targets are built,
then a rebuild after a source-only change is timed. The running containers are then asked, over
HTTP: `api` alone (embedded Redis), `api` + `worker` on an external Redis, both with compose.yaml's
security options; readiness, encode/decode/generate byte-identical to tests/golden (what `make run`
answers), /metrics, the HEALTHCHECK, uid 10001, the read-only root; and finally compose.yaml itself
under podman-compose (compose_test.py). Build times, sizes and the load average go to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import checks
import compose_test
import context
import engine
import wheelhouse

REPO = engine.REPO
sys.path.insert(0, str(REPO))

from benchmarks.machine import describe, mark_quotable  # noqa: E402

WORK = REPO / "runs" / "image-test"
IMAGE = "localhost/pae-stack"
TORCH_VERSION = "2.13.0"
MAX_SERVING_MB = 600
READY_TIMEOUT_S = 240.0


def timed(phases: dict[str, float], name: str, action, *args, **kwargs):
    """Run `action`, record its wall time under `name`, print it, return its result."""
    start = time.monotonic()
    result = action(*args, **kwargs)
    phases[name] = round(time.monotonic() - start, 1)
    print(f"[{phases[name]:7.1f} s] {name}", flush=True)
    return result


def build_images(args: argparse.Namespace, phases: dict[str, float], log: Path) -> dict[str, str]:
    """Base, PAE targets and compose stand-ins; the timed rebuild after a source change. Returns tags."""
    base = timed(phases, "base_image", engine.base_image)
    source = timed(phases, "context_mirror", context.mirror, WORK / "context")
    index_dir = timed(phases, "wheelhouse", wheelhouse.prepare, WORK / "wheelhouse", TORCH_VERSION)
    tags = {"base": base, "cpu": f"{IMAGE}:cpu", "cpu-torch": f"{IMAGE}:cpu-torch"}
    with wheelhouse.serve(index_dir) as index_url:
        build_args = {"CPU_BASE": base, "TORCH_INDEX_URL": index_url, "TORCH_VERSION": TORCH_VERSION}

        def build(phase: str, tag: str, target: str, no_cache: bool = False) -> float:
            return timed(
                phases, phase, engine.build, source, tag, target, build_args, log=log, no_cache=no_cache
            )

        for target in ("cpu", "cpu-torch"):
            build(f"build_{target}", tags[target], target, no_cache=args.cold)
        build("rebuild_unchanged", tags["cpu"], "cpu")
        with context.source_edited(source):
            build("rebuild_after_source_change", f"{IMAGE}:source-edit", "cpu")
        engine.run(["podman", "rmi", f"{IMAGE}:source-edit"], check=False)
    containerfile = engine.HERE / "Containerfile"
    for name in ("redis", "prometheus"):
        tags[name] = f"localhost/pae-image-test-{name}:latest"
        stand_in_args = {"BASE": base}
        timed(
            phases,
            f"build_stand_in_{name}",
            engine.build,
            engine.HERE,
            tags[name],
            name,
            stand_in_args,
            file=containerfile,
            log=log,
        )
    return tags


def image_checks(report: checks.Report, tags: dict[str, str]) -> None:
    """What the images are, before any of them runs."""
    info = engine.inspect_image(tags["cpu"])
    config = info["Config"]
    health = (info.get("Healthcheck") or config.get("Healthcheck") or {}).get("Test") or []
    report.check(
        "image keeps its HEALTHCHECK (docker format)", "pae-healthcheck" in " ".join(health), str(health)
    )
    report.check(
        "image runs as uid 10001", config.get("User", "").split(":")[0] == "10001", config.get("User", "")
    )
    size_mb = engine.image_size(tags["cpu"]) / 1e6
    report.check(f"cpu image ≤ {MAX_SERVING_MB} MB", size_mb <= MAX_SERVING_MB, f"{size_mb:.0f} MB")
    no_torch = engine.run(["podman", "run", "--rm", tags["cpu"], "python", "-c", "import torch"], check=False)
    report.check("cpu image has no torch (`import torch` fails)", no_torch.returncode != 0)
    has_torch = engine.run(
        ["podman", "run", "--rm", tags["cpu-torch"], "python", "-c", "import torch"], check=False
    )
    report.check("cpu-torch image imports torch", has_torch.returncode == 0, has_torch.stdout.strip()[-200:])


def serving_checks(
    report: checks.Report, label: str, api: engine.Container, worker_metrics: str | None
) -> float:
    """Readiness, golden answers, metrics, healthcheck and security of a running API; returns ready seconds."""
    ready = checks.wait_ready(api.url(), READY_TIMEOUT_S, alive=lambda: api.inspect()["State"]["Running"])
    report.check(f"{label}: /readyz 200", True, f"after {ready:.1f} s")
    report.attempt(
        f"{label}: generate PNGs byte-identical to make run's",
        lambda: checks.generate_matches_golden(api.url()),
    )
    report.attempt(
        f"{label}: encode and decode byte-identical", lambda: checks.encode_decode_match_golden(api.url())
    )
    report.attempt(
        f"{label}: API /metrics counts the requests", lambda: checks.api_metrics_count_requests(api.url())
    )
    if worker_metrics:
        report.attempt(
            f"{label}: worker /metrics counts batches",
            lambda: checks.worker_metrics_count_batches(worker_metrics),
        )
    report.check(f"{label}: API healthcheck passes", api.healthcheck())
    report.attempt(
        f"{label}: uid 10001, no capabilities, read-only root", lambda: checks.security_options(api)
    )
    return ready


def container_checks(report: checks.Report, tags: dict[str, str], log: Path) -> dict[str, float]:
    """The two topologies of the issue, plus the torch flavour's eager runtime; returns ready times."""
    ready: dict[str, float] = {}
    containers: list[engine.Container] = []
    network = "pae-image-test"
    try:
        api = engine.Container.start("pae-image-test-embedded", tags["cpu"], ["api"], publish=[8000])
        containers.append(api)
        ready["embedded"] = serving_checks(report, "api alone (embedded Redis)", api, None)

        engine.run(["podman", "network", "rm", "--force", network], check=False)
        engine.run(["podman", "network", "create", network])
        redis_env = {"REDIS_URL": "redis://redis:6379/0"}
        # Redis last: the roles must wait for it themselves (compose's start order is a courtesy).
        worker = engine.Container.start(
            "pae-image-test-worker", tags["cpu"], ["worker"], env=redis_env, publish=[9100], network=network
        )
        api2 = engine.Container.start(
            "pae-image-test-api", tags["cpu"], ["api"], env=redis_env, publish=[8000], network=network
        )
        containers += [worker, api2]
        report.attempt(
            "api + worker + Redis: started before Redis, the API answers /readyz 503",
            lambda: checks.not_ready_without_redis(api2.url(), READY_TIMEOUT_S),
        )
        redis = engine.Container.start(
            "pae-image-test-redis",
            tags["redis"],
            ["redis-server", "--save", ""],
            network=network,
            alias="redis",
            hardened=False,
        )
        containers.append(redis)
        ready["api_worker_redis"] = serving_checks(report, "api + worker + Redis", api2, worker.url(9100))
        report.check("api + worker + Redis: worker healthcheck passes", worker.healthcheck())
        report.attempt(
            "api + worker + Redis: worker uid 10001, no capabilities, read-only root",
            lambda: checks.security_options(worker),
        )

        eager = engine.Container.start(
            "pae-image-test-torch", tags["cpu-torch"], ["api"], env={"RUNTIME": "torch"}, publish=[8000]
        )
        containers.append(eager)
        ready["cpu_torch_eager"] = checks.wait_ready(eager.url(), READY_TIMEOUT_S)
        report.attempt(
            "cpu-torch with RUNTIME=torch: generate answers a PNG", lambda: checks.generate_png(eager.url())
        )
    except (TimeoutError, RuntimeError) as exc:
        report.check("containers started and became ready", False, str(exc))
    finally:
        if report.failed:
            with log.open("a") as out:
                for container in containers:
                    out.write(f"--- {container.name} ---\n{container.logs()}\n")
        for container in reversed(containers):
            container.remove()
        engine.run(["podman", "network", "rm", "--force", network], check=False)
    return {k: round(v, 1) for k, v in ready.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cold", action="store_true", help="build without any cached layer (podman --no-cache)"
    )
    parser.add_argument("--no-compose", action="store_true", help="skip the podman-compose stack")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "image_test.json")
    args = parser.parse_args(argv)
    extra = " ".join(sys.argv[1:] if argv is None else argv)
    WORK.mkdir(parents=True, exist_ok=True)
    log = WORK / "build.log"
    log.write_text("")
    machine = describe()
    start = time.monotonic()
    phases: dict[str, float] = {}
    report = checks.Report()
    installed = timed(phases, "host_tools", engine.install_host_tools)
    images_before = engine.run(["podman", "images", "--all", "--quiet"]).stdout.split()
    tags = build_images(args, phases, log)
    image_checks(report, tags)
    ready = timed(phases, "container_checks", container_checks, report, tags, log)
    stack = (
        {}
        if args.no_compose
        else timed(phases, "compose_stack", compose_test.run, report, tags, log, READY_TIMEOUT_S)
    )
    phases["total"] = round(time.monotonic() - start, 1)
    sizes = {name: engine.image_size(tag) for name, tag in tags.items()}
    result = {
        "machine": {**machine, "load_average_end": [round(v, 2) for v in os.getloadavg()]},
        "command": "make image-test" + (f" IMAGE_TEST_ARGS='{extra}'" if extra else ""),
        "build_cache": "none (--no-cache)"
        if args.cold
        else ("warm" if images_before else "cold (empty store)"),
        "installed_host_packages": installed,
        "phases_s": phases,
        "image_size_bytes": sizes,
        "image_size_mb": {name: round(size / 1e6) for name, size in sizes.items()},
        "ready_s": ready,
        "compose_s": stack,
        "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in report.results],
        "passed": len(report.results) - report.failed,
        "failed": report.failed,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = mark_quotable(result, "its build and start times")
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print("image sizes: " + ", ".join(f"{n} {s / 1e6:.0f} MB" for n, s in sizes.items()))
    print(
        f"build: cpu {phases['build_cpu']} s ({result['build_cache']}), after a source change "
        f"{phases['rebuild_after_source_change']} s; total {phases['total']} s; JSON: {args.json}"
    )
    print(report.summary())
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
