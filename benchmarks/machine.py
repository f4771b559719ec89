"""Whose numbers these are, and whether they may be quoted: the `machine` block every benchmark JSON
starts with, and the quotability rule every benchmark applies before it writes its JSON.

These machines are shared, and a benchmark's timings are only comparable with one taken under a
similar load: two processes on two cores halve what each gets, and a 2-thread OpenMP pool stalls
whenever another process takes one of its cores. So the load average at the start is recorded, and a
result measured while it exceeded `QUOTABLE_LOAD` is marked not quotable (`"quotable": false`, with
the reason) and says so loudly.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# The 1-minute load average above which a result may not be quoted: more than one core's worth of
# other work was running when the benchmark started.
QUOTABLE_LOAD = 1.0


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo ("unknown" where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def describe(**extra: Any) -> dict[str, Any]:
    """CPU, core count, platform, Python and torch versions and the load average, plus `extra`.

    Called when a benchmark starts; warns at once when the machine is too loaded for its result to
    be quoted, so the run can be stopped and started again on an idle machine.
    """
    block = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
        **extra,
    }
    quotable, reason = quotability(block)
    if not quotable:
        _warn(f"this run will be marked not quotable: {reason}")
    return block


def quotability(machine: Mapping[str, Any], affects: str = "its timings") -> tuple[bool, str]:
    """Whether a result measured on `machine` may be quoted, and why (`affects`: what load changes)."""
    load = machine.get("load_average_start")
    if not load:
        return False, "it records no load average at start"
    first = float(load[0])
    if first > QUOTABLE_LOAD:
        return False, (
            f"the load average at start was {first:g}, over {QUOTABLE_LOAD:g}: other processes shared "
            f"the cores, so {affects} are not comparable with an idle machine's"
        )
    return True, f"the load average at start was {first:g}, at most {QUOTABLE_LOAD:g}"


def mark_quotable(result: Mapping[str, Any], affects: str = "its timings") -> dict[str, Any]:
    """`result` with `quotable` and `quotable_reason` right after its machine block, from the load
    average that block recorded at the start; warns on stderr when it may not be quoted."""
    quotable, reason = quotability(result.get("machine", {}), affects)
    if not quotable:
        _warn(f"this result is NOT QUOTABLE: {reason}")
    marked: dict[str, Any] = {}
    if "machine" in result:
        marked["machine"] = result["machine"]
    marked.update({"quotable": quotable, "quotable_reason": reason})
    marked.update({k: v for k, v in result.items() if k not in marked})
    return marked


def save_figure(fig: Any, path: Path, title: str, result: Mapping[str, Any], dpi: int = 110) -> None:
    """Title the figure with `title`, the load average at the start and, when the result may not be
    quoted, a mark saying so (a plot travels without its JSON), then write it to `path` and close it."""
    import matplotlib.pyplot as plt

    load = result.get("machine", {}).get("load_average_start") or ["?"]
    flag = "" if result.get("quotable") else " — NOT QUOTABLE"
    fig.suptitle(f"{title}; load average at start {load[0]}{flag}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)
