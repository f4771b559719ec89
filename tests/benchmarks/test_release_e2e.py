"""The released model's path at full size on CPU (slow: about an hour on 2 cores, ~40 GB of disk):
random official-layout checkpoint → pae-import → pae-export → pae-serve → a 256×256 generate and an
encode/decode. `python -m benchmarks.release_e2e` is the documented command; this runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.release_e2e import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(4 * 3600)]


def test_a_random_release_imports_exports_and_serves_at_256px(tmp_path: Path) -> None:
    out = tmp_path / "release_e2e.json"
    assert main(["--work", str(tmp_path / "work"), "--out", str(out), "--repeats", "1"]) == 0
    report = json.loads(out.read_text())
    files = report["repository"]["files_mib"]
    assert files["dit.onnx.data"] > 2048 and files["dit_cond.onnx.data"] > 2048  # over protobuf's 2 GiB
    assert all(
        r["passed"] for r in report["repository"]["parity"]["fp32"] + report["repository"]["parity"]["fp16"]
    )
    assert report["phases"]["serve"]["generate"]["png_size"] == [256, 256]
    by_process = report["phases"]["serve"]["server_peak_rss_mib_by_process"]
    assert {"pae-serve", "pae-worker", "redis-server"} <= set(by_process)
    assert set(report["graph_latency_batch1"]) == {"encoder", "decoder", "dit", "dit_cond"}
