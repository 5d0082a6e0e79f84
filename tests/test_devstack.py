"""`site-activity dev` as a newcomer runs it: one command, a stack.json, events land, Ctrl-C stops it all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import psutil
import psycopg
import pytest

from dev_stack.embedded import free_port, wait_until
from dev_stack.kafka_dist import broker_kind
from tests.conftest import broker_settings


@pytest.mark.integration  # starts the whole dev stack (its own broker and Postgres)
def test_dev_runs_the_whole_pipeline_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    ports = {
        name: free_port()
        for name in (
            "HTTP",
            "DEMO",
            "SINK_HTTP",
            "PROCESSORS_WEB",
            "EMBEDDED_KAFKA",
            "EMBEDDED_KAFKA_CONTROLLER",
            "EMBEDDED_POSTGRES",
            "CONSOLE",
            "WEBHOOKS_HTTP",
        )
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITE_ACTIVITY_")}
    # The suite's broker choice, and Kafka's already-fetched jars instead of a fresh copy in the data dir.
    chosen = broker_settings()
    env |= {
        "SITE_ACTIVITY_EMBEDDED_BROKER": broker_kind(chosen),
        "SITE_ACTIVITY_KAFKA_DIST_DIR": str(chosen.kafka_dist),
    }
    env |= {f"SITE_ACTIVITY_{name}_PORT": str(port) for name, port in ports.items()}
    env |= {
        "SITE_ACTIVITY_DATA_DIR": str(data_dir),
        "SITE_ACTIVITY_TOPIC_PARTITIONS": "2",
        "SITE_ACTIVITY_CONSUMER_SESSION_TIMEOUT_MS": "3000",
        "SITE_ACTIVITY_CONSUMER_HEARTBEAT_INTERVAL_MS": "500",
    }
    log = open(tmp_path / "dev.log", "wb")  # written by the child until it is stopped below  # noqa: SIM115
    dev = subprocess.Popen(
        [sys.executable, "-m", "command_line", "dev"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        stack_file = data_dir / "stack.json"
        wait_until(lambda: stack_file.exists() or dev.poll() is not None, 120, "stack.json")
        assert dev.poll() is None, (tmp_path / "dev.log").read_text()
        stack = json.loads(stack_file.read_text())
        assert stack["api_url"] == f"http://127.0.0.1:{ports['HTTP']}"
        assert stack["kafka_bootstrap"] == f"127.0.0.1:{ports['EMBEDDED_KAFKA']}"
        assert f":{ports['EMBEDDED_POSTGRES']}/" in stack["postgres_dsn"]

        demo = httpx.get(stack["demo_url"], timeout=5)
        assert demo.status_code == 200 and "widget.js" in demo.text
        assert httpx.get(f"{stack['api_url']}/widget.js", timeout=5).status_code == 200

        event_id = str(uuid.uuid4())
        now = datetime.now(UTC).isoformat()
        body = {
            "widget_id": stack["demo_widget_id"],
            "visitor_id": "newcomer",
            "sent_at": now,
            "events": [{"event_id": event_id, "type": "pageview", "occurred_at": now, "url": "https://demo.example/"}],
        }

        def landed() -> bool:
            resp = httpx.post(f"{stack['api_url']}/api/widget/track", json=body, timeout=5)
            assert resp.status_code in (204, 503), resp.text  # 503 only while the broker warms up
            with psycopg.connect(stack["postgres_dsn"]) as conn:
                rows = conn.execute(
                    "SELECT event_type FROM visitor_events WHERE event_id = %s OR (visitor_id = 'newcomer'"
                    " AND event_type = 'session_start')",
                    (uuid.UUID(event_id),),
                ).fetchall()
            return sorted(r[0] for r in rows) == ["pageview", "session_start"]

        wait_until(landed, 90, "event through api -> processors -> sink", interval=1)

        # The console: dev printed a one-time sign-in link for the demo tenant's owner.
        assert stack["console_url"] == f"http://127.0.0.1:{ports['CONSOLE']}"
        printed = (tmp_path / "dev.log").read_text()
        link = next(w for w in printed.split() if w.startswith(stack["console_url"] + "/login?token="))
        query = parse_qs(urlsplit(link).query)
        dashboard = f"/site-activity?widget_id={stack['demo_widget_id']}"
        assert query["next"] == [dashboard] and f"{stack['console_url']}{dashboard}" in printed
        with httpx.Client(base_url=stack["console_url"], timeout=5) as console:
            signed_in = console.post("/login", data={"token": query["token"][0], "next": query["next"][0]})
            assert signed_in.status_code == 303 and signed_in.headers["location"] == dashboard
            assert console.get(dashboard).status_code == 200
            assert "Demo site" in console.get("/settings/widgets").text
            # The event sent above is on the dashboard: a visitor now.
            realtime = console.get("/site-activity/realtime.json", params={"widget_id": stack["demo_widget_id"]})
            assert realtime.status_code == 200 and realtime.json()["visitors"] >= 1, realtime.text

        children = psutil.Process(dev.pid).children(recursive=True)
        assert len(children) >= 6  # broker, postgres, api, processors, sink, console
        dev.send_signal(signal.SIGTERM)
        assert dev.wait(60) == 0
        time.sleep(0.5)
        assert [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE] == []
        assert not stack_file.exists()
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGKILL)
        log.close()
