"""visitor_event.created webhooks: real broker, Postgres, sink, `site-activity webhooks` and console processes,
and a real HTTP receiver on 127.0.0.1. Deliveries are verified with the reference `standardwebhooks` library.

Most tests write events straight onto the sink's source topic (the enriched topic) so that they control exactly
what the topic carries (duplicates, events of deleted widgets or erased visitors); one test goes through the
whole pipeline from the ingest API."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psycopg
import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, Producer, TopicPartition
from standardwebhooks import Webhook

from dev_stack.embedded import EmbeddedBroker, EmbeddedPostgres, free_port, wait_until
from schemas.codec import EventCodec
from site_activity import erasure, widgets
from site_activity.kafka import admin, producer_config
from site_activity.settings import Settings
from site_activity.topics import Topics, event_key
from tests.conftest import Service, http_ok, iso, make_settings, wait_for_rows
from tests.console_helpers import Tenant, cli, make_tenant
from tests.webhook_helpers import Receiver, always, fail_first
from webhooks.dispatcher import parse_retry_after, retry_delay
from webhooks.urls import GuardedResolver, UrlRefused, check_url, refused_literal

CODEC = EventCodec()
TIMEOUT_S = 3.0  # the stage's attempt timeout in this module (lease = 2 x timeout + 5 s)


@dataclass
class Stack:
    settings: Settings
    console: httpx.Client
    webhooks: Service
    receiver: Receiver
    producer: Producer
    topic: str

    def produce(self, events: list[dict[str, Any]], *, single: bool = False) -> None:
        """One message per call (a VisitorEventBatch, or single-event messages), keyed like the pipeline keys them."""
        for chunk in ([e] for e in events) if single else [events]:
            value = CODEC.encode_event(chunk[0]) if single else CODEC.encode_events(chunk)
            self.producer.produce(self.topic, value, event_key(str(chunk[0]["widget_id"]), chunk[0]["visitor_id"]))
        assert self.producer.flush(15) == 0

    def endpoint(self, tenant: Tenant, path: str, **body: Any) -> tuple[str, str]:
        """Creates an endpoint for `path` of the receiver as the tenant's admin; (endpoint id, secret)."""
        resp = self.console.post(
            "/api/v1/webhook-endpoints", json={"url": self.receiver.url + path, **body}, headers=tenant.auth("admin")
        )
        assert resp.status_code == 201, resp.text
        return resp.json()["id"], resp.json()["secret"]

    def webhooks_caught_up(self) -> None:
        webhooks_caught_up(self.settings, self.topic)


def webhooks_caught_up(settings: Settings, topic: str) -> None:
    """Waits until the webhooks group has committed everything on the topic (so anything that would be
    queued is queued)."""
    from confluent_kafka import Consumer

    client = admin(settings)
    parts = list(client.list_topics(topic, timeout=10).topics[topic].partitions)

    def done() -> bool:
        c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"probe-{uuid.uuid4().hex[:6]}"})
        try:
            ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        finally:
            c.close()
        req = ConsumerGroupTopicPartitions(settings.webhooks_group, [TopicPartition(topic, p) for p in parts])
        [fut] = client.list_consumer_group_offsets([req]).values()
        got = {tp.partition: tp.offset for tp in fut.result().topic_partitions}
        return all(ends[p] == 0 or got.get(p, -1) >= ends[p] for p in parts)

    wait_until(done, 60, "webhooks group caught up", interval=0.3)


@pytest.fixture(scope="module")
def stack(
    kafka: EmbeddedBroker, postgres: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("webhooks")
    s = make_settings(
        kafka,
        postgres,
        base / "data",
        console_port=free_port(),
        webhooks_http_port=free_port(),
        webhooks_group=f"wh-{uuid.uuid4().hex[:8]}",
        webhooks_allow_private_urls=True,
        webhooks_retry_schedule_s=[0, 0.5, 0.5, 0.5, 0.5],
        webhooks_timeout_s=TIMEOUT_S,
        webhooks_poll_interval_s=0.2,
        webhooks_endpoint_concurrency=3,
    )
    yield from running_stack(s, base)


def running_stack(s: Settings, base: Path) -> Iterator[Stack]:
    """The sink, the webhooks stage and the console on `s`, a local receiver and a producer of enriched events;
    everything stopped afterwards (for module fixtures: `yield from running_stack(...)`)."""
    services = []
    for stage, port in (("sink", s.sink_http_port), ("webhooks", s.webhooks_http_port), ("console", s.console_port)):
        svc = Service(stage, s, base / "logs")
        svc.ready = http_ok(f"http://127.0.0.1:{port}/healthz")
        services.append(svc.start())
    receiver = Receiver().start()
    producer = Producer(producer_config(s))
    with httpx.Client(base_url=f"http://127.0.0.1:{s.console_port}", timeout=30) as client:
        yield Stack(s, client, services[1], receiver, producer, Topics.from_settings(s).enriched_events)
    receiver.stop()
    for svc in reversed(services):
        svc.stop()


def event(
    w: widgets.Widget, *, visitor: str = "visitor-1", kind: str = "pageview", event_id: str | None = None, **extra: Any
) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "event_type": kind,
        "tenant_id": str(w.tenant_id),
        "widget_id": str(w.id),
        "visitor_id": visitor,
        "name": "signup" if kind == "custom" else None,
        "url": "https://shop.example/pricing",
        "referrer": None,
        "properties": '{"plan": "growth", "n": 1.50}',
        "user_id": None,
        "occurred_at": now,
        "received_at": now,
        "session_id": None,
        "customer_id": None,
        **extra,
    }


def verified(secret: str, got: list[Any]) -> list[dict[str, Any]]:
    """Every request verified with the reference library; their parsed bodies."""
    return [Webhook(secret).verify(r.body, r.headers) for r in got]


def deliveries(stack: Stack, tenant: Tenant, endpoint_id: str, **params: Any) -> list[dict[str, Any]]:
    resp = stack.console.get(
        f"/api/v1/webhook-endpoints/{endpoint_id}/deliveries", params=params, headers=tenant.auth("admin")
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]


# --- pure rules ---------------------------------------------------------------------------------------


def test_retry_schedule_and_retry_after() -> None:
    schedule = [0, 5, 300]
    assert retry_delay(schedule, 1) is not None and 5 <= retry_delay(schedule, 1) <= 5.5  # type: ignore[operator]
    assert 300 <= retry_delay(schedule, 2) <= 330  # type: ignore[operator]
    assert retry_delay(schedule, 3) is None  # spent
    assert retry_delay(schedule, 1, retry_after_s=120) == 120  # Retry-After wins when longer
    assert parse_retry_after("30") == 30 and parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://localhost:8080/hook",
        "http://10.1.2.3/",
        "http://192.168.0.1/",
        "http://172.16.5.4/",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/",
        "http://[fe80::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
        "http://100.64.0.1/",
        "http://[fc00::1]/",
        "http://224.0.0.1/",
        "http://240.0.0.1/",
        "http://2130706433/",
    ],
)
def test_private_addresses_are_refused(url: str) -> None:
    with pytest.raises(UrlRefused):
        check_url(url, allow_private=False)
    assert check_url(url, allow_private=True) == url


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "https://user:pw@example.com/",
        "https://",
        "not a url",
        "https://example.com/#frag",
        "https://example.com:99999/",
    ],
)
def test_malformed_urls_are_refused(url: str) -> None:
    with pytest.raises(UrlRefused):
        check_url(url, allow_private=True)


def test_public_address_is_accepted() -> None:
    assert check_url("https://93.184.215.14/hooks", allow_private=False) == "https://93.184.215.14/hooks"


def test_delivery_time_check_refuses_a_private_address_before_connecting() -> None:
    """DNS rebinding: a URL accepted earlier is checked again on every new connection, on the addresses the
    connection then uses; IP literals (which skip resolvers) are checked by the dispatcher."""
    receiver = Receiver().start()
    try:
        port = receiver.server.server_address[1]

        async def post(url: str, guarded: bool) -> int:
            connector = aiohttp.TCPConnector(use_dns_cache=False, resolver=GuardedResolver() if guarded else None)
            async with aiohttp.ClientSession(connector=connector) as session, session.post(url, data=b"{}") as resp:
                return resp.status

        with pytest.raises(aiohttp.ClientConnectorError, match="not a public address"):
            asyncio.run(post(f"http://localhost:{port}/x", guarded=True))
        assert receiver.at("/x") == []
        assert asyncio.run(post(f"http://localhost:{port}/x", guarded=False)) == 200
        assert "not a public address" in (refused_literal("127.0.0.1") or "")
        assert "not a public address" in (refused_literal("[::1]") or "")
        assert refused_literal("93.184.215.14") is None and refused_literal("example.com") is None
    finally:
        receiver.stop()


# --- admin API ----------------------------------------------------------------------------------------


def test_ssrf_refused_by_the_api_when_private_urls_are_not_allowed(
    console: httpx.Client, postgres: EmbeddedPostgres
) -> None:
    t = make_tenant(postgres.dsn, "Ssrf")
    for url in ("http://127.0.0.1:9/x", "http://localhost/x", "http://169.254.169.254/", "http://[::1]/"):
        resp = console.post("/api/v1/webhook-endpoints", json={"url": url}, headers=t.auth("admin"))
        assert resp.status_code == 400 and "not a public address" in resp.json()["reason"], resp.text
    assert console.get("/api/v1/webhook-endpoints", headers=t.auth("admin")).json() == {"data": []}


def test_admin_only_tenant_scoped_and_audited(stack: Stack, postgres: EmbeddedPostgres, db: psycopg.Connection) -> None:
    t, other = make_tenant(postgres.dsn, "Hooks"), make_tenant(postgres.dsn, "Rival")
    c = stack.console
    url = stack.receiver.url + "/admin"
    body: dict[str, Any] | None
    for method, path, body in (("POST", "", {"url": url}), ("GET", "", None)):
        assert (
            c.request(method, f"/api/v1/webhook-endpoints{path}", json=body, headers=t.auth("member")).status_code
            == 403
        )
    assert c.get("/api/v1/webhook-endpoints").status_code == 401
    created = c.post(
        "/api/v1/webhook-endpoints",
        headers=t.auth("admin"),
        json={
            "url": url,
            "event_types": ["custom", "identify"],
            "widget_ids": [str(t.widget.id)],
            "description": "crm",
        },
    )
    assert created.status_code == 201, created.text
    ep = created.json()
    assert ep["secret"].startswith("whsec_") and Webhook(ep["secret"])  # the library accepts it
    assert ep["event_types"] == ["custom", "identify"] and ep["widget_ids"] == [str(t.widget.id)]
    eid = ep["id"]
    shown = c.get(f"/api/v1/webhook-endpoints/{eid}", headers=t.auth("owner")).json()
    assert "secret" not in shown and shown["enabled"] is True
    assert all("secret" not in e for e in c.get("/api/v1/webhook-endpoints", headers=t.auth("admin")).json()["data"])
    # Members are refused every endpoint action; another tenant sees nothing (404, not 403).
    for method, path, body in (
        ("GET", f"/{eid}", None),
        ("PATCH", f"/{eid}", {"enabled": False}),
        ("DELETE", f"/{eid}", None),
        ("GET", f"/{eid}/deliveries", None),
        ("POST", f"/{eid}/replay", {"from": iso(datetime.now(UTC)), "to": iso(datetime.now(UTC))}),
    ):
        assert (
            c.request(method, f"/api/v1/webhook-endpoints{path}", json=body, headers=t.auth("member")).status_code
            == 403
        )
        assert (
            c.request(method, f"/api/v1/webhook-endpoints{path}", json=body, headers=other.auth("admin")).status_code
            == 404
        )
    # Bad input: a reason, nothing created.
    for bad in (
        {"url": url, "event_types": ["purchase"]},
        {"url": url, "widget_ids": [str(other.widget.id)]},
        {"url": "gopher://x"},
        {"url": url, "extra": 1},
        {"url": url, "event_types": []},
    ):
        resp = c.post("/api/v1/webhook-endpoints", json=bad, headers=t.auth("admin"))
        assert resp.status_code == 400 and resp.json()["reason"], (bad, resp.text)
    patched = c.patch(
        f"/api/v1/webhook-endpoints/{eid}", json={"enabled": False, "event_types": None}, headers=t.auth("admin")
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["enabled"] is False and patched.json()["event_types"] is None
    assert t.emails["admin"] in patched.json()["disabled_reason"]
    assert (
        c.patch(f"/api/v1/webhook-endpoints/{eid}", json={"enabled": True}, headers=t.auth("admin")).json()[
            "disabled_reason"
        ]
        is None
    )
    assert c.delete(f"/api/v1/webhook-endpoints/{eid}", headers=t.auth("admin")).status_code == 204
    assert c.get(f"/api/v1/webhook-endpoints/{eid}", headers=t.auth("admin")).status_code == 404
    audit = db.execute(
        "SELECT actor, action, old_value, new_value FROM audit_log WHERE entity = 'webhook_endpoint'"
        " AND entity_id = %s ORDER BY id",
        (eid,),
    ).fetchall()
    assert [(a[0], a[1]) for a in audit] == [
        (t.emails["admin"], "webhook_endpoint.create"),
        (t.emails["admin"], "webhook_endpoint.update"),
        (t.emails["admin"], "webhook_endpoint.update"),
        (t.emails["admin"], "webhook_endpoint.delete"),
    ]
    assert audit[1][2]["enabled"] is True and audit[1][3]["enabled"] is False
    assert audit[1][2]["event_types"] == ["custom", "identify"] and audit[1][3]["event_types"] is None
    assert "whsec_" not in json.dumps([a[2:] for a in audit])  # the secret never reaches the audit log


def test_cli_add_list_disable_remove(stack: Stack, postgres: EmbeddedPostgres, db: psycopg.Connection) -> None:
    t = make_tenant(postgres.dsn, "Cli")
    added = cli(
        stack.settings,
        "webhooks",
        "add",
        "--tenant",
        str(t.id),
        "--url",
        stack.receiver.url + "/cli",
        "--event-type",
        "custom",
        "--actor",
        "ops@example.com",
    )
    assert added.returncode == 0, added.stderr
    secret = added.stdout.strip()
    assert secret.startswith("whsec_") and "shown only now" in added.stderr
    listed = cli(stack.settings, "webhooks", "list", "--tenant", str(t.id), "--json")
    [ep] = json.loads(listed.stdout)
    assert ep["url"] == stack.receiver.url + "/cli" and ep["event_types"] == ["custom"] and ep["enabled"]
    assert (
        cli(
            stack.settings, "webhooks", "disable", ep["id"], "--tenant", str(t.id), "--actor", "ops@example.com"
        ).returncode
        == 0
    )
    assert (
        "disabled (disabled by ops@example.com)"
        in cli(stack.settings, "webhooks", "list", "--tenant", str(t.id)).stdout
    )
    refused = cli(
        stack.settings.model_copy(update={"webhooks_allow_private_urls": False}),
        "webhooks",
        "add",
        "--tenant",
        str(t.id),
        "--url",
        "http://127.0.0.1/x",
        "--actor",
        "ops@example.com",
    )
    assert refused.returncode == 2 and "not a public address" in refused.stderr
    assert (
        cli(
            stack.settings, "webhooks", "remove", ep["id"], "--tenant", str(t.id), "--actor", "ops@example.com"
        ).returncode
        == 0
    )
    assert json.loads(cli(stack.settings, "webhooks", "list", "--tenant", str(t.id), "--json").stdout) == []
    actions = [r[0] for r in db.execute("SELECT action FROM audit_log WHERE entity_id = %s ORDER BY id", (ep["id"],))]
    assert actions == ["webhook_endpoint.create", "webhook_endpoint.update", "webhook_endpoint.delete"]


# --- delivery ------------------------------------------------------------------------------------------


def test_stored_events_are_delivered_signed_with_the_event_as_data(
    stack: Stack, postgres: EmbeddedPostgres, db: psycopg.Connection
) -> None:
    t = make_tenant(postgres.dsn, "Signed")
    eid, secret = stack.endpoint(t, "/signed")
    sent = [event(t.widget, kind="pageview"), event(t.widget, kind="custom")]
    stack.produce(sent)
    got = stack.receiver.wait_for("/signed", 2)
    bodies = verified(secret, got)
    assert sorted(b["data"]["event_id"] for b in bodies) == sorted(e["event_id"] for e in sent)
    for body, request in zip(bodies, got, strict=False):
        assert body["type"] == "visitor_event.created"
        data = body["data"]
        row = db.execute(
            "SELECT widget_id, tenant_id, visitor_id, event_type, url, properties::text FROM visitor_events"
            " WHERE widget_id = %s AND event_id = %s",
            (t.widget.id, data["event_id"]),
        ).fetchone()
        assert row is not None  # delivered only because it is a row
        assert (data["widget_id"], data["tenant_id"], data["visitor_id"], data["event_type"], data["url"]) == (
            str(row[0]),
            str(row[1]),
            row[2],
            row[3],
            row[4],
        )
        assert '"n": 1.50' in request.body  # numbers exactly as stored
        assert request.headers["webhook-id"].startswith("msg_") and "." not in request.headers["webhook-id"]
        assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 60
        assert request.headers["content-type"] == "application/json"
    # A tampered body or another endpoint's secret does not verify.
    from standardwebhooks.webhooks import WebhookVerificationError

    with pytest.raises(WebhookVerificationError):
        # (a change every body allows, whichever delivery arrived first)
        Webhook(secret).verify(got[0].body.replace("visitor_event.created", "visitor_event.deleted"), got[0].headers)
    # The outcome is recorded just after the response (in batches): wait for it, do not race it.
    wait_until(
        lambda: [d["status"] for d in deliveries(stack, t, eid)] == ["succeeded", "succeeded"],
        20,
        "both deliveries recorded",
    )
    log = deliveries(stack, t, eid)
    assert all(d["attempt_log"][0]["response_status"] == 200 and d["attempt_log"][0]["latency_ms"] >= 0 for d in log)


def test_retry_after_500_with_the_same_webhook_id(stack: Stack, postgres: EmbeddedPostgres) -> None:
    t = make_tenant(postgres.dsn, "Flaky")
    stack.receiver.on("/flaky", fail_first(2, 500))
    eid, secret = stack.endpoint(t, "/flaky")
    e = event(t.widget)
    stack.produce([e])
    got = stack.receiver.wait_for("/flaky", 3)
    assert len({r.headers["webhook-id"] for r in got}) == 1  # the receiver can dedupe on it
    assert all(b["data"]["event_id"] == e["event_id"] for b in verified(secret, got))
    wait_until(lambda: deliveries(stack, t, eid)[0]["status"] == "succeeded", 20, "delivery recorded")
    [d] = deliveries(stack, t, eid)
    assert [a["response_status"] for a in d["attempt_log"]] == [500, 500, 200]
    assert [a["attempt"] for a in d["attempt_log"]] == [1, 2, 3]
    assert d["attempt_log"][0]["error"].startswith("HTTP 500")
    assert d["webhook_id"] == got[0].headers["webhook-id"]
    ep = stack.console.get(f"/api/v1/webhook-endpoints/{eid}", headers=t.auth("admin")).json()
    assert ep["failing_since"] is None and ep["enabled"]  # the success reset the failure clock


def test_retries_run_out_then_failed(stack: Stack, postgres: EmbeddedPostgres) -> None:
    t = make_tenant(postgres.dsn, "Down")
    stack.receiver.on("/down", always(503))
    eid, _ = stack.endpoint(t, "/down")
    stack.produce([event(t.widget)])
    schedule = stack.settings.webhooks_retry_schedule_s
    stack.receiver.wait_for("/down", len(schedule))
    wait_until(lambda: deliveries(stack, t, eid)[0]["status"] == "failed", 20, "delivery failed")
    [d] = deliveries(stack, t, eid)
    assert d["attempts"] == len(schedule) and len(d["attempt_log"]) == len(schedule)
    assert len(stack.receiver.at("/down")) == len(schedule)  # nothing after the schedule is spent
    ep = stack.console.get(f"/api/v1/webhook-endpoints/{eid}", headers=t.auth("admin")).json()
    assert ep["failing_since"] is not None and ep["enabled"]  # failing, but not for days


def test_410_gone_disables_the_endpoint(stack: Stack, postgres: EmbeddedPostgres, db: psycopg.Connection) -> None:
    t = make_tenant(postgres.dsn, "Gone")
    stack.receiver.on("/gone", always(410))
    eid, _ = stack.endpoint(t, "/gone")
    stack.produce([event(t.widget)])
    stack.receiver.wait_for("/gone", 1)

    def disabled() -> dict[str, Any] | None:
        ep = stack.console.get(f"/api/v1/webhook-endpoints/{eid}", headers=t.auth("admin")).json()
        return ep if not ep["enabled"] else None

    wait_until(lambda: disabled() is not None, 20, "endpoint disabled")
    assert "410 Gone" in disabled()["disabled_reason"]
    [(actor, new)] = db.execute(
        "SELECT actor, new_value FROM audit_log WHERE entity_id = %s AND action = 'webhook_endpoint.disable'", (eid,)
    ).fetchall()
    assert actor == "system:webhooks" and "410" in new["disabled_reason"]
    stack.produce([event(t.widget)])  # a disabled endpoint gets nothing more: not even queued
    stack.webhooks_caught_up()
    assert db.execute("SELECT status FROM webhook_deliveries WHERE endpoint_id = %s", (eid,)).fetchall() == [
        ("failed",)
    ]  # the 410'd delivery is not retried
    assert len(stack.receiver.at("/gone")) == 1


def test_failing_for_days_disables_the_endpoint(
    stack: Stack, postgres: EmbeddedPostgres, db: psycopg.Connection
) -> None:
    t = make_tenant(postgres.dsn, "Failing")
    stack.receiver.on("/failing", always(500))
    eid, _ = stack.endpoint(t, "/failing")
    # The endpoint has been failing for six days (the clock is kept in the row; days are not waited out here).
    db.execute("UPDATE webhook_endpoints SET failing_since = now() - interval '6 days' WHERE id = %s", (eid,))
    stack.produce([event(t.widget)])
    stack.receiver.wait_for("/failing", 1)
    wait_until(
        lambda: not stack.console.get(f"/api/v1/webhook-endpoints/{eid}", headers=t.auth("admin")).json()["enabled"],
        20,
        "disabled",
    )
    reason = stack.console.get(f"/api/v1/webhook-endpoints/{eid}", headers=t.auth("admin")).json()["disabled_reason"]
    assert "every attempt failed since" in reason and "HTTP 500" in reason


def test_slow_endpoint_does_not_delay_a_fast_one(stack: Stack, postgres: EmbeddedPostgres) -> None:
    slow_t, fast_t = make_tenant(postgres.dsn, "Slow"), make_tenant(postgres.dsn, "Fast")
    stack.receiver.on("/slow", always(200, delay=2.0))
    stack.endpoint(slow_t, "/slow")
    stack.endpoint(fast_t, "/fast")
    n = 30
    stack.produce([event(slow_t.widget, visitor=f"s{i}") for i in range(n)])
    stack.receiver.wait_for("/slow", 1)
    started = time.time()
    stack.produce([event(fast_t.widget, visitor=f"f{i}") for i in range(n)])
    fast = stack.receiver.wait_for("/fast", n, timeout=20)
    took = max(r.at for r in fast) - started
    # The slow endpoint needs n / concurrency x 2 s = 20 s for its backlog; the fast one is not queued behind it.
    assert took < 5.0, took
    assert len(stack.receiver.at("/slow")) <= 3 * stack.settings.webhooks_endpoint_concurrency


def test_duplicates_on_the_topic_are_delivered_once(
    stack: Stack, postgres: EmbeddedPostgres, db: psycopg.Connection
) -> None:
    t = make_tenant(postgres.dsn, "Dupes")
    eid, secret = stack.endpoint(t, "/dupes")
    e = event(t.widget)
    stack.produce([e, dict(e)])  # twice in one message
    stack.produce([e], single=True)  # and again as a single-event message
    stack.produce([{**e, "occurred_at": e["occurred_at"] + timedelta(milliseconds=3)}])  # a re-send, other clock
    stack.webhooks_caught_up()
    [got] = stack.receiver.wait_for("/dupes", 1)
    assert verified(secret, [got])[0]["data"]["event_id"] == e["event_id"]
    assert db.execute("SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = %s", (eid,)).fetchone() == (1,)
    wait_until(lambda: deliveries(stack, t, eid)[0]["status"] == "succeeded", 20, "recorded")
    assert len(stack.receiver.at("/dupes")) == 1


def test_events_of_deleted_widgets_and_erased_visitors_are_not_delivered(
    stack: Stack, postgres: EmbeddedPostgres, db: psycopg.Connection
) -> None:
    t = make_tenant(postgres.dsn, "Erased")
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        doomed = widgets.create_widget(conn, name="doomed", tenant_id=t.id, actor="tests", tracking_enabled=True)
    # The receiver fails every attempt, so the first event's delivery stays queued for retries until the erase.
    stack.receiver.on("/erased", always(500))
    eid, secret = stack.endpoint(t, "/erased")
    early = event(t.widget, visitor="erase-me")
    stack.produce([early])
    stack.receiver.wait_for("/erased", 1)
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        erasure.erase_visitor(conn, t.id, t.widget.id, "erase-me", actor="tests", notify=lambda keys: None)
        widgets.delete_widget(conn, doomed.id, actor="tests")
    erased_at = time.time()
    # The queued delivery went with the event (and its log with it): nothing left to retry.
    assert db.execute("SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = %s", (eid,)).fetchone() == (0,)
    late = [event(t.widget, visitor="erase-me"), event(doomed)]
    live = event(t.widget, visitor="still-here")
    stack.produce(late)
    stack.produce([live])
    stack.webhooks_caught_up()

    def sent_ids() -> set[str]:
        return {b["data"]["event_id"] for b in verified(secret, stack.receiver.at("/erased"))}

    wait_until(lambda: live["event_id"] in sent_ids(), 30, "the live visitor's event")
    time.sleep(TIMEOUT_S + 1.0)  # an attempt in flight during the erase has ended; retries would have come
    got = stack.receiver.at("/erased")
    bodies = verified(secret, got)
    after = [b["data"]["event_id"] for r, b in zip(got, bodies, strict=False) if r.at > erased_at + TIMEOUT_S]
    sent_after = {b["data"]["event_id"] for b in bodies}
    assert live["event_id"] in sent_after
    assert not {e["event_id"] for e in late} & sent_after  # never stored, never sent
    assert early["event_id"] not in after  # no retry after the erase
    assert db.execute(
        "SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = %s AND event_id <> %s", (eid, live["event_id"])
    ).fetchone() == (0,)


def test_filters_by_event_type_and_widget(stack: Stack, postgres: EmbeddedPostgres) -> None:
    t = make_tenant(postgres.dsn, "Filters")
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        other = widgets.create_widget(conn, name="other", tenant_id=t.id, actor="tests", tracking_enabled=True)
    eid, secret = stack.endpoint(t, "/filtered", event_types=["custom"], widget_ids=[str(t.widget.id)])
    wanted = event(t.widget, kind="custom")
    stack.produce([event(t.widget, kind="pageview"), wanted, event(other, kind="custom")])
    stack.webhooks_caught_up()
    assert [d["event_id"] for d in deliveries(stack, t, eid)] == [wanted["event_id"]]  # only it was queued
    stack.receiver.wait_for("/filtered", 1)
    wait_until(lambda: deliveries(stack, t, eid)[0]["status"] == "succeeded", 20, "recorded")
    got = stack.receiver.at("/filtered")
    assert [b["data"]["event_id"] for b in verified(secret, got)] == [wanted["event_id"]]


def test_replay_of_a_time_range(stack: Stack, postgres: EmbeddedPostgres, db: psycopg.Connection) -> None:
    t = make_tenant(postgres.dsn, "Replay")
    eid, secret = stack.endpoint(t, "/replay")
    sent = [event(t.widget, visitor=f"r{i}") for i in range(3)]
    stack.produce(sent)
    first = stack.receiver.wait_for("/replay", 3)
    wait_until(lambda: all(d["status"] == "succeeded" for d in deliveries(stack, t, eid)), 20, "succeeded")
    now = datetime.now(UTC)
    resp = stack.console.post(
        f"/api/v1/webhook-endpoints/{eid}/replay",
        headers=t.auth("admin"),
        json={"from": iso(now - timedelta(minutes=5)), "to": iso(now + timedelta(minutes=1))},
    )
    assert resp.status_code == 202 and resp.json() == {"queued": 3}, resp.text
    again = stack.receiver.wait_for("/replay", 6)[3:]
    assert sorted(b["data"]["event_id"] for b in verified(secret, again)) == sorted(e["event_id"] for e in sent)
    # A replay is the same message again: same webhook-id per event.
    assert {r.headers["webhook-id"] for r in again} == {r.headers["webhook-id"] for r in first}
    bad = stack.console.post(
        f"/api/v1/webhook-endpoints/{eid}/replay",
        headers=t.auth("admin"),
        json={"from": iso(now), "to": iso(now - timedelta(days=1))},
    )
    assert bad.status_code == 400
    [(actor, new)] = db.execute(
        "SELECT actor, new_value FROM audit_log WHERE entity_id = %s AND action = 'webhook_endpoint.replay'", (eid,)
    ).fetchall()
    assert actor == t.emails["admin"] and new["queued"] == 3


def test_deliveries_log_is_paginated(stack: Stack, postgres: EmbeddedPostgres) -> None:
    t = make_tenant(postgres.dsn, "Pages")
    eid, _ = stack.endpoint(t, "/pages")
    stack.produce([event(t.widget, visitor=f"p{i}") for i in range(5)])
    stack.receiver.wait_for("/pages", 5)
    wait_until(lambda: len(deliveries(stack, t, eid, status="succeeded")) == 5, 20, "recorded")
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = stack.console.get(
            f"/api/v1/webhook-endpoints/{eid}/deliveries", params=params, headers=t.auth("admin")
        ).json()
        seen += [d["id"] for d in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 5 and len(set(seen)) == 5 and seen == sorted(seen, key=int, reverse=True)
    assert (
        stack.console.get(
            f"/api/v1/webhook-endpoints/{eid}/deliveries", params={"limit": 0}, headers=t.auth("admin")
        ).status_code
        == 400
    )


def test_restart_mid_queue_loses_no_delivery(stack: Stack, postgres: EmbeddedPostgres) -> None:
    """SIGKILL while deliveries are queued and in flight; after a restart every one arrives (at least once)."""
    t = make_tenant(postgres.dsn, "Restart")
    stack.receiver.on("/restart", always(200, delay=0.3))
    _, secret = stack.endpoint(t, "/restart")
    sent = [event(t.widget, visitor=f"k{i}") for i in range(40)]
    stack.produce(sent)
    stack.receiver.wait_for("/restart", 4)
    stack.webhooks.kill()
    assert len({r.headers["webhook-id"] for r in stack.receiver.at("/restart")}) < len(sent)  # mid-queue
    stack.webhooks.start()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        ids = {b["data"]["event_id"] for b in verified(secret, stack.receiver.at("/restart"))}
        if len(ids) == len(sent):
            break
        time.sleep(0.2)
    assert ids == {e["event_id"] for e in sent}


def test_whole_pipeline_from_the_ingest_api(
    kafka: EmbeddedBroker, postgres: EmbeddedPostgres, tmp_path: Path, start_service: Callable[..., Service]
) -> None:
    """POST /api/widget/track -> processors -> sink -> webhooks: every stored event (the derived session_start
    included) arrives once, signed."""
    s = make_settings(
        kafka,
        postgres,
        tmp_path / "data",
        console_port=free_port(),
        webhooks_http_port=free_port(),
        webhooks_group=f"wh-{uuid.uuid4().hex[:8]}",
        webhooks_allow_private_urls=True,
    )
    for stage in ("api", "processors", "sink", "webhooks", "console"):
        start_service(stage, settings_override=s)
    receiver = Receiver().start()
    try:
        t = make_tenant(postgres.dsn, "Pipeline")
        with httpx.Client(base_url=f"http://127.0.0.1:{s.console_port}", timeout=30) as console:
            resp = console.post(
                "/api/v1/webhook-endpoints", json={"url": receiver.url + "/all"}, headers=t.auth("admin")
            )
            assert resp.status_code == 201, resp.text
            secret = resp.json()["secret"]
        now = datetime.now(UTC)
        body = {
            "widget_id": str(t.widget.id),
            "visitor_id": "v-pipe",
            "sent_at": iso(now),
            "events": [
                {
                    "event_id": str(uuid.uuid4()),
                    "type": "pageview",
                    "occurred_at": iso(now),
                    "url": "https://a.example/",
                },
                {
                    "event_id": str(uuid.uuid4()),
                    "type": "custom",
                    "name": "buy",
                    "occurred_at": iso(now),
                    "url": "https://a.example/",
                },
            ],
        }
        for _ in range(2):  # the client retried: the same events twice
            assert (
                httpx.post(f"http://127.0.0.1:{s.http_port}/api/widget/track", json=body, timeout=10).status_code == 204
            )
        with psycopg.connect(postgres.dsn, autocommit=True) as db:
            rows = wait_for_rows(
                db, "SELECT event_id::text, event_type FROM visitor_events WHERE widget_id = %s", (t.widget.id,), 3
            )
        receiver.wait_for("/all", 3)
        webhooks_caught_up(s, Topics.from_settings(s).enriched_events)
        with psycopg.connect(postgres.dsn, autocommit=True) as db:
            wait_until(
                lambda: (
                    db.execute(
                        "SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*)"
                        " FROM webhook_deliveries WHERE widget_id = %s",
                        (t.widget.id,),
                    ).fetchone()
                    == (3, 3)
                ),
                20,
                "3 deliveries recorded",
            )
        bodies = verified(secret, receiver.at("/all"))
        assert sorted((b["data"]["event_id"], b["data"]["event_type"]) for b in bodies) == sorted(rows)
    finally:
        receiver.stop()


def test_two_replicas_share_the_queue_without_sending_twice(
    stack: Stack, postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    """A second `site-activity webhooks` process on the same group and queue: both send (SKIP LOCKED claims),
    and no event is sent twice while nothing fails."""
    second_settings = stack.settings.model_copy(update={"webhooks_http_port": free_port()})
    second = Service("webhooks", second_settings, tmp_path)
    second.ready = http_ok(f"http://127.0.0.1:{second_settings.webhooks_http_port}/healthz")
    second.start()
    try:
        t = make_tenant(postgres.dsn, "Replicas")
        stack.receiver.on("/replicas", always(200, delay=0.3))
        eid, secret = stack.endpoint(t, "/replicas")
        sent = [event(t.widget, visitor=f"r{i}") for i in range(40)]
        stack.produce(sent)
        stack.receiver.wait_for("/replicas", len(sent), timeout=60)
        wait_until(
            lambda: len(deliveries(stack, t, eid, status="succeeded", limit=100)) == len(sent), 30, "all recorded"
        )
        got = stack.receiver.at("/replicas")
        ids = [b["data"]["event_id"] for b in verified(secret, got)]
        assert sorted(ids) == sorted(e["event_id"] for e in sent)  # each exactly once

        def successes(port: int) -> float:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            return sum(
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith('site_activity_webhooks_attempts_total{result="success"}')
            )

        assert successes(stack.settings.webhooks_http_port) > 0
        assert successes(second_settings.webhooks_http_port) > 0

        def group_lag(port: int) -> list[str]:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            return [
                line
                for line in text.splitlines()
                if line.startswith("kafka_consumergroup_group_lag{")
                and f'group="{stack.settings.webhooks_group}"' in line
            ]

        # Each replica serves its consumer group's lag (site_activity/lag.py) like the sink and processors do.
        wait_until(lambda: bool(group_lag(stack.settings.webhooks_http_port)), 30, "webhooks group lag gauges")
    finally:
        second.stop()
