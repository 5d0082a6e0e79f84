"""uvicorn's httptools protocol with read deadlines, so slow or stalled clients cannot hold connections forever.

uvicorn only times out idle keep-alive connections between requests (`timeout_keep_alive`); a client that
connects and sends nothing, or half a request line, or headers and then a trickle of body bytes, keeps its
connection (a file descriptor and a parser) open for as long as it likes — slowloris. Two deadlines:
- headers: from the connection being made (or, on a kept-alive connection, from the first byte of the next
  request) until the end of the request's headers; past it the server answers 408 and closes;
- body: from the end of the headers until the end of the body (a whole-body deadline, not an idle timer,
  so one byte every few seconds does not keep it alive); past it the connection is closed, and the app's
  next read of the body sees a client disconnect (nothing of the request is written).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

_TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s"
)
_BODY_408 = b'{"error":"request_timeout","reason":"the request headers did not arrive in time"}'


def guarded_protocol(
    header_timeout_s: float, body_timeout_s: float, on_timeout: Callable[[str], None] = lambda phase: None
) -> type[HttpToolsProtocol]:
    """An HttpToolsProtocol subclass with the two deadlines, for uvicorn.Config(http=...). `on_timeout` is
    called with "headers" or "body" each time a connection is cut (for metrics)."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _phase: str | None = None  # "headers" or "body" while a deadline runs

        def _arm(self, phase: str, seconds: float) -> None:
            self._disarm()
            self._phase = phase
            self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = None
            self._phase = None

        def _expired(self) -> None:
            phase, self._deadline, self._phase = self._phase or "headers", None, None
            if self.transport is None or self.transport.is_closing():
                return
            on_timeout(phase)
            log.info(
                "closed a connection whose request %s did not arrive in time",
                phase,
                extra={"client": self.client and self.client[0], "phase": phase},
            )
            if phase == "headers":
                self.transport.write(_TIMEOUT_408 % (len(_BODY_408), _BODY_408))
            self.transport.close()  # connection_lost then tells a running request that its client is gone

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm("headers", header_timeout_s)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._phase != "headers":  # the next request on a kept-alive connection: its own deadline
                self._arm("headers", header_timeout_s)

        def on_headers_complete(self) -> None:
            self._arm("body", body_timeout_s)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

    return GuardedHttpToolsProtocol
