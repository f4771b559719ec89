"""Whose numbers these are: the `machine` block every benchmark JSON starts with.

The load average at the start is recorded because these machines are shared: a benchmark result is
only comparable with one taken under a similar load.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo ("unknown" where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def describe(**extra: Any) -> dict[str, Any]:
    """CPU, core count, platform, Python and torch versions and the load average, plus `extra`."""
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
        **extra,
    }
