"""The HTTP connection's own guards: each request's headers must arrive within HEADER_TIMEOUT_S
and hold at most MAX_HEADER_BYTES, and a body the app answered without reading must finish within
BODY_TIMEOUT_S.

uvicorn closes a keep-alive connection that sits idle between requests, but nothing else: a client
that opens a connection and sends nothing, or sends its headers a byte at a time, holds that
connection (and a file descriptor) for as long as it likes, and enough of them starve the server
(slowloris). The ASGI app cannot help, since it only sees a request once its headers are complete,
so the clock runs in the protocol: from the connection's first moment, or a request's first byte on
a kept-alive connection, to the end of its headers. A late client gets a 408 and the connection
closes. Nor does uvicorn's httptools parser bound the headers' size (a 10 MB header was served, a
100 MB one grew the process by as much), so the protocol counts the bytes that arrive before the
headers end and answers 431 past MAX_HEADER_BYTES.

When the app answers before reading the body (a 401, a 429 decided up front), uvicorn keeps the
connection and reads the rest of the body past; closing at once instead would make the kernel reset
the connection over the unread bytes, and the client could lose the answer already sent. But a
client that never finishes that body would keep the connection forever, so it gets BODY_TIMEOUT_S
to do so. Bodies the app does read are timed in the app (`service.api.middleware.BodyLimits`),
where the answer can be an ordinary error response.

`pae-serve` selects this protocol with `uvicorn.run(http=PROTOCOL)`; the timeouts come from the
app's settings through the lifespan state, which uvicorn hands every protocol instance.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import metrics

PROTOCOL = "service.api.server:GuardedProtocol"
"""uvicorn's `http` option: an import string, so worker processes started by uvicorn find it too."""

HEADER_TIMEOUT_STATE = "pae.header_timeout_s"
BODY_TIMEOUT_STATE = "pae.body_timeout_s"
"""Keys of HEADER_TIMEOUT_S and BODY_TIMEOUT_S in the lifespan state (`service.app.lifespan`)."""

DEFAULT_TIMEOUT_S = 10.0
MAX_HEADER_BYTES = 64 * 1024
"""Request line plus headers; a browser sends a few kilobytes."""

_END_OF_HEADERS = b"\r\n\r\n"


def _answer(status: bytes, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\n".encode()
        + b"connection: close\r\n\r\n"
        + body
    )


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's headers and on the rest of
    a body answered early."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._header_tail = b""

    def _timeout_s(self, key: str) -> float:
        return float(self.app_state.get(key, DEFAULT_TIMEOUT_S))

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_headers()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_headers()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is not None:  # a request has begun (or may) and its headers have not ended
            allowed = MAX_HEADER_BYTES - self._header_bytes
            if len(data) > allowed and _END_OF_HEADERS not in self._header_tail + data[: max(allowed, 0)]:
                self._refuse(
                    b"431 Request Header Fields Too Large",
                    f"the request line and headers exceed {MAX_HEADER_BYTES} bytes",
                )
                return
            self._header_bytes += len(data)
            self._header_tail = data[-3:]
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._header_timer = self._cancel(self._header_timer)
        self._header_bytes, self._header_tail = 0, b""
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._drain_timer = self._cancel(self._drain_timer)
        super().on_message_complete()

    def on_response_complete(self) -> None:
        unread = self.cycle is not None and self.cycle.more_body and not self.transport.is_closing()
        super().on_response_complete()
        if unread and self._drain_timer is None:
            self._drain_timer = self.loop.call_later(self._timeout_s(BODY_TIMEOUT_STATE), self._body_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._header_timer = self._cancel(self._header_timer)
        self._drain_timer = self._cancel(self._drain_timer)
        super().connection_lost(exc)

    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()

    def _arm_headers(self) -> None:
        """Start the clock unless it already runs (a request's first byte does not restart it)."""
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(
                self._timeout_s(HEADER_TIMEOUT_STATE), self._headers_late
            )

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        metrics.SLOW_CLIENTS.labels("headers").inc()
        if self.cycle is None or self.cycle.response_complete:
            timeout_s = self._timeout_s(HEADER_TIMEOUT_STATE)
            self._refuse(
                b"408 Request Timeout",
                f"the request headers did not arrive within {timeout_s:g} s (HEADER_TIMEOUT_S)",
            )
        else:
            # A pipelined request stalled behind one still running: close once that one is answered.
            self.cycle.keep_alive = False

    def _refuse(self, status: bytes, detail: str) -> None:
        """Answer before the app has seen the request, and close."""
        self._header_timer = self._cancel(self._header_timer)
        self.transport.write(_answer(status, detail))
        self.transport.close()

    def _body_late(self) -> None:
        """The answer went out long ago; the client is still not done sending the body."""
        self._drain_timer = None
        if not self.transport.is_closing():
            metrics.SLOW_CLIENTS.labels("body").inc()
            self.transport.close()
