"""Erasing a person: their events (and contact) are deleted, and nothing of theirs is stored afterwards, even
events already in flight through the processors and sink when the erase ran."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import psycopg
import pytest

from dev_stack.embedded import EmbeddedPostgres, free_port, wait_until
from site_activity import erasure
from site_activity.settings import Settings
from site_activity.topics import Topics, event_key
from tests.conftest import Service, http_ok, iso, read_topic, wait_for_rows
from tests.console_helpers import Tenant, cli, make_tenant


def stack_with_console(settings: Settings, start_service: Callable[..., Service]) -> tuple[Settings, httpx.Client]:
    """Sink, processors, API and a console on one topic prefix (the console tells the processors through it)."""
    s = settings.model_copy(update={"console_port": free_port()})
    for stage in ("sink", "processors", "api"):
        start_service(stage, settings_override=s)
    start_service("console", settings_override=s)
    wait_until(http_ok(s.health_url("console")), 30, "console", interval=0.2)
    return s, httpx.Client(base_url=f"http://127.0.0.1:{s.console_port}", timeout=30)


def seed(
    conn: psycopg.Connection,
    t: Tenant,
    visitor: str,
    n: int,
    *,
    widget_id: uuid.UUID | None = None,
    customer_id: uuid.UUID | None = None,
    user_id: str | None = None,
) -> None:
    now = datetime.now(UTC)
    for i in range(n):
        conn.execute(
            "INSERT INTO visitor_events (widget_id, event_id, tenant_id, visitor_id, event_type, user_id, customer_id,"
            " occurred_at, received_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                widget_id or t.widget.id,
                uuid.uuid4(),
                t.id,
                visitor,
                "identify" if user_id and i == 0 else "pageview",
                user_id if i == 0 else None,
                customer_id,
                now,
                now,
            ),
        )


def without_activity_time(state: dict[str, object]) -> dict[str, object]:
    """A changelog state without "a", the wall time of the visitor's last processed event (idle-visitor expiry
    reads it; it is not part of what the state says)."""
    return {k: v for k, v in state.items() if k != "a"}


def count(conn: psycopg.Connection, sql: str, *params: object) -> int:
    return int(conn.execute(sql, params).fetchone()[0])


def test_erase_visitor_deletes_only_that_visitor_and_audits_a_hash(
    console: httpx.Client, db: psycopg.Connection, postgres: EmbeddedPostgres
) -> None:
    t = make_tenant(postgres.dsn, "Erase")
    seed(db, t, "alice-browser", 5)
    seed(db, t, "bob-browser", 3)
    resp = console.delete(
        "/api/v1/visitors/alice-browser", params={"widget_id": str(t.widget.id)}, headers=t.auth("admin")
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["events_deleted"] == 5
    subject_hash = resp.json()["subject_hash"]
    assert (
        count(db, "SELECT count(*) FROM visitor_events WHERE tenant_id = %s AND visitor_id = 'alice-browser'", t.id)
        == 0
    )
    assert (
        count(db, "SELECT count(*) FROM visitor_events WHERE tenant_id = %s AND visitor_id = 'bob-browser'", t.id) == 3
    )
    audit = db.execute(
        "SELECT actor, action, entity_id, new_value::text FROM audit_log WHERE tenant_id = %s"
        " AND action LIKE 'erase.%%'",
        (t.id,),
    ).fetchall()
    assert audit == [(t.emails["admin"], "erase.visitor", subject_hash, '{"events_deleted": 5}')]
    everything = " ".join(str(r) for r in db.execute("SELECT * FROM audit_log WHERE tenant_id = %s", (t.id,)))
    everything += " ".join(str(r) for r in db.execute("SELECT * FROM erased_subjects WHERE tenant_id = %s", (t.id,)))
    assert "alice-browser" not in everything
    # Members may not erase; a missing widget_id is a 400 with a reason.
    assert (
        console.delete(
            "/api/v1/visitors/bob-browser", params={"widget_id": str(t.widget.id)}, headers=t.auth("member")
        ).status_code
        == 403
    )
    missing = console.delete("/api/v1/visitors/bob-browser", headers=t.auth("admin"))
    assert missing.status_code == 400 and "widget_id" in missing.json()["reason"]


def test_erase_visitor_ids_with_slashes_up_to_the_ingest_limit(
    console: httpx.Client, db: psycopg.Connection, postgres: EmbeddedPostgres
) -> None:
    """Any id the ingest API stores can be erased: "/" included (literal or %2F), up to its 128 characters."""
    t = make_tenant(postgres.dsn, "Slashes")
    longest = "v/" + "x" * 126
    for visitor in ("a/b/c", "d/e", longest):
        seed(db, t, visitor, 2)
    params, auth = {"widget_id": str(t.widget.id)}, t.auth("admin")
    assert console.delete("/api/v1/visitors/a/b/c", params=params, headers=auth).json()["events_deleted"] == 2
    assert console.delete("/api/v1/visitors/d%2Fe", params=params, headers=auth).json()["events_deleted"] == 2
    assert console.delete(f"/api/v1/visitors/{longest}", params=params, headers=auth).json()["events_deleted"] == 2
    too_long = console.delete(f"/api/v1/visitors/{longest}x", params=params, headers=auth)
    assert too_long.status_code == 400 and "128" in too_long.json()["reason"]
    assert count(db, "SELECT count(*) FROM visitor_events WHERE tenant_id = %s", t.id) == 0


def test_erase_that_deadlocks_is_a_503_with_retry_after(
    console: httpx.Client, db: psycopg.Connection, postgres: EmbeddedPostgres
) -> None:
    """An erase chosen as a deadlock victim rolled back whole: the caller is told to retry (503), not 500."""
    t = make_tenant(postgres.dsn, "Deadlock")
    seed(db, t, "stuck", 2)
    with psycopg.connect(postgres.dsn) as blocker:
        blocker.execute(
            "SELECT pg_advisory_xact_lock_shared(%s, hashtext(%s::text))", (erasure.TENANT_LOCK_CLASS, t.id)
        )  # like a sink batch of this tenant
        answer: list[httpx.Response] = []
        worker = threading.Thread(
            target=lambda: answer.append(
                console.delete(
                    "/api/v1/visitors/stuck", params={"widget_id": str(t.widget.id)}, headers=t.auth("admin")
                )
            )
        )
        worker.start()
        wait_until(
            lambda: (
                count(
                    db,
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND objid = hashtext(%s::text)::oid",
                    str(t.id),
                )
                > 0
            ),
            20,
            "erase waiting",
        )
        # The erase holds widget_configs (it read the widget) and waits for us; we now wait for it: a cycle.
        blocker.execute("LOCK TABLE widget_configs IN ACCESS EXCLUSIVE MODE")
        blocker.rollback()
        worker.join(30)
    [resp] = answer
    assert resp.status_code == 503 and resp.headers["Retry-After"], resp.text
    assert "nothing was erased" in resp.json()["reason"]
    assert count(db, "SELECT count(*) FROM visitor_events WHERE tenant_id = %s AND visitor_id = 'stuck'", t.id) == 2


def test_erase_contact_deletes_every_linked_visitor_and_the_contact(
    console: httpx.Client, db: psycopg.Connection, postgres: EmbeddedPostgres, console_settings: Settings
) -> None:
    t = make_tenant(postgres.dsn, "Contact")
    contact = uuid.uuid4()
    db.execute(
        "INSERT INTO customers (id, tenant_id, external_id, email) VALUES (%s, %s, 'u_42', 'paul@arrakis.example')",
        (contact, t.id),
    )
    seed(db, t, "laptop", 4, customer_id=contact, user_id="u_42")
    seed(db, t, "phone", 2, customer_id=contact)
    seed(db, t, "phone", 3)  # the phone's anonymous events before it identified: the same person
    seed(db, t, "stranger", 2)
    done = cli(
        console_settings, "erase", "contact", "--tenant", str(t.id), "--contact", str(contact), "--actor", "dpo@hydra"
    )
    assert done.returncode == 0, done.stderr
    assert '"events_deleted": 9' in done.stdout and '"visitors": 2' in done.stdout
    assert count(db, "SELECT count(*) FROM customers WHERE id = %s", contact) == 0
    assert [
        r[0] for r in db.execute("SELECT DISTINCT visitor_id FROM visitor_events WHERE tenant_id = %s", (t.id,))
    ] == ["stranger"]
    kinds = sorted(r[0] for r in db.execute("SELECT kind FROM erased_subjects WHERE tenant_id = %s", (t.id,)))
    assert kinds == ["contact", "user", "visitor", "visitor"]
    # Another tenant's contact: not found, and nothing is erased.
    other = cli(
        console_settings,
        "erase",
        "contact",
        "--tenant",
        str(uuid.uuid4()),
        "--contact",
        str(contact),
        "--actor",
        "dpo@hydra",
    )
    assert other.returncode == 2 and "no contact" in other.stderr


def test_erase_with_events_in_flight_leaves_zero_rows(
    db: psycopg.Connection, postgres: EmbeddedPostgres, settings: Settings, start_service: Callable[..., Service]
) -> None:
    """A visitor keeps sending while being erased, with the processors and sink running: nothing of theirs is
    left or lands later; a bystander's events all land."""
    t = make_tenant(postgres.dsn, "Race")
    settings, console = stack_with_console(settings, start_service)
    api = httpx.Client(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=10)
    sent: dict[str, list[str]] = {"erased-visitor": [], "bystander": []}
    stop = threading.Event()

    def post(visitor: str, extra: list[dict[str, object]] | None = None) -> None:
        now = iso(datetime.now(UTC))
        events = [
            {"event_id": str(uuid.uuid4()), "type": "pageview", "url": "https://race.example/", "occurred_at": now}
            for _ in range(5)
        ] + (extra or [])
        resp = api.post(
            "/api/widget/track",
            json={"widget_id": str(t.widget.id), "visitor_id": visitor, "sent_at": now, "events": events},
        )
        assert resp.status_code == 204, resp.text  # the widget is told nothing: erased or not, 204
        sent[visitor] += [str(e["event_id"]) for e in events]

    def keep_sending() -> None:
        while not stop.is_set():
            post("erased-visitor")
            post("bystander")
            time.sleep(0.02)

    post(
        "erased-visitor",
        [
            {
                "event_id": str(uuid.uuid4()),
                "type": "identify",
                "user_id": "racer",
                "occurred_at": iso(datetime.now(UTC)),
                "traits": {"email": "racer@example.com"},
            }
        ],
    )
    wait_for_rows(db, "SELECT 1 FROM visitor_events WHERE tenant_id = %s AND visitor_id = 'erased-visitor'", (t.id,), 1)
    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        time.sleep(1.0)  # events of the visitor are now in the raw and enriched topics, and in Postgres
        resp = console.delete(
            "/api/v1/visitors/erased-visitor", params={"widget_id": str(t.widget.id)}, headers=t.auth("owner")
        )
        assert resp.status_code == 200, resp.text
        deleted, sent_by_then = resp.json()["events_deleted"], len(sent["erased-visitor"])
        time.sleep(1.5)  # and more are sent after the erase
    finally:
        stop.set()
        sender.join()
    # Everything the bystander sent has landed, so everything sent before it (same partition or not) went
    # through the sink too: wait for that, then look for the erased visitor.
    last = sent["bystander"][-1]
    wait_for_rows(
        db, "SELECT 1 FROM visitor_events WHERE widget_id = %s AND event_id = %s", (t.widget.id, last), 1, timeout=60
    )
    bystander = count(
        db,
        "SELECT count(*) FROM visitor_events WHERE tenant_id = %s AND visitor_id = 'bystander'"
        " AND event_type = 'pageview'",
        t.id,
    )
    assert bystander == len(sent["bystander"])
    assert len(sent["erased-visitor"]) > 20
    deadline = time.monotonic() + 5  # the erased visitor's last batch may trail the bystander's by a poll
    while time.monotonic() < deadline:
        assert (
            count(
                db, "SELECT count(*) FROM visitor_events WHERE tenant_id = %s AND visitor_id = 'erased-visitor'", t.id
            )
            == 0
        )
        time.sleep(0.5)
    metrics = httpx.get(f"http://127.0.0.1:{settings.sink_http_port}/metrics").text
    erased = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("site_activity_sink_rows_erased_total")
    )
    # (most of the visitor's later events are dropped by the processors already; both are counted below)
    # The processors' state for the visitor is a tombstone from the erase on: the last changelog record of
    # the key says erased, and no session or link was written for it afterwards.
    key = event_key(str(t.widget.id), "erased-visitor")
    changelog = f"{settings.processors_app_id}-visitor-state-changelog"
    records = [
        without_activity_time(json.loads(m.value() or b""))
        for m in read_topic(settings, changelog, 10**9, timeout=5)
        if m.key() == key
    ]
    assert records and records[-1] == {"erased": True}, records[-3:]
    first_erased = records.index({"erased": True})
    assert all(r == {"erased": True} for r in records[first_erased:])
    links = read_topic(settings, Topics.from_settings(settings).identity_links, 10**9, timeout=3)
    assert len([m for m in links if m.key() == key]) == 1  # the identify before the erase; none after
    proc_metrics = httpx.get(f"http://127.0.0.1:{settings.processors_web_port}/metrics").text
    dropped = next(
        float(line.split()[-1])
        for line in proc_metrics.splitlines()
        if line.startswith("site_activity_processors_erased_events_total")
    )
    # Every event of the visitor is accounted for exactly once: deleted by the erase (it was a row), dropped by
    # the processors, or dropped by the sink. Rows = what was sent + the one session_start the processors
    # derived (all events are seconds apart: one session).
    after = len(sent["erased-visitor"]) - sent_by_then
    assert after > 0 and dropped + erased >= after, (dropped, erased, after)
    assert deleted + dropped + erased == len(sent["erased-visitor"]) + 1, (deleted, dropped, erased)
    api.close()
    console.close()


def test_erased_contact_never_reappears(
    db: psycopg.Connection, postgres: EmbeddedPostgres, settings: Settings, start_service: Callable[..., Service]
) -> None:
    """After a contact is erased, the same user identifying from a new browser stores nothing: no contact row,
    no events linked to it, not even the new browser's anonymous events that the processors link to it."""
    t = make_tenant(postgres.dsn, "Reappear")
    settings, console = stack_with_console(settings, start_service)
    api = httpx.Client(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=10)

    def post(visitor: str, *events: dict[str, object]) -> None:
        now = iso(datetime.now(UTC))
        full = [{"event_id": str(uuid.uuid4()), "occurred_at": now, "url": "https://x.example/", **e} for e in events]
        assert (
            api.post(
                "/api/widget/track",
                json={"widget_id": str(t.widget.id), "visitor_id": visitor, "sent_at": now, "events": full},
            ).status_code
            == 204
        )

    post("first-browser", {"type": "pageview"}, {"type": "identify", "user_id": "u_gone"}, {"type": "pageview"})
    [(contact,)] = wait_for_rows(db, "SELECT id FROM customers WHERE tenant_id = %s", (t.id,), 1)
    erased = console.delete(f"/api/v1/contacts/{contact}", headers=t.auth("admin"))
    assert erased.status_code == 200, erased.text
    post("second-browser", {"type": "pageview"}, {"type": "identify", "user_id": "u_gone"}, {"type": "pageview"})
    post("second-browser", {"type": "custom", "name": "after_identify"})
    post("first-browser", {"type": "pageview"})
    post("witness", {"type": "pageview"})
    wait_for_rows(
        db,
        "SELECT 1 FROM visitor_events WHERE tenant_id = %s AND visitor_id = 'witness' AND event_type = 'pageview'",
        (t.id,),
        1,
    )
    time.sleep(1)  # a trailing batch of the same requests
    assert count(db, "SELECT count(*) FROM customers WHERE tenant_id = %s", t.id) == 0
    # The first browser is suppressed for good. The second browser was never erased: what it sends before it
    # identifies may be stored, anonymous; everything linked to the erased contact (the processors stamp the
    # identify's request with it) is not.
    rows = db.execute(
        "SELECT visitor_id, event_type, customer_id, user_id FROM visitor_events WHERE tenant_id = %s"
        " AND visitor_id <> 'witness' ORDER BY occurred_at",
        (t.id,),
    ).fetchall()
    assert all(r[0] == "second-browser" and r[2] is None and r[3] is None for r in rows), rows
    assert (
        count(
            db,
            "SELECT count(*) FROM visitor_events WHERE customer_id = %s OR (tenant_id = %s AND user_id = 'u_gone')",
            contact,
            t.id,
        )
        == 0
    )
    # The first browser's state in the processors is a tombstone: nothing new was placed or linked for it.
    key = event_key(str(t.widget.id), "first-browser")
    changelog = f"{settings.processors_app_id}-visitor-state-changelog"
    records = [
        without_activity_time(json.loads(m.value() or b""))
        for m in read_topic(settings, changelog, 10**9, timeout=5)
        if m.key() == key
    ]
    assert records[-1] == {"erased": True}, records
    api.close()
    console.close()


def test_marker_goes_out_only_after_the_erase_committed(db: psycopg.Connection, postgres: EmbeddedPostgres) -> None:
    """A marker for an erase that never committed would make the processors drop a live visitor's events
    forever; so the processors are told only once the erase is visible to everyone else."""
    t = make_tenant(postgres.dsn, "Ordered")
    seed(db, t, "gone", 3)
    seen: list[tuple[int, int]] = []

    def observe(keys: list[bytes]) -> None:  # what another session sees when the marker goes out
        seen.append(
            (
                count(db, "SELECT count(*) FROM visitor_events WHERE tenant_id = %s AND visitor_id = 'gone'", t.id),
                count(db, "SELECT count(*) FROM erased_subjects WHERE tenant_id = %s", t.id),
            )
        )

    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        erasure.erase_visitor(conn, t.id, t.widget.id, "gone", actor="tests", notify=observe)
    assert seen == [(0, 1)]


def test_erase_that_cannot_reach_kafka_is_committed_and_can_be_repeated(
    db: psycopg.Connection, postgres: EmbeddedPostgres
) -> None:
    """Kafka unreachable after the commit: the erase stands (the sink's suppression keeps the visitor out), the
    caller is told (NotifyError, 503 in the console) and repeating the erase resends the marker."""
    t = make_tenant(postgres.dsn, "NoKafka")
    seed(db, t, "gone", 3)
    sent: list[list[bytes]] = []

    def unreachable(keys: list[bytes]) -> None:
        raise erasure.NotifyError("broker down")

    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        with pytest.raises(erasure.NotifyError):
            erasure.erase_visitor(conn, t.id, t.widget.id, "gone", actor="tests", notify=unreachable)
        assert count(db, "SELECT count(*) FROM visitor_events WHERE tenant_id = %s AND visitor_id = 'gone'", t.id) == 0
        assert count(db, "SELECT count(*) FROM erased_subjects WHERE tenant_id = %s", t.id) == 1
        again = erasure.erase_visitor(conn, t.id, t.widget.id, "gone", actor="tests", notify=sent.append)
    assert again.events_deleted == 0 and sent == [[event_key(str(t.widget.id), "gone")]]
    assert count(db, "SELECT count(*) FROM audit_log WHERE tenant_id = %s AND action = 'erase.visitor'", t.id) == 2
