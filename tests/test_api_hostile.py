"""Issue 8, ingest cases: what the API accepts must be storable, what it cannot store is refused up front with
a reason, and nothing a client sends gets a 5xx. Each test drives the real `site-activity api` (and, where
the outcome is a row, the sink or the processors + sink) over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest

from producer_api.errors import ApiError
from producer_api.ingest import IngestService
from producer_api.metrics import ApiMetrics
from producer_api.producer import EventProducer
from producer_api.validation import PLACEHOLDER_USER_IDS, Limits, build_events, is_placeholder_user_id, parse_envelope
from producer_api.widget_cache import WidgetCache
from schemas.codec import EventCodec
from site_activity import widgets
from site_activity.settings import Settings
from site_activity.topics import KEY_AND_FRAMING_BYTES, Topics, event_key, max_event_value_bytes
from tests.conftest import Service, iso, read_topic, wait_for_rows

TRACK = "/api/widget/track"
LIMITS = Limits.from_settings(Settings())  # the defaults the API runs with in these tests
CODEC = EventCodec()


def now() -> datetime:
    return datetime.now(UTC)


def event(kind: str = "custom", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "type": kind,
        "occurred_at": iso(now()),
        "url": "https://shop.example/pricing",
    }
    if kind == "custom":
        base["name"] = "clicked"
    if kind == "identify":
        base["user_id"] = "u_1"
    return {**base, **fields}


def body(widget_id: uuid.UUID, events: list[Any], visitor: str = "v-1") -> dict[str, Any]:
    return {"widget_id": str(widget_id), "visitor_id": visitor, "sent_at": iso(now()), "events": events}


def nested(depth: int) -> list[Any]:
    """`depth` arrays inside each other: nested(1) == []."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def nested_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def exact(text: str) -> Any:
    """JSON with every number as an exact Decimal, for comparing what was sent with what is stored."""
    return json.loads(text, parse_int=Decimal, parse_float=Decimal)


def stored(db: psycopg.Connection, event_ids: list[str]) -> dict[str, Any]:
    rows = db.execute(
        "SELECT event_id::text, properties::text FROM visitor_events WHERE event_id = ANY(%s)",
        ([uuid.UUID(e) for e in event_ids],),
    ).fetchall()
    return {event_id: exact(props) for event_id, props in rows}


def post(api_url: str, payload: str | bytes) -> httpx.Response:
    return httpx.post(api_url + TRACK, content=payload, headers={"content-type": "text/plain"}, timeout=15)


# --- case 1: numbers a double would change, values jsonb refuses -------------------------------------------
def test_numbers_that_would_change_are_refused_per_event_and_the_rest_land_unchanged(
    raw_pipeline: Settings, api_url: str, db: psycopg.Connection, make_widget: Callable[..., widgets.Widget]
) -> None:
    w = make_widget()
    # (number text, accepted?) — the text goes into the body verbatim, as Python's json.dumps or a hand-written
    # client would send it. Accepted: whatever a double reads back as the same value.
    numbers = [
        ("NaN", False),
        ("Infinity", False),
        ("-Infinity", False),
        ("1e400", False),
        ("-1e400", False),
        ("1e-400", False),
        ("9007199254740993", False),
        ("123456789012345678901234567890", False),
        ("0.30000000000000001", False),
        ("18446744073709551616", False),
        ("1" + "0" * 5000, False),
        ("0", True),
        ("-0", True),
        ("-0.0", True),
        ("1.5", True),
        ("0.1", True),
        ("1E2", True),
        ("9007199254740991", True),
        ("9007199254740992", True),
        ("9007199254740994", True),
        ("12345678901234567000", True),
        ("1e20", True),
        ("1.7976931348623157e308", True),
        ("5e-324", True),
        ("2.2250738585072014e-308", True),
        ("0.30000000000000004", True),
    ]
    clean = event(properties={"plan": "growth"})
    events: list[dict[str, Any]] = [clean]
    for i, _ in enumerate(numbers):
        kind = "identify" if i % 3 == 2 else "custom"
        field = "traits" if kind == "identify" else "properties"
        # Nested one level, next to a good value, to show the reason names the exact field.
        events.append(event(kind, **{field: {"ok": 1, "m": {"n": f"@NUM{i}@"}}}))
    text = json.dumps(body(w.id, events))
    for i, (num, _) in enumerate(numbers):
        text = text.replace(f'"@NUM{i}@"', num)
    resp = post(api_url, text)
    assert resp.status_code == 400, resp.text
    answer = resp.json()
    assert answer["error"] == "invalid_events"
    refused = {r["index"]: r["reason"] for r in answer["rejected"]}
    expected_refused = {i + 1 for i, (_, ok) in enumerate(numbers) if not ok}
    assert set(refused) == expected_refused, (refused, numbers)
    for index, reason in refused.items():
        field = "traits" if (index - 1) % 3 == 2 else "properties"
        assert reason.startswith(f"{field}.m.n: "), reason
        assert numbers[index - 1][0][:20] in reason, reason
    assert answer["accepted"] == len(events) - len(refused)

    landed = [e for i, e in enumerate(events) if i not in refused]
    wait_for_rows(db, "SELECT 1 FROM visitor_events WHERE widget_id = %s", (w.id,), len(landed))
    rows = stored(db, [e["event_id"] for e in landed])
    assert set(rows) == {e["event_id"] for e in landed}
    for i, e in enumerate(events):
        if i in refused or i == 0:
            continue
        sent = Decimal(numbers[i - 1][0])
        got = rows[e["event_id"]]["m"]["n"]
        assert got == sent, (numbers[i - 1][0], got)  # the exact value sent, not a rounded one
    assert rows[clean["event_id"]] == {"plan": "growth"}
    count = db.execute("SELECT count(*) FROM visitor_events WHERE widget_id = %s", (w.id,)).fetchone()[0]
    assert count == len(landed)


def test_strings_jsonb_cannot_hold_are_refused_wherever_they_are(
    raw_pipeline: Settings, api_url: str, db: psycopg.Connection, make_widget: Callable[..., widgets.Widget]
) -> None:
    w = make_widget()
    good = event(properties={"k": "é😀", "list": ["a", {"b": "c"}]})
    events = [
        good,
        event(properties={"a\u0000b": 1}),  # NUL in a key
        event(properties={"deep": {"x": ["ok", "a\u0000"]}}),  # NUL nested in an array
        event("identify", traits={"t": {"PLACEHOLDER": 1}}),  # lone surrogate in a nested key
        event(properties={"s": ["PLACEHOLDER"]}),  # lone surrogate nested in an array
        event("pageview", url="https://x.example/PLACEHOLDER"),  # lone surrogate in a text field
        event(name="a\u0000"),
    ]
    text = json.dumps(body(w.id, events)).replace("PLACEHOLDER", "\\udc00")
    resp = post(api_url, text)
    assert resp.status_code == 400, resp.text
    reasons = {r["index"]: r["reason"] for r in resp.json()["rejected"]}
    assert set(reasons) == {1, 2, 3, 4, 5, 6}
    assert "properties keys" in reasons[1] and "NUL" in reasons[1]
    assert reasons[2].startswith("properties.deep.x[1]") and "NUL" in reasons[2]
    assert reasons[3].startswith("traits.t keys") and "surrogate" in reasons[3]
    assert reasons[4].startswith("properties.s[0]") and "surrogate" in reasons[4]
    assert reasons[5].startswith("url") and "surrogate" in reasons[5]
    assert reasons[6].startswith("name") and "NUL" in reasons[6]
    wait_for_rows(db, "SELECT 1 FROM visitor_events WHERE widget_id = %s", (w.id,), 1)
    assert stored(db, [good["event_id"]]) == {good["event_id"]: {"k": "é😀", "list": ["a", {"b": "c"}]}}


# --- case 2: deep nesting ---------------------------------------------------------------------------------
def test_deep_nesting_costs_only_its_event_never_a_500(
    raw_pipeline: Settings, api_url: str, db: psycopg.Connection, make_widget: Callable[..., widgets.Widget]
) -> None:
    w = make_widget()
    depth = LIMITS.max_depth
    valid = event(properties={"plan": "growth"})
    at_limit = event(properties={"tree": nested(depth - 1)})  # properties itself is level 1
    events = [
        valid,
        event(properties={"tree": "@2000@"}),
        event(properties={"tree": "@990@"}),
        event("identify", traits={"tree": "@1023@"}),
        event(properties={"tree": nested(depth)}),
        at_limit,
        "@5000@",
        event("pageview", extra="@3000@"),
    ]
    text = json.dumps(body(w.id, events), separators=(",", ":"))
    for n in (2000, 990, 1023, 5000, 3000):
        text = text.replace(f'"@{n}@"', nested_json(n))
    assert len(text) < 32 * 1024
    resp = post(api_url, text)
    assert resp.status_code == 400, resp.text
    reasons = {r["index"]: r["reason"] for r in resp.json()["rejected"]}
    assert set(reasons) == {1, 2, 3, 4, 6}, reasons
    for i in (1, 2, 4):
        assert reasons[i].startswith("properties.tree") and f"more than {depth} levels" in reasons[i], reasons[i]
    assert reasons[3].startswith("traits.tree") and f"more than {depth} levels" in reasons[3]
    assert "event must be a JSON object" in reasons[6]
    # The unknown field "extra" is ignored (never stored), however deep: that pageview lands.
    landed = [valid, at_limit, events[7]]
    wait_for_rows(db, "SELECT 1 FROM visitor_events WHERE widget_id = %s", (w.id,), len(landed))
    assert set(stored(db, [e["event_id"] for e in landed])) == {e["event_id"] for e in landed}

    # A whole body nested too deep, or deep and broken, is one 400 for the body; the server stays up.
    for raw in (
        nested_json(200_000),
        "[" * 200_000,
        '{"events":' + "[" * 100_000 + "1,]" + "]" * 99_999 + "}",
        json.dumps(body(w.id, [])).replace("[]", nested_json(100_000)),
    ):
        resp = post(api_url, raw)
        assert resp.status_code == 400, (raw[:30], resp.status_code, resp.text)
    assert httpx.get(api_url + "/healthz").status_code == 200


# --- case 3: field lengths and the derived message --------------------------------------------------------
def test_every_text_field_has_a_limit_in_characters(
    raw_pipeline: Settings, api_url: str, make_widget: Callable[..., widgets.Widget]
) -> None:
    w = make_widget()
    lim = LIMITS.max_url_chars, LIMITS.max_referrer_chars, LIMITS.max_property_key_chars
    accepted = [
        event("pageview", url="é" * lim[0], referrer="😀" * lim[1]),
        event(properties={"k" * lim[2]: 1}),
        event("identify", user_id="😀" * LIMITS.max_user_id_chars),
    ]
    resp = httpx.post(api_url + TRACK, json=body(w.id, accepted, visitor="😀" * LIMITS.max_visitor_id_chars))
    assert resp.status_code == 204, resp.text
    refused = [
        event("pageview", url="é" * (lim[0] + 1)),
        event("pageview", referrer="😀" * (lim[1] + 1)),
        event(properties={"k" * (lim[2] + 1): 1}),
        event(traits={}, properties={"a": {"é" * (lim[2] + 1): 1}}),
        event("identify", user_id="u" * (LIMITS.max_user_id_chars + 1)),
        event(name="n" * 101),
    ]
    resp = httpx.post(api_url + TRACK, json=body(w.id, refused))
    assert resp.status_code == 400
    reasons = [r["reason"] for r in resp.json()["rejected"]]
    assert len(reasons) == len(refused), reasons
    for reason, field in zip(
        reasons, ["url", "referrer", "properties", "properties.a", "user_id", "name"], strict=True
    ):
        assert reason.startswith(field) and ("at most" in reason), reason
    resp = httpx.post(
        api_url + TRACK, json=body(w.id, [event("pageview")], visitor="😀" * (LIMITS.max_visitor_id_chars + 1))
    )
    assert resp.status_code == 400 and "visitor_id must be at most 128" in resp.json()["reason"]


def issue_request(
    widget_id: uuid.UUID, visitor: str, start: datetime, count: int = 62, char: str = "é"
) -> dict[str, Any]:
    """Issue 8, case 3: `count` page views 31 minutes apart (so each opens a session, and its session_start
    repeats the url, referrer and visitor id), each with a 2048-character non-ASCII url and referrer."""
    events = [
        event(
            "pageview",
            occurred_at=iso(start + timedelta(minutes=31 * i)),
            url="https://shop.example/" + char * (LIMITS.max_url_chars - 21),
            referrer="https://ref.example/" + char * (LIMITS.max_referrer_chars - 20),
        )
        for i in range(count)
    ]
    return body(widget_id, events, visitor=visitor)


def as_text(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode()  # UTF-8, "é" two bytes: what a browser sends


def test_the_issue_request_lands_whole_with_every_session_start(
    settings: Settings,
    full_pipeline: None,
    api_url: str,
    db: psycopg.Connection,
    make_widget: Callable[..., widgets.Widget],
) -> None:
    """Issue 8, case 3, exactly: a 128-emoji visitor id and 62 page views 31 minutes apart, each with a
    2048-character non-ASCII url and referrer (~515 KB of JSON, under the 512 KiB body limit), then small
    requests from other visitors. Its raw message (~545 KB) fits one Kafka message; its enriched output
    (~1.1 MB: a session_start before every page view) does not, so the processors split it by size. Right:
    every request 204, every event a row (62 session_starts included), nothing dead-lettered."""
    w = make_widget()
    visitor = "😀" * LIMITS.max_visitor_id_chars
    big = issue_request(w.id, visitor, now() - timedelta(days=3))
    payload = as_text(big)
    assert 500_000 < len(payload) <= settings.max_body_bytes
    resp = post(api_url, payload)
    assert resp.status_code == 204, resp.text
    small = [body(w.id, [event("pageview"), event()], visitor=f"other-{i}") for i in range(5)]
    for b in small:
        resp = httpx.post(api_url + TRACK, json=b, timeout=15)
        assert resp.status_code == 204, resp.text

    ids = [e["event_id"] for e in big["events"]] + [e["event_id"] for b in small for e in b["events"]]
    rows = wait_for_rows(
        db,
        "SELECT event_id::text FROM visitor_events WHERE event_id = ANY(%s)",
        ([uuid.UUID(i) for i in ids],),
        len(ids),
        timeout=90,
    )
    assert sorted(r[0] for r in rows) == sorted(ids)
    starts = db.execute(
        "SELECT visitor_id, count(*) FROM visitor_events WHERE widget_id = %s "
        "AND event_type = 'session_start' GROUP BY visitor_id",
        (w.id,),
    ).fetchall()
    assert dict(starts) == {visitor: 62, **{f"other-{i}": 1 for i in range(5)}}

    topics = Topics.from_settings(settings)
    key = event_key(str(w.id), visitor)
    raw = [m for m in read_topic(settings, topics.raw_events, 1 + len(small)) if m.key() == key]
    assert len(raw) == 1 and 480_000 < len(raw[0].value() or b"") <= LIMITS.max_raw_message_bytes  # one request, whole
    enriched = [m for m in read_topic(settings, topics.enriched_events, 2 + len(small)) if m.key() == key]
    assert len(enriched) >= 2, "the enriched output is over one message and must have been split"
    assert all(len(m.key() or b"") + len(m.value() or b"") <= settings.kafka_max_message_bytes for m in enriched)
    records = [r for m in enriched for r in CODEC.decode_events(m.value())]
    assert [r["event_type"] for r in records] == ["session_start", "pageview"] * 62  # in order across messages
    assert read_topic(settings, topics.dead_letter, 1, timeout=3) == []


def test_the_default_body_limit_cannot_reach_the_raw_message_limit() -> None:
    """The raw budget (what one Kafka message carries) is a guard for inconsistent settings: with the default
    body limit no request gets near it. The densest requests in raw bytes per body byte repeat a 128-emoji
    visitor id in each of 100 events; filled up to the body limit they encode to about 570 KB."""
    widget, tenant = uuid.uuid4(), uuid.uuid4()
    visitor = "😀" * LIMITS.max_visitor_id_chars
    # The room left for the key and librdkafka's record framing (at most 36 bytes) holds the longest key.
    assert len(event_key(str(widget), visitor)) + 36 <= KEY_AND_FRAMING_BYTES
    assert LIMITS.max_raw_message_bytes == Settings().kafka_max_message_bytes - KEY_AND_FRAMING_BYTES
    shapes: dict[str, Callable[[int], dict[str, Any]]] = {
        "pageview": lambda n: event("pageview", url="😀" * n, referrer="😀" * n),
        "identify": lambda n: event(
            "identify",
            user_id="😀" * LIMITS.max_user_id_chars,
            url="😀" * n,
            traits={f"k{i}": "😀" * 200 for i in range(5)},
        ),
        "custom": lambda n: event(
            name="😀" * LIMITS.max_name_chars, url="😀" * n, properties={f"k{i}": "😀" * 200 for i in range(5)}
        ),
    }
    for shape, make in shapes.items():
        largest = 0
        for n in range(0, LIMITS.max_url_chars + 1, 16):
            payload = as_text(body(widget, [make(n) for _ in range(LIMITS.max_events)], visitor=visitor))
            if len(payload) > LIMITS.max_body_bytes:
                break
            events, rejected = build_events(parse_envelope(payload, LIMITS), str(tenant), now(), LIMITS)
            assert not rejected, (shape, rejected[:1])
            largest = max(largest, len(CODEC.encode_events(events)))
        assert 500_000 < largest < 600_000 < LIMITS.max_raw_message_bytes, (shape, largest)


def test_a_raw_message_over_what_kafka_takes_is_refused_up_front(
    settings: Settings, start_service: Callable[..., Service], api_url: str, make_widget: Callable[..., widgets.Widget]
) -> None:
    """Inconsistent settings: the body limit raised to 2 MiB while Kafka still takes 1 MB messages. A request
    whose raw message would be over what one message carries is refused whole (413 batch_too_large, its limit
    kafka_max_message_bytes minus key and framing), nothing is written, never a 5xx; below it, 204."""
    roomy = settings.model_copy(update={"max_body_bytes": 2 * 1024 * 1024})
    start_service("api", settings_override=roomy)
    w = make_widget()
    start = now() - timedelta(days=3)
    too_big = issue_request(w.id, "v-too-big", start, count=62, char="😀")  # ~1.06 MB of JSON, ~1.1 MB raw
    resp = post(api_url, as_text(too_big))
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"] == "batch_too_large"
    assert resp.json()["limit"] == max_event_value_bytes(roomy) == roomy.kafka_max_message_bytes - KEY_AND_FRAMING_BYTES
    fits = issue_request(w.id, "v-fits", start)  # ~545 KB raw: over the 480,000 bytes of the old 2x budget
    resp = post(api_url, as_text(fits))
    assert resp.status_code == 204, resp.text
    raw = read_topic(roomy, Topics.from_settings(roomy).raw_events, 2, timeout=10)
    assert [m.key() for m in raw] == [event_key(str(w.id), "v-fits")]  # nothing of the refused request


def test_a_message_kafka_refuses_at_produce_time_is_a_4xx_not_a_503(
    settings: Settings, make_widget: Callable[..., widgets.Widget]
) -> None:
    """If librdkafka still refuses a request's message for its size (here the producer's message.max.bytes
    is 300 KB while the API's budget follows the default 1 MB), that is permanent: 413 batch_too_large with
    Kafka's reason, never a 503 that tells the client to retry forever; the producer keeps serving."""
    w = make_widget()
    strict = settings.model_copy(update={"kafka_max_message_bytes": 300_000})

    async def run() -> tuple[ApiError, int, float]:
        metrics = ApiMetrics()
        producer = EventProducer(strict, metrics)
        cache = WidgetCache(settings.postgres_dsn, settings.widget_cache_refresh_s)
        producer.start()
        await cache.start()
        try:
            ingest = IngestService(settings, cache, producer, metrics)
            with pytest.raises(ApiError) as refused:
                await ingest.ingest(as_text(issue_request(w.id, "v-refused", now() - timedelta(days=3))))
            after = await ingest.ingest(as_text(body(w.id, [event("pageview")], visitor="v-after")))
            unwritable = metrics.registry.get_sample_value(
                "site_activity_api_produce_failures_total", {"reason": "unwritable"}
            )
            return refused.value, after.accepted, unwritable or 0.0
        finally:
            await cache.stop()
            producer.close()

    refused, accepted_after, unwritable = asyncio.run(run())
    assert refused.status == 413 and refused.error == "batch_too_large", (refused.status, refused.reason)
    assert "size too large" in refused.reason.lower() and "smaller requests" in refused.reason
    assert accepted_after == 1 and unwritable == 1
    raw = read_topic(settings, Topics.from_settings(settings).raw_events, 2, timeout=10)
    assert [m.key() for m in raw] == [event_key(str(w.id), "v-after")]


# --- case 4: placeholder user ids ----------------------------------------------------------------------------
def test_placeholder_list_is_matched_case_insensitively_after_trimming() -> None:
    for placeholder in PLACEHOLDER_USER_IDS:
        for variant in (placeholder, placeholder.upper(), f"  {placeholder.title()}\t"):
            assert is_placeholder_user_id(variant), variant
    for empty in ("", " ", "\t\n", "\u00a0"):
        assert is_placeholder_user_id(empty), repr(empty)
    for real in ("u_88291", "42", "00", "nullable", "ada@example.com", "[object Objection]", "undefined_user"):
        assert not is_placeholder_user_id(real), real
    assert {"undefined", "null", "none", "nan", "0", "true", "false", "[object object]"} <= PLACEHOLDER_USER_IDS


def test_placeholder_user_ids_create_no_contact(
    settings: Settings,
    full_pipeline: None,
    api_url: str,
    db: psycopg.Connection,
    make_widget: Callable[..., widgets.Widget],
) -> None:
    w = make_widget()
    ids = ["undefined", "undefined", "null", "[object Object]", "NULL", " None ", "   ", "NaN", "0", "false"]
    pageviews = []
    for i, user_id in enumerate(ids):
        pv = event("pageview", occurred_at=iso(now() - timedelta(seconds=5)))
        pageviews.append(pv)
        resp = httpx.post(
            api_url + TRACK,
            json=body(w.id, [pv, event("identify", user_id=user_id)], visitor=f"visitor-{i}"),
            timeout=15,
        )
        assert resp.status_code == 400, (user_id, resp.text)
        assert resp.json()["accepted"] == 1
        [rejected] = resp.json()["rejected"]
        assert rejected["index"] == 1 and "placeholder" in rejected["reason"], rejected
    # A real id still links, through the same processors: the refusals above are not a broken pipeline.
    real = event("identify", user_id="u_real")
    assert httpx.post(api_url + TRACK, json=body(w.id, [real], visitor="visitor-real")).status_code == 204

    rows = wait_for_rows(
        db,
        "SELECT event_id::text, customer_id FROM visitor_events WHERE widget_id = %s AND event_type = 'pageview'",
        (w.id,),
        len(ids),
    )
    assert sorted(event_id for event_id, _ in rows) == sorted(pv["event_id"] for pv in pageviews)
    assert all(customer is None for _, customer in rows), rows  # no contact, so none shared either
    wait_for_rows(db, "SELECT 1 FROM customers WHERE tenant_id = %s", (w.tenant_id,), 1)
    contacts = db.execute("SELECT external_id FROM customers WHERE tenant_id = %s", (w.tenant_id,)).fetchall()
    assert contacts == [("u_real",)]
    assert (
        db.execute(
            "SELECT count(*) FROM visitor_events WHERE widget_id = %s AND event_type = 'identify'", (w.id,)
        ).fetchone()[0]
        == 1
    )


# --- case 12: slow clients --------------------------------------------------------------------------------------
SLOW_CONNECTIONS = 300


def test_slow_clients_are_cut_off_while_others_are_served(
    settings: Settings, start_service: Callable[..., Service], make_widget: Callable[..., widgets.Widget]
) -> None:
    short = settings.model_copy(update={"http_header_timeout_s": 3.0, "http_body_timeout_s": 3.0})
    start_service("api", settings_override=short)
    url = f"http://127.0.0.1:{short.http_port}"
    w = make_widget()
    payload = json.dumps(body(w.id, [event("pageview")])).encode()
    partial_body = (
        f"POST {TRACK} HTTP/1.1\r\nhost: x\r\ncontent-type: text/plain\r\ncontent-length: {len(payload)}\r\n\r\n"
    ).encode() + payload[:20]
    # A third each: half a request line; complete headers minus the blank line; headers and part of a body.
    openers = [b"POST /api/widget/tr", b"GET /healthz HTTP/1.1\r\nhost: x\r\n", partial_body]
    slow: list[socket.socket] = []
    try:
        opened = time.monotonic()
        for i in range(SLOW_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", short.http_port), timeout=10)
            sock.sendall(openers[i % 3])
            slow.append(sock)
        # Meanwhile normal requests are answered, promptly.
        with httpx.Client(base_url=url, timeout=5) as client:
            for _ in range(20):
                started = time.monotonic()
                assert client.post(TRACK, json=body(w.id, [event("pageview")])).status_code == 204
                assert client.get("/healthz").status_code == 200
                assert time.monotonic() - started < 2
        # The server closes every slow connection after its deadline (not before: they were all open above).
        answers: list[bytes] = []
        for sock in slow:
            sock.settimeout(max(0.1, opened + 3.0 + 10.0 - time.monotonic()))
            data = b""
            try:
                while chunk := sock.recv(4096):  # b"" = closed by the server; socket.timeout fails the test
                    data += chunk
            except ConnectionResetError:  # closed by the server too (a reset instead of a FIN)
                pass
            answers.append(data)
        assert time.monotonic() - opened < 3.0 + 10.0
        header_answers = [a for i, a in enumerate(answers) if i % 3 != 2]
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in header_answers), {a[:40] for a in header_answers}
        assert all(a == b"" for i, a in enumerate(answers) if i % 3 == 2)  # body too slow: closed, no answer
        metrics = httpx.get(url + "/metrics").text
        assert (
            f'site_activity_api_slow_clients_closed_total{{phase="headers"}} {2 * SLOW_CONNECTIONS // 3}.0' in metrics
        )
        assert f'site_activity_api_slow_clients_closed_total{{phase="body"}} {SLOW_CONNECTIONS // 3}.0' in metrics
    finally:
        for sock in slow:
            sock.close()


def test_a_trickled_body_is_cut_at_the_deadline_not_kept_alive_by_each_byte(
    settings: Settings, start_service: Callable[..., Service], make_widget: Callable[..., widgets.Widget]
) -> None:
    short = settings.model_copy(update={"http_header_timeout_s": 2.0, "http_body_timeout_s": 2.0})
    start_service("api", settings_override=short)
    w = make_widget()
    payload = json.dumps(body(w.id, [event("pageview")])).encode()
    with socket.create_connection(("127.0.0.1", short.http_port), timeout=10) as sock:
        sock.sendall(
            (
                f"POST {TRACK} HTTP/1.1\r\nhost: x\r\ncontent-type: text/plain\r\n"
                f"content-length: {len(payload)}\r\n\r\n"
            ).encode()
        )
        started = time.monotonic()
        closed_after = None
        for byte in payload:
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # reset by the server
                closed_after = time.monotonic() - started
                break
            time.sleep(0.25)
            if time.monotonic() - started > 8:
                break
        if closed_after is None:
            sock.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(4096) == b""
            closed_after = time.monotonic() - started
        assert 1.5 < closed_after < 5, closed_after
