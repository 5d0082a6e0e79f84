"""Issue 8, ingest cases: what the API accepts must be storable, what it cannot store is refused up front with
a reason, and nothing a client sends gets a 5xx. Each test drives the real `site-activity api` (and, where
the outcome is a row, the sink or the processors + sink) over HTTP."""

from __future__ import annotations

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

from producer_api.validation import PLACEHOLDER_USER_IDS, Limits, is_placeholder_user_id
from site_activity import widgets
from site_activity.settings import Settings
from site_activity.topics import Topics
from tests.conftest import Service, iso, read_topic, wait_for_rows

TRACK = "/api/widget/track"
LIMITS = Limits.from_settings(Settings())  # the defaults the API runs with in these tests


def now() -> datetime:
    return datetime.now(UTC)


def event(kind: str = "custom", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"event_id": str(uuid.uuid4()), "type": kind, "occurred_at": iso(now()),
                            "url": "https://shop.example/pricing"}
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
    rows = db.execute("SELECT event_id::text, properties::text FROM visitor_events WHERE event_id = ANY(%s)",
                      ([uuid.UUID(e) for e in event_ids],)).fetchall()
    return {event_id: exact(props) for event_id, props in rows}


@pytest.fixture
def raw_pipeline(settings: Settings, start_service: Callable[..., Service]) -> Settings:
    """API + sink reading the raw topic."""
    raw = settings.model_copy(update={"sink_from_enriched": False})
    start_service("api")
    start_service("sink", settings_override=raw)
    return raw


def post(api_url: str, payload: str | bytes) -> httpx.Response:
    return httpx.post(api_url + TRACK, content=payload, headers={"content-type": "text/plain"}, timeout=15)


# --- case 1: numbers a double would change, values jsonb refuses -------------------------------------------
def test_numbers_that_would_change_are_refused_per_event_and_the_rest_land_unchanged(
        raw_pipeline: Settings, api_url: str, db: psycopg.Connection,
        make_widget: Callable[..., widgets.Widget]) -> None:
    w = make_widget()
    # (number text, accepted?) — the text goes into the body verbatim, as Python's json.dumps or a hand-written
    # client would send it. Accepted: whatever a double reads back as the same value.
    numbers = [
        ("NaN", False), ("Infinity", False), ("-Infinity", False), ("1e400", False), ("-1e400", False),
        ("1e-400", False), ("9007199254740993", False), ("123456789012345678901234567890", False),
        ("0.30000000000000001", False), ("18446744073709551616", False), ("1" + "0" * 5000, False),
        ("0", True), ("-0", True), ("-0.0", True), ("1.5", True), ("0.1", True), ("1E2", True),
        ("9007199254740991", True), ("9007199254740992", True), ("9007199254740994", True),
        ("12345678901234567000", True), ("1e20", True), ("1.7976931348623157e308", True),
        ("5e-324", True), ("2.2250738585072014e-308", True), ("0.30000000000000004", True),
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
        raw_pipeline: Settings, api_url: str, db: psycopg.Connection,
        make_widget: Callable[..., widgets.Widget]) -> None:
    w = make_widget()
    good = event(properties={"k": "é😀", "list": ["a", {"b": "c"}]})
    events = [
        good,
        event(properties={"a\u0000b": 1}),                      # NUL in a key
        event(properties={"deep": {"x": ["ok", "a\u0000"]}}),   # NUL nested in an array
        event("identify", traits={"t": {"PLACEHOLDER": 1}}),    # lone surrogate in a nested key
        event(properties={"s": ["PLACEHOLDER"]}),               # lone surrogate nested in an array
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
        raw_pipeline: Settings, api_url: str, db: psycopg.Connection,
        make_widget: Callable[..., widgets.Widget]) -> None:
    w = make_widget()
    depth = LIMITS.max_depth
    valid = event(properties={"plan": "growth"})
    at_limit = event(properties={"tree": nested(depth - 1)})  # properties itself is level 1
    events = [valid, event(properties={"tree": "@2000@"}), event(properties={"tree": "@990@"}),
              event("identify", traits={"tree": "@1023@"}), event(properties={"tree": nested(depth)}),
              at_limit, "@5000@", event("pageview", extra="@3000@")]
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
    for raw in (nested_json(200_000), "[" * 200_000, '{"events":' + "[" * 100_000 + "1,]" + "]" * 99_999 + "}",
                json.dumps(body(w.id, [])).replace("[]", nested_json(100_000))):
        resp = post(api_url, raw)
        assert resp.status_code == 400, (raw[:30], resp.status_code, resp.text)
    assert httpx.get(api_url + "/healthz").status_code == 200


# --- case 3: field lengths and the derived message --------------------------------------------------------
def test_every_text_field_has_a_limit_in_characters(raw_pipeline: Settings, api_url: str,
                                                    make_widget: Callable[..., widgets.Widget]) -> None:
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
    for reason, field in zip(reasons, ["url", "referrer", "properties", "properties.a", "user_id", "name"],
                             strict=True):
        assert reason.startswith(field) and ("at most" in reason), reason
    resp = httpx.post(api_url + TRACK, json=body(w.id, [event("pageview")],
                                                 visitor="😀" * (LIMITS.max_visitor_id_chars + 1)))
    assert resp.status_code == 400 and "visitor_id must be at most 128" in resp.json()["reason"]


def worst_case_request(widget_id: uuid.UUID, visitor: str, count: int, start: datetime) -> dict[str, Any]:
    """`count` pageviews 31 minutes apart (each opens a session), with the longest 4-byte-character url and
    referrer, plus a custom event with full properties: the biggest enriched message per raw byte."""
    events = [event("pageview", occurred_at=iso(start + timedelta(minutes=31 * i)),
                    url="😀" * LIMITS.max_url_chars, referrer="😀" * LIMITS.max_referrer_chars)
              for i in range(count)]
    return body(widget_id, events, visitor=visitor)


def test_largest_request_fits_one_enriched_message_and_lands(
        settings: Settings, start_service: Callable[..., Service], api_url: str, db: psycopg.Connection,
        make_widget: Callable[..., widgets.Widget]) -> None:
    """The issue's request: a 128-emoji visitor id and ~62 pageviews 31 minutes apart with 2048-character
    non-ASCII urls and referrers. Over the raw message budget it is refused whole (413, nothing written,
    split it); the largest request that fits lands with all its session_starts, and the enriched message
    stays within the bound the budget is derived from."""
    start_service("api")
    start_service("processors")
    start_service("sink")
    w = make_widget()
    visitor = "😀" * LIMITS.max_visitor_id_chars
    start = now() - timedelta(days=3)
    too_big = worst_case_request(w.id, visitor, 62, start)
    too_big["events"] = [{**e, "url": "é" * 2048, "referrer": "é" * 2048} for e in too_big["events"]]
    raw_json = json.dumps(too_big, ensure_ascii=False).encode()
    assert 500_000 < len(raw_json) < settings.max_body_bytes
    resp = httpx.post(api_url + TRACK, content=raw_json, headers={"content-type": "text/plain"}, timeout=15)
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"] == "batch_too_large" and resp.json()["limit"] == LIMITS.max_raw_message_bytes

    # The most 4-byte-character pageviews one request can carry (each opens a session, so the enriched
    # message has a session_start copy of every url and referrer), found by bisection: 413 above it.
    fits, too_many, accepted_requests = 1, 64, 0
    while too_many - fits > 1:
        count = (fits + too_many) // 2
        probe_visitor = visitor[:-1] + chr(0x1F600 + count)  # another visitor, with an id as long in bytes
        resp = httpx.post(api_url + TRACK, json=worst_case_request(w.id, probe_visitor, count, start), timeout=15)
        assert resp.status_code in (204, 413), resp.text
        if resp.status_code == 204:
            fits, accepted_requests = count, accepted_requests + 1
        else:
            too_many = count
    assert 20 <= fits < 64
    biggest = worst_case_request(w.id, visitor, fits, start)
    assert httpx.post(api_url + TRACK, json=biggest, timeout=15).status_code == 204
    # ... and other visitors' small requests behind it land too.
    small = [body(w.id, [event("pageview")], visitor=f"other-{i}") for i in range(3)]
    for b in small:
        assert httpx.post(api_url + TRACK, json=b, timeout=15).status_code == 204

    ids = [e["event_id"] for e in biggest["events"]] + [b["events"][0]["event_id"] for b in small]
    rows = wait_for_rows(db, "SELECT event_id::text FROM visitor_events WHERE event_id = ANY(%s)",
                         ([uuid.UUID(i) for i in ids],), len(ids), timeout=60)
    assert len(rows) == len(ids)
    starts = db.execute("SELECT count(*) FROM visitor_events WHERE widget_id = %s AND visitor_id = %s "
                        "AND event_type = 'session_start'", (w.id, visitor)).fetchone()[0]
    assert starts == fits

    topics = Topics.from_settings(settings)
    messages = accepted_requests + 1 + len(small)
    raw_sizes = [len(m.value()) for m in read_topic(settings, topics.raw_events, messages)]
    enriched_sizes = [len(m.value()) for m in read_topic(settings, topics.enriched_events, messages)]
    assert len(raw_sizes) == len(enriched_sizes) == messages
    largest_raw = max(raw_sizes)
    assert largest_raw <= LIMITS.max_raw_message_bytes
    # The bound the budget rests on (LIMITS.max_raw_message_bytes): enriched <= 2 * raw + 148 per event.
    assert max(enriched_sizes) <= 2 * largest_raw + 148 * fits
    assert max(enriched_sizes) < 1_000_000


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
        settings: Settings, start_service: Callable[..., Service], api_url: str, db: psycopg.Connection,
        make_widget: Callable[..., widgets.Widget]) -> None:
    start_service("api")
    start_service("processors")
    start_service("sink")
    w = make_widget()
    ids = ["undefined", "undefined", "null", "[object Object]", "NULL", " None ", "   ", "NaN", "0", "false"]
    pageviews = []
    for i, user_id in enumerate(ids):
        pv = event("pageview", occurred_at=iso(now() - timedelta(seconds=5)))
        pageviews.append(pv)
        resp = httpx.post(api_url + TRACK, json=body(w.id, [pv, event("identify", user_id=user_id)],
                                                       visitor=f"visitor-{i}"), timeout=15)
        assert resp.status_code == 400, (user_id, resp.text)
        assert resp.json()["accepted"] == 1
        [rejected] = resp.json()["rejected"]
        assert rejected["index"] == 1 and "placeholder" in rejected["reason"], rejected
    # A real id still links, through the same processors: the refusals above are not a broken pipeline.
    real = event("identify", user_id="u_real")
    assert httpx.post(api_url + TRACK, json=body(w.id, [real], visitor="visitor-real")).status_code == 204

    rows = wait_for_rows(db, "SELECT event_id::text, customer_id FROM visitor_events WHERE widget_id = %s AND "
                             "event_type = 'pageview'", (w.id,), len(ids))
    assert sorted(event_id for event_id, _ in rows) == sorted(pv["event_id"] for pv in pageviews)
    assert all(customer is None for _, customer in rows), rows  # no contact, so none shared either
    wait_for_rows(db, "SELECT 1 FROM customers WHERE tenant_id = %s", (w.tenant_id,), 1)
    contacts = db.execute("SELECT external_id FROM customers WHERE tenant_id = %s", (w.tenant_id,)).fetchall()
    assert contacts == [("u_real",)]
    assert db.execute("SELECT count(*) FROM visitor_events WHERE widget_id = %s AND event_type = 'identify'",
                      (w.id,)).fetchone()[0] == 1


# --- case 12: slow clients --------------------------------------------------------------------------------------
SLOW_CONNECTIONS = 300


def test_slow_clients_are_cut_off_while_others_are_served(
        settings: Settings, start_service: Callable[..., Service], make_widget: Callable[..., widgets.Widget]) -> None:
    short = settings.model_copy(update={"http_header_timeout_s": 3.0, "http_body_timeout_s": 3.0})
    start_service("api", settings_override=short)
    url = f"http://127.0.0.1:{short.http_port}"
    w = make_widget()
    payload = json.dumps(body(w.id, [event("pageview")])).encode()
    partial_body = (f"POST {TRACK} HTTP/1.1\r\nhost: x\r\ncontent-type: text/plain\r\n"
                    f"content-length: {len(payload)}\r\n\r\n").encode() + payload[:20]
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
        assert f'site_activity_api_slow_clients_closed_total{{phase="headers"}} {2 * SLOW_CONNECTIONS // 3}.0' \
            in metrics
        assert f'site_activity_api_slow_clients_closed_total{{phase="body"}} {SLOW_CONNECTIONS // 3}.0' in metrics
    finally:
        for sock in slow:
            sock.close()


def test_a_trickled_body_is_cut_at_the_deadline_not_kept_alive_by_each_byte(
        settings: Settings, start_service: Callable[..., Service], make_widget: Callable[..., widgets.Widget]) -> None:
    short = settings.model_copy(update={"http_header_timeout_s": 2.0, "http_body_timeout_s": 2.0})
    start_service("api", settings_override=short)
    w = make_widget()
    payload = json.dumps(body(w.id, [event("pageview")])).encode()
    with socket.create_connection(("127.0.0.1", short.http_port), timeout=10) as sock:
        sock.sendall((f"POST {TRACK} HTTP/1.1\r\nhost: x\r\ncontent-type: text/plain\r\n"
                      f"content-length: {len(payload)}\r\n\r\n").encode())
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
            try:
                assert sock.recv(4096) == b""
            except ConnectionResetError:
                pass
            closed_after = time.monotonic() - started
        assert 1.5 < closed_after < 5, closed_after
