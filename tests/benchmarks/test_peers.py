"""A fast run of the peer benchmark (benchmarks/peers) on the tiny repository: the service as
`make run` starts it and the plain FastAPI peer, every answer checked, the JSON, table and plot
written; and Ray Serve skipped with a message when it is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.peers import __main__ as peers
from benchmarks.peers.client import server_timing
from benchmarks.peers.report import markdown_table
from benchmarks.peers.servers import tree_cpu_seconds
from service.settings import usable_cores
from tests.service.conftest import tiny_repository  # noqa: F401  (the session fixture)


def test_service_and_plain_peer_answer_every_request_correctly(
    tiny_repository: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "peers.json"
    args = ["--duration", "0.6", "--concurrency", "1,4", "--repetitions", "1", "--servers", "service,plain"]
    args += [
        "--repository",
        str(tiny_repository),
        "--model",
        "tiny",
        "--batch",
        "4",
        "--ceiling-seconds",
        "0.1",
    ]
    result = peers.main([*args, "--ort-threads", "1", "--out", str(out)])
    assert json.loads(out.read_text())["runs"] == result["runs"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert "quotable" in result and result["machine"]["load_average_start"]
    for name in ("service", "plain"):
        for endpoint in ("encode", "decode"):
            for c in ("1", "4"):
                (point,) = result["runs"][name][endpoint][c]
                assert point["errors"] == 0, point["error_examples"]
                assert point["rps"] > 0 and point["server_cpu_ms_per_request"] > 0
    service = result["runs"]["service"]["decode"]["1"][0]
    # At c=1 an API process's direct lane computes (service/direct.py): the worker and redis-server
    # idle; `pae-serve` itself only hands connections to its API processes (service/replicas.py).
    api = "pae-api-process" if usable_cores() > 1 else "pae-serve"
    assert api in service["server_cpu_ms_per_request_by_process"]
    assert service["stages_p50_ms"]["queue"] == 0
    assert {"parse", "enqueue", "wait", "compute", "encode", "app"} <= set(service["stages_p50_ms"])
    figures = result["figures"]["decode"]
    assert {"c1_vs_plain", "c1_p50_overhead_ms", "c4_ceiling_fraction", "c4_all_cores_fraction"} <= set(
        figures
    )
    assert result["ceilings"][0]["decoder"]["4"]["cpu_ms_per_image"] > 0
    assert "| decode | 4 |" in capsys.readouterr().out


def test_ray_is_skipped_with_a_message_when_absent(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(peers, "ray_available", lambda: False)
    assert peers.available(["service", "plain", "ray"]) == ["service", "plain"]
    assert "Ray Serve is not installed" in capsys.readouterr().err
    assert peers.available(["service"]) == ["service"]


def test_helpers() -> None:
    assert server_timing("parse;dur=0.5, app;dur=2") == {"parse": 0.5, "app": 2.0}
    assert tree_cpu_seconds(1 << 30) == {}
    runs = {"plain": {"decode": {"1": [{"rps": 10.2}, {"rps": 11.6}]}}}
    ceiling = {
        "decoder": {"1": {"img_per_s": 100.0}, "4": {"img_per_s": 300.0}, "all_cores": {"img_per_s": 550.0}}
    }
    assert "| decode | 1 | 10–12 | 100 / 300 / 550 |" in markdown_table(runs, [ceiling], 4)


def test_profile_samples_go_to_the_innermost_named_stage() -> None:
    from benchmarks.peers.profile import summarise

    lines = [
        "main (uvicorn/main.py:1);run_asgi (uvicorn/protocols/http/httptools_impl.py:2);"
        "app (starlette/routing.py:3);decode (service/api/inference.py:4);"
        "encode_png (service/codecs.py:5) 3",
        "main (uvicorn/main.py:1);run_asgi (uvicorn/protocols/http/httptools_impl.py:2);"
        "app (starlette/routing.py:3) 1",
        "_run_once (asyncio/base_events.py:9) 1",
        "__call__ (service/api/middleware.py:6);app (service/api/jobs.py:7);decode (service/api/inference.py:4) 2",
        "__call__ (service/api/middleware.py:6);observe (prometheus_client/metrics.py:8) 1",
    ]
    assert summarise(lines) == {
        "png / json encode": 37.5,
        "service handlers (checks, lane, answer)": 25.0,
        "framework (routing, middleware, dependencies)": 12.5,
        "event loop, other": 12.5,
        "metrics and body-limit middleware": 12.5,
        "samples": 8,
    }


def test_ab_compares_service_settings_side_by_side(tiny_repository: Path, tmp_path: Path) -> None:  # noqa: F811
    from benchmarks.peers import ab

    out = tmp_path / "ab.json"
    args = ["--config", "DIRECT_SLOTS=0", "--config", "DIRECT_SLOTS=2", "--plain", "--endpoints", "decode"]
    args += ["--concurrency", "2", "--duration", "0.5", "--repetitions", "1", "--warmup-seconds", "0.2"]
    result = ab.main([*args, "--repository", str(tiny_repository), "--model", "tiny", "--out", str(out)])
    assert json.loads(out.read_text())["rps"] == result["rps"]
    assert set(result["rps"]) == {"DIRECT_SLOTS=0", "DIRECT_SLOTS=2", "plain"}
    assert all(result["rps"][c]["decode"]["2"][0] > 0 for c in result["rps"])
    assert "quotable" in result
    with pytest.raises(ValueError, match="NAME=VALUE"):
        ab.parse_config("DIRECT_SLOTS")
