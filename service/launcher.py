"""Starting, finding ready and stopping the stack's processes: API replicas, workers, redis-server.

`pae-serve`'s embedded Redis, the local production stack (deploy/stack.py) and the benchmarks'
topologies (benchmarks/topology.py) all launch processes through this module, so a process is
started, probed and stopped the same way everywhere; service/redis_server.py adds what is
particular to redis-server.

Every process starts in a session of its own, so the recorded PID is a process-group id and stopping
it reaches whatever it spawned without touching anything else on the machine. A process given a
lifetime runs under coreutils `timeout`: one nobody stops (its launcher was killed, a benchmark was
interrupted) still ends by itself. Signals meant for the program go to the program alone, not to
`timeout`, which would pass a signal on to the whole group a second time; uvicorn, for one, treats
a second SIGINT as "stop now" rather than "drain".

Only the standard library is imported, so deploy/stack.py can start and stop a stack without the
service's dependencies loaded."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Self

LOOPBACK = "127.0.0.1"
# Console scripts of this package and the function each runs, for interpreters without them installed.
ENTRY_POINTS = {
    "pae-serve": "service.cli:serve_main",
    "pae-worker": "service.cli:worker_main",
    "pae-api-process": "service.api.handoff:main",
}


class Started:
    """`with x:` for things made of processes: `start()`, and `stop()` on leaving or when the start
    fails half-way, so a failed start leaves no process behind."""

    def start(self) -> object:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LaunchError(RuntimeError):
    """A process could not be found, started or made ready; the message says what to fix."""


# ---------------------------------------------------------------- ports and binaries


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether `port` can be bound on the loopback interface now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def find_binary(name: str, install_hint: str, search: Path | None = None) -> str:
    """Absolute path of an executable, from `search` first, then PATH; a clear error otherwise."""
    if search is not None and (search / name).is_file():
        return str(search / name)
    found = shutil.which(name)
    if found is None:
        raise LaunchError(f"`{name}` not found on PATH; install it from {install_hint}")
    return found


def entry_point(name: str) -> list[str]:
    """The argv that runs a console script: the one installed beside this Python, else the same
    function through `python -c` (a checkout used without `pip install`)."""
    script = Path(sys.executable).with_name(name)
    if script.is_file():
        return [str(script)]
    module, function = ENTRY_POINTS[name].split(":")
    return [sys.executable, "-c", f"from {module} import {function}; {function}()"]


# ---------------------------------------------------------------- processes


@dataclass
class Proc:
    """One started process, recorded well enough to probe and stop it from another invocation.

    `pid` is the process-group leader (`timeout` when the process has a lifetime, else the program);
    `program_pid` is the program itself, where signals go and /proc readings come from. `started`
    (clock ticks since boot) tells the process apart from a later one that reuses its PID. `port` is
    the one it serves on (0: none).
    """

    name: str
    pid: int
    argv: list[str]
    log: str
    started: int
    probe: str = ""
    env: dict[str, str] = field(default_factory=dict)
    program_pid: int = 0
    port: int = 0
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.program_pid = self.program_pid or self.pid

    def to_json(self) -> dict[str, Any]:
        """The fields that outlive this interpreter (everything but the Popen handle)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "popen"}

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> Proc:
        return cls(**{k: v for k, v in entry.items() if k != "popen"})

    def alive(self) -> bool:
        """True while the process runs (a child of this interpreter is reaped when it has exited)."""
        if self.popen is not None:
            return self.popen.poll() is None
        stat = _proc_stat(self.pid)
        return stat is not None and stat[0] != "Z" and stat[1] == self.started

    @property
    def returncode(self) -> int | None:
        """The exit status (the program's, through `timeout`), or None while running or unknown."""
        return None if self.popen is None else self.popen.poll()

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = Path(self.log).read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a PID, or None when there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return fields[0], int(fields[19])


def _program_pid(popen: subprocess.Popen[bytes], timeout_s: float = 5.0) -> int:
    """The PID of the program `timeout` runs (its only child); `timeout`'s own once it has exited."""
    children = Path(f"/proc/{popen.pid}/task/{popen.pid}/children")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            listed = children.read_text().split()
            if listed:
                return int(listed[0])
        if popen.poll() is not None:
            return popen.pid
        time.sleep(0.01)
    raise LaunchError(f"timeout (pid {popen.pid}) started no program within {timeout_s:.0f} s")


def start_process(
    name: str,
    argv: Sequence[str],
    *,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    base_env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    lifetime_s: float | None = None,
    probe: str = "",
    port: int = 0,
    inherit_output: bool = False,
) -> Proc:
    """Start `argv` in its own session, output appended to `log` (without one: discarded, or
    written to this process's own stdout and stderr with `inherit_output`).

    `env` is laid over `base_env` (default: this process's environment) and recorded in the Proc.
    With `lifetime_s` the program runs under `timeout`: SIGTERM when the lifetime is up, SIGKILL
    ten seconds later.
    """
    full = list(argv)
    if lifetime_s is not None:
        full = ["timeout", "--signal=TERM", "--kill-after=10", str(int(lifetime_s)), *full]
    environ = {**(os.environ if base_env is None else base_env), **(env or {})}
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    discard = None if inherit_output else subprocess.DEVNULL
    with open(log, "ab") if log is not None else contextlib.nullcontext() as out:
        popen = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=out if out is not None else discard,
            stderr=subprocess.STDOUT if out is not None else discard,
            env=environ,
            cwd=cwd,
            start_new_session=True,
        )
    stat = _proc_stat(popen.pid)
    program = _program_pid(popen) if lifetime_s is not None else popen.pid
    return Proc(
        name=name,
        pid=popen.pid,
        argv=list(argv),
        log=str(log or ""),
        started=stat[1] if stat else 0,
        probe=probe,
        env=dict(env or {}),
        program_pid=program,
        port=port,
        popen=popen,
    )


def signal_process(proc: Proc, sig: int) -> None:
    """Send `sig` to the program (not to its `timeout` wrapper); a process already gone is fine."""
    if proc.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.program_pid, sig)


def _wait_ended(procs: Sequence[Proc], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(p.alive() for p in procs):
        time.sleep(0.05)


def stop_processes(procs: Sequence[Proc], sig: int = signal.SIGTERM, grace_s: float = 15.0) -> list[str]:
    """Send `sig` to every live program, wait up to `grace_s` for all to end, then SIGKILL the
    process group of each one still running. Returns the names of those that were running."""
    live = [p for p in procs if p.alive()]
    for proc in live:
        signal_process(proc, sig)
    _wait_ended(live, grace_s)
    for proc in live:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    _wait_ended(live, 5.0)
    return [p.name for p in live]


def stop_process(proc: Proc | None, sig: int = signal.SIGTERM, grace_s: float = 15.0) -> None:
    """`stop_processes` for one process (None: nothing to stop)."""
    if proc is not None:
        stop_processes([proc], sig, grace_s)


def start_api(name: str, port: int, args: Sequence[str] = (), **options: Any) -> Proc:
    """An API replica (`pae-serve`) on the loopback `port`, probed at /readyz; `options` as for
    `start_process`."""
    argv = [*entry_point("pae-serve"), "--host", LOOPBACK, "--port", str(port), *args]
    return start_process(name, argv, probe=f"http://{LOOPBACK}:{port}/readyz", port=port, **options)


def start_worker(name: str, metrics_port: int, args: Sequence[str] = (), **options: Any) -> Proc:
    """A worker (`pae-worker`) serving its metrics on `metrics_port`, also its probe; `options` as
    for `start_process`."""
    options["env"] = {**options.get("env", {}), "WORKER_METRICS_PORT": str(metrics_port)}
    probe = f"http://{LOOPBACK}:{metrics_port}/metrics"
    argv = [*entry_point("pae-worker"), *args]
    return start_process(name, argv, probe=probe, port=metrics_port, **options)


# ---------------------------------------------------------------- readiness


def http_get(url: str, timeout: float = 5.0, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """Status and body; connection failures come back as status 0 so pollers can keep polling."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def wait_until_ready(procs: Sequence[Proc], timeout_s: float) -> None:
    """Poll each process's probe URL until it answers 200; fail with its log if it dies or times out."""
    pending = [p for p in procs if p.probe]
    deadline = time.monotonic() + timeout_s
    while pending:
        for proc in list(pending):
            if not proc.alive():
                raise LaunchError(f"{proc.name} exited during start-up; last log lines:\n{proc.log_tail()}")
            if http_get(proc.probe, timeout=2.0)[0] == 200:
                pending.remove(proc)
        if not pending:
            return
        if time.monotonic() > deadline:
            names = ", ".join(f"{p.name} ({p.probe})" for p in pending)
            tails = "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in pending)
            raise LaunchError(f"not ready after {timeout_s:.0f} s: {names}\n{tails}")
        time.sleep(0.5)
