"""The three servers under comparison as processes on 127.0.0.1, their CPU, and the graphs' ceiling.

- `service`: `pae-serve` with no REDIS_URL, exactly what `make run` starts (its own redis-server
  and worker process beside the API);
- `plain`: benchmarks/peers/plain.py, one FastAPI process calling ONNX Runtime in its handlers;
- `ray`: benchmarks/peers/ray_peer.py, Ray Serve with `@serve.batch` (skipped when Ray is absent).

Each is started through the service's launcher, and the CPU it uses is the sum over its whole
process tree (API, worker and redis-server; Ray's raylet, GCS, proxy and replica).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.launcher import (
    LOOPBACK,
    Proc,
    entry_point,
    free_port,
    start_process,
    stop_process,
    wait_until_ready,
)
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SERVERS = ("service", "plain", "ray")
LIFETIME_S = 3600


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.serve") is not None


@dataclass
class Running:
    """A started server: its process (session leader), port and log."""

    name: str
    proc: Proc
    port: int

    def cpu_seconds(self) -> dict[str, float]:
        return tree_cpu_seconds(self.proc.pid)

    def python_processes(self) -> dict[str, int]:
        """name → pid of its Python processes (API, worker; Ray's proxy and replicas)."""
        found: dict[str, int] = {}
        for pid, name in sorted(tree_members(self.proc.pid).items()):
            if name.startswith(("pae-", "python", "ray::")) and "Dashboard" not in name:
                found[name if name not in found else f"{name}-{pid}"] = pid
        return found

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 20 s, then SIGKILL whatever is left of its session (Ray's actors
        leave the process group, not the session)."""
        stop_process(self.proc, grace_s=20.0)
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3]) == self.proc.pid:
                        os.kill(int(entry.name), signal.SIGKILL)


def start_server(
    name: str, version_dir: Path, threads: int, log_dir: Path, extra_env: Mapping[str, str] | None = None
) -> Running:
    """Start one server on a free port, with `extra_env` over this process's environment, and wait
    until it answers its probe."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(extra_env or {})})
    if name == "service":
        env.update(
            {
                "MODEL_REPOSITORY": str(version_dir.parents[1]),
                "MODEL_NAME": version_dir.parent.name,
                "MODEL_VERSION": version_dir.name,
                "ORT_INTRA_OP_THREADS": str(threads),
            }
        )
        argv = [*entry_point("pae-serve"), "--host", LOOPBACK, "--port", str(port), "--log-level", "warning"]
        probe = "/readyz"
    else:
        module = "benchmarks.peers.plain" if name == "plain" else "benchmarks.peers.ray_peer"
        argv = [sys.executable, "-m", module, "--port", str(port), "--version-dir", str(version_dir)]
        argv += ["--intra-op-threads", str(threads)]
        probe = "/healthz"
    proc = start_process(
        name,
        argv,
        log=log_dir / f"{name}.log",
        base_env=env,
        cwd=ROOT,
        lifetime_s=LIFETIME_S,
        probe=f"http://{LOOPBACK}:{port}{probe}",
        port=port,
    )
    try:
        wait_until_ready([proc], timeout_s=240.0)
    except BaseException:
        stop_process(proc)
        raise
    return Running(name, proc, port)


def _proc_table() -> dict[int, tuple[int, int, str, float]]:
    """pid → (parent, session, program name, user + system CPU seconds) of every live process."""
    tick = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, int, str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            head, rest = (entry / "stat").read_text().rsplit(")", 1)
        except OSError:
            continue
        fields = rest.split()
        table[int(entry.name)] = (
            int(fields[1]),
            int(fields[3]),
            head.split("(", 1)[1],
            (int(fields[11]) + int(fields[12])) / tick,
        )
    return table


def tree_members(root: int, table: dict[int, tuple[int, int, str, float]] | None = None) -> dict[int, str]:
    """pid → program name of `root`, its live descendants and every process of `root`'s session.

    Both, because the service's worker and redis-server run in sessions of their own, and Ray's
    actors (proxy, replica) are re-parented to init but stay in the session.
    """
    table = _proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (parent, _session, _name, _cpu) in table.items():
        children.setdefault(parent, []).append(pid)
    members = {pid for pid, (_parent, session, _name, _cpu) in table.items() if session == root}
    todo = [root] if root in table else []
    while todo:
        pid = todo.pop()
        members.add(pid)
        todo.extend(children.get(pid, ()))
    return {pid: table[pid][2] for pid in members}


def tree_cpu_seconds(root: int) -> dict[str, float]:
    """User + system CPU seconds of `tree_members(root)`, summed per program name. A process that
    has exited takes its share with it, so measure across intervals in which the server's processes
    live."""
    table = _proc_table()
    totals: dict[str, float] = {}
    for pid, name in tree_members(root, table).items():
        totals[name] = totals.get(name, 0.0) + table[pid][3]
    return totals


def graph_ceiling(version_dir: Path, threads: int, batch: int, seconds: float = 1.5) -> dict[str, object]:
    """Images per second of the encoder and decoder graphs alone, at batch 1 and at `batch`, with
    the servers' session options; nothing else of the benchmark runs meanwhile.

    Each figure is the median over repeated timed slices, so one slice disturbed by another process
    does not set it, with the CPU time per image beside it (what the graph costs however busy the
    machine is). `all_cores` is the batched figure with as many runs at once as the service's worker
    computes batches (`Settings.batch_threads`): what the machine can do with every core on the graph.
    """
    from benchmarks.peers.graphs import Graphs

    graphs = Graphs(version_dir, threads)
    config = graphs.config
    size = config.image_size
    rng = np.random.default_rng(0)
    streams = Settings(ort_intra_op_threads=threads).batch_threads
    result: dict[str, object] = {"streams": streams}
    for name, shape in (("encoder", (3, size, size)), ("decoder", tuple(config.latent_shape))):
        result[name] = {}
        for b in (1, batch):
            x = rng.random((b, *shape), dtype=np.float32)
            graphs.run(name, x)
            rates, ms = [], []
            cpu = time.process_time()
            end = time.perf_counter() + seconds
            while time.perf_counter() < end or len(rates) < 5:
                start = time.perf_counter()
                graphs.run(name, x)
                took = time.perf_counter() - start
                rates.append(b / took)
                ms.append(took * 1000)
            result[name][str(b)] = {
                "img_per_s": round(statistics.median(rates), 1),
                "ms_per_batch": round(statistics.median(ms), 3),
                "cpu_ms_per_image": round(1000 * (time.process_time() - cpu) / (b * len(rates)), 3),
                "runs": len(rates),
            }
        x = rng.random((batch, *shape), dtype=np.float32)
        result[name]["all_cores"] = {"img_per_s": round(_parallel_rate(graphs, name, x, streams, seconds), 1)}
    return result


def _parallel_rate(graphs, name: str, x: np.ndarray, streams: int, seconds: float) -> float:
    """Images per second of `streams` threads each running the graph on `x` back to back."""
    counts = [0] * streams
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            graphs.run(name, x)
            counts[i] += len(x)

    start = time.perf_counter()
    pool = [threading.Thread(target=loop, args=(i,)) for i in range(streams)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(counts) / (time.perf_counter() - start)
