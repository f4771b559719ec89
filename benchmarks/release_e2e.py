"""The released model's path end to end on CPU, without the real weights.

A random checkpoint in the authors' layout (every tensor of the release's tables: DINOv2-L PAE,
LightningDiT-XL/1) → `pae-import` → `pae-export` (fp32 and fp16, parity at batch 1 and 2) →
`pae-serve` → one 256×256 generate and one encode/decode over HTTP. Each phase runs in its own
process, so its wall time and peak RSS are its own; then each graph's per-image CPU latency
(ONNX Runtime, batch 1) is measured alone. Results → JSON.

    python -m benchmarks.release_e2e --work /tmp/release-e2e --out benchmarks/results/release_e2e.json

Needs about 40 GB of free disk under --work and ~12 GB of free memory; --keep leaves the files, and
a kept --work resumes after its last finished phase.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.machine import describe, mark_quotable

ROOT = Path(__file__).resolve().parents[1]
TABLES = ROOT / "tests" / "data" / "official"
NAME = "release"
GRAPHS = ("encoder", "decoder", "dit", "dit_cond")
GENERATE = {"class_label": 207, "seed": 0, "sampler_preset": "release-80ep", "steps": 4}


def _bin(name: str) -> str:
    local = Path(sys.executable).with_name(name)
    return str(local) if local.is_file() else name


def _run(phase: str, command: list[str], work: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one phase as a child process; its wall time and peak RSS (from wait4)."""
    log = work / f"{phase}.log"
    start = time.perf_counter()
    with open(log, "w") as handle:
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"phase {phase} exited {code}; log {log}:\n{tail}")
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def write_sources(work: Path) -> None:
    """Phase body: random official-layout files from the release's tables."""
    from export.importer.synthetic import read_table, write_release_files
    from model.presets import get_preset

    pae = read_table(TABLES / "official_pae_dinov2l_d32_keys.tsv.gz")
    dit = read_table(TABLES / "official_lightningdit_xl1_keys.tsv.gz")
    write_release_files(work / "release", pae, dit, get_preset("imagenet256-dinov2l"), seed=0)


def graph_latency(version: Path, repeats: int) -> dict[str, Any]:
    """Phase body: per-image latency of each graph at batch 1, one ONNX Runtime session at a time."""
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feeds = {
        "encoder": {"images": rng.random((1, 3, 256, 256), dtype=np.float32)},
        "decoder": {"latents": rng.standard_normal((1, 32, 16, 16), dtype=np.float32)},
        "dit": {
            "x": rng.standard_normal((1, 32, 16, 16), dtype=np.float32),
            "t": np.array([0.5], np.float32),
            "y": np.array([207], np.int64),
            "cfg_scale": np.array([2.5], np.float32),
        },
        "dit_cond": {
            "x": rng.standard_normal((1, 32, 16, 16), dtype=np.float32),
            "t": np.array([0.5], np.float32),
            "y": np.array([207], np.int64),
        },
    }
    out: dict[str, Any] = {}
    for graph in GRAPHS:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = os.cpu_count() or 1
        start = time.perf_counter()
        session = ort.InferenceSession(
            str(version / f"{graph}.onnx"), opts, providers=["CPUExecutionProvider"]
        )
        load_s = time.perf_counter() - start
        session.run(None, feeds[graph])
        times = []
        for _ in range(repeats):
            tick = time.perf_counter()
            session.run(None, feeds[graph])
            times.append(time.perf_counter() - tick)
        out[graph] = {
            "session_load_s": round(load_s, 1),
            "ms_per_image": round(1000 * statistics.median(times)),
        }
        del session
    return out


def _post(url: str, body: bytes, content_type: str, accept: str, timeout: float) -> tuple[bytes, float]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type, "Accept": accept})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read(), time.perf_counter() - start


def _peak_rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return -1


def tree_peak_rss_mib(root: int) -> dict[str, int]:
    """Peak RSS of `pae-serve` and the processes it started (worker, redis-server), by program."""
    from benchmarks.peers.servers import tree_members

    peaks: dict[str, int] = {}
    for pid, name in sorted(tree_members(root).items()):
        try:
            peaks[name if name not in peaks else f"{name}-{pid}"] = _peak_rss_mib(pid)
        except OSError:
            continue  # exited between the listing and the read
    return peaks


def serve(work: Path, repository: Path, timeout_s: float = 1800.0) -> dict[str, Any]:
    """Start pae-serve (embedded Redis and worker) on the export; one generate and one encode/decode."""
    from PIL import Image

    from service.launcher import free_port, start_api, stop_process, wait_until_ready

    env = {
        "MODEL_REPOSITORY": str(repository),
        "MODEL_NAME": NAME,
        "REQUEST_TIMEOUT_S": str(timeout_s),
        "MAX_BATCH_SIZE_ENCODE": "1",
        "MAX_BATCH_SIZE_DECODE": "1",
        "MAX_BATCH_SIZE_GENERATE": "1",
        "WORKER_METRICS_PORT": "0",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    server = start_api("release", port, log=work / "serve.log", env=env, lifetime_s=3 * timeout_s)
    try:
        wait_until_ready([server], timeout_s)
        ready_s = time.perf_counter() - start
        png, generate_s = _post(
            f"{url}/v1/generate", json.dumps(GENERATE).encode(), "application/json", "image/png", timeout_s
        )
        (work / "generated.png").write_bytes(png)
        latents, encode_s = _post(f"{url}/v1/encode", png, "image/png", "application/x-npy", timeout_s)
        decoded, decode_s = _post(f"{url}/v1/decode", latents, "application/x-npy", "image/png", timeout_s)
        (work / "decoded.png").write_bytes(decoded)
        rss = tree_peak_rss_mib(server.program_pid)
    finally:
        stop_process(server, grace_s=120)
    return {
        "load_and_warm_up_s": round(ready_s, 1),
        "generate": {
            "request": GENERATE,
            "wall_s": round(generate_s, 1),
            "png_size": list(Image.open(work / "generated.png").size),
        },
        "encode_s": round(encode_s, 1),
        "decode_s": round(decode_s, 1),
        # Each process's own peak, summed: an upper bound on what the three held at once.
        "server_peak_rss_mib": sum(rss.values()),
        "server_peak_rss_mib_by_process": rss,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.release_e2e", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (tens of GB)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "release_e2e.json")
    parser.add_argument("--repeats", type=int, default=3, help="timed batch-1 runs per graph")
    parser.add_argument("--keep", action="store_true", help="keep the files under --work")
    parser.add_argument("--phase", choices=("write", "latency"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = args.work.resolve()
    repository = work / "repository"
    version = repository / NAME / "1"
    if args.phase == "write":
        write_sources(work)
        return 0
    if args.phase == "latency":
        (work / "latency.json").write_text(json.dumps(graph_latency(version, args.repeats)))
        return 0

    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": describe(), "phases": {}}
    phases = report["phases"]
    me = [sys.executable, "-m", "benchmarks.release_e2e", "--work", str(work), "--repeats", str(args.repeats)]
    started = time.perf_counter()
    try:
        release = work / "release"
        steps = (
            ("write_random_release", release / "latents_stats.pt", lambda: [*me, "--phase", "write"]),
            (
                "import",
                work / "checkpoint" / "config.json",
                lambda: [
                    _bin("pae-import"),
                    "--pae",
                    str(release / "pae.pt"),
                    "--dit",
                    str(release / "dit.pt"),
                    "--latent-stats",
                    str(release / "latents_stats.pt"),
                    "--out",
                    str(work / "checkpoint"),
                ],
            ),
            (
                "export",
                version / "manifest.json",
                lambda: [
                    _bin("pae-export"),
                    "--checkpoint",
                    str(work / "checkpoint"),
                    "--repository",
                    str(repository),
                    "--name",
                    NAME,
                    "--fp16",
                    "--parity-batches",
                    "1,2",
                ],
            ),
        )
        for phase, product, command in steps:
            # A kept --work resumes after the last finished phase (its product exists).
            phases[phase] = {"reused": str(product)} if product.exists() else _run(phase, command(), work)
        manifest = json.loads((version / "manifest.json").read_text())
        report["repository"] = {
            "files_mib": {k: round(v["bytes"] / 2**20) for k, v in sorted(manifest["files"].items())},
            "parity": {p: manifest["parity"][p] for p in ("fp32", "fp16")},
        }
        phases["serve"] = serve(work, repository)
        phases["graph_latency"] = _run("latency", [*me, "--phase", "latency"], work)
        report["graph_latency_batch1"] = json.loads((work / "latency.json").read_text())
    finally:
        report["total_wall_s"] = round(time.perf_counter() - started, 1)
        report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        report = mark_quotable(report, affects="its wall times and latencies (not its sizes or RSS)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        if not args.keep:
            shutil.rmtree(work / "release", ignore_errors=True)
            shutil.rmtree(work / "checkpoint", ignore_errors=True)
            shutil.rmtree(repository, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
