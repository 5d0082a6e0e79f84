"""Bounded visitor state (issue 14): idle visitors' sessions expire after the late-event horizon, links stay,
expiry writes changelog tombstones so recovery does not bring expired state back; RocksDB store recovery."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
from confluent_kafka.admin import ConfigResource

from dev_stack.embedded import free_port, wait_until
from site_activity import widgets
from site_activity.events import customer_id_for
from site_activity.kafka import admin
from site_activity.settings import Settings
from site_activity.topics import event_key
from stream_processors.app import create_app
from stream_processors.store import _expirable
from tests.conftest import read_topic
from tests.test_processors import MIN, T0, RawFeed, ev, feed, identify, logs_on_failure, rows, sid  # noqa: F401

LONG = 3600.0


def expired_count(port: int, outcome: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    found = re.search(rf'^site_activity_processors_state_expired_total{{outcome="{outcome}"}} ([\d.e+]+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def changelog_config(settings: Settings, topic: str) -> dict[str, str]:
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    client = admin(settings)  # kept referenced until the result is in
    configs = client.describe_configs([resource])[resource].result(timeout=10)
    return {name: entry.value for name, entry in configs.items()}


def starts(db: psycopg.Connection, w: widgets.Widget, visitor: str) -> list[tuple[Any, Any]]:
    return db.execute(
        "SELECT occurred_at, session_id FROM visitor_events WHERE widget_id = %s AND visitor_id = %s "
        "AND event_type = 'session_start' ORDER BY occurred_at",
        (w.id, visitor),
    ).fetchall()


def test_expirable_rule() -> None:
    assert _expirable({"s": [[1, 1, 1]], "a": 10}, 11)
    assert not _expirable({"s": [[1, 1, 1]], "a": 10}, 10)  # idle exactly the horizon: kept
    assert not _expirable({"erased": True, "a": 0}, 11)  # erasure records are never expired
    assert not _expirable({"s": [], "l": [[1, "u"]], "e": [], "x": True, "a": 0}, 11)  # already expired


def test_expiry_then_late_events_within_and_beyond_the_horizon(
    settings: Settings,
    start_service: Callable[..., Any],
    feed: RawFeed,
    make_widget: Callable[..., widgets.Widget],
    db: psycopg.Connection,
) -> None:
    w = make_widget()
    long = settings.model_copy(update={"processors_state_horizon_s": LONG})
    short = settings.model_copy(update={"processors_state_horizon_s": 1.0, "processors_expiry_interval_s": 0.2})
    sink = start_service("sink")
    proc = start_service("processors", settings_override=long)
    with logs_on_failure(proc, sink):
        feed.send([ev(w, "a", T0), identify(w, "a", T0 + 5 * MIN, "user-a"), ev(w, "a", T0 + 10 * MIN)])
        feed.send([ev(w, "b", T0), ev(w, "b", T0 + 10 * MIN)])
        feed.send([ev(w, "d", T0), ev(w, "d", T0 + 10 * MIN)])
        rows(db, w, 3 + 1 + 2 + 1 + 2 + 1)
        # Within the horizon: a late event 20 min before B's session joins it (no second session_start).
        feed.send([ev(w, "b", T0 - 20 * MIN)])
        rows(db, w, 11)
        assert starts(db, w, "b") == [(T0, sid(w, "b", T0))]

        # Beyond the horizon: the same worker (its local store) restarted with a 1 s horizon expires all three.
        proc.stop()
        proc = start_service("processors", settings_override=short)
        port = short.processors_web_port
        wait_until(
            lambda: expired_count(port, "deleted") >= 2 and expired_count(port, "links_kept") >= 1,
            30,
            "expiry of the idle visitors",
        )
        # B's late event 45 min before its first event, within the gap of the forgotten session's start
        # (T0 - 20 min): placed as if that session was never seen (rule 4), a session of its own.
        feed.send([ev(w, "b", T0 - 45 * MIN)])
        # A's event 20 min after its last one: a new session, still carrying A's contact (links are kept).
        feed.send([ev(w, "a", T0 + 30 * MIN)])
        got = rows(db, w, 11 + 2 + 2)
        assert starts(db, w, "b") == [(T0 - 45 * MIN, sid(w, "b", T0 - 45 * MIN)), (T0, sid(w, "b", T0))]
        assert starts(db, w, "a") == [(T0, sid(w, "a", T0)), (T0 + 30 * MIN, sid(w, "a", T0 + 30 * MIN))]
        contact = customer_id_for(w.tenant_id, "user-a")
        assert {r[4] for r in got if r[1] == "a"} == {contact}

        # The expiry wrote a tombstone for D: a worker recovering from the changelog alone (a new host: empty
        # data dir) does not bring D's session back; D's next event, 10 min after its old session, opens one.
        key = event_key(str(w.id), "d")
        changelog = f"{settings.processors_app_id}-visitor-state-changelog"
        d_records = [m.value() for m in read_topic(settings, changelog, 10**6, timeout=8) if m.key() == key]
        assert d_records and d_records[-1] is None
        assert changelog_config(settings, changelog)["cleanup.policy"] == "compact"  # tombstones get compacted
        proc.kill()
        fresh = long.model_copy(update={"data_dir": settings.data_dir / "another-host"})
        proc = start_service("processors", settings_override=fresh)
        feed.send([ev(w, "d", T0 + 20 * MIN)])
        rows(db, w, 15 + 2)
        assert starts(db, w, "d") == [(T0, sid(w, "d", T0)), (T0 + 20 * MIN, sid(w, "d", T0 + 20 * MIN))]


def test_store_url_standby_replicas_and_data_dir_reach_faust(tmp_path: Path) -> None:
    # No broker is contacted: a closed port, so the producers the app creates reach nobody else's broker.
    s = Settings(
        data_dir=tmp_path,
        processors_standby_replicas=2,
        processors_web_port=6123,
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
    )
    app = create_app(s)
    assert app.conf.table_standby_replicas == 2
    assert str(app.conf.store).startswith("rocksdb:")  # the default: state on disk
    assert Path(app.conf.datadir) == tmp_path / "processors" / "6123"  # one directory per worker on a host
    assert app.state_store.rocksdb
    memory = create_app(s.model_copy(update={"processors_store_url": "memory://", "processors_web_port": 6124}))
    assert str(memory.conf.store).startswith("memory:") and not memory.state_store.rocksdb
