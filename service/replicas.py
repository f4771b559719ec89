"""Several API processes behind one port: `pae-serve --workers N` accepts, its processes serve.

One event loop is one core's worth of Python, and with the direct lane (`service.direct`) an API
process parses, checks and answers every request besides: at concurrency 32 on two cores one API
process was the bound (decode used 1.75 cores, its event loop saturated). Several processes each
with its own loop and lane remove that bound, if the connections spread over them evenly; uvicorn's
own workers share a listening socket and leave that to whichever process wakes first, and the
kernel's SO_REUSEPORT to a hash of the client's address, so two connections often share one process
while another idles.

So `pae-serve` keeps the listening socket and hands each accepted connection, as a file descriptor
over a Unix socket (SCM_RIGHTS), to the next ready process in turn (`service.api.handoff` is the
other end). Only connections travel this way; their requests and answers go between the client and
the process directly. A process is handed connections once it says it is ready (its lifespan has
loaded the model); one that dies is started again, with a growing delay while it keeps dying early,
and the others serve meanwhile. None ready yet: new connections wait in the listen backlog. On
SIGTERM `pae-serve` stops accepting first, then asks each process to drain (uvicorn's graceful
shutdown: requests in flight are answered), so no request that reached a process is dropped.

Only the standard library is imported (and `service.launcher`, which is too): this runs in
`pae-serve`'s own process, which does no HTTP.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

from service.launcher import entry_point

log = logging.getLogger("service")

READY = b"R"
"""What an API process writes on its channel once it can serve."""
ACCEPTS_PER_WAKE = 64
"""Connections accepted in one go before the supervisor looks at its processes again."""
FDS_PER_MESSAGE = 1
"""Each message on a channel carries one connection."""
RESTART_DELAY_S = (0.5, 30.0)
"""A process that dies is started again after the first delay, doubled for each early death in a row
up to the second; one that ran EARLY_DEATH_S or more starts over at the first."""
EARLY_DEATH_S = 30.0
POLL_S = 0.25
"""How often the supervisor looks for processes that exited without closing their channel first."""


@dataclass
class Replica:
    """One API process and `pae-serve`'s end of its channel."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    channel: socket.socket | None = None
    ready: bool = False
    started_at: float = 0.0
    restart_at: float = 0.0
    early_deaths: int = 0


class ReplicaSet:
    """N API processes fed by one listening socket (see the module docstring).

    `serve()` runs until a signal ends the process (SIGTERM → SystemExit in `pae-serve`, SIGINT →
    KeyboardInterrupt); `stop()`, from a `finally`, drains and stops the processes.
    """

    def __init__(
        self,
        count: int,
        host: str,
        port: int,
        log_level: str = "info",
        backlog: int = 2048,
        env: dict[str, str] | None = None,
    ) -> None:
        """`env`: variables over this process's environment for the API processes."""
        if count < 1:
            raise ValueError(f"an API needs at least one process, got {count}")
        self.host, self.port, self.log_level, self.backlog = host, port, log_level, backlog
        self.replicas = [Replica(i) for i in range(count)]
        self.listener: socket.socket | None = None
        self._selector = selectors.DefaultSelector()
        self._next = 0
        self._ever_ready = False
        self.env = {**os.environ, **(env or {})}

    def bind(self) -> socket.socket:
        """The listening socket, bound before any process starts so a busy port fails at once."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(self.backlog)
        sock.setblocking(False)
        self.listener = sock
        return sock

    def serve(self) -> None:
        """Start the processes and hand them connections until a signal ends this process."""
        if self.listener is None:
            self.bind()
        for replica in self.replicas:
            self._spawn(replica)
        log.info(
            "API on http://%s:%d: %d processes, connections handed out in turn (service/replicas.py)",
            self.host,
            self.port,
            len(self.replicas),
        )
        listening = False
        while True:
            for key, _ in self._selector.select(POLL_S):
                if key.data is None:
                    self._accept()
                else:
                    self._read_channel(key.data)
            self._supervise()
            wanted = any(r.ready for r in self.replicas)
            if wanted != listening:
                if wanted:
                    self._selector.register(self.listener, selectors.EVENT_READ, None)
                else:
                    self._selector.unregister(self.listener)
                listening = wanted

    # ---------------------------------------------------------------- connections

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the connection stays in the backlog
                log.warning("accepting a connection failed: %s", exc)
                time.sleep(POLL_S)  # instead of spinning on a listener that stays readable
                return
            with conn:
                self._hand(conn)

    def _hand(self, conn: socket.socket) -> None:
        """Pass `conn` to the next ready process; this process's copy is closed by the caller."""
        count = len(self.replicas)
        for step in range(count):
            replica = self.replicas[(self._next + step) % count]
            if not replica.ready:
                continue
            try:
                socket.send_fds(replica.channel, [b"c"], [conn.fileno()])
            except BlockingIOError:  # its channel is full: it is far behind, try another
                continue
            except OSError as exc:
                self._lost(replica, f"its channel failed ({exc})")
                continue
            self._next = (replica.index + 1) % count
            return
        log.warning("no API process could take a connection; it is closed")

    def _read_channel(self, replica: Replica) -> None:
        try:
            message = replica.channel.recv(16)
        except BlockingIOError:
            return
        except OSError:
            message = b""
        if not message:
            self._lost(replica, "its channel closed")
        elif READY in message and not replica.ready:
            replica.ready = True
            self._ever_ready = True
            log.info("API process %d (pid %d) is ready", replica.index, replica.proc.pid)

    # ---------------------------------------------------------------- processes

    def _spawn(self, replica: Replica) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            argv = [*entry_point("pae-api-process"), "--channel-fd", str(theirs.fileno())]
            replica.proc = subprocess.Popen(
                [*argv, "--log-level", self.log_level], pass_fds=(theirs.fileno(),), env=self.env
            )
        ours.setblocking(False)
        replica.channel, replica.ready, replica.started_at = ours, False, time.monotonic()
        self._selector.register(ours, selectors.EVENT_READ, replica)

    def _lost(self, replica: Replica, why: str) -> None:
        """Stop handing connections to `replica`; `_supervise` restarts it once it has exited."""
        if replica.channel is None:
            return
        self._selector.unregister(replica.channel)
        replica.channel.close()
        replica.channel, replica.ready = None, False
        if replica.proc is not None and replica.proc.poll() is None:
            log.warning("API process %d (pid %d): %s; stopping it", replica.index, replica.proc.pid, why)
            replica.proc.terminate()

    def _supervise(self) -> None:
        now = time.monotonic()
        for replica in self.replicas:
            if replica.proc is not None and replica.proc.poll() is not None:
                self._exited(replica, now)
            elif replica.proc is None and now >= replica.restart_at:
                self._spawn(replica)

    def _exited(self, replica: Replica, now: float) -> None:
        code = replica.proc.returncode
        pid = replica.proc.pid
        self._lost(replica, "it exited")
        _metrics_dead(pid)
        if not self._ever_ready:
            raise SystemExit(f"pae-serve: API process {replica.index} exited ({code}) before serving")
        lived = now - replica.started_at
        replica.early_deaths = replica.early_deaths + 1 if lived < EARLY_DEATH_S else 0
        first, most = RESTART_DELAY_S
        delay = min(most, first * 2 ** max(0, replica.early_deaths - 1))
        log.error(
            "API process %d (pid %d) exited with %s after %.0f s; starting another in %.1f s",
            replica.index,
            pid,
            code,
            lived,
            delay,
        )
        replica.proc, replica.restart_at = None, now + delay

    def stop(self, grace_s: float = 60.0) -> None:
        """Stop accepting, then let each process answer what it has (SIGTERM) for up to `grace_s`."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        running = [r.proc for r in self.replicas if r.proc is not None and r.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("API process %d did not drain within %.0f s; killing it", proc.pid, grace_s)
                proc.kill()
                proc.wait()
        for replica in self.replicas:
            if replica.channel is not None:
                replica.channel.close()
                replica.channel = None
            if replica.proc is not None:
                _metrics_dead(replica.proc.pid)
        self._selector.close()


def _metrics_dead(pid: int) -> None:
    """Drop a gone process's live gauges from the shared Prometheus view (multiprocess mode)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
