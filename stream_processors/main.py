"""`site-activity processors`: runs one faust worker of the stream processors until SIGTERM/SIGINT."""

from __future__ import annotations

import gc
import logging

import faust

from site_activity.lag import processors_group, start_lag_metrics
from site_activity.settings import Settings
from stream_processors import metrics
from stream_processors.app import create_app

log = logging.getLogger(__name__)

# The cyclic garbage collector's thresholds for the worker (CPython's default: 700, 10, 10). A batch allocates
# several containers per event (its records, their tuples, the recent-event entries) that live until the batch
# is done, so with the default a collection of the young generation ran every ~150 events and kept promoting the
# batch's objects into older generations that then had to be scanned again: 15-20 % of the batch work
# (bench/README.md, "Where a worker's time goes"). Little of it is cyclic garbage; it is collected all the same,
# later.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    """Moves everything alive after start-up (modules, the app) out of the collector's sight and raises its
    thresholds (GC_THRESHOLDS). Call once, when the worker is built."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run(settings: Settings) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings)
    tune_gc()
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
