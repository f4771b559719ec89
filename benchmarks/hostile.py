"""Hostile traffic against the real topology: cancelled costly work, rejection under a burst,
slow clients, and image headers that promise costly decoding.

    .venv/bin/python -m benchmarks.hostile [--repository DIR] [--burst 200] [--slow 200]
        [--timeout-s 5]

One redis-server, one `pae-serve` API replica and one `pae-worker` (benchmarks/topology.py),
all on 127.0.0.1, serving `model_repository/fmnist32-tiny/<latest>` when exported (its compute is
real: a sampler step of 8 images is tens of milliseconds on one core), else the tiny test model.

- cancellation: a 16-image, 250-step guided Heun generate whose deadline (`X-Request-Timeout: 0.5`)
  passes, or whose client disconnects after 0.5 s, then at once a light generate. Reported: the
  worker-seconds the abandoned batch ran after the cancellation (`pae_abandoned_compute_seconds`:
  all its jobs share one batch, so the mean per job is the batch's), against one sampler step of
  that batch (measured on the same batch size) and against the compute the request had left; and
  the light request's wait.
- burst: with the worker busy and a task's queue full (QUEUE_MAX_LEN), `--burst` concurrent encode
  (256×256 PNG bodies) or generate requests, on new connections or on connections opened
  beforehand; the median and p99 time of their 429s, and the API's CPU per request (which, unlike
  the times, does not depend on what else the machine runs).
- slowloris: `--slow` connections that send nothing, half a request line, headers a byte a second,
  or half a body, while a client keeps sending light requests; when the server closes each one
  (HEADER_TIMEOUT_S = BODY_TIMEOUT_S = `--timeout-s`) and how the light requests fare.
- decompression: four 8 × 2 000 000-pixel PNG headers (4 KB each) in one encode with a 3 s
  deadline, and other shapes; status and time.

Writes `benchmarks/results/hostile.json` (with the load average at the start: figures taken with a
load above 1 are marked not quotable) and `hostile.png`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import httpx

from benchmarks.hostile_plot import plot
from benchmarks.machine import RESULTS, mark_quotable
from benchmarks.topology import Topology, cpu_seconds, machine_info, metric_sum, resolve_model
from benchmarks.traffic import drive, percentile, png_bytes
from service.broker_protocol import Keys

HEAVY = {"class_label": 0, "num_images": 16, "steps": 250, "sampler": "heun", "cfg_scale": 3.5, "seed": 1}
LIGHT = {"class_label": 1, "seed": 2, "steps": 10}
QUEUE_MAX_LEN = 64
SLOW_KINDS = ("silent", "half request line", "header dribble", "half body")


def topology_env(timeout_s: float) -> dict[str, str]:
    return {
        "MAX_STEPS": "250",
        "MAX_NUM_IMAGES": "16",
        "MAX_REQUEST_COST": "16000",
        "QUEUE_MAX_COST": "80000",
        "QUEUE_MAX_LEN": str(QUEUE_MAX_LEN),
        "REQUEST_TIMEOUT_S": "120",
        "HEADER_TIMEOUT_S": str(timeout_s),
        "BODY_TIMEOUT_S": str(timeout_s),
    }


def model_version(topo: Topology) -> str:
    return httpx.get(f"{topo.urls[0]}/v1/models", timeout=10).json()["models"][0]["version"]


def worker_sums(topo: Topology) -> dict[str, float]:
    texts = topo.worker_metrics()
    return {
        "abandoned_s": metric_sum(texts, "pae_abandoned_compute_seconds_sum", task="generate"),
        "abandoned_jobs": metric_sum(texts, "pae_abandoned_compute_seconds_count", task="generate"),
        "expired": metric_sum(texts, "pae_jobs_expired_total", task="generate"),
        "cancelled": metric_sum(texts, "pae_jobs_cancelled_total", task="generate"),
    }


def step_seconds(url: str) -> float:
    """One sampler step of a batch of 8 images under HEAVY's settings (the heavy batches' size)."""
    probe = {**HEAVY, "num_images": 8, "steps": 10}
    answer = httpx.post(f"{url}/v1/generate", json=probe, timeout=120)
    answer.raise_for_status()
    return float(answer.headers["x-compute-ms"]) / 1000 / probe["steps"]


def cancellation(topo: Topology, url: str, how: str, step_s: float) -> dict[str, object]:
    """One heavy request abandoned after 0.5 s (`how`: deadline or disconnect), then a light one."""
    before = worker_sums(topo)
    start = time.perf_counter()
    if how == "deadline":
        answer = httpx.post(
            f"{url}/v1/generate", json=HEAVY, headers={"X-Request-Timeout": "0.5"}, timeout=60
        )
        status = answer.status_code
    else:
        try:
            httpx.post(f"{url}/v1/generate", json=HEAVY, timeout=0.5)
            status = 200
        except httpx.ReadTimeout:
            status = 0  # the client went away
    abandoned_after = time.perf_counter() - start
    light_start = time.perf_counter()
    light = httpx.post(f"{url}/v1/generate", json=LIGHT, timeout=120)
    light_wait = time.perf_counter() - light_start
    time.sleep(1.5)  # the dropped jobs are counted when their batch ends
    after = worker_sums(topo)
    jobs = after["abandoned_jobs"] - before["abandoned_jobs"]
    dropped = "expired" if how == "deadline" else "cancelled"
    batch_s = (after["abandoned_s"] - before["abandoned_s"]) / jobs if jobs else None
    return {
        "status": status,
        "abandoned_after_s": round(abandoned_after, 3),
        "worker_seconds_after_cancel": None if batch_s is None else round(batch_s, 4),
        "in_sampler_steps": None if batch_s is None else round(batch_s / step_s, 2),
        "jobs_stopped_mid_batch": int(jobs),
        "jobs_dropped": int(after[dropped] - before[dropped]),
        "compute_left_unpruned_s": round(2 * 250 * step_s - abandoned_after, 2),
        "light_status": light.status_code,
        "light_wait_s": round(light_wait, 3),
        "light_compute_ms": float(light.headers.get("x-compute-ms", "nan")),
    }


async def hold(url: str, calls: Sequence[tuple[str, dict]], stop: asyncio.Event) -> dict[str, int]:
    """Keep `calls` in flight (each on its own connection) until `stop`, then drop them; the
    statuses of those answered meanwhile (none, if they held their queues as meant to)."""
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=len(calls))) as http:
        tasks = [asyncio.create_task(http.post(url + path, **kwargs)) for path, kwargs in calls]
        await stop.wait()
        answered = [str(t.result().status_code) if not t.exception() else "error" for t in tasks if t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {status: answered.count(status) for status in set(answered)}


def post_bytes(path: str, content_type: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one request and read its whole answer, as bare as a client can be (the load generator
    shares the cores with the service, so its own CPU per request must stay small); the status."""
    writer.write(request)
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return status


async def burst(port: int, request: bytes, n: int, kept_alive: bool) -> list[tuple[int, float]]:
    """`n` copies of `request` at once, each on its own connection: new ones, or ones opened (and
    used once) beforehand, as a client pool's would be. Status and milliseconds of each."""
    connections = []
    if kept_alive:
        connections = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(n)))
        probe = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        await asyncio.gather(*(exchange(r, w, probe) for r, w in connections))

    async def one(i: int) -> tuple[int, float]:
        start = time.perf_counter()
        try:
            reader, writer = (
                connections[i] if kept_alive else await asyncio.open_connection("127.0.0.1", port)
            )
            status = await exchange(reader, writer, request)
            writer.close()
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            status = 0
        return status, (time.perf_counter() - start) * 1000

    return await asyncio.gather(*(one(i) for i in range(n)))


async def bursts(topo: Topology, n: int) -> dict[str, object]:
    """Fill the generate and encode queues behind a busy worker, then burst each endpoint."""
    url, port, api_pid = topo.urls[0], topo.apis[0].port, topo.apis[0].program_pid
    store, keys = topo.redis_client(), Keys.for_model(topo.model, model_version(topo))
    image = png_bytes(256, 0)
    stop = asyncio.Event()
    heavies = [("/v1/generate", {"json": {**HEAVY, "seed": i}}) for i in range(QUEUE_MAX_LEN // 16)]
    encodes = [
        ("/v1/encode", {"content": png_bytes(32, i), "headers": {"Content-Type": "image/png"}})
        for i in range(QUEUE_MAX_LEN)
    ]

    async def filled(task: str) -> None:
        deadline = time.monotonic() + 60
        while store.xlen(keys.jobs(task)) < QUEUE_MAX_LEN:
            assert time.monotonic() < deadline, f"the held requests did not fill the {task} queue"
            await asyncio.sleep(0.1)

    # The heavy batch must hold the worker before the encodes arrive, or it would answer them.
    holders = [asyncio.create_task(hold(url, heavies, stop))]
    await filled("generate")
    holders.append(asyncio.create_task(hold(url, encodes, stop)))
    await filled("encode")
    out: dict[str, object] = {}
    for name, content_type, body in (
        ("encode", "image/png", image),
        ("generate", "application/json", json.dumps(LIGHT).encode()),
    ):
        for kept_alive in (False, True):
            queued = {"jobs": store.xlen(keys.jobs(name)), "cost": int(store.get(keys.cost(name)) or 0)}
            cpu = cpu_seconds(api_pid)
            results = await burst(port, post_bytes(f"/v1/{name}", content_type, body), n, kept_alive)
            cpu = cpu_seconds(api_pid) - cpu
            refused = [ms for status, ms in results if status == 429]
            out[f"{name}, {'kept-alive' if kept_alive else 'new'} connections"] = {
                "requests": n,
                "body_bytes": len(body),
                "statuses": {str(s): sum(1 for r, _ in results if r == s) for s in {r for r, _ in results}},
                "p50_429_ms": percentile(refused, 50),
                "p99_429_ms": percentile(refused, 99),
                "max_429_ms": round(max(refused), 1) if refused else None,
                "api_cpu_ms_per_request": round(cpu * 1000 / n, 3),
                "queued_before": queued,
                "latencies_429_ms": [round(ms, 2) for ms in refused],
            }
    stop.set()
    out["held_requests_answered_during_the_bursts"] = await asyncio.gather(*holders)
    return out


async def slow_connection(port: int, kind: str, limit_s: float) -> tuple[str, float, str]:
    """Open one connection that misbehaves as `kind`; how long until the server closed it, and its answer."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"POST /v1/decode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if kind == "half request line":
        writer.write(b"POST /v1/dec")
    elif kind == "half body":
        writer.write(head + b"Content-Length: 5000\r\n\r\n{")

    async def dribble() -> None:
        for byte in head:
            writer.write(bytes([byte]))
            await asyncio.sleep(1.0)

    feeder = asyncio.create_task(dribble()) if kind == "header dribble" else None
    try:
        answer = await asyncio.wait_for(reader.read(), limit_s)
        closed = time.perf_counter() - start
    except (TimeoutError, ConnectionError):
        answer, closed = b"", float("nan")
    finally:
        if feeder is not None:
            feeder.cancel()
        writer.close()
    return kind, closed, answer.split(b"\r\n", 1)[0].decode(errors="replace")


async def slowloris(url: str, port: int, n: int, timeout_s: float) -> dict[str, object]:
    stop = asyncio.Event()
    light: list[tuple[float, float, int]] = []

    async def serve_others() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            while not stop.is_set():
                sent = time.perf_counter()
                try:
                    status = (await http.post(f"{url}/v1/generate", json={**LIGHT, "steps": 2})).status_code
                except httpx.HTTPError:
                    status = 0
                light.append((sent, (time.perf_counter() - sent) * 1000, status))

    others = asyncio.create_task(serve_others())
    start = time.perf_counter()
    closes = await asyncio.gather(
        *(slow_connection(port, SLOW_KINDS[i % len(SLOW_KINDS)], 6 * timeout_s) for i in range(n))
    )
    stop.set()
    await others
    per_kind = {}
    for kind in SLOW_KINDS:
        times = [t for k, t, _ in closes if k == kind]
        closed = [t for t in times if t == t]
        per_kind[kind] = {
            "connections": len(times),
            "closed_by_server": len(closed),
            "close_s_median": percentile(closed, 50),
            "close_s_max": round(max(closed), 3) if closed else None,
            "answers": sorted({a for k, _, a in closes if k == kind}),
        }
    statuses = [s for _, _, s in light]
    return {
        "timeout_s": timeout_s,
        "connections": n,
        "per_kind": per_kind,
        "all_closed_within_timeout_plus_1s": all(t <= timeout_s + 1 for _, t, _ in closes),
        "others": {
            "requests": len(light),
            "ok": statuses.count(200),
            "p50_ms": percentile([ms for _, ms, s in light if s == 200], 50),
            "p99_ms": percentile([ms for _, ms, s in light if s == 200], 99),
            "timeline": [(round(t - start, 3), round(ms, 1), s) for t, ms, s in light],
        },
        "close_times": [(k, round(t, 3)) for k, t, _ in closes],
    }


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width × height and holds almost no data (what a decompression bomb sends)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def decompression(url: str) -> dict[str, object]:
    out = {}
    for name, files in (
        ("4 × 8×2000000 (inside MAX_IMAGE_PIXELS)", [png_header(8, 2_000_000)] * 4),
        ("8×4000 (aspect 500)", [png_header(8, 4000)]),
        ("20000×20000", [png_header(20_000, 20_000)]),
    ):
        start = time.perf_counter()
        answer = httpx.post(
            f"{url}/v1/encode",
            files=[("file", (f"{i}.png", data)) for i, data in enumerate(files)],
            headers={"X-Request-Timeout": "3"},
            timeout=60,
        )
        out[name] = {
            "bytes_each": len(files[0]),
            "status": answer.status_code,
            "seconds": round(time.perf_counter() - start, 3),
            "detail": answer.json().get("detail"),
        }
    return out


def run(args: argparse.Namespace, scratch: Path) -> dict[str, object]:
    repository, model, description = resolve_model(args.repository, scratch)
    env = topology_env(args.timeout_s)
    with Topology(repository, model, api_replicas=1, workers=1, env=env) as topo:
        url = topo.urls[0]
        port = topo.apis[0].port
        httpx.post(f"{url}/v1/generate", json=LIGHT, timeout=120).raise_for_status()  # warm
        step_s = step_seconds(url)
        result = {
            "machine": machine_info(),
            "model": description,
            "settings": env,
            "sampler_step_s_batch_of_8": round(step_s, 4),
            "cancellation": {how: cancellation(topo, url, how, step_s) for how in ("deadline", "disconnect")},
            "burst": drive(bursts(topo, args.burst)),
            "slowloris": drive(slowloris(url, port, args.slow, args.timeout_s)),
            "decompression": decompression(url),
        }
        result["ready_after"] = httpx.get(f"{url}/readyz", timeout=10).status_code
    return mark_quotable(result)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hostile", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--repository", type=Path, default=None)
    parser.add_argument("--burst", type=int, default=200, help="concurrent requests per burst")
    parser.add_argument("--slow", type=int, default=200, help="slow connections")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="HEADER_TIMEOUT_S and BODY_TIMEOUT_S")
    parser.add_argument("--out", type=Path, default=RESULTS / "hostile.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        result = run(args, Path(scratch))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    summary = {
        "cancellation": {
            k: {x: v[x] for x in ("worker_seconds_after_cancel", "in_sampler_steps", "light_wait_s")}
            for k, v in result["cancellation"].items()
        },
        "burst_p50_429_ms": {k: v["p50_429_ms"] for k, v in result["burst"].items() if "p50_429_ms" in v},
        "slowloris_closed_in_time": result["slowloris"]["all_closed_within_timeout_plus_1s"],
        "decompression": {k: (v["status"], v["seconds"]) for k, v in result["decompression"].items()},
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
