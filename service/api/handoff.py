"""One API process of several: uvicorn serving the connections `pae-serve` hands it.

`pae-serve --workers N` (N > 1) accepts every connection in its own process and passes each one,
as a file descriptor over a Unix socket (`service.replicas`), to the next of its N API processes
in turn. This module is such a process: the app, uvicorn's HTTP protocol (`GuardedProtocol`) and
its graceful shutdown, with no listening socket of its own. Why not uvicorn's own `--workers`: its
processes share one listening socket and each connection goes to whichever process wakes first, so
two kept-alive connections often share one process while another idles (measured: encode at
concurrency 32 gave 180 and 292 req/s in two repetitions of the same run).

It tells `pae-serve` it is ready (`READY`) once the app's lifespan has started, so no connection
waits on a process still loading its graphs, and it drains and exits when the channel closes (its
`pae-serve` is gone), as on SIGTERM.

Run as `pae-api-process --channel-fd FD` (its name in `ps` and the benchmarks' process tables);
`pae-serve` does that.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
from collections.abc import Sequence

import uvicorn

from service.api.server import PROTOCOL
from service.replicas import FDS_PER_MESSAGE, READY

log = logging.getLogger("service")


class HandedServer(uvicorn.Server):
    """uvicorn's server without a listener: connections arrive as descriptors on `channel`."""

    def __init__(self, config: uvicorn.Config, channel: socket.socket) -> None:
        super().__init__(config)
        self.channel = channel
        self._pending: set[asyncio.Task[object]] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # the lifespan, and no listener of its own
        if not self.started:
            return
        loop = asyncio.get_running_loop()
        self.channel.setblocking(False)
        loop.add_reader(self.channel.fileno(), self._take)
        self.channel.send(READY)

    def _protocol(self) -> asyncio.Protocol:
        """What uvicorn's own `startup` makes for each connection of a server it listens with."""
        return self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
            _loop=asyncio.get_running_loop(),
        )

    def _take(self) -> None:
        """Serve every connection waiting on the channel; an empty read means `pae-serve` is gone."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self.channel, 16, FDS_PER_MESSAGE)
            except BlockingIOError:
                return
            except OSError as exc:
                message, fds = b"", []
                log.warning("the connection channel failed: %s", exc)
            if not message and not fds:
                log.warning("pae-serve closed the connection channel; draining and stopping")
                loop.remove_reader(self.channel.fileno())
                self.should_exit = True
                return
            for fd in fds:
                conn = socket.socket(fileno=fd)
                if self.should_exit:
                    conn.close()
                    continue
                task = loop.create_task(loop.connect_accepted_socket(self._protocol, conn))
                self._pending.add(task)
                task.add_done_callback(self._served)

    def _served(self, task: asyncio.Task[object]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("a handed connection could not be served: %s", task.exception())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
        self.channel.close()  # connections still queued in it are closed with it
        await super().shutdown(sockets=sockets)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pae-api-process", description=__doc__)
    parser.add_argument(
        "--channel-fd", type=int, required=True, help="the Unix socket pae-serve hands connections on"
    )
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    channel = socket.socket(fileno=args.channel_fd)
    config = uvicorn.Config("service.app:create_app", factory=True, http=PROTOCOL, log_level=args.log_level)
    HandedServer(config, channel).run()


if __name__ == "__main__":
    main()
