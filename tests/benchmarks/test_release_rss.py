"""release_e2e's server memory figure covers every process `pae-serve` started, not only itself."""

from __future__ import annotations

import os
import subprocess

from benchmarks.release_e2e import tree_peak_rss_mib


def test_the_peak_rss_of_a_process_tree_names_each_process() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        peaks = tree_peak_rss_mib(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert "sleep" in peaks and all(v >= 0 for v in peaks.values())
    assert max(peaks.values()) > 10  # this Python process
