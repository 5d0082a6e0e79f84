"""The one HTTP endpoint of the stages that have no web framework of their own (sink, webhooks): /healthz and
/metrics on a small threaded server, plus the `Liveness` tick their /healthz reports."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST


class RendersMetrics(Protocol):
    def render(self) -> bytes:
        """The Prometheus text exposition of the stage's registry."""
        ...


class Alive(Protocol):
    def alive(self) -> bool: ...


class Liveness:
    """The main loop ticks; /healthz is 200 while ticks keep coming (the loop also ticks while it backs off)."""

    def __init__(self, max_silence_s: float) -> None:
        self.max_silence_s = max_silence_s
        self._last = time.monotonic()
        self.running = True

    def tick(self) -> None:
        self._last = time.monotonic()

    def alive(self) -> bool:
        return self.running and time.monotonic() - self._last < self.max_silence_s


def serve_http(host: str, port: int, metrics: RendersMetrics, liveness: Alive) -> ThreadingHTTPServer:
    """Serves GET /healthz (200 `{"status":"ok"}` while `liveness.alive()`, else 503 `{"status":"stalled"}`) and
    GET /metrics (`metrics.render()`) on host:port from a daemon thread; returns the server (call `shutdown()`).
    Raises OSError when the port cannot be bound."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                ok = liveness.alive()
                self._send(
                    200 if ok else 503, b'{"status":"ok"}' if ok else b'{"status":"stalled"}', "application/json"
                )
            elif self.path == "/metrics":
                self._send(200, metrics.render(), CONTENT_TYPE_LATEST)
            else:
                self._send(404, b'{"error":"not found"}', "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # probes every few seconds; not worth a log line
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"http-{port}", daemon=True).start()
    return server
