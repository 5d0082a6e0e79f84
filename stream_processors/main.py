"""`site-activity processors`: runs one faust worker of the stream processors until SIGTERM/SIGINT."""

from __future__ import annotations

import logging

import faust

from site_activity.lag import processors_group, start_lag_metrics
from site_activity.settings import Settings
from stream_processors import metrics
from stream_processors.app import create_app

log = logging.getLogger(__name__)


def run(settings: Settings) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings)
    # kafka_consumergroup_* gauges of the processors' faust group on /metrics (issue 13: consumer lag).
    lag = start_lag_metrics(metrics.REGISTRY, settings, [processors_group(settings)])
    worker = faust.Worker(
        app,
        loglevel=settings.log_level,
        quiet=True,  # no banner
        override_logging=False,  # keep our JSON logging (site_activity.logs)
        redirect_stdouts=False,
    )
    log.info(
        "starting processors", extra={"app_id": settings.processors_app_id, "web_port": settings.processors_web_port}
    )
    try:
        worker.execute_from_commandline()  # returns by SystemExit after a clean stop (SIGTERM/SIGINT)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        log.info("processors stopped", extra={"exit_code": code})
        return code
    finally:
        lag.stop()
    return 0
