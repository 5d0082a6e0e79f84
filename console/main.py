"""`site-activity console`: the console under uvicorn, bound to SITE_ACTIVITY_HTTP_HOST:SITE_ACTIVITY_CONSOLE_PORT."""

from __future__ import annotations

import logging
import signal

import uvicorn

from console.app import create_app
from site_activity.settings import Settings

log = logging.getLogger(__name__)


def run(settings: Settings) -> int:
    config = uvicorn.Config(
        create_app(settings),
        host=settings.http_host,
        port=settings.console_port,
        workers=1,
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
    )
    server = uvicorn.Server(config)
    for sig in (signal.SIGTERM, signal.SIGINT):  # let uvicorn shut down gracefully, then return an exit code
        signal.signal(sig, lambda *_: None)
    log.info("console starting", extra={"host": settings.http_host, "port": settings.console_port})
    # Export bundles (issue 13): the export worker runs beside the server, in this process.
    worker = None
    if settings.export_worker_enabled:
        from site_activity.export_jobs import ExportWorker

        worker = ExportWorker(settings).start()
    try:
        server.run()
    finally:
        if worker is not None:
            worker.stop()
    return 0 if server.started else 1
