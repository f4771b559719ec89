"""Where a server's own CPU goes: py-spy samples of each of its Python processes under load,
summed into the stages of a request.

    python -m benchmarks.peers --profile ...   (py-spy from PyPI: pip install py-spy)

Samples are taken with `--gil`, so they count the time a thread held the GIL, which is the Python
work that one process can do on one core; ONNX Runtime releases the GIL and shows in the CPU
figures instead. Each sample goes to the stage of its innermost frame that names one (a handler runs
inside the framework's frames, which run inside uvicorn's, so the frame nearest the sample decides);
a frame that several stages name goes to the first of them in `STAGES`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("compute (worker)", ("service/batch.py", "service/cancellation.py", "service/runtimes/")),
    ("png / json encode", ("encode_png", "pngs (", "png_response", "JSONResponse", "latents_to_json")),
    ("body parse", ("read_latents", "read_images", "read_generate", "latents_from", "parse_model")),
    ("image decode / resize", ("open_image", "finish_image", "decode_image")),
    ("enqueue", ("submit (service/broker.py",)),
    ("reply dispatcher", ("_dispatch (service/broker.py",)),
    ("worker: read / screen / answer", ("service/worker.py", "service/broker_worker.py")),
    ("peer handler (decode, run, encode)", ("benchmarks/peers/graphs.py", "benchmarks/peers/ray_peer.py")),
    ("metrics and body-limit middleware", ("prometheus_client", "service/api/middleware.py")),
    (
        "service handlers (checks, lane, answer)",
        ("service/api/", "service/codecs.py", "service/direct.py", "service/hot_threads.py"),
    ),
    ("server timing", ("service/timing.py",)),
    ("framework (routing, middleware, dependencies)", ("fastapi/", "starlette/", "pydantic", "anyio/")),
    ("http parse / write (uvicorn)", ("uvicorn/",)),
)


def py_spy() -> str | None:
    """The py-spy binary (beside this Python, or on PATH), or None when it is not installed."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.is_file() else shutil.which("py-spy")


class Profiler:
    """py-spy on each process (name → pid) for `seconds`, started before the load is driven."""

    def __init__(self, pids: Mapping[str, int], seconds: float) -> None:
        binary = py_spy()
        if binary is None:
            raise RuntimeError("py-spy is not installed: pip install py-spy")
        self.out = Path(tempfile.mkdtemp(prefix="pae-profile-"))
        self.seconds = max(1, int(seconds))
        self.files = {name: self.out / f"{name}.txt" for name in pids}
        argv = [binary, "record", "--gil", "-r", "200", "-d", str(self.seconds), "-f", "raw"]
        self.spies = [
            subprocess.Popen(
                [*argv, "-o", str(self.files[name]), "--pid", str(pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, pid in pids.items()
        ]

    def stages(self) -> dict[str, dict[str, float]]:
        """Wait for the samplers, then each process's samples by stage."""
        for spy in self.spies:
            spy.wait(timeout=self.seconds + 30)
        out = {
            name: summarise(path.read_text().splitlines())
            for name, path in self.files.items()
            if path.is_file()
        }
        shutil.rmtree(self.out, ignore_errors=True)
        return out


def summarise(lines: Sequence[str]) -> dict[str, float]:
    """Collapsed stacks (`frame;frame;... count`) → percent of samples per stage, and the count."""
    counts: dict[str, int] = {}
    total = 0
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        stage = _stage(stack.split(";"))
        counts[stage] = counts.get(stage, 0) + int(n)
        total += int(n)
    summary = {stage: round(100 * n / total, 1) for stage, n in sorted(counts.items(), key=lambda kv: -kv[1])}
    return {**summary, "samples": total}


def _stage(frames: Sequence[str]) -> str:
    for frame in reversed(frames):
        for name, marks in STAGES:
            if any(mark in frame for mark in marks):
                return name
    return "event loop, other"
