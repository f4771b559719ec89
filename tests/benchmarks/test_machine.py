"""The quotability rule: a benchmark whose load average at start exceeds 1 marks its JSON not
quotable and says so; every committed result records its load average and carries the mark."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import machine
from benchmarks.machine import QUOTABLE_LOAD, RESULTS, mark_quotable, quotability


def block(load: float) -> dict:
    return {"cpu": "test", "load_average_start": [load, 0.1, 0.1]}


@pytest.mark.parametrize(
    ("load", "quotable"), [(0.0, True), (0.6, True), (1.0, True), (1.01, False), (5.1, False)]
)
def test_the_one_minute_load_at_start_decides(load: float, quotable: bool) -> None:
    assert quotability(block(load))[0] is quotable


def test_a_result_without_a_load_average_is_not_quotable() -> None:
    ok, reason = quotability({})
    assert not ok and "no load average" in reason


def test_a_loaded_result_is_marked_with_its_reason_and_warns(capsys: pytest.CaptureFixture[str]) -> None:
    result = {"model": "m", "machine": block(2.5), "rps": 10.0}
    marked = mark_quotable(result, affects="its requests per second")
    assert marked["quotable"] is False
    assert "2.5" in marked["quotable_reason"] and "its requests per second" in marked["quotable_reason"]
    assert list(marked) == ["machine", "quotable", "quotable_reason", "model", "rps"]
    assert "NOT QUOTABLE" in capsys.readouterr().err
    assert result == {"model": "m", "machine": block(2.5), "rps": 10.0}  # the input is left alone


def test_an_idle_result_is_quotable_and_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    marked = mark_quotable({"machine": block(0.3)})
    assert marked["quotable"] is True and "0.3" in marked["quotable_reason"]
    assert capsys.readouterr().err == ""
    assert mark_quotable({**marked, "machine": block(3.0)})["quotable"] is False  # marked afresh


def test_the_machine_block_warns_when_a_run_starts_loaded(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(machine.os, "getloadavg", lambda: (QUOTABLE_LOAD + 0.5, 1.0, 1.0))
    assert machine.describe(extra="x")["load_average_start"][0] == QUOTABLE_LOAD + 0.5
    assert "will be marked not quotable" in capsys.readouterr().err
    monkeypatch.setattr(machine.os, "getloadavg", lambda: (0.2, 1.0, 1.0))
    machine.describe()
    assert capsys.readouterr().err == ""


COMMITTED = sorted(RESULTS.glob("*.json"))


@pytest.mark.parametrize("path", COMMITTED, ids=[p.name for p in COMMITTED])
def test_every_committed_result_records_its_load_and_says_whether_it_may_be_quoted(path: Path) -> None:
    result = json.loads(path.read_text())
    load = result["machine"]["load_average_start"]
    assert len(load) == 3
    assert result["quotable"] is quotability(result["machine"])[0], (path.name, load)
    assert result["quotable_reason"]


def test_results_are_committed() -> None:
    assert COMMITTED, f"no benchmark results in {RESULTS}"
