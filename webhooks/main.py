"""`site-activity webhooks`: visitor_event.created webhooks.

Two loops in one process: the reader (a thread; confluent-kafka) queues a delivery per stored event and
matching endpoint (webhooks/feeder.py) through the dispatcher (asyncio, main thread; webhooks/dispatcher.py),
which sends those new deliveries at once and claims whatever else is due. The queue lives in Postgres, so
deliveries survive restarts and several replicas share the work. /healthz and /metrics on
SITE_ACTIVITY_WEBHOOKS_HTTP_PORT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading

from site_activity.lag import start_lag_metrics, webhooks_group
from site_activity.metrics import serve_http
from site_activity.settings import Settings
from webhooks.dispatcher import Dispatcher
from webhooks.feeder import Feeder
from webhooks.metrics import AllAlive, WebhookMetrics

log = logging.getLogger(__name__)


async def _serve(settings: Settings) -> int:
    metrics = WebhookMetrics()
    dispatcher = Dispatcher(settings, metrics)
    feeder = Feeder(settings, metrics, dispatcher.enqueue_from_thread)
    # kafka_consumergroup_* gauges of this stage's own group on its /metrics, like the sink and the processors.
    lag = start_lag_metrics(metrics.registry, settings, [webhooks_group(settings)])
    server = serve_http(
        settings.http_host, settings.webhooks_http_port, metrics, AllAlive(feeder.liveness, dispatcher.liveness)
    )
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        log.info("stop requested", extra={"signal": signal.Signals(signum).name})
        feeder.stop()
        dispatcher.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    failed: list[BaseException] = []

    def read() -> None:
        try:
            feeder.run()
        except BaseException as exc:
            log.exception("webhooks reader failed")
            failed.append(exc)
            loop.call_soon_threadsafe(dispatcher.stop)

    reader = threading.Thread(target=read, name="webhooks-reader", daemon=True)
    reader.start()
    try:
        await dispatcher.run()
    finally:
        feeder.stop()
        await asyncio.to_thread(reader.join, 30)
        server.shutdown()
        lag.stop()
    return 1 if failed else 0


def run(settings: Settings) -> int:
    return asyncio.run(_serve(settings))
