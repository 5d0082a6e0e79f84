"""`site-activity api`: the ingest API under uvicorn (uvloop + httptools, one worker per process)."""

from __future__ import annotations

import logging
import signal

import uvicorn

from producer_api.app import create_app
from producer_api.http_protocol import guarded_protocol
from producer_api.metrics import ApiMetrics
from site_activity.settings import Settings

log = logging.getLogger(__name__)


def run(settings: Settings) -> int:
    """Serves until SIGTERM/SIGINT, then drains requests, flushes the producer and returns the exit code."""
    metrics = ApiMetrics()
    config = uvicorn.Config(
        create_app(settings, metrics),
        host=settings.http_host,
        port=settings.http_port,
        loop="uvloop",
        # httptools with header and body read deadlines (slow clients are cut off, see http_protocol.py).
        http=guarded_protocol(
            settings.http_header_timeout_s,
            settings.http_body_timeout_s,
            on_timeout=lambda phase: metrics.slow_clients_closed.labels(phase).inc(),
        ),
        workers=1,
        lifespan="on",
        log_config=None,  # keep our JSON logging
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=int(settings.produce_timeout_s) + 5,
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; swallowing it here lets
    # run() return an exit code instead of the process dying from the re-raised SIGTERM.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if not server.started:
        log.error("api failed to start")
        return 1
    return 0
