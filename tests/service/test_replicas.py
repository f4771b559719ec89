"""`pae-serve --workers N`: one listening socket, connections handed in turn to N API processes
(service/replicas.py, service/api/handoff.py)."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis

from service.cli import api_processes, lane_threads_env
from service.launcher import (
    LOOPBACK,
    Proc,
    free_port,
    signal_process,
    start_api,
    stop_process,
    wait_until_ready,
)
from service.replicas import READY, Replica, ReplicaSet
from service.settings import Settings, SettingsError, usable_cores
from tests.service.payloads import image_bytes
from tests.service.test_cli import alive, embedded_env

ROOT = Path(__file__).resolve().parents[2]
READY_LINE = re.compile(r"API process (\d+) \(pid (\d+)\) is ready")


# ---------------------------------------------------------------- how many, with what


def test_auto_is_one_process_per_core_only_where_the_api_computes(
    tiny_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DIRECT_SLOTS", raising=False)
    embedded = Settings(model_repository=tiny_repository, model_name="tiny")
    assert api_processes("auto", embedded) == usable_cores()  # small graphs: the direct lane is on
    external = Settings(
        model_repository=tiny_repository, model_name="tiny", redis_url="redis://127.0.0.1:1/0"
    )
    assert api_processes("auto", external) == 1  # the API only enqueues: scale it by replicas
    monkeypatch.setenv("DIRECT_SLOTS", "0")
    assert api_processes("auto", Settings(model_repository=tiny_repository, model_name="tiny")) == 1
    assert api_processes("3", embedded) == 3
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(SettingsError, match="--workers must be a positive number or auto"):
            api_processes(bad, embedded)


def test_the_lane_threads_split_the_cores_between_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMPUTE_THREADS", raising=False)
    settings = Settings(compute_threads=4)
    assert lane_threads_env(settings, 2) == {"COMPUTE_THREADS": "2"}
    assert lane_threads_env(settings, 8) == {"COMPUTE_THREADS": "1"}
    assert lane_threads_env(settings, 1) == {}
    assert lane_threads_env(Settings(runtime="torch"), 2) == {}  # one call at a time anyway
    monkeypatch.setenv("COMPUTE_THREADS", "3")
    assert lane_threads_env(settings, 2) == {}  # the operator's choice stands


# ---------------------------------------------------------------- the hand-off, without processes


def _channels(replicas: ReplicaSet) -> list[socket.socket]:
    """Give each replica a ready channel; return the processes' ends."""
    theirs = []
    for replica in replicas.replicas:
        ours, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        replica.channel, replica.ready = ours, True
        replicas._selector.register(ours, 1, replica)
        theirs.append(other)
    return theirs


def _received(end: socket.socket) -> int:
    end.setblocking(False)
    count = 0
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(end, 16, 16)
        except BlockingIOError:
            return count
        for fd in fds:
            os.close(fd)
        count += len(fds)


def test_connections_go_to_ready_processes_in_turn_and_skip_a_gone_one() -> None:
    replicas = ReplicaSet(3, LOOPBACK, 0)
    theirs = _channels(replicas)
    replicas.replicas[2].ready = False  # still loading its model
    for _ in range(4):
        with socket.socket() as conn:
            replicas._hand(conn)
    assert [_received(end) for end in theirs] == [2, 2, 0]
    theirs[0].close()  # process 0 died; its channel is closed at the other end
    for _ in range(3):
        with socket.socket() as conn:
            replicas._hand(conn)
    assert _received(theirs[1]) == 3, "a connection for the dead process went to another one"
    assert replicas.replicas[0].channel is None and not replicas.replicas[0].ready
    replicas.replicas[1].ready = False
    with socket.socket() as conn:
        replicas._hand(conn)  # nobody ready: closed, not kept
    replicas.stop()


def test_a_process_is_handed_connections_only_once_it_says_it_is_ready() -> None:
    replicas = ReplicaSet(1, LOOPBACK, 0)
    (theirs,) = _channels(replicas)
    replica: Replica = replicas.replicas[0]
    replica.ready = False
    replica.proc = subprocess.Popen(["sleep", "30"])  # stands in for the API process
    theirs.send(READY)
    replicas._read_channel(replica)
    assert replica.ready
    theirs.close()
    replicas._read_channel(replica)
    assert not replica.ready and replica.channel is None
    assert replica.proc.wait(timeout=5) == -signal.SIGTERM  # a process without a channel is stopped
    replicas.stop()


def test_a_dead_process_is_restarted_later_the_more_often_it_dies_early() -> None:
    replicas = ReplicaSet(1, LOOPBACK, 0)
    replica = replicas.replicas[0]
    replica.proc = subprocess.Popen(["true"])
    replica.proc.wait()
    with pytest.raises(SystemExit, match="API process 0 exited"):
        replicas._exited(replica, time.monotonic())  # never served: pae-serve gives up, as uvicorn does
    replicas._ever_ready = True
    delays = []
    for _ in range(4):
        replica.proc = subprocess.Popen(["true"])
        replica.proc.wait()
        now = replica.started_at = time.monotonic()
        replicas._exited(replica, now + 1)  # died a second after it started
        assert replica.proc is None
        delays.append(round(replica.restart_at - now - 1, 3))
    assert delays == [0.5, 1.0, 2.0, 4.0]
    replica.proc = subprocess.Popen(["true"])
    replica.proc.wait()
    replica.started_at = time.monotonic() - 600  # ran ten minutes: back to the first delay
    replicas._exited(replica, time.monotonic())
    assert round(replica.restart_at - time.monotonic(), 1) == 0.5
    replicas.stop()


# ---------------------------------------------------------------- real processes


def _ready_pids(
    log: Path, count: int, exclude: set[int] = frozenset(), timeout_s: float = 60
) -> dict[int, int]:
    """{index: pid} of the API processes the log says are ready, once `count` new ones are."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = {int(i): int(p) for i, p in READY_LINE.findall(log.read_text()) if int(p) not in exclude}
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"{count} API process(es) did not get ready:\n{log.read_text()[-3000:]}")


def _serving_pid(conn: http.client.HTTPConnection, server_port: int, pids: set[int]) -> int:
    """Which process holds the server's end of `conn` (by the socket's inode in /proc)."""
    client_port = conn.sock.getsockname()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1].split(":")[1], fields[2].split(":")[1]
        if int(local, 16) == server_port and int(remote, 16) == client_port:
            inode = fields[9]
    assert inode is not None, "the server's end of the connection is not in /proc/net/tcp"
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no API process holds socket {inode}")


def _two_api_processes(repository: Path, tmp_path: Path) -> tuple[Proc, int, Path, set[int]]:
    """`pae-serve --workers 2` in its embedded default, both API processes ready: (the pae-serve
    process, its port, its log, the API processes' pids)."""
    port = free_port()
    log = tmp_path / "api.log"
    env = embedded_env(repository)
    proc = start_api("api", port, ["--workers", "2"], log=log, base_env=env, cwd=ROOT, lifetime_s=300)
    try:
        wait_until_ready([proc], timeout_s=90)
        return proc, port, log, set(_ready_pids(log, 2).values())
    except BaseException:
        stop_process(proc, grace_s=10)
        raise


def test_connections_spread_evenly_a_dead_process_is_replaced_and_stop_drains(
    tiny_repository: Path, tmp_path: Path
) -> None:
    proc, port, log, pids = _two_api_processes(tiny_repository, tmp_path)
    try:
        conns = [http.client.HTTPConnection(LOOPBACK, port, timeout=30) for _ in range(4)]
        for conn in conns:
            conn.request("GET", "/readyz")
            answer = conn.getresponse()
            answer.read()
            assert answer.status == 200
        served = Counter(_serving_pid(conn, port, pids) for conn in conns)
        assert sorted(served.values()) == [2, 2], f"connections were not handed out in turn: {served}"
        for conn in conns:
            conn.close()

        gone = min(pids)
        os.kill(gone, signal.SIGKILL)
        for _ in range(6):  # new connections right after the death: none is lost
            answer = httpx.get(f"http://{LOOPBACK}:{port}/readyz", timeout=30)
            assert answer.status_code == 200
        replaced = _ready_pids(log, 1, exclude=pids)
        assert alive(next(iter(replaced.values())))

        # A request half-sent when pae-serve is told to stop: its process has it, and must answer it.
        png = image_bytes(32, 32)
        with socket.create_connection((LOOPBACK, port), timeout=30) as client:
            head = f"POST /v1/encode HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(png)}\r\n\r\n"
            client.sendall(head.encode() + png[:100])
            time.sleep(0.3)
            api_pids = (pids - {gone}) | set(replaced.values())
            signal_process(proc, signal.SIGTERM)
            time.sleep(0.5)
            client.sendall(png[100:])
            answer = client.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), f"the request in flight at the stop got {answer[:200]!r}"
        proc.popen.wait(timeout=60)
        assert proc.returncode == 0, log.read_text()[-2000:]
        assert not any(alive(pid) for pid in api_pids)
    finally:
        stop_process(proc, grace_s=10)


def test_the_api_processes_stop_when_pae_serve_is_killed(tiny_repository: Path, tmp_path: Path) -> None:
    proc, _, log, pids = _two_api_processes(tiny_repository, tmp_path)
    try:
        os.kill(proc.program_pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in pids), "an API process outlived its pae-serve"
    finally:
        stop_process(proc, grace_s=5)
        found = re.search(r"embedded mode: redis at (\S+),", log.read_text())
        if found:  # redis-server outlives a SIGKILLed pae-serve (it cannot watch its parent)
            with contextlib.suppress(redis.RedisError):
                redis.Redis.from_url(found.group(1), socket_connect_timeout=1).shutdown(nosave=True)
