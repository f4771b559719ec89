"""service/launcher.py and service/redis_server.py: real processes started, probed and stopped; real
redis-servers restarted in place."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import redis

from service.launcher import (
    LaunchError,
    Proc,
    entry_point,
    port_is_free,
    start_process,
    stop_process,
    stop_processes,
    wait_until_ready,
)
from service.redis_server import RedisServer, redis_pid

# Counts the SIGTERMs it receives, taking a second to drain after the first, as a server would.
COUNT_TERMS = """
import signal, sys, time
count = 0
def on_term(*_):
    global count
    count += 1
    print(f"TERM {count}", flush=True)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while count == 0:
    time.sleep(0.01)
time.sleep(1.0)
sys.exit(0)
"""
# Ignores SIGTERM and leaves a grandchild behind: only the process-group SIGKILL ends both.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def wait_for_line(log: Path, text: str, timeout_s: float = 10.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.is_file() and text in log.read_text():
            return log.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{text!r} never appeared in {log}")


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_lifetime_ends_a_process_nobody_stops(tmp_path: Path) -> None:
    proc = start_process("sleeper", ["sleep", "30"], log=tmp_path / "sleeper.log", lifetime_s=1)
    assert proc.alive() and proc.program_pid != proc.pid  # `timeout` leads, `sleep` is the program
    deadline = time.monotonic() + 10
    while proc.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not proc.alive(), "timeout did not end the process after its lifetime"
    assert proc.returncode == 124  # timeout's status for "the lifetime ran out"


def test_stop_signals_the_program_once_and_reports_its_exit_status(tmp_path: Path) -> None:
    log = tmp_path / "terms.log"
    proc = start_process("terms", [sys.executable, "-c", COUNT_TERMS], log=log, lifetime_s=60)
    wait_for_line(log, "ready")
    stop_process(proc)
    assert not proc.alive()
    assert log.read_text().split() == ["ready", "TERM", "1"]  # not once from us and again from timeout
    assert proc.returncode == 0


def test_a_process_that_ignores_sigterm_is_killed_with_its_children(tmp_path: Path) -> None:
    log = tmp_path / "stubborn.log"
    proc = start_process("stubborn", [sys.executable, "-c", STUBBORN], log=log, lifetime_s=60)
    grandchild = int(wait_for_line(log, "\n").split()[0])
    assert pid_alive(grandchild)
    started = time.monotonic()
    assert stop_processes([proc], grace_s=0.5) == ["stubborn"]
    assert not proc.alive() and time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while pid_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(grandchild), "a process the program spawned outlived the stop"
    assert stop_processes([proc]) == []  # stopping again: nothing was running


def test_a_recorded_process_is_recognised_from_another_invocation(tmp_path: Path) -> None:
    proc = start_process("sleeper", ["sleep", "30"], log=tmp_path / "s.log", lifetime_s=30)
    try:
        recorded = Proc.from_json(proc.to_json())
        assert recorded.popen is None and recorded.program_pid == proc.program_pid
        assert recorded.alive()
        reused = Proc.from_json({**proc.to_json(), "started": proc.started + 1})
        assert not reused.alive(), "a PID with another start time is another process"
        assert Proc.from_json({k: v for k, v in proc.to_json().items() if k != "program_pid"}).alive()
        stop_processes([recorded])
    finally:
        stop_process(proc)
    assert not recorded.alive()


def test_wait_until_ready_reports_a_dead_process_with_its_log(tmp_path: Path) -> None:
    proc = start_process(
        "broken",
        ["sh", "-c", "echo model missing >&2; exit 3"],
        log=tmp_path / "broken.log",
        lifetime_s=30,
        probe="http://127.0.0.1:1/readyz",
    )
    with pytest.raises(LaunchError, match="model missing"):
        wait_until_ready([proc], timeout_s=10)
    assert proc.returncode == 3


def test_entry_points_run_from_any_interpreter() -> None:
    argv = entry_point("pae-worker")
    assert argv[0].endswith("pae-worker") or argv[-1].endswith("worker_main()")
    with pytest.raises(KeyError):
        entry_point("pae-unknown")


def test_redis_restarts_in_place_with_or_without_its_data(tmp_path: Path) -> None:
    kept = RedisServer(workdir=tmp_path / "data", appendonly=True)
    fresh = RedisServer()
    try:
        for server in (kept, fresh):
            url = server.start()
            assert redis_pid(server.port) == server.pid
            redis.Redis.from_url(url).set("key", "value")
            port, pid = server.port, server.pid
            server.stop()
            assert server.pid == 0 and port_is_free(port)
            assert server.start() == url and server.pid != pid  # same address, a new process
        assert redis.Redis.from_url(kept.url).get("key") == b"value"  # the append-only file kept it
        assert redis.Redis.from_url(fresh.url).get("key") is None  # a fresh temporary data folder
    finally:
        kept.stop()
        fresh.stop()


def test_redis_with_a_password_answers_only_after_auth() -> None:
    with RedisServer(password="pw with spaces") as server:
        assert redis_pid(server.port, "pw with spaces") == server.pid
        assert redis_pid(server.port) is None
        assert redis_pid(server.port, "wrong") is None
        assert redis.Redis.from_url(server.url).ping()


def test_a_redis_that_cannot_start_says_so() -> None:
    with RedisServer() as busy:
        taken = RedisServer(busy.port)
        with pytest.raises(LaunchError, match="did not start"):  # although the port answers PING
            taken.start(timeout_s=2)
        assert taken.proc is None and redis_pid(busy.port) == busy.pid
    with pytest.raises(LaunchError, match="no port"):
        _ = RedisServer().url
