"""A real local HTTP receiver for webhook tests and benchmarks (127.0.0.1, one thread per request)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# What the receiver answers on a path: (status, seconds to sleep first), given how many requests that path had
# before this one (0 for the first).
Behaviour = Callable[[int], tuple[int, float]]


def ok(_: int) -> tuple[int, float]:
    return 200, 0.0


def fail_first(n_failures: int, status: int = 500) -> Behaviour:
    return lambda seen: (status, 0.0) if seen < n_failures else (200, 0.0)


def always(status: int, delay: float = 0.0) -> Behaviour:
    return lambda _: (status, delay)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: str
    at: float  # time.time() when the request arrived


@dataclass
class Receiver:
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def on(self, path: str, behaviour: Behaviour) -> str:
        """Sets how `path` answers; returns its full URL."""
        self.behaviours[path] = behaviour
        return self.url + path

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

    def wait_for(self, path: str, n: int, timeout: float = 30.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.at(path)
            if len(got) >= n:
                return got
            time.sleep(0.05)
        raise AssertionError(f"{path}: expected {n} requests, got {len(self.at(path))}")

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0"))).decode()
                with receiver.lock:
                    seen = sum(1 for r in receiver.received if r.path == self.path)
                    receiver.received.append(
                        Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time())
                    )
                status, delay = receiver.behaviours.get(self.path, ok)(seen)
                if delay:
                    time.sleep(delay)
                payload = b"ok" if status < 300 else b"nope"
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout)
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
