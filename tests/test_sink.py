"""The sink against a real broker and a real Postgres: rows, idempotency, crashes, outages, dead letters,
deleted widgets, and the identity writes (contacts, trait merge, retro-linking)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import psycopg
import pytest
from confluent_kafka import Message, Producer

from dev_stack.embedded import EmbeddedPostgres, free_port, wait_until
from schemas.codec import VISITOR_EVENT, AvroCodec, EventCodec
from sink.batch import Batch
from site_activity import widgets
from site_activity.db import migrate
from site_activity.events import customer_id_for
from site_activity.kafka import DeliveryReports, flush_or_raise, produce_waiting, producer_config
from site_activity.settings import Settings
from site_activity.topics import event_key
from tests.conftest import committed_total, http_ok, read_topic

CODEC = AvroCodec(VISITOR_EVENT)
# Relative to today: the sink does not store events older than their widget's retention (90 days here).
T0 = (datetime.now(UTC) - timedelta(days=2)).replace(hour=8, minute=0, second=0, microsecond=123456)

EVENT_COLUMNS = (
    "widget_id, event_id, tenant_id, visitor_id, event_type, name, url, referrer, properties, user_id,"
    " customer_id, session_id, occurred_at, received_at"
)


# --- helpers ------------------------------------------------------------------------------------------


def make_event(
    widget: widgets.Widget, visitor: str = "v-1", event_type: str = "pageview", at: datetime = T0, **fields: Any
) -> dict[str, Any]:
    record = {
        "event_id": uuid.uuid4(),
        "event_type": event_type,
        "tenant_id": widget.tenant_id,
        "widget_id": widget.id,
        "visitor_id": visitor,
        "name": None,
        "url": "https://shop.example/",
        "referrer": None,
        "properties": "{}",
        "user_id": None,
        "occurred_at": at,
        "received_at": at + timedelta(seconds=1),
        "session_id": None,
        "customer_id": None,
    }
    record.update(fields)
    return record


def identify(
    widget: widgets.Widget, visitor: str, user_id: str, traits: dict[str, Any], at: datetime, **fields: Any
) -> dict[str, Any]:
    """An identify as the processors put it on the enriched stream: customer_id derived from (tenant, user)."""
    cid = customer_id_for(widget.tenant_id, user_id)
    return make_event(
        widget, visitor, "identify", at, user_id=user_id, properties=json.dumps(traits), customer_id=cid, **fields
    )


def produce(settings: Settings, topic: str, records: Sequence[dict[str, Any] | bytes]) -> None:
    """Encodes records with the Avro codec (bytes are sent as they are) and waits for delivery."""
    producer = Producer(producer_config(settings))
    reports = DeliveryReports()
    for rec in records:
        if isinstance(rec, bytes):
            key, value = b"garbage", rec
        else:
            key, value = event_key(str(rec["widget_id"]), rec["visitor_id"]), CODEC.encode(rec)
        produce_waiting(producer, topic, value, key, on_delivery=reports)
        producer.poll(0)
    flush_or_raise(producer, 30, reports)


def produce_request(settings: Settings, topic: str, records: list[dict[str, Any]]) -> None:
    """One VisitorEventBatch message of one visitor's records, as the API publishes a request."""
    producer = Producer(producer_config(settings))
    key = event_key(str(records[0]["widget_id"]), records[0]["visitor_id"])
    produce_waiting(producer, topic, EventCodec().encode_events(records), key)
    flush_or_raise(producer, 30)


def count_rows(conn: psycopg.Connection, widget_id: uuid.UUID) -> int:
    return conn.execute("SELECT count(*) FROM visitor_events WHERE widget_id = %s", (widget_id,)).fetchone()[0]


def wait_count(conn: psycopg.Connection, widget_id: uuid.UUID, expected: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    n = -1
    while time.monotonic() < deadline:
        n = count_rows(conn, widget_id)
        if n >= expected:
            break
        time.sleep(0.1)
    assert n == expected, f"expected {expected} rows for widget {widget_id}, found {n}"


def event_ids(conn: psycopg.Connection, widget_id: uuid.UUID) -> list[uuid.UUID]:
    return [r[0] for r in conn.execute("SELECT event_id FROM visitor_events WHERE widget_id = %s", (widget_id,))]


def metric(port: int, name: str) -> float:
    """Sum of every sample of one metric family (all label values) from the sink's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            sample = line.split(" ")[0]
            if sample == name or sample.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def raw_settings(settings: Settings) -> Settings:
    """The sink reading the raw topic directly (no processors in the path)."""
    return settings.model_copy(update={"sink_from_enriched": False})


# --- writing rows -----------------------------------------------------------------------------------


def test_rows_land_with_every_column(raw_settings, topics, db, make_widget, start_service) -> None:
    w = make_widget()
    session = uuid.uuid4()
    custom = make_event(
        w,
        "v-abc",
        "custom",
        T0,
        name="clicked_upgrade",
        url="https://shop.example/pricing",
        referrer="https://search.example/?q=x",
        session_id=session,
        properties=json.dumps({"plan": "growth", "n": 3, "nested": {"ü": [1, 2]}}),
    )
    page = make_event(w, "v-abc", "pageview", T0 + timedelta(seconds=5))
    produce(raw_settings, topics.raw_events, [custom, page])

    svc = start_service("sink", settings_override=raw_settings)
    wait_count(db, w.id, 2)
    rows = {r[1]: r for r in db.execute(f"SELECT {EVENT_COLUMNS} FROM visitor_events WHERE widget_id = %s", (w.id,))}
    assert rows[custom["event_id"]] == (
        w.id,
        custom["event_id"],
        w.tenant_id,
        "v-abc",
        "custom",
        "clicked_upgrade",
        "https://shop.example/pricing",
        "https://search.example/?q=x",
        {"plan": "growth", "n": 3, "nested": {"ü": [1, 2]}},
        None,
        None,
        session,
        T0,
        T0 + timedelta(seconds=1),
    )
    assert rows[page["event_id"]][4:] == (
        "pageview",
        None,
        "https://shop.example/",
        None,
        {},
        None,
        None,
        None,
        T0 + timedelta(seconds=5),
        T0 + timedelta(seconds=6),
    )
    port = raw_settings.sink_http_port
    wait_until(lambda: metric(port, "site_activity_sink_rows_written_total") == 2, 5, "rows metric")
    assert metric(port, "site_activity_sink_batches_total") >= 1
    assert "site_activity_sink_batch_seconds_bucket" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
    svc.stop()
    assert svc.proc is not None and svc.proc.returncode == 0, svc.log_tail()


NASTY = [
    "back\\slash \\N \\.",
    "tab\there",
    "new\nline\r\nand cr\r",
    "ünïcødé 🚀 日本語",
    "\\N",
    "",
    "trailing backslash \\",
]


def test_strings_and_timestamps_round_trip_exactly(raw_settings, topics, db, make_widget, start_service) -> None:
    """Values go to Postgres as COPY text: every character that format escapes must come back unchanged, and
    timestamps (sent as µs since the epoch) exactly, before 1970 too."""
    w = make_widget()
    props = json.dumps({"quote": 'say "hi"\\', "esc": "\\n\\t", "raw": "a\tb\nc", "ü": "🚀"}, ensure_ascii=False)
    times = [
        T0,
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 58, 999999, tzinfo=UTC),
    ]
    # occurred_at must be within the widget's retention (older events are not stored); received_at is not bound.
    occurred = [T0, T0 - timedelta(microseconds=1), datetime(9999, 12, 31, 23, 59, 58, 999999, tzinfo=UTC)]
    events = [
        make_event(
            w,
            f"v{text}",
            "custom",
            occurred[i % len(occurred)],
            name=text,
            url=text,
            referrer=text,
            properties=props,
            received_at=times[(i + 1) % len(times)],
        )
        for i, text in enumerate(NASTY)
    ]
    produce(raw_settings, topics.raw_events, events)
    start_service("sink", settings_override=raw_settings)
    wait_count(db, w.id, len(events))
    got = {
        r[0]: r[1:]
        for r in db.execute(
            "SELECT event_id, visitor_id, name, url, referrer, properties, occurred_at, received_at"
            " FROM visitor_events WHERE widget_id = %s",
            (w.id,),
        )
    }
    for e in events:
        assert got[e["event_id"]] == (
            e["visitor_id"],
            e["name"],
            e["url"],
            e["referrer"],
            json.loads(props),
            e["occurred_at"],
            e["received_at"],
        )


def test_same_event_twice_is_one_row(raw_settings, topics, db, make_widget, start_service) -> None:
    w = make_widget()
    events = [make_event(w, f"v-{i}", at=T0 + timedelta(seconds=i)) for i in range(5)]
    # A producer retry: the same events again, both inside one batch and in a later one.
    produce(raw_settings, topics.raw_events, events + events)
    svc = start_service("sink", settings_override=raw_settings)
    wait_count(db, w.id, 5)
    produce(raw_settings, topics.raw_events, events[:2] + [late := make_event(w, "v-late")])
    wait_count(db, w.id, 6)
    assert sorted(event_ids(db, w.id)) == sorted([e["event_id"] for e in events] + [late["event_id"]])
    wait_until(
        lambda: metric(raw_settings.sink_http_port, "site_activity_sink_rows_skipped_total") >= 2, 5, "skipped metric"
    )
    svc.stop()


def test_sigkill_mid_stream_then_restart_loses_and_duplicates_nothing(
    raw_settings, topics, db, make_widget, start_service
) -> None:
    s = raw_settings.model_copy(update={"sink_batch_max_events": 500})
    w = make_widget()
    total = 20_000
    events = [make_event(w, f"v-{i % 300}", at=T0 + timedelta(milliseconds=i)) for i in range(total)]
    svc = start_service("sink", settings_override=s)
    produce(s, topics.raw_events, events)

    wait_until(lambda: count_rows(db, w.id) > 0, 30, "first rows")
    svc.kill()
    at_kill = count_rows(db, w.id)
    assert 0 < at_kill < total, f"the sink was killed with {at_kill} of {total} rows written"

    svc.start()  # waits for /healthz again
    wait_count(db, w.id, total, timeout=60)
    # rows per event id, against what was sent: each sent event exactly once, nothing else
    per_event = dict(
        db.execute(
            "SELECT event_id, count(*) FROM visitor_events WHERE widget_id = %s GROUP BY event_id", (w.id,)
        ).fetchall()
    )
    assert per_event == {e["event_id"]: 1 for e in events}


def test_postgres_outage_retries_then_writes_everything_once(
    raw_settings, topics, make_widget, start_service, tmp_path: Path
) -> None:
    pg = EmbeddedPostgres(tmp_path / "own-pg" / "data", free_port())
    pg.start()
    try:
        migrate(pg.dsn)
        with psycopg.connect(pg.dsn) as conn:
            w = widgets.create_widget(conn, name="outage", actor="tests", tracking_enabled=True)
        s = raw_settings.model_copy(update={"postgres_dsn": pg.dsn, "sink_retry_max_backoff_s": 1.0})
        port = s.sink_http_port
        svc = start_service("sink", settings_override=s)
        first = [make_event(w, f"v-{i % 7}", at=T0 + timedelta(seconds=i)) for i in range(300)]
        produce(s, topics.raw_events, first)
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            wait_count(conn, w.id, 300)

        pg.stop()
        second = [make_event(w, f"v-{i % 7}", at=T0 + timedelta(hours=1, seconds=i)) for i in range(300)]
        produce(s, topics.raw_events, second)
        # A few backoff rounds (0.2 s, 0.4 s, 0.8 s, then the 1 s cap) with the database gone.
        wait_until(lambda: metric(port, "site_activity_sink_db_retries_total") >= 5, 30, "sink retrying")
        assert http_ok(f"http://127.0.0.1:{port}/healthz")(), "the sink must stay alive while Postgres is down"
        produce(s, topics.raw_events, second[:50])  # the widget retries a request meanwhile

        pg.start()
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            wait_count(conn, w.id, 600, timeout=45)
            ids = event_ids(conn, w.id)
        assert sorted(ids) == sorted(e["event_id"] for e in first + second)

        # Stopped (SIGTERM) while Postgres is down: exits cleanly without committing; a new sink finishes.
        pg.stop()
        third = [make_event(w, "v-3", at=T0 + timedelta(hours=2, seconds=i)) for i in range(100)]
        retries = metric(port, "site_activity_sink_db_retries_total")
        produce(s, topics.raw_events, third)
        wait_until(lambda: metric(port, "site_activity_sink_db_retries_total") > retries, 30, "sink retrying")
        started = time.monotonic()
        svc.stop()
        assert svc.proc is not None and svc.proc.returncode == 0, svc.log_tail()
        assert time.monotonic() - started < 10
        pg.start()
        svc.start()
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            wait_count(conn, w.id, 700, timeout=45)
            assert sorted(event_ids(conn, w.id)) == sorted(e["event_id"] for e in first + second + third)
    finally:
        pg.stop()


def test_second_member_joining_mid_stream_rebalances_without_loss(
    raw_settings, topics, db, make_widget, start_service, tmp_path: Path
) -> None:
    s = raw_settings.model_copy(update={"sink_batch_max_events": 200})
    w = make_widget()
    events = [make_event(w, f"v-{i % 50}", at=T0 + timedelta(milliseconds=i)) for i in range(6000)]
    start_service("sink", settings_override=s)
    produce(s, topics.raw_events, events[:3000])
    wait_until(lambda: count_rows(db, w.id) > 0, 30, "first rows")
    # A second member of the same group: partitions move, the first member flushes and commits on revoke.
    second = s.model_copy(update={"sink_http_port": free_port()})
    start_service("sink", settings_override=second)
    produce(s, topics.raw_events, events[3000:])
    wait_count(db, w.id, len(events), timeout=60)
    assert sorted(event_ids(db, w.id)) == sorted(e["event_id"] for e in events)
    assert metric(second.sink_http_port, "site_activity_sink_batches_total") >= 1, "the second member got no work"


# --- what can never be written ----------------------------------------------------------------------


def test_undecodable_and_rejected_rows_go_to_dead_letter_topic(
    raw_settings, topics, db, make_widget, start_service
) -> None:
    w = make_widget()
    good = [make_event(w, "v-1", at=T0 + timedelta(seconds=i)) for i in range(3)]
    bad_json = make_event(w, "v-1", "custom", T0, name="bad", properties="{not json")
    nul_byte = make_event(w, "v-1", "custom", T0, name="nul\x00byte")
    garbage = b"\x00\x01 definitely not avro"
    # and a VisitorEventBatch message (as the API and the processors write them) with one bad event among good ones
    in_message = [make_event(w, "v-2", at=T0 + timedelta(seconds=i)) for i in range(3)]
    bad_in_message = make_event(w, "v-2", "custom", T0, name="bad", properties="[1, 2")
    produce(raw_settings, topics.raw_events, [good[0], garbage, good[1], bad_json, nul_byte, good[2]])
    produce_request(raw_settings, topics.raw_events, [in_message[0], bad_in_message, *in_message[1:]])
    good += in_message

    start_service("sink", settings_override=raw_settings)
    wait_count(db, w.id, len(good))
    letters = read_topic(raw_settings, topics.dead_letter, 4)
    assert len(letters) == 4
    by_value = {m.value(): dict(cast(list[tuple[str, bytes]], m.headers())) for m in letters}
    assert by_value[garbage]["x-reason"].startswith(b"undecodable")
    for rec in (bad_json, nul_byte, bad_in_message):  # each bad event alone, as a single-event message
        headers = by_value[CODEC.encode(rec)]
        assert headers["x-reason"].startswith(b"db_rejected"), headers
        assert headers["x-source-topic"] == topics.raw_events.encode()
        assert int(headers["x-source-partition"]) >= 0 and int(headers["x-source-offset"]) >= 0
    assert {m.key() for m in letters} >= {b"garbage", event_key(str(w.id), "v-1")}
    assert sorted(event_ids(db, w.id)) == sorted(e["event_id"] for e in good)
    # The sink moved on: nothing is stuck behind the poison messages.
    produce(raw_settings, topics.raw_events, [make_event(w, "v-1")])
    wait_count(db, w.id, len(good) + 1)
    assert metric(raw_settings.sink_http_port, "site_activity_sink_dead_letters_total") == 4


def test_a_stream_gone_bad_stops_the_sink_without_committing_it(
    raw_settings, topics, db, make_widget, start_service
) -> None:
    """A producer deployed with a broken encoder: every message is undecodable. Past the dead-letter limit the
    sink stops (exit 65) instead of moving the stream to the dead-letter topic, and commits none of the batch
    that crossed it, so a restart reads those messages again; with the limit off they are dead-lettered."""
    limited = raw_settings.model_copy(update={"dead_letter_max_consecutive": 5})
    sink = start_service("sink", settings_override=limited)
    garbage = [b"\x00\x01 not avro %d" % i for i in range(12)]
    produce(limited, topics.raw_events, garbage)
    wait_until(lambda: not sink.alive(), 30, "the sink to stop at the dead-letter limit")
    assert sink.proc is not None and sink.proc.returncode == 65, sink.log_tail()
    assert "dead-letter limit reached" in sink.log_tail()
    assert committed_total(limited, limited.sink_group, topics.raw_events) < len(garbage)

    again = start_service("sink", settings_override=limited)  # same input, same limit: stops again
    wait_until(lambda: not again.alive(), 30, "the restarted sink to stop again")
    assert again.proc is not None and again.proc.returncode == 65

    start_service("sink", settings_override=limited.model_copy(update={"dead_letter_max_consecutive": 0}))
    wait_until(
        lambda: committed_total(limited, limited.sink_group, topics.raw_events) == len(garbage),
        30,
        "all offsets committed",
    )
    letters = read_topic(limited, topics.dead_letter, len(garbage))
    assert {m.value() for m in letters} == set(garbage)
    w = make_widget()  # and the sink runs on
    produce(limited, topics.raw_events, [make_event(w, "v-1")])
    wait_count(db, w.id, 1)


def test_events_of_a_deleted_widget_are_dropped(raw_settings, topics, db, make_widget, start_service) -> None:
    gone, kept = make_widget(), make_widget()
    widgets.delete_widget(db, gone.id, actor="tests")
    produce(
        raw_settings,
        topics.raw_events,
        [
            make_event(gone, "v-1"),
            make_event(kept, "v-1"),
            make_event(gone, "v-2", "identify", user_id="u", customer_id=customer_id_for(gone.tenant_id, "u")),
        ],
    )
    start_service("sink", settings_override=raw_settings)
    wait_count(db, kept.id, 1)
    produce(raw_settings, topics.raw_events, [make_event(kept, "v-2")])
    wait_count(db, kept.id, 2)
    assert count_rows(db, gone.id) == 0
    assert db.execute("SELECT count(*) FROM customers WHERE tenant_id = %s", (gone.tenant_id,)).fetchone()[0] == 0


# --- identity -----------------------------------------------------------------------------------------


def customer(conn: psycopg.Connection, tenant_id: uuid.UUID, user_id: str) -> tuple | None:
    return conn.execute(
        "SELECT id, external_id, email, name, traits, trait_times FROM customers"
        " WHERE tenant_id = %s AND external_id = %s",
        (tenant_id, user_id),
    ).fetchone()


def wait_customer(
    conn: psycopg.Connection, tenant_id: uuid.UUID, user_id: str, check: Callable[[tuple], bool]
) -> tuple:
    row: tuple | None = None

    def ready() -> bool:
        nonlocal row
        row = customer(conn, tenant_id, user_id)
        return row is not None and check(row)

    try:
        wait_until(ready, 20, f"customer {user_id}")
    except TimeoutError:
        raise AssertionError(f"customer {user_id} never matched: {row}") from None
    return row  # type: ignore[return-value]


def linked(conn: psycopg.Connection, widget_id: uuid.UUID) -> dict[uuid.UUID, uuid.UUID | None]:
    return dict(conn.execute("SELECT event_id, customer_id FROM visitor_events WHERE widget_id = %s", (widget_id,)))


def test_identify_merges_traits_by_event_time(settings, topics, db, make_widget, start_service) -> None:
    w = make_widget()
    t = T0
    first = identify(w, "v-1", "u_1", {"email": "a@x.example", "name": "Paul", "plan": "free"}, t)
    newest = identify(w, "v-1", "u_1", {"email": "b@x.example", "plan": "pro"}, t + timedelta(minutes=10))
    start_service("sink", settings_override=settings)
    produce(settings, topics.enriched_events, [first, newest])
    row = wait_customer(db, w.tenant_id, "u_1", lambda r: r[4].get("plan") == "pro")
    assert row[0] == customer_id_for(w.tenant_id, "u_1")
    assert row[2:5] == ("b@x.example", "Paul", {"email": "b@x.example", "name": "Paul", "plan": "pro"})

    # Arrives late but happened in between: only fills keys nobody set, overwrites nothing newer.
    late = identify(
        w, "v-2", "u_1", {"email": "c@x.example", "company": "Acme", "plan": "basic"}, t + timedelta(minutes=5)
    )
    # Out of order inside one batch too: the newer identify of another contact first.
    other_new = identify(w, "v-3", "u_2", {"name": "Jessica", "email": "j2@x.example"}, t + timedelta(hours=1))
    other_old = identify(w, "v-3", "u_2", {"name": "Jess", "email": "j1@x.example", "tz": "UTC"}, t)
    produce(settings, topics.enriched_events, [late, other_new, other_old])
    row = wait_customer(db, w.tenant_id, "u_1", lambda r: "company" in r[4])
    assert row[2:5] == (
        "b@x.example",
        "Paul",
        {"email": "b@x.example", "name": "Paul", "plan": "pro", "company": "Acme"},
    )
    times = {k: datetime.fromisoformat(v) for k, v in row[5].items()}
    assert times == {
        "email": t + timedelta(minutes=10),
        "plan": t + timedelta(minutes=10),
        "name": t,
        "company": t + timedelta(minutes=5),
    }
    row2 = wait_customer(db, w.tenant_id, "u_2", lambda r: True)
    assert row2[2:5] == ("j2@x.example", "Jessica", {"name": "Jessica", "email": "j2@x.example", "tz": "UTC"})

    # Re-applying the same identify (a redelivery) changes nothing, not even updated_at.
    before = db.execute("SELECT traits, trait_times, updated_at FROM customers WHERE id = %s", (row[0],)).fetchone()
    produce(settings, topics.enriched_events, [first, {**first, "event_id": uuid.uuid4()}, marker := make_event(w)])
    wait_until(lambda: marker["event_id"] in linked(db, w.id), 20, "marker row")
    after = db.execute("SELECT traits, trait_times, updated_at FROM customers WHERE id = %s", (row[0],)).fetchone()
    assert after == before


def test_repeated_identifies_skip_only_what_an_older_link_already_covers(
    settings, topics, db, make_widget, start_service
) -> None:
    """Two identifies of the same user in one batch, both new: the first still claims the anonymous history
    (its neighbour is new too, so it justifies no skip); a later repeat of that user changes nothing; another
    user's identify after them takes over the rows from its time on."""
    w = make_widget()
    t = T0
    anon = [make_event(w, "v-r", at=t + timedelta(minutes=i)) for i in range(3)]
    start_service("sink", settings_override=settings)
    produce(settings, topics.enriched_events, anon)
    wait_count(db, w.id, 3)

    first = identify(w, "v-r", "u_same", {}, t + timedelta(minutes=10))
    again = identify(w, "v-r", "u_same", {}, t + timedelta(minutes=20))
    cid = first["customer_id"]
    produce(settings, topics.enriched_events, [first, again])
    wait_until(lambda: all(linked(db, w.id).get(e["event_id"]) == cid for e in anon), 20, "anonymous history claimed")

    repeat = identify(w, "v-r", "u_same", {}, t + timedelta(minutes=30))
    later = make_event(w, "v-r", at=t + timedelta(minutes=35), customer_id=cid)
    other = identify(w, "v-r", "u_other", {}, t + timedelta(minutes=40))
    produce(settings, topics.enriched_events, [repeat, later, other])
    wait_count(db, w.id, 8)
    links = linked(db, w.id)
    assert all(links[e["event_id"]] == cid for e in (*anon, first, again, repeat, later))
    assert links[other["event_id"]] == other["customer_id"] != cid


def test_identify_retro_links_anonymous_history(settings, topics, db, make_widget, start_service) -> None:
    tenant = uuid.uuid4()
    w, w_same_tenant = make_widget(tenant_id=tenant), make_widget(tenant_id=tenant)
    w_other_tenant = make_widget()
    t = T0
    before = [make_event(w, "v-1", at=t + timedelta(minutes=i)) for i in range(3)]
    # The same visitor id on another widget of this tenant is the same browser (ids are per origin per tenant).
    same_tenant = make_event(w_same_tenant, "v-1", at=t)
    other_visitor = make_event(w, "v-2", at=t)
    other_tenant = make_event(w_other_tenant, "v-1", at=t)  # same visitor id, unrelated person
    start_service("sink", settings_override=settings)
    produce(settings, topics.enriched_events, [*before, same_tenant, other_visitor, other_tenant])
    wait_count(db, w.id, 4)

    ident = identify(w, "v-1", "u_9", {"email": "p@x.example"}, t + timedelta(minutes=10))
    cid = ident["customer_id"]
    after = make_event(w, "v-1", at=t + timedelta(minutes=11), customer_id=cid)  # stamped by the processors
    produce(settings, topics.enriched_events, [ident, after])
    wait_until(lambda: linked(db, w.id).get(after["event_id"]) == cid, 20, "stamped event")
    links = linked(db, w.id)
    assert all(links[e["event_id"]] == cid for e in (*before, ident, after))
    assert links[other_visitor["event_id"]] is None
    assert linked(db, w_same_tenant.id)[same_tenant["event_id"]] == cid
    assert linked(db, w_other_tenant.id)[other_tenant["event_id"]] is None

    # Deleting the contact keeps its events, unlinked; deleting the widget removes its events.
    db.execute("DELETE FROM customers WHERE id = %s", (cid,))
    assert set(linked(db, w.id).values()) == {None} and count_rows(db, w.id) == 6
    widgets.delete_widget(db, w.id, actor="tests")
    assert count_rows(db, w.id) == 0 and count_rows(db, w_same_tenant.id) == 1

    # An event still carrying the deleted contact's id lands, with customer_id NULL instead of an FK error.
    orphan = make_event(w_same_tenant, "v-1", at=t + timedelta(minutes=20), customer_id=cid)
    produce(settings, topics.enriched_events, [orphan])
    wait_count(db, w_same_tenant.id, 2)
    assert linked(db, w_same_tenant.id)[orphan["event_id"]] is None


@pytest.mark.parametrize("one_batch", [True, False], ids=["one-batch", "separate-batches"])
def test_shared_computer_keeps_earlier_events_with_first_contact(
    settings, topics, db, make_widget, start_service, one_batch: bool
) -> None:
    w = make_widget()
    t = T0
    a = customer_id_for(w.tenant_id, "alice")
    b = customer_id_for(w.tenant_id, "bob")
    anon = make_event(w, "pc", at=t)
    ident_a = identify(w, "pc", "alice", {"name": "Alice"}, t + timedelta(minutes=1))
    between = make_event(w, "pc", at=t + timedelta(minutes=2), customer_id=a)
    ident_b = identify(w, "pc", "bob", {"name": "Bob"}, t + timedelta(minutes=3))
    after_b = make_event(w, "pc", at=t + timedelta(minutes=4), customer_id=b)
    stream = [anon, ident_a, between, ident_b, after_b]
    start_service("sink", settings_override=settings)
    if one_batch:
        produce(settings, topics.enriched_events, stream)
    else:
        for rec in stream:
            produce(settings, topics.enriched_events, [rec])
            wait_until(lambda rec=rec: rec["event_id"] in linked(db, w.id), 20, "row")
    wait_count(db, w.id, 5)
    assert linked(db, w.id) == {
        anon["event_id"]: a,
        ident_a["event_id"]: a,
        between["event_id"]: a,
        ident_b["event_id"]: b,
        after_b["event_id"]: b,
    }
    assert customer(db, w.tenant_id, "alice")[3] == "Alice" and customer(db, w.tenant_id, "bob")[3] == "Bob"


@pytest.mark.parametrize("identify_first", [False, True], ids=["identify-after", "identify-before"])
def test_a_newly_learned_link_claims_rows_up_to_the_next_link(
    settings, topics, db, make_widget, start_service, identify_first: bool
) -> None:
    """Issue 8, case 5 (the sink's half): rows carry the contact of the link in force at their time, the first
    link's before any. An identify at T0-100 s for a page view at T0+100 s links it in either order; an identify
    learned late between two links re-links the rows from its time up to the next link, and no others."""
    w = make_widget()
    x, a, b, c = (customer_id_for(w.tenant_id, u) for u in ("u-x", "u-a", "u-b", "u-c"))
    ident = identify(w, "v-1", "u-x", {}, T0 - timedelta(seconds=100))
    # processed before the identify: anonymous; after it: stamped by the processors with the link in force
    view = make_event(w, "v-1", at=T0 + timedelta(seconds=100), customer_id=x if identify_first else None)
    start_service("sink", settings_override=settings)
    for rec in [ident, view] if identify_first else [view, ident]:
        produce(settings, topics.enriched_events, [rec])
        wait_until(lambda rec=rec: rec["event_id"] in linked(db, w.id), 20, "row")
    wait_until(lambda: linked(db, w.id).get(view["event_id"]) == x, 20, "page view linked")

    # v-2: links A at T0 and C at T0+20 min, rows stamped by them; then B at T0+10 min arrives late.
    minute = timedelta(minutes=1)
    early, mid1, mid2, late = (
        make_event(w, "v-2", at=T0 + m * minute, customer_id=cid) for m, cid in ((5, a), (12, a), (15, a), (25, c))
    )
    stream = [
        identify(w, "v-2", "u-a", {}, T0),
        early,
        mid1,
        mid2,
        identify(w, "v-2", "u-c", {}, T0 + 20 * minute),
        late,
    ]
    produce(settings, topics.enriched_events, stream)
    wait_until(lambda: late["event_id"] in linked(db, w.id), 20, "rows")
    produce(settings, topics.enriched_events, [identify(w, "v-2", "u-b", {}, T0 + 10 * minute)])
    wait_until(lambda: linked(db, w.id).get(mid1["event_id"]) == b, 20, "re-linked")
    links = linked(db, w.id)
    assert [links[e["event_id"]] for e in (early, mid1, mid2, late)] == [a, b, b, c]


@pytest.mark.parametrize("w1_first", [True, False], ids=["widget-1-first", "widget-2-first"])
def test_two_widgets_same_visitor_id_different_users_never_flip(
    settings, topics, db, make_widget, start_service, w1_first: bool
) -> None:
    """The processors link a visitor per widget; the sink must not move one widget's rows to the contact of
    another widget's identify (they would flip with every identify). Another widget's rows are only claimed
    while anonymous, and the widget's own link then takes them, in either order."""
    tenant = uuid.uuid4()
    w1, w2 = make_widget(tenant_id=tenant), make_widget(tenant_id=tenant)
    u1, u2 = customer_id_for(tenant, "u-one"), customer_id_for(tenant, "u-two")
    minute = timedelta(minutes=1)
    anon1, anon2 = make_event(w1, "v", at=T0), make_event(w2, "v", at=T0)
    id1 = identify(w1, "v", "u-one", {}, T0 + minute)
    id2 = identify(w2, "v", "u-two", {}, T0 + 2 * minute)
    after1 = make_event(w1, "v", at=T0 + 3 * minute, customer_id=u1)
    after2 = make_event(w2, "v", at=T0 + 3 * minute, customer_id=u2)
    start_service("sink", settings_override=settings)
    produce(settings, topics.enriched_events, [anon1, anon2])
    wait_count(db, w1.id, 1)
    wait_count(db, w2.id, 1)
    for batch in ([id1, after1], [id2, after2]) if w1_first else ([id2, after2], [id1, after1]):
        produce(settings, topics.enriched_events, batch)
        wait_until(lambda b=batch: b[1]["event_id"] in linked(db, b[1]["widget_id"]), 20, "row")
    again = identify(w1, "v", "u-one", {}, T0 + 4 * minute)  # a later identify on widget 1 claims nothing of 2
    produce(settings, topics.enriched_events, [again])
    wait_until(lambda: again["event_id"] in linked(db, w1.id), 20, "row")
    assert linked(db, w1.id) == {
        anon1["event_id"]: u1,
        id1["event_id"]: u1,
        after1["event_id"]: u1,
        again["event_id"]: u1,
    }
    assert linked(db, w2.id) == {anon2["event_id"]: u2, id2["event_id"]: u2, after2["event_id"]: u2}


# --- batching -----------------------------------------------------------------------------------------


class _Message:
    """What sink.batch reads of a consumed message."""

    def __init__(self, value: bytes, partition: int = 0) -> None:
        self._value, self._partition = value, partition

    def value(self) -> bytes:
        return self._value

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return self._partition


def test_sink_batches_are_bounded_by_events_not_messages() -> None:
    raw = EventCodec(logical_types=False)
    event = {
        "event_id": str(uuid.uuid4()),
        "event_type": "pageview",
        "tenant_id": str(uuid.uuid4()),
        "widget_id": str(uuid.uuid4()),
        "visitor_id": "v",
        "name": None,
        "url": None,
        "referrer": None,
        "properties": "{}",
        "user_id": None,
        "occurred_at": 1,
        "received_at": 2,
        "session_id": None,
        "customer_id": None,
    }
    request = cast(
        Message, _Message(raw.encode_events([event] * 25))
    )  # one request's 25 events, as both event topics carry them
    batch = Batch(max_events=1000, max_age_s=60.0)
    assert batch.room() == 10  # nothing seen yet: as if every message held 100 events
    batch.max_events = 100
    batch.add([request, request])
    assert (len(batch), batch.events, batch.due()) == (2, 50, False)
    assert batch.room() == 2  # 50 events still wanted, at 25 per message
    batch.add([request, cast(Message, _Message(raw.encode_event(event), partition=1)), request])
    assert batch.events == 101 and batch.due()
    assert batch.drop_partitions({("t", 1)}) == 1 and batch.events == 100
    assert len(batch.take()) == 4 and batch.events == 0 and not batch.due()
