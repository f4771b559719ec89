"""The HTTP connection's own guard: each request's headers must arrive within HEADER_TIMEOUT_S.

uvicorn closes a keep-alive connection that sits idle between requests, but nothing else: a client
that opens a connection and sends nothing, or sends its headers a byte at a time, holds that
connection (and a file descriptor) for as long as it likes, and enough of them starve the server
(slowloris). The ASGI app cannot help, since it only sees a request once its headers are complete,
so the clock runs in the protocol: from the connection's first moment, or a request's first byte on
a kept-alive connection, to the end of its headers. A late client gets a 408 and the connection
closes. Bodies are timed in the app (`service.api.middleware.RequestBody`), where the answer can
be an ordinary error response.

`pae-serve` selects this protocol with `uvicorn.run(http=PROTOCOL)`; the timeout comes from the
app's settings through the lifespan state, which uvicorn hands every protocol instance.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import metrics

PROTOCOL = "service.api.server:HeaderTimeoutProtocol"
"""uvicorn's `http` option: an import string, so worker processes started by uvicorn find it too."""

HEADER_TIMEOUT_STATE = "pae.header_timeout_s"
"""Key of HEADER_TIMEOUT_S in the lifespan state (`service.app.lifespan`)."""

DEFAULT_HEADER_TIMEOUT_S = 10.0


def _timeout_response(timeout_s: float) -> bytes:
    body = json.dumps(
        {"detail": f"the request headers did not arrive within {timeout_s:g} s (HEADER_TIMEOUT_S)"}
    ).encode()
    return (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\n".encode()
        + b"connection: close\r\n\r\n"
        + body
    )


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's headers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def _timeout_s(self) -> float:
        return float(self.app_state.get(HEADER_TIMEOUT_STATE, DEFAULT_HEADER_TIMEOUT_S))

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        """Start the clock unless it already runs (a request's first byte does not restart it)."""
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self._timeout_s(), self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        metrics.SLOW_CLIENTS.labels("headers").inc()
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_timeout_response(self._timeout_s()))
            self.transport.close()
        else:
            # A pipelined request stalled behind one still running: close once that one is answered.
            self.cycle.keep_alive = False
