"""`site-activity dev`: the whole pipeline in one terminal on the embedded stack.

Starts the embedded broker (Apache Kafka, or Tansu without Java; SITE_ACTIVITY_EMBEDDED_BROKER) and Postgres (unless SITE_ACTIVITY_KAFKA_BOOTSTRAP / SITE_ACTIVITY_POSTGRES_DSN point elsewhere),
applies migrations, creates topics, makes sure an enabled demo widget exists, runs the API, processors and
sink as child processes (restarted if they die), serves the demo site, writes <data dir>/stack.json and stops
everything it started on Ctrl-C / SIGTERM."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

from dev_stack.embedded import EmbeddedApacheKafka, EmbeddedPostgres, make_broker, port_open, wait_until
from dev_stack.kafka_dist import broker_kind
from dev_stack.process import StageProcess
from site_activity import widgets
from site_activity.db import connect, ensure_database, migrate
from site_activity.kafka import ensure_topics
from site_activity.settings import Settings
from widget.demo_server import start_demo

log = logging.getLogger(__name__)

STAGES = ("api", "processors", "sink", "webhooks", "console")  # webhooks: issue 13
DEMO_TENANT = "Demo tenant"
DEMO_WIDGET = "Demo site"
DEMO_OWNER = "owner@demo.example"


def _start_embedded(settings: Settings, stack: ExitStack) -> Settings:
    """Starts what the settings do not point elsewhere; returns settings that name what runs."""
    updates: dict[str, object] = {}
    if "kafka_bootstrap" not in settings.model_fields_set:
        # Apache Kafka keeps its log dirs in <data dir>/kafka-data across runs, like Postgres keeps its rows.
        broker = make_broker(
            settings, settings.data_dir / ("kafka-data" if broker_kind(settings) == "kafka" else "logs")
        )
        broker.start()
        stack.callback(broker.stop)
        updates["kafka_bootstrap"] = broker.bootstrap
        # --- processors' state (issue 14): Tansu keeps topics in memory only, so after a restart the
        # processors' local RocksDB state would describe changelog records that no longer exist.
        if broker_kind(settings) != "kafka":
            shutil.rmtree(settings.data_dir / "processors", ignore_errors=True)
        if isinstance(broker, EmbeddedApacheKafka) and len(broker.nodes) > 1:
            # A cluster: replicate the product's topics like production does (see deploy/README.md).
            updates["topic_replication_factor"] = min(3, len(broker.nodes))
            updates["topic_min_insync_replicas"] = min(2, len(broker.nodes))
        log.info("started the embedded broker", extra={"broker": broker_kind(settings), "bootstrap": broker.bootstrap})
    if "postgres_dsn" not in settings.model_fields_set:
        pg = EmbeddedPostgres(settings.data_dir.resolve() / "postgres", settings.embedded_postgres_port)
        pg.start()
        stack.callback(pg.stop)
        updates["postgres_dsn"] = pg.dsn
        log.info("started Postgres", extra={"dsn": pg.dsn, "pid": pg.proc.pid})  # type: ignore[union-attr]
    if "webhooks_allow_private_urls" not in settings.model_fields_set:
        # issue 13: on a laptop the webhook receiver under test is usually on localhost.
        updates["webhooks_allow_private_urls"] = True
    return settings.model_copy(update=updates)


def ensure_demo_widget(dsn: str) -> widgets.Widget:
    with connect(dsn) as conn:
        for w in widgets.list_widgets(conn):
            if w.name == DEMO_WIDGET:
                return w if w.tracking_enabled else widgets.set_tracking(conn, w.id, True, actor="site-activity dev")
        return widgets.create_widget(
            conn, name=DEMO_WIDGET, tenant_name=DEMO_TENANT, actor="site-activity dev", tracking_enabled=True
        )


def demo_owner_link(settings: Settings, widget: widgets.Widget) -> str:
    """Makes sure the demo tenant has an owner; returns a fresh one-time console sign-in link for them that opens
    the demo widget's Site Activity dashboard."""
    from console import accounts

    with connect(settings.postgres_dsn, autocommit=True) as conn:
        try:
            accounts.get_member(conn, widget.tenant_id, DEMO_OWNER)
        except accounts.AccountError:
            accounts.add_member(conn, widget.tenant_id, DEMO_OWNER, "owner", actor="site-activity dev")
        return accounts.login_link(
            conn,
            settings.console_origin,
            widget.tenant_id,
            DEMO_OWNER,
            settings.console_login_link_ttl_s,
            next_path=dashboard_path(widget),
        )


def dashboard_path(widget: widgets.Widget) -> str:
    return f"/site-activity?widget_id={widget.id}"


def start_daily_purge(settings: Settings, stop: threading.Event) -> threading.Thread:
    """Runs the retention purge now and then every purge_interval_s until `stop` is set (a daemon thread)."""
    from site_activity.retention import purge_every

    thread = threading.Thread(
        target=purge_every,
        name="retention-purge",
        daemon=True,
        args=(settings.postgres_dsn, settings.purge_interval_s, stop),
        kwargs={"chunk_rows": settings.purge_chunk_rows, "duty_cycle": settings.purge_duty_cycle},
    )
    thread.start()
    return thread


class Supervisor:
    """Keeps the stage processes running; a stage that dies is restarted with a growing delay."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.procs = {s: StageProcess(s, settings, log_dir / f"{s}.log") for s in STAGES}
        self._restarts = dict.fromkeys(STAGES, 0)

    def start(self) -> None:
        for proc in self.procs.values():
            proc.start()

    def check(self) -> None:
        for stage, proc in self.procs.items():
            if not proc.alive():
                self._restarts[stage] += 1
                delay = min(2 ** self._restarts[stage], 30)
                log.warning(
                    "stage exited; restarting",
                    extra={"stage": stage, "in_s": delay, "log": str(proc.log_path), "tail": proc.log_tail(5)},
                )
                time.sleep(delay)
                proc.start()

    def stop(self) -> None:
        # Upstream first, so the sink can drain what the processors already emitted.
        for stage in STAGES:
            self.procs[stage].stop()


def _write_stack_file(settings: Settings, demo_url: str, widget: widgets.Widget, sup: Supervisor) -> Path:
    info = {
        "api_url": settings.api_origin,
        "postgres_dsn": settings.postgres_dsn,
        "kafka_bootstrap": settings.kafka_bootstrap,
        "demo_url": demo_url,
        "demo_widget_id": str(widget.id),
        "demo_tenant_id": str(widget.tenant_id),
        "console_url": settings.console_origin,
        "pids": {stage: proc.pid for stage, proc in sup.procs.items()},
    }
    settings.stack_file.write_text(json.dumps(info, indent=2) + "\n")
    return settings.stack_file


def run(settings: Settings) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def on_signal(signum: int, _: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    with ExitStack() as stack:
        settings = _start_embedded(settings, stack)
        ensure_database(settings.postgres_dsn)
        migrate(settings.postgres_dsn)
        ensure_topics(settings)
        widget = ensure_demo_widget(settings.postgres_dsn)

        sup = Supervisor(settings, settings.data_dir / "logs")
        sup.start()
        stack.callback(sup.stop)
        api_url = settings.api_origin
        wait_until(lambda: port_open(settings.http_port) or stop.is_set(), 60, "API")
        demo = start_demo(settings, str(widget.id))
        stack.callback(demo.stop)
        demo_url = demo.url + "/"
        stack_file = _write_stack_file(settings, demo_url, widget, sup)
        wait_until(lambda: port_open(settings.console_port) or stop.is_set(), 60, "console")
        sign_in = demo_owner_link(settings, widget)
        start_daily_purge(settings, stop)

        print(
            "\nSite Activity is running on the embedded stack\n"
            f"  demo site      {demo_url}   (click around; events land in Postgres seconds later)\n"
            f"  ingest API     {api_url}/api/widget/track   (health {api_url}/readyz, metrics {api_url}/metrics)\n"
            f"  widget script  {api_url}/widget.js   demo widget id {widget.id}\n"
            f"  dashboard      {settings.console_origin}{dashboard_path(widget)}   (the demo's clicks, within seconds)\n"
            f"                 sign in as {DEMO_OWNER} with this one-time link (15 min); it opens the dashboard:\n"
            f"                 {sign_in}\n"
            f"                 new link: .venv/bin/site-activity login-link --tenant {widget.tenant_id} --email {DEMO_OWNER}"
            f" --next '{dashboard_path(widget)}'\n"
            f"  console        {settings.console_origin}   (settings, members, keys, audit log, visitors)\n"
            f"  Kafka          {settings.kafka_bootstrap}\n"
            f"  Postgres       {settings.postgres_dsn}\n"
            "  watch rows     .venv/bin/site-activity events recent --follow   (in another terminal)\n"
            "  webhooks       SITE_ACTIVITY_WEBHOOKS_ALLOW_PRIVATE_URLS=1 .venv/bin/site-activity webhooks add"
            f" --tenant {widget.tenant_id} --url http://127.0.0.1:<port>/hook --actor you\n"
            f"                 (localhost endpoints are allowed in dev; metrics"
            f" http://127.0.0.1:{settings.webhooks_http_port}/metrics)\n"
            f"  purge          every {settings.purge_interval_s / 3600:g} h in the background"
            " (now: .venv/bin/site-activity purge --dry-run)\n"
            f"  stack file     {stack_file}\n"
            f"  logs           {settings.data_dir / 'logs'}/\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        while not stop.wait(1.0):
            sup.check()
        log.info("shutting down")
    settings.stack_file.unlink(missing_ok=True)
    return 0
