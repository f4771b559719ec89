"""The GPU check script runs end to end; on the CPU (no CUDA, no TensorRT here) with the default
model, so a change that breaks it is caught before it reaches a GPU machine."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.gpu_release import main

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_script_measures_every_task_and_says_what_it_skipped(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    argv = [
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(out),
        "--checkpoint",
        str(ROOT / "checkpoints" / "fmnist32-tiny"),
    ]
    assert main([*argv, "--device", "cpu", "--batches", "1,2", "--steps", "2,3", "--budget-s", "300"]) == 0
    report = json.loads(out.read_text())
    rows = report["results"]["onnxruntime-cpu"]
    assert {(r["task"], r["batch"], r.get("steps")) for r in rows} == {
        (task, batch, steps)
        for batch in (1, 2)
        for task, steps in (("encode", None), ("decode", None), ("generate", 2), ("generate", 3))
    }
    assert all(r["images_per_s"] > 0 for r in rows)
    assert {r["task"] for r in report["results"]["torch-pae-bf16"]} == {"encode", "decode"}
    assert any(s["what"] == "TensorRT engines" for s in report["skipped"])
    assert report["setup_s"]["export"] > 0
