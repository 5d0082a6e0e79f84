"""The stream processors end to end: raw Avro events produced to the raw topic (as the API would), the
processors and the sink as real processes, assertions on the enriched topic and on Postgres rows."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import psycopg
import pytest
from confluent_kafka import Message, Producer
from faust.types import TP
from faust.types import Message as FaustMessage

from dev_stack.embedded import wait_until
from dev_stack.process import StageProcess
from schemas.codec import VISITOR_EVENT, AvroCodec, EventCodec
from site_activity import erasure, widgets
from site_activity.events import customer_id_for, session_id_for, session_start_event_id_text
from site_activity.kafka import position, producer_config
from site_activity.settings import Settings
from site_activity.topics import Topics, event_key
from stream_processors import transport
from stream_processors.app import create_app
from stream_processors.erasures import is_erased
from stream_processors.repair import SkippedReader
from tests.conftest import committed_total, read_events, read_topic, wait_for_rows

CODEC = AvroCodec(VISITOR_EVENT)
EVENTS = EventCodec()
# Relative to today: the sink does not store events older than their widget's retention (90 days here).
T0 = (datetime.now(UTC) - timedelta(days=2)).replace(hour=8, minute=0, second=0, microsecond=250000)
MIN = timedelta(minutes=1)
SEC = timedelta(seconds=1)


# --- helpers ------------------------------------------------------------------------------------------


def ev(
    widget: widgets.Widget, visitor: str, at: datetime, event_type: str = "pageview", **fields: Any
) -> dict[str, Any]:
    """A raw event as the API publishes it: session_id and customer_id empty."""
    record = {
        "event_id": uuid.uuid4(),
        "event_type": event_type,
        "tenant_id": widget.tenant_id,
        "widget_id": widget.id,
        "visitor_id": visitor,
        "name": None,
        "url": f"https://shop.example/p/{at.minute}",
        "referrer": None,
        "properties": "{}",
        "user_id": None,
        "occurred_at": at,
        "received_at": at + SEC,
        "session_id": None,
        "customer_id": None,
    }
    record.update(fields)
    return record


def identify(widget: widgets.Widget, visitor: str, at: datetime, user_id: str, **traits: Any) -> dict[str, Any]:
    return ev(widget, visitor, at, "identify", user_id=user_id, properties=json.dumps(traits))


class RawFeed:
    """Publishes to the raw topic, keyed by widget:visitor, each call's events in the order given (the API
    sorts a request's events by occurred_at): `send` as one VisitorEventBatch message per call, which is what the
    API writes (one message per request); `send_single` as one message per event (what older producers
    wrote: readers must still accept it)."""

    def __init__(self, settings: Settings) -> None:
        self.topic = Topics.from_settings(settings).raw_events
        self.producer = Producer(producer_config(settings))

    def send(self, records: list[dict[str, Any]]) -> None:
        """One message per visitor (a request holds one visitor's events), visitors in order of appearance."""
        by_visitor: dict[tuple[Any, str], list[dict[str, Any]]] = {}
        for r in records:
            by_visitor.setdefault((r["widget_id"], r["visitor_id"]), []).append(r)
        for events in by_visitor.values():
            self.send_request(events)

    def send_single(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            self.producer.produce(self.topic, CODEC.encode(r), event_key(str(r["widget_id"]), r["visitor_id"]))
        assert self.producer.flush(15) == 0

    def send_request(self, records: list[dict[str, Any]]) -> None:
        r = records[0]
        self.send_bytes(event_key(str(r["widget_id"]), r["visitor_id"]), EVENTS.encode_events(records))

    def send_bytes(self, key: bytes, value: bytes) -> None:
        self.producer.produce(self.topic, value, key)
        assert self.producer.flush(15) == 0


@pytest.fixture
def feed(settings: Settings) -> RawFeed:
    return RawFeed(settings)


@pytest.fixture
def pipeline(start_service: Callable[..., Any]) -> dict[str, Any]:
    """Processors + sink (reading the enriched topic) running against the test's topics."""
    return {"processors": start_service("processors"), "sink": start_service("sink")}


def enriched(settings: Settings, expected: int) -> list[dict[str, Any]]:
    """The enriched events, in topic order: one message per raw message, each a VisitorEventBatch of its events."""
    events = [event for _, event in read_events(settings, Topics.from_settings(settings).enriched_events, expected)]
    assert len(events) == expected, f"expected {expected} enriched records, got {len(events)}"
    return events


def rows(db: psycopg.Connection, widget: widgets.Widget, expected: int, timeout: float = 30.0) -> list[tuple]:
    """(event_type, visitor_id, occurred_at, session_id, customer_id, event_id) of a widget, by time."""
    sql = (
        "SELECT event_type, visitor_id, occurred_at, session_id, customer_id, event_id FROM visitor_events "
        "WHERE widget_id = %s ORDER BY visitor_id, occurred_at, event_type <> 'session_start'"
    )
    return wait_for_rows(db, sql, (widget.id,), expected, timeout)


@contextmanager
def logs_on_failure(*services: Any) -> Iterator[None]:
    """Adds the services' log tails to a failed assertion (crash/restart tests are hard to debug without)."""
    try:
        yield
    except AssertionError as exc:
        tails = "\n".join(f"--- {svc.stage} log ---\n{svc.log_tail(60)}" for svc in services)
        raise AssertionError(f"{exc}\n{tails}") from exc


def sid(widget: widgets.Widget, visitor: str, started: datetime) -> uuid.UUID:
    return session_id_for(widget.id, visitor, started)


# --- sessions -----------------------------------------------------------------------------------------


def test_sessions_gap_edges_out_of_order_and_duplicates(
    settings: Settings, pipeline: Any, feed: RawFeed, make_widget: Callable[..., widgets.Widget], db: psycopg.Connection
) -> None:
    w = make_widget()
    # v-edge: silences of 10 s, 29:59, 30:00 (same session), then 30:01 (new session).
    edge_times = [T0, T0 + 10 * SEC]
    edge_times.append(edge_times[-1] + 29 * MIN + 59 * SEC)
    edge_times.append(edge_times[-1] + 30 * MIN)
    edge_times.append(edge_times[-1] + 30 * MIN + SEC)
    feed.send([ev(w, "v-edge", t) for t in edge_times])

    # v-late: two sessions, then a late request: an event inside session 1, a re-sent duplicate, and an event
    # 20 min after session 1 (bridging nothing: joins session 1, no new session_start).
    first = [ev(w, "v-late", T0), ev(w, "v-late", T0 + 5 * MIN)]
    second = [ev(w, "v-late", T0 + 3 * 60 * MIN)]
    feed.send(first)
    feed.send(second)
    late = [ev(w, "v-late", T0 + 2 * MIN), dict(first[1]), ev(w, "v-late", T0 + 25 * MIN)]
    feed.send(late)

    # enriched topic: v-edge 5 events + 2 starts, v-late 6 (one a duplicate) + 2 starts
    records = enriched(settings, 5 + 2 + 6 + 2)
    assert all(r["session_id"] is not None for r in records)
    starts = sorted((r["visitor_id"], r["occurred_at"]) for r in records if r["event_type"] == "session_start")
    assert starts == sorted(
        [("v-edge", edge_times[0]), ("v-edge", edge_times[4]), ("v-late", T0), ("v-late", T0 + 3 * 60 * MIN)]
    )
    for r in records:
        if r["event_type"] == "session_start":
            assert r["event_id"] == uuid.UUID(session_start_event_id_text(str(r["session_id"])))

    # Postgres: one row per event (the duplicate collapses), session ids as defined.
    got = rows(db, w, 5 + 2 + 5 + 2)
    by_visitor: dict[str, list[tuple]] = {}
    for row in got:
        by_visitor.setdefault(row[1], []).append(row)
    edge_session1, edge_session2 = sid(w, "v-edge", edge_times[0]), sid(w, "v-edge", edge_times[4])
    assert [(r[0], r[3]) for r in by_visitor["v-edge"]] == (
        [("session_start", edge_session1)]
        + [("pageview", edge_session1)] * 4
        + [("session_start", edge_session2), ("pageview", edge_session2)]
    )
    late1, late2 = sid(w, "v-late", T0), sid(w, "v-late", T0 + 3 * 60 * MIN)
    assert [(r[0], r[2], r[3]) for r in by_visitor["v-late"]] == [
        ("session_start", T0, late1),
        ("pageview", T0, late1),
        ("pageview", T0 + 2 * MIN, late1),
        ("pageview", T0 + 5 * MIN, late1),
        ("pageview", T0 + 25 * MIN, late1),
        ("session_start", T0 + 3 * 60 * MIN, late2),
        ("pageview", T0 + 3 * 60 * MIN, late2),
    ]
    assert db.execute(
        "SELECT count(*) FROM visitor_events WHERE widget_id = %s AND session_id IS NULL", (w.id,)
    ).fetchone() == (0,)


def test_request_messages_are_processed_like_single_event_messages(
    settings: Settings, pipeline: Any, feed: RawFeed, make_widget: Callable[..., widgets.Widget], db: psycopg.Connection
) -> None:
    """The same visitor timeline (sessions, identify, a late request) on two widgets of one tenant: one as a
    message per event, the other as VisitorEventBatch messages. The enriched records must be the same, up to the widget
    and the widget-derived session ids."""
    w_single = make_widget()
    w_batch = make_widget(tenant_id=w_single.tenant_id)
    timeline = [
        [ev(w_single, "v", T0), ev(w_single, "v", T0 + 29 * MIN), ev(w_single, "v", T0 + 60 * MIN)],
        [
            identify(w_single, "v", T0 + 61 * MIN, "u-batch", plan="pro"),
            ev(w_single, "v", T0 + 62 * MIN, "custom", name="clicked"),
        ],
        [ev(w_single, "v", T0 + 3 * 60 * MIN)],
        [ev(w_single, "v", T0 + 10 * MIN), ev(w_single, "v", T0 + 100 * MIN)],  # late: joins, then opens
    ]
    for batch in timeline:
        feed.send_single(batch)
        feed.send_request([{**r, "widget_id": w_batch.id} for r in batch])  # same event ids, other widget

    records = enriched(settings, 2 * (8 + 4))  # 8 events + 4 session_starts per widget
    by_widget: dict[uuid.UUID, list[dict[str, Any]]] = {w_single.id: [], w_batch.id: []}
    for r in records:
        by_widget[r["widget_id"]].append(r)

    def comparable(r: dict[str, Any]) -> tuple:
        fields = {k: v for k, v in r.items() if k not in ("widget_id", "session_id", "event_id")}
        own_id = r["event_id"] if r["event_type"] != "session_start" else None  # derived ids depend on the widget
        return tuple(sorted(fields.items())) + (own_id,)

    assert Counter(map(comparable, by_widget[w_single.id])) == Counter(map(comparable, by_widget[w_batch.id]))
    contact_id = customer_id_for(w_single.tenant_id, "u-batch")
    for w in (w_single, w_batch):
        opened = sorted(r["occurred_at"] for r in by_widget[w.id] if r["event_type"] == "session_start")
        assert opened == [T0, T0 + 60 * MIN, T0 + 100 * MIN, T0 + 3 * 60 * MIN]
        for r in by_widget[w.id]:
            assert r["session_id"] == sid(w, "v", max(t for t in opened if t <= r["occurred_at"]))
            if r["event_type"] == "session_start":
                assert r["event_id"] == uuid.UUID(session_start_event_id_text(str(r["session_id"])))
            # processed before the identify arrived: no contact yet (the sink retro-links those rows)
            before_identify = r["occurred_at"] in (T0, T0 + 29 * MIN, T0 + 60 * MIN)
            assert r["customer_id"] == (None if before_identify else contact_id)
    assert len(rows(db, w_batch, 12)) == 12


# --- identity -----------------------------------------------------------------------------------------


def contact(db: psycopg.Connection, tenant_id: uuid.UUID, user_id: str) -> tuple | None:
    return db.execute(
        "SELECT id, email, name, traits FROM customers WHERE tenant_id = %s AND external_id = %s", (tenant_id, user_id)
    ).fetchone()


def customers_of(db: psycopg.Connection, widget: widgets.Widget, visitor: str) -> list[tuple]:
    return db.execute(
        "SELECT event_type, occurred_at, customer_id FROM visitor_events WHERE widget_id = %s "
        "AND visitor_id = %s ORDER BY occurred_at, event_type <> 'session_start'",
        (widget.id, visitor),
    ).fetchall()


def test_identify_retro_link_traits_tenants_and_shared_computer(
    settings: Settings, pipeline: Any, feed: RawFeed, make_widget: Callable[..., widgets.Widget], db: psycopg.Connection
) -> None:
    w = make_widget()
    other_tenant = make_widget()

    # Retro-link: anonymous history lands first, then the identify, then a later and a late event.
    anon = [ev(w, "v-anon", T0), ev(w, "v-anon", T0 + 10 * MIN)]
    feed.send(anon)
    wait_for_rows(
        db,
        "SELECT 1 FROM visitor_events WHERE widget_id = %s AND visitor_id = 'v-anon' AND customer_id IS NULL",
        (w.id,),
        3,
    )
    feed.send(
        [
            identify(w, "v-anon", T0 + 20 * MIN, "u-paul", email="paul@arrakis.example", plan="free"),
            ev(w, "v-anon", T0 + 21 * MIN),
        ]
    )
    feed.send([ev(w, "v-anon", T0 + 15 * MIN)])  # flushed late: before the identify, after it arrived
    # Traits: a later identify overwrites plan; an older one arriving last only adds what is missing.
    feed.send([identify(w, "v-anon", T0 + 22 * MIN, "u-paul", plan="growth")])
    feed.send([identify(w, "v-anon", T0 + 19 * MIN, "u-paul", plan="old", name="Paul Atreides")])

    # Two tenants, same visitor id and same user id: two unrelated contacts.
    for widget in (w, other_tenant):
        feed.send([ev(widget, "v-same", T0), identify(widget, "v-same", T0 + MIN, "u-same", plan="t")])

    # Shared computer: A, then B on the same browser.
    feed.send(
        [
            ev(w, "v-shared", T0),
            identify(w, "v-shared", T0 + MIN, "u-a"),
            ev(w, "v-shared", T0 + 2 * MIN),
            identify(w, "v-shared", T0 + 3 * MIN, "u-b"),
            ev(w, "v-shared", T0 + 4 * MIN),
        ]
    )

    # Several browsers, one user: one contact.
    feed.send([ev(w, "v-laptop", T0), identify(w, "v-laptop", T0 + MIN, "u-multi")])
    feed.send([ev(w, "v-phone", T0 + 5 * MIN), identify(w, "v-phone", T0 + 6 * MIN, "u-multi")])

    # v-anon 7 + start, v-same 2 + start (x2 widgets), v-shared 5 + start, v-laptop 2 + start, v-phone 2 + start
    rows(db, w, 8 + 3 + 6 + 3 + 3)
    rows(db, other_tenant, 3)

    paul = customer_id_for(w.tenant_id, "u-paul")
    wait_for_rows(
        db,
        "SELECT 1 FROM visitor_events WHERE widget_id = %s AND visitor_id = 'v-anon' AND customer_id = %s",
        (w.id, paul),
        8,
    )
    assert {c for _, _, c in customers_of(db, w, "v-anon")} == {paul}
    pid, email, name, traits = contact(db, w.tenant_id, "u-paul")  # type: ignore[misc]
    assert (pid, email, name) == (paul, "paul@arrakis.example", "Paul Atreides")
    assert traits == {"email": "paul@arrakis.example", "plan": "growth", "name": "Paul Atreides"}

    same_a, same_b = contact(db, w.tenant_id, "u-same"), contact(db, other_tenant.tenant_id, "u-same")
    assert same_a and same_b and same_a[0] != same_b[0]
    assert {c for _, _, c in customers_of(db, w, "v-same")} == {same_a[0]}
    assert {c for _, _, c in customers_of(db, other_tenant, "v-same")} == {same_b[0]}

    a, b = customer_id_for(w.tenant_id, "u-a"), customer_id_for(w.tenant_id, "u-b")
    assert [c for _, _, c in customers_of(db, w, "v-shared")] == [a, a, a, a, b, b]

    multi = contact(db, w.tenant_id, "u-multi")
    assert multi is not None
    assert {c for v in ("v-laptop", "v-phone") for _, _, c in customers_of(db, w, v)} == {multi[0]}

    # Every new latest link is published for other consumers.
    links = read_topic(settings, Topics.from_settings(settings).identity_links, 8)
    link_keys = Counter(m.key() for m in links)
    assert link_keys[event_key(str(w.id), "v-shared")] == 2
    assert link_keys[event_key(str(w.id), "v-phone")] == 1


def erasures_applied(settings: Settings) -> float:
    text = httpx.get(f"http://127.0.0.1:{settings.processors_web_port}/metrics", timeout=2).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("site_activity_processors_erasures_total ")
    )


def test_no_link_to_an_erased_contact_even_from_identify_calls_in_flight(
    settings: Settings, pipeline: Any, feed: RawFeed, make_widget: Callable[..., widgets.Widget]
) -> None:
    """A contact erase finds the visitors already in the database; an identify still in flight would link
    another one (processor state, identity.links). The contact marker makes every partition refuse such links
    and forget ones a visitor's state already holds."""
    w = make_widget()
    topics = Topics.from_settings(settings)
    feed.send([identify(w, "v-before", T0, "u-gone")])  # linked before the erase
    assert len(read_topic(settings, topics.identity_links, 1)) == 1
    erasure.kafka_notifier(settings)([erasure.contact_marker_key(customer_id_for(w.tenant_id, "u-gone"))])
    wait_until(lambda: erasures_applied(settings) >= settings.topic_partitions, 30, "contact marker applied")

    feed.send([ev(w, "v-before", T0 + MIN)])
    feed.send([identify(w, "v-after", T0, "u-gone"), ev(w, "v-after", T0 + MIN)])
    feed.send([identify(w, "v-kept", T0, "u-kept"), ev(w, "v-kept", T0 + MIN)])
    # 1 + start, then 1, then 2 + start, then 2 + start
    out = [(e["visitor_id"], e["event_type"], e["customer_id"]) for e in enriched(settings, 2 + 1 + 3 + 3)]
    kept = customer_id_for(w.tenant_id, "u-kept")
    assert ("v-before", "pageview", None) in out  # the link it held is forgotten
    assert [c for v, _, c in out if v == "v-after"] == [None, None, None]  # its identify names nobody
    assert [c for v, _, c in out if v == "v-kept"] == [kept] * 3
    links = read_topic(settings, topics.identity_links, 3, timeout=5)
    assert sorted(m.key() or b"" for m in links) == sorted(
        [event_key(str(w.id), "v-before"), event_key(str(w.id), "v-kept")]
    )


# --- robustness ---------------------------------------------------------------------------------------


def visitor_stream(w: widgets.Widget, visitors: int, per_visitor: int, start: datetime) -> list[list[dict[str, Any]]]:
    """Per visitor, events one minute apart (one session each), cut into requests of 5, requests interleaved."""
    requests = []
    for v in range(visitors):
        events = [ev(w, f"r{v}", start + i * MIN) for i in range(per_visitor)]
        requests += [events[i : i + 5] for i in range(0, per_visitor, 5)]
    random.Random(7).shuffle(requests)
    # keep each visitor's requests in time order after the shuffle
    order: dict[str, list[list[dict[str, Any]]]] = {}
    for b in requests:
        order.setdefault(b[0]["visitor_id"], []).append(b)
    for bs in order.values():
        bs.sort(key=lambda b: b[0]["occurred_at"])
    cursors = {v: iter(bs) for v, bs in order.items()}
    return [next(cursors[b[0]["visitor_id"]]) for b in requests]


def test_events_before_the_login_in_one_request_carry_the_contact(
    settings: Settings, pipeline: Any, feed: RawFeed, make_widget: Callable[..., widgets.Widget], db: psycopg.Connection
) -> None:
    """A request with page views and then the identify: the processors stamp all of them with the contact, so
    the sink inserts them linked (no retro-link update needed)."""
    w = make_widget()
    feed.send_request([ev(w, "v-login", T0), ev(w, "v-login", T0 + MIN), identify(w, "v-login", T0 + 2 * MIN, "u-l")])
    contact = customer_id_for(w.tenant_id, "u-l")
    records = enriched(settings, 4)  # the session_start, two page views, the identify
    assert [r["event_type"] for r in records] == ["session_start", "pageview", "pageview", "identify"]
    assert {r["customer_id"] for r in records} == {contact}
    got = rows(db, w, 4)
    assert {r[4] for r in got} == {contact}


def test_restart_recovery_sigterm_and_sigkill(
    settings: Settings,
    start_service: Callable[..., Any],
    feed: RawFeed,
    make_widget: Callable[..., widgets.Widget],
    db: psycopg.Connection,
) -> None:
    # Default producer batching: the table changelog is recovered exactly after a SIGKILL (real Kafka).
    s = settings
    w = make_widget()
    visitors = 30
    sink = start_service("sink")
    proc = start_service("processors", settings_override=s)
    with logs_on_failure(proc, sink):
        _restart_scenario(s, proc, feed, w, db, visitors)


def _restart_scenario(
    s: Settings, proc: Any, feed: RawFeed, w: widgets.Widget, db: psycopg.Connection, visitors: int
) -> None:

    part1 = visitor_stream(w, visitors, 10, T0)  # minutes 0..9
    for b in part1:
        feed.send(b)
    rows(db, w, visitors * 11)

    proc.stop()  # SIGTERM: clean shutdown
    assert proc.proc.returncode == 0, proc.log_tail()
    # 5 minutes after each visitor's last event: must continue the session across the restart
    feed.send([ev(w, f"r{v}", T0 + 14 * MIN) for v in range(visitors)])
    proc.start()  # waits for /healthz
    rows(db, w, visitors * 12)

    # SIGKILL mid-stream: events keep coming while the worker dies and comes back.
    part2 = visitor_stream(w, visitors, 20, T0 + 15 * MIN)

    def send_part2() -> None:
        for b in part2:
            feed.send(b)
            time.sleep(0.01)

    sender = threading.Thread(target=send_part2)
    sender.start()
    wait_for_rows(
        db, "SELECT 1 FROM visitor_events WHERE widget_id = %s AND occurred_at >= %s", (w.id, T0 + 15 * MIN), 50
    )
    proc.kill()  # SIGKILL
    sender.join()
    proc.start()  # waits for /healthz

    total = visitors * (11 + 1 + 20)
    got = rows(db, w, total, timeout=60)
    assert len(got) == total
    starts = [r for r in got if r[0] == "session_start"]
    assert sorted((r[1], r[2]) for r in starts) == sorted((f"r{v}", T0) for v in range(visitors))
    assert {r[3] for r in got} == {sid(w, f"r{v}", T0) for v in range(visitors)}


class GaveUp(Exception):
    pass


@dataclass
class RepairRig:
    """A processors app (not started) whose repair handler records what it processes, and the raw-topic
    partition holding one visitor's messages, with the consumer state the repair works on."""

    app: transport.App
    consumer: transport.Consumer
    tp: TP
    partition: int
    processed: list[tuple[int, int]]


def repair_rig(settings: Settings, feed: RawFeed, w: widgets.Widget, visitor: str, messages: int) -> RepairRig:
    """Sends `messages` one-event messages of `visitor` (one key: one partition, offsets 0..messages-1)."""
    topics = Topics.from_settings(settings)
    for i in range(messages):
        feed.send([ev(w, visitor, T0 + i * MIN)])
    app = create_app(settings)
    processed: list[tuple[int, int]] = []
    app.skipped_offsets_handler = SkippedReader(
        settings, {topics.raw_events: lambda msgs: processed.extend((m.partition, m.offset) for m in msgs)}, 20.0
    )
    partition = partition_of(settings, topics.raw_events, event_key(str(w.id), visitor))
    tp = TP(topics.raw_events, partition)
    return RepairRig(app, cast(transport.Consumer, app.consumer), tp, partition, processed)


def test_offsets_faust_skipped_are_processed_before_the_commit(
    settings: Settings, feed: RawFeed, make_widget: Callable[..., widgets.Widget]
) -> None:
    """faust would commit past messages that never reached the agent: one at the committed offset (its
    off-by-one check of the first acked offset), and ones it recorded as "gaps" (offsets its fetch loop did
    not see delivered, which include messages faust itself dropped around a rebalance: the loss of issue 8,
    case 16). The transport reads every unacked offset below the highest acked one from Kafka and processes
    the messages before the commit; if it cannot, it gives up without committing."""
    w = make_widget()
    topics = Topics.from_settings(settings)
    rig = repair_rig(settings, feed, w, "v-skip", 12)  # offsets 0..11
    app, consumer, tp, partition, processed = rig.app, rig.consumer, rig.tp, rig.partition, rig.processed
    consumer._committed_offset[tp] = 2  # committed: next to read is 2
    consumer._acked[tp].extend([4, 5])  # 2 and 3 never reached the agent
    assert consumer._new_offset(tp) == 6  # commit after 5, now that 2 and 3 are processed too
    assert processed == [(partition, 2), (partition, 3)]

    # A message faust dropped after the first acked one is recorded as a gap (one offset missing between two
    # delivered ones): faust's own computation fills it in and commits past it, unprocessed.
    consumer._committed_offset[tp], processed[:] = 6, []
    consumer._acked[tp].extend([6, 8, 9])
    consumer._gap[tp].addi(7, 8)
    assert consumer._new_offset(tp) == 10
    assert processed == [(partition, 7)]

    consumer._committed_offset[tp], processed[:] = 10, []
    consumer._acked[tp].extend([10, 11])  # nothing skipped: faust's own computation, no reads
    assert consumer._new_offset(tp) == 12 and processed == []

    # Offsets that cannot be read (here: past the end of the log) within the time limit: no commit past them.
    def give_up() -> None:
        raise GaveUp

    app.skipped_offsets_handler = SkippedReader(
        settings,
        {topics.raw_events: lambda msgs: processed.extend((m.partition, m.offset) for m in msgs)},
        1.0,
        on_give_up=give_up,
    )
    consumer._committed_offset[tp] = 12
    consumer._acked[tp].extend([20])  # 12..19 are not in the log: the read never reaches offset 19
    with pytest.raises(GaveUp):
        consumer._new_offset(tp)
    assert processed == [] and consumer._acked[tp] == [20]


def test_messages_dropped_after_delivery_are_processed_before_the_commit(
    settings: Settings, feed: RawFeed, make_widget: Callable[..., widgets.Widget]
) -> None:
    """faust may drop messages its fetch loop already delivered to the agent's queue: its table recovery resumes
    flow control after the fetch loop is running again, and resuming empties every agent queue (the stall after a
    SIGKILL restart: a partition's messages delivered and dropped, the consumer's position at the end of the log).
    At the tail of a partition no later ack reveals the hole, so faust never commits past it and the worker sits
    on it until its next restart. Before every commit the transport processes each delivered offset that is
    neither acked nor still queued or in progress."""
    w = make_widget()
    topics = Topics.from_settings(settings)
    rig = repair_rig(settings, feed, w, "v-tail", 6)  # offsets 0..5
    app, consumer, tp, partition, processed = rig.app, rig.consumer, rig.tp, rig.partition, rig.processed
    consumer._committed_offset[tp] = 1
    consumer._delivered[tp] = 5  # 1..5 delivered, only 2 acked: 1, 3, 4 and 5 were dropped
    consumer._acked[tp].append(2)
    consumer._acked_index[tp].add(2)

    # Still in the agent's queue (one queue for all its partitions), or taken by the agent and not acked yet:
    # in progress, not lost. Another partition's message in the queue does not hold this one back.
    def queued_event(tp: TP, offset: int) -> SimpleNamespace:
        return SimpleNamespace(
            message=FaustMessage(tp.topic, tp.partition, offset, 0.0, 0, None, b"k", b"v", None, tp=tp)
        )

    other = TP(topics.raw_events, (partition + 1) % settings.topic_partitions)
    queued = app.channel()
    app.topics._tp_index[tp].add(queued)  # type: ignore[attr-defined]
    app.topics._tp_index[other].add(queued)  # type: ignore[attr-defined]
    queued.queue.put_nowait(queued_event(tp, 5))
    queued.queue.put_nowait(queued_event(other, 9))
    consumer.process_lost()
    assert processed == []
    app.flow_control.resume()  # what faust's recovery does: the queue is emptied, its messages lost
    assert queued.queue.empty()
    in_progress = FaustMessage(tp.topic, tp.partition, 4, 0.0, 0, None, b"k", b"v", None, tp=tp)
    consumer._unacked_messages.add(in_progress)
    consumer.process_lost()
    assert processed == []
    in_progress.acked = True  # acked (faust may keep an acked copy in the set): no longer in progress
    queued.queue.put_nowait(queued_event(other, 10))
    consumer.process_lost()
    assert processed == [(partition, 1), (partition, 3), (partition, 4), (partition, 5)]
    assert consumer._new_offset(tp) == 6  # the commit moves past all of them
    consumer._committed_offset[tp] = 6  # what faust records once that commit succeeded
    processed.clear()
    consumer.process_lost()  # nothing left
    assert processed == []

    # A partition the group never committed (faust's committed offset is None, as for a committed 0): checked from
    # where its messages start, not skipped (faust would otherwise commit past a lost head once later ones are acked).
    consumer._committed_offset[tp] = None
    consumer._acked[tp][:] = [3]
    consumer._acked_index[tp].clear()
    consumer._acked_index[tp].add(3)
    consumer._delivered[tp] = 4
    consumer._floor[tp] = 0
    queued.queue.get_nowait()
    consumer.process_lost()
    assert processed == [(partition, 0), (partition, 1), (partition, 2), (partition, 4)]
    assert consumer._new_offset(tp) == 5


def test_a_skipped_erasure_marker_is_applied_before_the_commit(
    settings: Settings, make_widget: Callable[..., widgets.Widget]
) -> None:
    """faust's off-by-one may commit past a marker on the erasures topic too; the repair applies it the way the
    erasures agent does (tombstone state), so the erased visitor is not tracked again."""
    w = make_widget()
    topics = Topics.from_settings(settings)
    key = event_key(str(w.id), "v-erased")
    notify = erasure.kafka_notifier(settings)
    notify([key])
    notify([key])  # offsets 0 and 1 of the key's partition
    app = create_app(settings)
    partition = partition_of(settings, topics.erasures, key)
    tp = TP(topics.erasures, partition)
    consumer = cast(transport.Consumer, app.consumer)
    consumer._committed_offset[tp] = 0
    consumer._acked[tp].extend([1])  # offset 0 never reached the agent
    assert consumer._new_offset(tp) == 2
    assert is_erased(app.state_store.get(key, partition))


def partition_of(settings: Settings, topic: str, key: bytes) -> int:
    [msg] = [m for m in read_topic(settings, topic, 1) if m.key() == key]
    return position(msg)[1]


def test_undecodable_and_invalid_messages_go_to_dead_letter(
    settings: Settings, pipeline: Any, feed: RawFeed, make_widget: Callable[..., widgets.Widget], db: psycopg.Connection
) -> None:
    w = make_widget()
    feed.send_bytes(event_key(str(w.id), "v-x"), b"not avro at all")
    feed.send([ev(w, "v-x", T0, "session_start")])  # clients cannot send derived events
    feed.send([ev(w, "v-x", T0 + MIN)])  # and the stream goes on
    # one bad event inside a VisitorEventBatch message is dead-lettered alone; its siblings go on
    bad = ev(w, "v-x", T0 + 3 * MIN, "identify")  # an identify without user_id
    feed.send_request([ev(w, "v-x", T0 + 2 * MIN), bad, ev(w, "v-x", T0 + 4 * MIN)])

    raw = Topics.from_settings(settings).raw_events
    dead = read_topic(settings, Topics.from_settings(settings).dead_letter, 3)
    assert len(dead) == 3
    headers = [headers_of(m) for m in dead]
    assert headers[0]["x-reason"].startswith("undecodable: ") and "session_start" in headers[1]["x-reason"]
    assert headers[1]["x-reason"].startswith("invalid_event: ")
    assert headers[2]["x-reason"] == "invalid_event: identify event without user_id"
    assert dead[0].value() == b"not avro at all"
    assert CODEC.decode(dead[2].value()) == bad  # the bad event alone, as a single-event message
    assert [h["x-source-offset"] for h in headers] == ["0", "1", "3"]  # all keyed alike: one partition
    for h, m in zip(headers, dead, strict=True):
        assert (h["x-stage"], h["x-source-topic"], m.key()) == ("processors", raw, event_key(str(w.id), "v-x"))
        assert h["x-source-partition"] == headers[0]["x-source-partition"]
    assert [r[0] for r in rows(db, w, 4)] == ["session_start", "pageview", "pageview", "pageview"]

    metrics = httpx.get(f"http://127.0.0.1:{settings.processors_web_port}/metrics").text
    assert 'site_activity_processors_dead_letters_total{reason="undecodable"} 1.0' in metrics
    assert 'site_activity_processors_dead_letters_total{reason="invalid_event"} 2.0' in metrics
    assert "site_activity_processors_session_starts_total 1.0" in metrics
    assert "site_activity_processors_messages_in_total 4.0" in metrics
    assert "site_activity_processors_events_in_total 3.0" in metrics  # the valid ones


def headers_of(msg: Message) -> dict[str, str]:
    """A consumed message's headers (confluent-kafka types them loosely: a consumed message has a list or none)."""
    return {k: v.decode() for k, v in cast(list[tuple[str, bytes]], msg.headers() or [])}


def test_a_stream_gone_bad_stops_the_processors_without_committing_it(
    settings: Settings,
    start_service: Callable[..., Any],
    feed: RawFeed,
    tmp_path: Path,
    make_widget: Callable[..., widgets.Widget],
) -> None:
    """A producer deployed with a broken encoder: every raw message is undecodable. Past the dead-letter limit
    the processors stop (exit 65) instead of moving the stream to the dead-letter topic, and commit none of the
    batch that crossed it, so a restart reads those messages again; with the limit off they are dead-lettered
    and the worker runs on."""
    limited = settings.model_copy(update={"dead_letter_max_consecutive": 5})
    topics = Topics.from_settings(settings)
    proc = start_service("processors", settings_override=limited)
    key = event_key(str(uuid.uuid4()), "v-bad")  # one partition: the messages arrive in order
    garbage = [b"\x00\x01 not avro %d" % i for i in range(12)]
    for value in garbage:
        feed.producer.produce(topics.raw_events, value, key)
    assert feed.producer.flush(15) == 0
    wait_until(lambda: not proc.alive(), 60, "the processors to stop at the dead-letter limit")
    assert proc.proc is not None and proc.proc.returncode == 65, proc.log_tail()
    assert "dead-letter limit reached" in proc.log_tail()
    assert committed_total(limited, limited.processors_app_id, topics.raw_events) < len(garbage)
    assert len(read_topic(limited, topics.dead_letter, len(garbage), timeout=3)) < len(garbage)

    # Same input, same limit: the restarted worker stops again (not through start_service: it may stop before
    # its health page is ever asked).
    again = StageProcess("processors", limited, tmp_path / "again.log").start()
    try:
        wait_until(lambda: not again.alive(), 60, "the restarted processors to stop again")
        assert again.proc is not None and again.proc.returncode == 65
    finally:
        again.stop()

    unlimited = limited.model_copy(update={"dead_letter_max_consecutive": 0})
    with logs_on_failure(start_service("processors", settings_override=unlimited)):
        wait_until(
            lambda: committed_total(unlimited, unlimited.processors_app_id, topics.raw_events) >= len(garbage),
            60,
            "offsets committed",
        )
        distinct: set[bytes | None] = set()  # a dead letter of an uncommitted batch may be written twice

        def new_value(m: Message) -> int:
            fresh = m.value() not in distinct
            distinct.add(m.value())
            return int(fresh)

        letters = read_topic(unlimited, topics.dead_letter, len(garbage), weight=new_value)
        assert {m.value() for m in letters} == set(garbage)
        assert all(headers_of(m)["x-reason"].startswith("undecodable: ") for m in letters)
        w = make_widget()  # and the worker runs on
        feed.send([ev(w, "v-1", T0)])
        assert [r["event_type"] for r in enriched(unlimited, 2)] == ["session_start", "pageview"]


# --- reference check ----------------------------------------------------------------------------------

GAPS = [29 * MIN + 59 * SEC, 30 * MIN, 30 * MIN + SEC, 10 * SEC, 2 * 60 * MIN, 3 * MIN, 31 * MIN, 29 * MIN]


def reference_workload(w: widgets.Widget, visitors: int, rng: random.Random) -> list[list[dict[str, Any]]]:
    """Per visitor a timeline with gaps clustered around the 30-minute edge, cut into time-ordered requests of
    1..25 events (as the widget flushes them), requests of all visitors interleaved."""
    per_visitor: dict[str, list[list[dict[str, Any]]]] = {}
    for v in range(visitors):
        t = T0 + rng.randrange(0, 3600) * SEC + timedelta(microseconds=rng.randrange(1_000_000))
        events = []
        for _ in range(rng.randint(14, 26)):
            events.append(ev(w, f"ref{v}", t, rng.choice(["pageview", "pageview", "custom"])))
            t += rng.choice(GAPS)
        i, requests = 0, []
        while i < len(events):
            n = rng.randint(1, 25)
            requests.append(events[i : i + n])
            i += n
        per_visitor[f"ref{v}"] = requests
    order = [v for v, bs in per_visitor.items() for _ in bs]
    rng.shuffle(order)
    cursors = {v: iter(bs) for v, bs in per_visitor.items()}
    return [next(cursors[v]) for v in order]


REFERENCE_SQL = """
SELECT visitor_id, occurred_at FROM (
    SELECT visitor_id, occurred_at,
           lag(occurred_at) OVER (PARTITION BY widget_id, visitor_id ORDER BY occurred_at) AS prev
    FROM visitor_events WHERE widget_id = %s AND event_type <> 'session_start') e
WHERE prev IS NULL OR occurred_at - prev > interval '30 minutes'
"""


def test_reference_check_session_starts_equal_offline_computation(
    settings: Settings, pipeline: Any, feed: RawFeed, make_widget: Callable[..., widgets.Widget], db: psycopg.Connection
) -> None:
    w = make_widget()
    requests = reference_workload(w, 520, random.Random(2026))
    n_events = sum(len(b) for b in requests)
    assert n_events >= 10_000
    for b in requests:  # one message per request, as the API writes them
        feed.producer.produce(feed.topic, EVENTS.encode_events(b), event_key(str(w.id), b[0]["visitor_id"]))
        feed.producer.poll(0)
    assert feed.producer.flush(30) == 0

    wait_for_rows(
        db,
        "SELECT 1 FROM visitor_events WHERE widget_id = %s AND event_type <> 'session_start'",
        (w.id,),
        n_events,
        timeout=90,
    )
    expected = {(v, t) for v, t in db.execute(REFERENCE_SQL, (w.id,)).fetchall()}
    got = wait_for_rows(
        db,
        "SELECT visitor_id, occurred_at FROM visitor_events WHERE widget_id = %s AND event_type = 'session_start'",
        (w.id,),
        len(expected),
        timeout=30,
    )
    assert {(v, t) for v, t in got} == expected
    assert len(got) == len(expected)
    # and every event carries the id of the session its start defines
    assert db.execute(
        """
        SELECT count(*) FROM visitor_events e WHERE widget_id = %s AND session_id IS DISTINCT FROM (
            SELECT s.session_id FROM visitor_events s WHERE s.widget_id = e.widget_id
              AND s.visitor_id = e.visitor_id AND s.event_type = 'session_start' AND s.occurred_at <= e.occurred_at
            ORDER BY s.occurred_at DESC LIMIT 1)""",
        (w.id,),
    ).fetchone() == (0,)


# --- issue 8: duplicates, late links, oversized output, bind address ----------------------------------------


def test_resent_event_with_another_corrected_time_opens_no_session(
    settings: Settings, pipeline: Any, feed: RawFeed, make_widget: Callable[..., widgets.Widget], db: psycopg.Connection
) -> None:
    """Issue 8, case 6: E, then a copy of E (same event_id) whose clock-corrected time is 45 min earlier (the
    device clock changed), then F 5 min after E. The kind: a copy of an event changes no state and derives
    nothing — one session_start, no session without events, the copy of an identify links nothing."""
    w = make_widget()
    e = ev(w, "v-copy", T0)
    f = ev(w, "v-copy", T0 + 5 * MIN)
    feed.send([e])
    feed.send([{**e, "occurred_at": T0 - 45 * MIN, "received_at": T0 - 45 * MIN + SEC}])
    feed.send([f])
    # The same for an identify: its copy 45 min earlier must not link the events before it to the contact.
    anon = ev(w, "v-copy-id", T0 - 60 * MIN)
    ident = identify(w, "v-copy-id", T0, "u-copy")
    feed.send([anon])
    feed.send([ident])
    feed.send([{**ident, "occurred_at": T0 - 45 * MIN}])
    feed.send([ev(w, "v-copy", T0 + 6 * MIN)])  # the end marker

    got = rows(db, w, 4 + 4)
    mine = [r for r in got if r[1] == "v-copy"]
    assert [(r[0], r[2]) for r in mine] == [
        ("session_start", T0),
        ("pageview", T0),
        ("pageview", T0 + 5 * MIN),
        ("pageview", T0 + 6 * MIN),
    ]
    assert {r[3] for r in mine} == {sid(w, "v-copy", T0)}
    # no session without events, for any visitor
    assert db.execute(
        """SELECT count(*) FROM visitor_events s WHERE s.widget_id = %s AND s.event_type = 'session_start'
                         AND NOT EXISTS (SELECT 1 FROM visitor_events e WHERE e.widget_id = s.widget_id
                                         AND e.session_id = s.session_id AND e.event_type <> 'session_start')""",
        (w.id,),
    ).fetchone() == (0,)
    contact_id = customer_id_for(w.tenant_id, "u-copy")
    assert [(r[0], r[2], r[4]) for r in got if r[1] == "v-copy-id"] == [
        ("session_start", T0 - 60 * MIN, contact_id),
        ("pageview", T0 - 60 * MIN, contact_id),
        ("session_start", T0, contact_id),
        ("identify", T0, contact_id),
    ]
    links = read_topic(settings, Topics.from_settings(settings).identity_links, 2, timeout=5)
    assert len(links) == 1  # the copy published no second link


def test_identify_arriving_after_later_events_links_them(
    settings: Settings, pipeline: Any, feed: RawFeed, make_widget: Callable[..., widgets.Widget], db: psycopg.Connection
) -> None:
    """Issue 8, case 5, both orders: a page view at T0+100 s, and an identify at T0-100 s that arrives after
    the page view's row was written (or before it). The rule: an event carries the contact of the link in
    force at its time (the first link's before any), so a newly learned link claims the events from its time
    up to the visitor's next link — rows already written are re-linked by the sink."""
    w = make_widget()
    x = customer_id_for(w.tenant_id, "u-x")
    # identify after the page view
    feed.send([ev(w, "v-after", T0 + 100 * SEC)])
    wait_for_rows(db, "SELECT 1 FROM visitor_events WHERE widget_id = %s AND visitor_id = 'v-after'", (w.id,), 2)
    feed.send([identify(w, "v-after", T0 - 100 * SEC, "u-x")])
    # identify before the page view
    feed.send([identify(w, "v-before", T0 - 100 * SEC, "u-x")])
    feed.send([ev(w, "v-before", T0 + 100 * SEC)])
    # a link learned late between two links: claims the rows up to the next link, not after it
    a, b = customer_id_for(w.tenant_id, "u-a"), customer_id_for(w.tenant_id, "u-b")
    c = customer_id_for(w.tenant_id, "u-c")
    feed.send(
        [
            identify(w, "v-mid", T0, "u-a"),
            ev(w, "v-mid", T0 + 5 * MIN),
            ev(w, "v-mid", T0 + 15 * MIN),
            identify(w, "v-mid", T0 + 20 * MIN, "u-c"),
            ev(w, "v-mid", T0 + 25 * MIN),
        ]
    )
    wait_for_rows(db, "SELECT 1 FROM visitor_events WHERE widget_id = %s AND visitor_id = 'v-mid'", (w.id,), 6)
    feed.send([identify(w, "v-mid", T0 + 10 * MIN, "u-b")])
    feed.send([ev(w, "v-mid", T0 + 12 * MIN)])  # arrives after: the processors apply the same rule

    wait_for_rows(
        db,
        "SELECT 1 FROM visitor_events WHERE widget_id = %s AND visitor_id = 'v-after' AND customer_id = %s",
        (w.id, x),
        3,
        timeout=30,
    )
    for visitor in ("v-after", "v-before"):
        assert sorted((t, c_) for t, _, c_ in customers_of(db, w, visitor)) == [
            ("identify", x),
            ("pageview", x),
            ("session_start", x),
        ], visitor
    wait_for_rows(
        db,
        "SELECT 1 FROM visitor_events WHERE widget_id = %s AND visitor_id = 'v-mid' AND customer_id = %s",
        (w.id, b),
        3,
        timeout=30,
    )
    assert [(t, at - T0, c_) for t, at, c_ in customers_of(db, w, "v-mid")] == [
        ("session_start", 0 * MIN, a),
        ("identify", 0 * MIN, a),
        ("pageview", 5 * MIN, a),
        ("identify", 10 * MIN, b),
        ("pageview", 12 * MIN, b),
        ("pageview", 15 * MIN, b),
        ("identify", 20 * MIN, c),
        ("pageview", 25 * MIN, c),
    ]


KAFKA_MESSAGE_LIMIT = 1_000_000  # Kafka's default max.message.bytes, and the producers' message.max.bytes


def oversized_visitor(w: widgets.Widget) -> list[dict[str, Any]]:
    """Issue 8, case 3: a visitor id of 128 emoji, 62 page views 31 min apart (each opens a session, whose
    session_start repeats the url and referrer), each with a 2048-character non-ASCII url and referrer."""
    visitor = "😀" * 128
    return [
        ev(
            w,
            visitor,
            T0 + i * 31 * MIN,
            url="https://shop.example/" + "✓" * 2027,
            referrer="https://ref.example/" + "é" * 2028,
        )
        for i in range(62)
    ]


def test_oversized_enriched_output_is_split_and_everything_lands(
    settings: Settings, pipeline: Any, feed: RawFeed, make_widget: Callable[..., widgets.Widget], db: psycopg.Connection
) -> None:
    """The enriched output of one request can be about twice the request: it is split into several messages
    (same key, in order) within the message size limit; nothing stalls and every event lands."""
    w = make_widget()
    big = oversized_visitor(w)
    assert len(big[0]["url"]) == 2048 and len(big[0]["referrer"]) == 2048
    raw = EVENTS.encode_events(big)
    assert 600_000 < len(raw) < KAFKA_MESSAGE_LIMIT  # a request the API could have put on the raw topic
    feed.send_bytes(event_key(str(w.id), big[0]["visitor_id"]), raw)
    for v in range(5):  # other visitors right behind it
        feed.send([ev(w, f"small-{v}", T0), ev(w, f"small-{v}", T0 + MIN)])

    got = rows(db, w, 62 * 2 + 5 * 3, timeout=60)
    assert len(got) == 62 * 2 + 5 * 3
    assert sum(1 for r in got if r[0] == "session_start" and r[1] == big[0]["visitor_id"]) == 62
    msgs = [
        m
        for m in read_topic(settings, Topics.from_settings(settings).enriched_events, 7, timeout=10)
        if m.key() == event_key(str(w.id), big[0]["visitor_id"])
    ]
    assert len(msgs) >= 2 and all(
        len(cast(bytes, m.value())) + len(cast(bytes, m.key())) <= KAFKA_MESSAGE_LIMIT for m in msgs
    )
    records = [r for m in msgs for r in EVENTS.decode_events(m.value())]
    assert [r["event_type"] for r in records] == ["session_start", "pageview"] * 62  # in order across messages
    assert read_topic(settings, Topics.from_settings(settings).dead_letter, 1, timeout=2) == []


def test_output_that_can_never_be_written_is_dead_lettered_and_the_rest_flows(
    settings: Settings,
    start_service: Callable[..., Any],
    feed: RawFeed,
    make_widget: Callable[..., widgets.Widget],
    db: psycopg.Connection,
) -> None:
    """A record over the message size limit on its own (here the limit is lowered to 200 KB and one event
    carries a 300 KB url) cannot be split: it goes to the dead-letter topic with its reason, and neither the
    processors nor anyone behind them stall."""
    small = settings.model_copy(update={"kafka_max_message_bytes": 200_000})
    start_service("sink")
    proc = start_service("processors", settings_override=small)
    w = make_widget()
    huge = ev(w, "v-huge", T0, url="https://shop.example/" + "x" * 300_000)
    feed.send([huge, ev(w, "v-huge", T0 + MIN)])
    for v in range(3):
        feed.send([ev(w, f"after-{v}", T0)])

    with logs_on_failure(proc):
        got = rows(db, w, 1 + 3 * 2, timeout=60)
        assert sorted((r[0], r[1]) for r in got) == sorted(
            [("pageview", "v-huge")] + [(t, f"after-{v}") for v in range(3) for t in ("session_start", "pageview")]
        )
        dead = read_topic(settings, Topics.from_settings(settings).dead_letter, 2, timeout=20)
        assert len(dead) == 2  # the session_start it opened (it repeats the url) and the event
        for m in dead:
            h = headers_of(m)
            assert "MSG_SIZE_TOO_LARGE" in h["x-reason"] and h["x-stage"] == "processors"
            assert h["x-reason"].startswith(f"unwritable_output: {Topics.from_settings(settings).enriched_events}: ")
            assert h["x-source-topic"] == Topics.from_settings(settings).raw_events and h["x-source-offset"] == "0"
            assert int(h["x-dropped-bytes"]) > 300_000 and m.value() in (b"", None)  # too big to keep
        assert proc.alive()


@pytest.mark.parametrize("stage", ["processors", "sink"])
def test_health_and_metrics_bind_to_the_configured_host(
    stage: str, settings: Settings, start_service: Callable[..., Any]
) -> None:
    """Issue 8, case 13: Kubernetes probes reach the pod's address, so each stage serves /healthz and
    /metrics on `http_host` (0.0.0.0 in the image), not on 127.0.0.1 only."""
    import psutil

    s = settings.model_copy(update={"http_host": "0.0.0.0"})
    svc = start_service(stage, settings_override=s)
    port = s.processors_web_port if stage == "processors" else s.sink_http_port
    listening = {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(svc.pid).net_connections("inet")
        if c.status == psutil.CONN_LISTEN
    }
    assert ("0.0.0.0", port) in listening, listening
