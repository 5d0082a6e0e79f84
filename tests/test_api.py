"""The ingest API against a real broker and Postgres: `site-activity api` as a subprocess, driven over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import re
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from dev_stack.embedded import EmbeddedPostgres, free_port
from site_activity import widgets
from site_activity.settings import Settings
from site_activity.topics import Topics, event_key
from tests.conftest import iso, read_events

TRACK = "/api/widget/track"


# --- request builders ---------------------------------------------------------------------------
def now() -> datetime:
    return datetime.now(UTC)


def pageview(**fields: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "type": "pageview",
        "occurred_at": iso(now()),
        "url": "https://shop.example/pricing",
        "referrer": "https://search.example/",
        **fields,
    }


def custom(name: str = "clicked_upgrade", **fields: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "type": "custom",
        "name": name,
        "occurred_at": iso(now()),
        "url": "https://shop.example/pricing",
        **fields,
    }


def identify(user_id: str = "u_88291", **fields: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "type": "identify",
        "user_id": user_id,
        "occurred_at": iso(now()),
        "url": "https://shop.example/account",
        **fields,
    }


def request_body(
    widget_id: uuid.UUID | str, events: list[Any], visitor_id: str = "v-1", **fields: Any
) -> dict[str, Any]:
    return {"widget_id": str(widget_id), "visitor_id": visitor_id, "sent_at": iso(now()), "events": events, **fields}


def props_of_size(size: int, char: str = "x") -> dict[str, str]:
    """An object whose compact JSON is exactly `size` UTF-8 bytes ({"k":"..."} is 8 bytes of overhead)."""
    width = len(char.encode())
    body = size - 8
    value = char * (body // width) + "y" * (body % width)
    doc = {"k": value}
    assert len(json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()) == size
    return doc


def decoded(settings: Settings, expected: int, timeout: float = 20.0) -> list[tuple[bytes | None, dict[str, Any]]]:
    return read_events(settings, Topics.from_settings(settings).raw_events, expected, timeout)


def assert_error(resp: httpx.Response, status: int, error: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["error"] and (error is None or body["error"] == error), body
    return body


@pytest.fixture
def api(start_service: Callable[..., Any], api_url: str) -> Iterator[httpx.Client]:
    start_service("api")
    with httpx.Client(base_url=api_url, timeout=15) as client:
        yield client


# --- the happy path ---------------------------------------------------------------------------------
def test_valid_request_lands_on_raw_topic_with_server_fields(
    api: httpx.Client, settings: Settings, make_widget: Callable[..., widgets.Widget]
) -> None:
    widget = make_widget()
    sent = now()
    hour = timedelta(hours=1)
    # The client clock runs an hour fast: its sent_at and occurred_at are both an hour ahead.
    events = [
        pageview(occurred_at=iso(sent + hour - timedelta(seconds=30))),
        custom(
            "clicked_upgrade",
            properties={"plan": "growth", "seats": 5, "nested": {"a": [1, "é"]}},
            occurred_at=iso(sent + hour - timedelta(seconds=10)),
        ),
        identify("u_88291", traits={"email": "ada@example.com", "plan": "pro"}, occurred_at=iso(sent + hour + hour)),
    ]
    spoofed = {
        "tenant_id": str(uuid.uuid4()),
        "customer_id": str(uuid.uuid4()),
        "session_id": str(uuid.uuid4()),
        "received_at": "2000-01-01T00:00:00Z",
    }
    for e in events:
        e.update(spoofed)
    payload = request_body(widget.id, events, visitor_id="visitor-42", sent_at=iso(sent + hour), **spoofed)

    before = now()
    resp = api.post(TRACK, json=payload)
    after = now()
    assert resp.status_code == 204, resp.text

    records = decoded(settings, 3)
    assert len(records) == 3
    by_id = {str(r["event_id"]): (key, r) for key, r in records}
    for e in events:
        key, r = by_id[e["event_id"]]
        assert key == event_key(str(widget.id), "visitor-42")
        assert r["widget_id"] == widget.id
        assert r["tenant_id"] == widget.tenant_id  # from the database, not the spoofed body value
        assert r["visitor_id"] == "visitor-42"
        assert r["customer_id"] is None and r["session_id"] is None
        assert before - timedelta(seconds=1) <= r["received_at"] <= after + timedelta(seconds=1)
        assert r["event_type"] == e["type"]
        assert r["url"] == e["url"]

    pv = by_id[events[0]["event_id"]][1]
    assert pv["referrer"] == "https://search.example/"
    assert pv["name"] is None and pv["user_id"] is None and json.loads(pv["properties"]) == {}
    # 30 s old on the client's clock -> 30 s before it was received, whatever the client's clock says.
    assert abs((pv["received_at"] - pv["occurred_at"]).total_seconds() - 30) < 0.5

    cu = by_id[events[1]["event_id"]][1]
    assert cu["name"] == "clicked_upgrade"
    assert json.loads(cu["properties"]) == {"plan": "growth", "seats": 5, "nested": {"a": [1, "é"]}}
    assert abs((cu["received_at"] - cu["occurred_at"]).total_seconds() - 10) < 0.5

    idf = by_id[events[2]["event_id"]][1]
    assert idf["user_id"] == "u_88291" and idf["name"] is None
    assert json.loads(idf["properties"]) == {"email": "ada@example.com", "plan": "pro"}
    assert idf["occurred_at"] == idf["received_at"]  # in the future even on the client's clock: clamped


# --- bad input, at the boundaries ---------------------------------------------------------------------
ACCEPTED_EVENTS: list[tuple[str, Callable[[], dict[str, Any]]]] = [
    ("name of 100 ASCII characters", lambda: custom("a" * 100)),
    ("name of 100 x 'é' (200 bytes)", lambda: custom("é" * 100)),
    ("name of 100 emoji (code points)", lambda: custom("😀" * 100)),
    ("properties of exactly 4096 bytes", lambda: custom(properties=props_of_size(4096))),
    ("properties of 4096 bytes of 2-byte chars", lambda: custom(properties=props_of_size(4096, "é"))),
    ("properties of 4096 bytes of 3-byte chars", lambda: custom(properties=props_of_size(4096, "€"))),
    ("traits of exactly 4096 bytes", lambda: identify(traits=props_of_size(4096))),
    ("properties null", lambda: custom(properties=None)),
    ("identify without traits", lambda: identify()),
    ("url and referrer null", lambda: pageview(url=None, referrer=None)),
]

REJECTED_EVENTS: list[tuple[str, Callable[[], Any], str]] = [
    ("name of 101 ASCII characters", lambda: custom("a" * 101), "name must be at most 100 characters"),
    ("name of 101 x 'é'", lambda: custom("é" * 101), "name must be at most 100 characters"),
    ("name of 101 emoji", lambda: custom("😀" * 101), "name must be at most 100 characters"),
    ("name missing", lambda: {k: v for k, v in custom().items() if k != "name"}, "name is required"),
    ("name empty", lambda: custom(""), "name must not be empty"),
    ("name a number", lambda: custom(5), "name must be a string"),  # type: ignore[arg-type]
    ("properties of 4097 bytes", lambda: custom(properties=props_of_size(4097)), "4097 bytes"),
    ("properties of 4097 bytes, multi-byte", lambda: custom(properties=props_of_size(4097, "é")), "4097 bytes"),
    ("properties 2100 x 'é' (2100 chars, 4208 bytes)", lambda: custom(properties={"k": "é" * 2100}), "4208 bytes"),
    ("traits of 4097 bytes", lambda: identify(traits=props_of_size(4097)), "traits is 4097 bytes"),
    ("properties a list", lambda: custom(properties=[1, 2]), "properties must be a JSON object"),
    ("properties a string", lambda: custom(properties="{}"), "properties must be a JSON object"),
    ("traits a list", lambda: identify(traits=["a"]), "traits must be a JSON object"),
    ("unknown type", lambda: pageview(type="click"), "unknown type"),
    ("client session_start", lambda: pageview(type="session_start"), "session_start"),
    ("type missing", lambda: {k: v for k, v in pageview().items() if k != "type"}, "type is required"),
    ("type a number", lambda: pageview(type=1), "type must be a string"),
    ("event_id missing", lambda: {k: v for k, v in pageview().items() if k != "event_id"}, "event_id is required"),
    ("event_id not a UUID", lambda: pageview(event_id="not-a-uuid"), "event_id must be a UUID"),
    ("event_id a number", lambda: pageview(event_id=12345), "event_id must be a UUID"),
    (
        "identify without user_id",
        lambda: {k: v for k, v in identify().items() if k != "user_id"},
        "user_id is required",
    ),
    ("user_id a number", lambda: identify(42), "user_id must be a string"),  # type: ignore[arg-type]
    ("user_id too long", lambda: identify("u" * 256), "user_id must be at most 255"),
    ("occurred_at not ISO-8601", lambda: pageview(occurred_at="yesterday"), "occurred_at must be an ISO-8601"),
    ("occurred_at a number", lambda: pageview(occurred_at=1732435200000), "occurred_at must be an ISO-8601"),
    (
        "occurred_at missing",
        lambda: {k: v for k, v in pageview().items() if k != "occurred_at"},
        "occurred_at is required",
    ),
    ("url a number", lambda: pageview(url=7), "url must be a string"),
    ("url too long", lambda: pageview(url="https://x.example/" + "a" * 2100), "url must be at most 2048"),
    ("referrer an object", lambda: pageview(referrer={}), "referrer must be a string"),
    ("NUL in name", lambda: custom("a\x00b"), "NUL"),
    ("NUL in properties", lambda: custom(properties={"k": "a\x00"}), "NUL"),
    ("event a string", lambda: "pageview", "event must be a JSON object"),
]


def test_each_event_rule_at_its_boundary(
    api: httpx.Client, settings: Settings, make_widget: Callable[..., widgets.Widget]
) -> None:
    widget = make_widget()
    published: set[str] = set()
    for label, make in ACCEPTED_EVENTS:
        event = make()
        resp = api.post(TRACK, json=request_body(widget.id, [event]))
        assert resp.status_code == 204, f"{label}: {resp.status_code} {resp.text}"
        published.add(event["event_id"])
    for label, make, reason in REJECTED_EVENTS:
        resp = api.post(TRACK, json=request_body(widget.id, [make()]))
        body = assert_error(resp, 400, "invalid_events")
        assert body["accepted"] == 0, label
        assert [r["index"] for r in body["rejected"]] == [0], f"{label}: {body}"
        assert reason in body["rejected"][0]["reason"], f"{label}: {body['rejected'][0]['reason']!r}"

    # Exactly the accepted events reached Kafka, byte-exact where it matters.
    records = decoded(settings, len(published) + 1, timeout=3)
    assert {str(r["event_id"]) for _, r in records} == published
    names = [r["name"] for _, r in records if r["name"] and len(r["name"]) == 100]
    assert sorted(names) == sorted(["a" * 100, "é" * 100, "😀" * 100])


ENVELOPE_ERRORS: list[tuple[str, Callable[[str], bytes], str, str]] = [
    ("truncated JSON", lambda w: b'{"widget_id": "' + w.encode() + b'", "events": [', "malformed_json", "valid JSON"),
    ("not JSON at all", lambda w: b"hello", "malformed_json", "valid JSON"),
    ("JSON array body", lambda w: b"[]", "invalid_request", "body must be a JSON object"),
    (
        "widget_id missing",
        lambda w: json.dumps({"visitor_id": "v", "sent_at": iso(now()), "events": []}).encode(),
        "invalid_request",
        "widget_id is required",
    ),
    (
        "widget_id not a UUID",
        lambda w: json.dumps(request_body("widget-7", [])).encode(),
        "invalid_request",
        "widget_id must be a UUID",
    ),
    (
        "visitor_id empty",
        lambda w: json.dumps(request_body(w, [], visitor_id="")).encode(),
        "invalid_request",
        "visitor_id must not be empty",
    ),
    (
        "visitor_id a number",
        lambda w: json.dumps({**request_body(w, []), "visitor_id": 5}).encode(),
        "invalid_request",
        "visitor_id must be a string",
    ),
    (
        "visitor_id too long",
        lambda w: json.dumps(request_body(w, [], visitor_id="v" * 129)).encode(),
        "invalid_request",
        "visitor_id must be at most 128",
    ),
    (
        "sent_at missing",
        lambda w: json.dumps({k: v for k, v in request_body(w, []).items() if k != "sent_at"}).encode(),
        "invalid_request",
        "sent_at is required",
    ),
    (
        "sent_at garbage",
        lambda w: json.dumps(request_body(w, [], sent_at="soon")).encode(),
        "invalid_request",
        "sent_at must be an ISO-8601",
    ),
    (
        "events an object",
        lambda w: json.dumps({**request_body(w, []), "events": {"0": pageview()}}).encode(),
        "invalid_request",
        "events must be an array",
    ),
    (
        "events missing",
        lambda w: json.dumps({k: v for k, v in request_body(w, []).items() if k != "events"}).encode(),
        "invalid_request",
        "events must be an array",
    ),
]


def test_envelope_errors_are_400_and_publish_nothing(
    api: httpx.Client, settings: Settings, make_widget: Callable[..., widgets.Widget]
) -> None:
    widget = make_widget()
    for label, make, error, reason in ENVELOPE_ERRORS:
        resp = api.post(TRACK, content=make(str(widget.id)), headers={"content-type": "application/json"})
        body = assert_error(resp, 400, error)
        assert reason in body["reason"], f"{label}: {body}"
    # A bad envelope with valid-looking events inside: nothing of it may be published.
    resp = api.post(TRACK, json={**request_body(widget.id, [pageview()]), "sent_at": 12})
    assert_error(resp, 400, "invalid_request")
    assert decoded(settings, 1, timeout=3) == []


def test_mixed_request_publishes_the_valid_events_and_names_the_bad_ones(
    api: httpx.Client, settings: Settings, make_widget: Callable[..., widgets.Widget]
) -> None:
    widget = make_widget()
    events = [
        pageview(),
        custom("a" * 101),
        identify(),
        pageview(type="session_start"),
        custom(properties=[1]),
        custom("ok"),
    ]
    resp = api.post(TRACK, json=request_body(widget.id, events))
    body = assert_error(resp, 400, "invalid_events")
    assert body["accepted"] == 3
    assert [r["index"] for r in body["rejected"]] == [1, 3, 4]
    assert all(r["reason"] for r in body["rejected"])
    records = decoded(settings, 4, timeout=3)
    assert {str(r["event_id"]) for _, r in records} == {events[i]["event_id"] for i in (0, 2, 5)}


# --- request limits and encodings ---------------------------------------------------------------------
def padded(payload: dict[str, Any], size: int) -> bytes:
    """The JSON of payload, padded with trailing whitespace to exactly `size` bytes."""
    raw = json.dumps(payload).encode()
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


def test_limits_encodings_and_content_types(
    api: httpx.Client, settings: Settings, make_widget: Callable[..., widgets.Widget]
) -> None:
    widget = make_widget()
    limit = settings.max_body_bytes
    json_type = {"content-type": "application/json"}
    gzip_json = {**json_type, "content-encoding": "gzip"}
    published: list[dict[str, Any]] = []

    def ok(resp: httpx.Response, events: list[dict[str, Any]]) -> None:
        assert resp.status_code == 204, resp.text
        published.extend(events)

    events = [pageview() for _ in range(settings.max_events_per_request)]
    ok(api.post(TRACK, json=request_body(widget.id, events)), events)
    body = assert_error(
        api.post(TRACK, json=request_body(widget.id, [pageview() for _ in range(101)])), 413, "too_many_events"
    )
    assert "101" in body["reason"]

    # Body size: exactly the limit is fine, one byte more is not (declared or streamed, plain or gzipped).
    events = [pageview()]
    ok(api.post(TRACK, content=padded(request_body(widget.id, events), limit), headers=json_type), events)
    assert_error(
        api.post(TRACK, content=padded(request_body(widget.id, [pageview()]), limit + 1), headers=json_type),
        413,
        "body_too_large",
    )
    big = padded(request_body(widget.id, [pageview()]), 600 * 1024)
    assert_error(
        api.post(TRACK, content=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]), headers=json_type),
        413,
        "body_too_large",
    )  # chunked: no Content-Length to trust
    events = [pageview()]
    ok(
        api.post(TRACK, content=gzip.compress(padded(request_body(widget.id, events), limit)), headers=gzip_json),
        events,
    )
    assert_error(
        api.post(
            TRACK, content=gzip.compress(padded(request_body(widget.id, [pageview()]), limit + 1)), headers=gzip_json
        ),
        413,
        "body_too_large",
    )

    # gzip and text/plain (what the widget sends to avoid a preflight) work.
    events = [pageview(), custom()]
    ok(
        api.post(TRACK, content=gzip.compress(json.dumps(request_body(widget.id, events)).encode()), headers=gzip_json),
        events,
    )
    events = [identify()]
    ok(
        api.post(
            TRACK,
            content=json.dumps(request_body(widget.id, events)),
            headers={"content-type": "text/plain;charset=UTF-8"},
        ),
        events,
    )
    assert_error(api.post(TRACK, content=b"\x1f\x8b\x08\x00garbage", headers=gzip_json), 400, "malformed_body")
    assert_error(api.post(TRACK, content=gzip.compress(b'{"a": 1}')[:-6], headers=gzip_json), 400, "malformed_body")
    assert_error(
        api.post(
            TRACK,
            content=json.dumps(request_body(widget.id, [pageview()])),
            headers={"content-type": "application/x-www-form-urlencoded"},
        ),
        415,
    )
    assert_error(api.post(TRACK, content=b"{}", headers={**json_type, "content-encoding": "br"}), 415)

    records = decoded(settings, len(published) + 1, timeout=3)
    assert sorted(str(r["event_id"]) for _, r in records) == sorted(e["event_id"] for e in published)


def rss_peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_gzip_bomb_is_refused_quickly_without_inflating_it(
    start_service: Callable[..., Any], api_url: str, make_widget: Callable[..., widgets.Widget]
) -> None:
    service = start_service("api")
    widget = make_widget()
    head = json.dumps(request_body(widget.id, [pageview()]))[:-1].encode() + b', "pad": "'
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    parts = [compressor.compress(head)]
    zeros = b"0" * (1 << 20)
    parts += [compressor.compress(zeros) for _ in range(400)]  # 400 MB once inflated
    bomb = b"".join(parts) + compressor.flush()
    assert len(bomb) < 512 * 1024  # small enough to pass the compressed-size check

    peak_before = rss_peak_kb(service.pid)
    started = time.monotonic()
    resp = httpx.post(
        api_url + TRACK,
        content=bomb,
        timeout=15,
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    elapsed = time.monotonic() - started
    assert_error(resp, 413, "body_too_large")
    assert elapsed < 2, elapsed
    assert rss_peak_kb(service.pid) - peak_before < 50 * 1024  # far below the 400 MB it would inflate to


def test_no_422_for_any_garbage(api: httpx.Client, make_widget: Callable[..., widgets.Widget]) -> None:
    widget = make_widget()
    bodies = [
        b"",
        b"null",
        b"0",
        b'"x"',
        b"{}",
        b'{"events": null}',
        json.dumps(request_body(widget.id, [None])).encode(),
        json.dumps(request_body(widget.id, [[]])).encode(),
        b"\xff\xfe",
        b'{"widget_id": "\\ud800"}',
    ]
    for raw in bodies:
        resp = api.post(TRACK, content=raw, headers={"content-type": "application/json"})
        assert resp.status_code == 400, (raw, resp.status_code, resp.text)
        assert resp.json()["error"], raw
    assert api.post(TRACK + "?x=1", content=b"[]").status_code == 400


# --- widget configs -----------------------------------------------------------------------------------
def test_disabled_widget_drops_silently_until_enabled(
    api: httpx.Client, settings: Settings, db: psycopg.Connection, make_widget: Callable[..., widgets.Widget]
) -> None:
    widget = make_widget(enabled=False)
    dropped = pageview()
    assert api.post(TRACK, json=request_body(widget.id, [dropped, custom()])).status_code == 204

    widgets.set_tracking(db, widget.id, True, actor="tests")
    flipped = time.monotonic()
    sent: list[str] = []
    while 'site_activity_api_events_total{outcome="accepted"} 0.0' in api.get("/metrics").text:
        # Every post answers 204 either way; the accepted-events counter shows when the flip took effect.
        assert time.monotonic() - flipped < 5, "enabling tracking took more than 5 s to take effect"
        event = pageview()
        assert api.post(TRACK, json=request_body(widget.id, [event])).status_code == 204
        sent.append(event["event_id"])
        time.sleep(0.1)

    # Read exactly as many as the API accepted (waiting for them, not for a fixed time: a consumer joining a
    # real broker's group can take seconds on a loaded machine).
    accepted = re.search(r'site_activity_api_events_total\{outcome="accepted"\} (\S+)', api.get("/metrics").text)
    assert accepted is not None
    records = decoded(settings, int(float(accepted.group(1))))
    ids = {str(r["event_id"]) for _, r in records}
    assert len(ids) == int(float(accepted.group(1)))
    assert dropped["event_id"] not in ids
    assert ids and ids <= set(sent) and sent[-1] in ids
    # Posts before the flip reached the cache were dropped too: 2 + those never published.
    dropped_count = 2 + len(sent) - len(ids)
    metrics = api.get("/metrics").text
    assert f'site_activity_api_events_total{{outcome="dropped_disabled"}} {dropped_count:.1f}' in metrics


def reloads(api: httpx.Client) -> float:
    for line in api.get("/metrics").text.splitlines():
        if line.startswith('site_activity_api_widget_cache_reloads_total{outcome="ok"}'):
            return float(line.split()[-1])
    raise AssertionError("no reload counter")


def test_unknown_widgets_are_404_without_hammering_postgres(
    start_service: Callable[..., Any], settings: Settings, make_widget: Callable[..., widgets.Widget]
) -> None:
    # A long periodic refresh, so that every reload seen here was pulled forward by a cache miss.
    slow = settings.model_copy(update={"widget_cache_refresh_s": 30.0})
    start_service("api", settings_override=slow)
    with httpx.Client(base_url=f"http://127.0.0.1:{slow.http_port}", timeout=10) as api:
        before = reloads(api)
        body = assert_error(api.post(TRACK, json=request_body(uuid.uuid4(), [pageview()])), 404, "unknown_widget")
        assert "no widget" in body["reason"]

        async def flood() -> list[int]:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{slow.http_port}", timeout=10) as client:
                resps = await asyncio.gather(
                    *(client.post(TRACK, json=request_body(uuid.uuid4(), [pageview()])) for _ in range(50))
                )
            return [r.status_code for r in resps]

        started = time.monotonic()
        assert asyncio.run(flood()) == [404] * 50
        elapsed = time.monotonic() - started
        # 50 garbage ids at once share reloads (at most one per 0.5 s), not one query each.
        assert reloads(api) - before <= 2 + elapsed / 0.5, (reloads(api) - before, elapsed)

        # Widgets created after the API started are found on their first request, even back to back.
        fresh = [make_widget() for _ in range(3)]
        events = [pageview() for _ in fresh]
        for widget, event in zip(fresh, events, strict=True):
            assert api.post(TRACK, json=request_body(widget.id, [event])).status_code == 204
    records = decoded(slow, 3)
    assert sorted(str(r["event_id"]) for _, r in records) == sorted(e["event_id"] for e in events)


# --- dependencies down ----------------------------------------------------------------------------------
def test_broker_unreachable_is_503_with_retry_after(
    start_service: Callable[..., Any], settings: Settings, make_widget: Callable[..., widgets.Widget]
) -> None:
    dead = settings.model_copy(
        update={"kafka_bootstrap": f"127.0.0.1:{free_port()}", "produce_timeout_s": 1.0, "retry_after_s": 7}
    )
    start_service("api", settings_override=dead)
    widget = make_widget()
    url = f"http://127.0.0.1:{dead.http_port}"
    started = time.monotonic()
    resp = httpx.post(url + TRACK, json=request_body(widget.id, [pageview(), custom()]), timeout=10)
    body = assert_error(resp, 503, "kafka_unavailable")
    assert resp.headers["retry-after"] == "7"
    assert time.monotonic() - started < 4
    assert "confirm" in body["reason"]

    ready = httpx.get(url + "/readyz", timeout=10)
    assert ready.status_code == 503
    assert ready.json()["kafka"]["ok"] is False and ready.json()["postgres"]["ok"] is True
    assert httpx.get(url + "/healthz").status_code == 200
    # One request is one Kafka message (its events travel as one VisitorEventBatch).
    assert 'site_activity_api_produce_failures_total{reason="timeout"} 1.0' in httpx.get(url + "/metrics").text


def test_postgres_unreachable_at_start(start_service: Callable[..., Any], settings: Settings) -> None:
    dead = settings.model_copy(update={"postgres_dsn": f"postgresql://postgres@127.0.0.1:{free_port()}/x"})
    start_service("api", settings_override=dead)
    url = f"http://127.0.0.1:{dead.http_port}"
    resp = httpx.post(url + TRACK, json=request_body(uuid.uuid4(), [pageview()]), timeout=10)
    assert_error(resp, 503, "widget_config_unavailable")
    assert resp.headers["retry-after"] == str(dead.retry_after_s)
    ready = httpx.get(url + "/readyz", timeout=10)
    # Never loaded a widget config: it cannot tell which widgets exist, so it cannot accept events.
    assert ready.status_code == 503
    assert ready.json()["postgres"]["ok"] is False and ready.json()["kafka"]["ok"] is True
    assert ready.json()["widget_cache"]["ok"] is False


class TcpProxy:
    """Forwards 127.0.0.1:port to a real server; stop() cuts every connection, like a network partition."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target = target_port
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None

    def start(self) -> TcpProxy:
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self._target))
                self._sockets += [client, upstream]
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        for sock in [self._listener, *self._sockets]:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self._sockets.clear()


def test_postgres_outage_keeps_serving_cached_configs(
    start_service: Callable[..., Any],
    settings: Settings,
    postgres: EmbeddedPostgres,
    make_widget: Callable[..., widgets.Widget],
) -> None:
    proxy = TcpProxy(postgres.port).start()
    via_proxy = settings.model_copy(
        update={"postgres_dsn": postgres.dsn.replace(f":{postgres.port}/", f":{proxy.port}/")}
    )
    assert via_proxy.postgres_dsn != settings.postgres_dsn
    widget = make_widget()
    start_service("api", settings_override=via_proxy)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{via_proxy.http_port}", timeout=15) as api:
            assert api.post(TRACK, json=request_body(widget.id, [pageview()])).status_code == 204
            proxy.stop()
            deadline = time.monotonic() + 10
            while api.get("/readyz").json()["postgres"]["ok"]:
                assert time.monotonic() < deadline, "readyz never noticed Postgres was gone"
                time.sleep(0.2)
            # Reported, not gating: this replica can still accept and durably write events (issue 8, case 14).
            ready = api.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["status"] == "ready" and ready.json()["postgres"]["ok"] is False
            assert ready.json()["kafka"]["ok"] is True and ready.json()["widget_cache"]["ok"] is True
            # Known widgets keep working from the cache; unknown ones cannot be decided: retry later.
            assert api.post(TRACK, json=request_body(widget.id, [pageview()])).status_code == 204
            resp = api.post(TRACK, json=request_body(uuid.uuid4(), [pageview()]))
            assert_error(resp, 503, "widget_config_unavailable")
            assert "retry-after" in resp.headers

            proxy.start()
            deadline = time.monotonic() + 15
            while not api.get("/readyz").json()["postgres"]["ok"]:
                assert time.monotonic() < deadline, "readyz never saw Postgres come back"
                time.sleep(0.2)
            assert api.get("/readyz").status_code == 200
            assert_error(api.post(TRACK, json=request_body(uuid.uuid4(), [pageview()])), 404, "unknown_widget")
    finally:
        proxy.stop()


# --- CORS, probes, script ----------------------------------------------------------------------------
def test_cors_preflight_and_error_responses(api: httpx.Client, make_widget: Callable[..., widgets.Widget]) -> None:
    origin = {"origin": "https://customer-site.example"}
    pre = api.options(
        TRACK,
        headers={
            **origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, content-encoding",
        },
    )
    assert pre.status_code == 200, pre.text
    assert pre.headers["access-control-allow-origin"] == "*"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "content-encoding" in pre.headers["access-control-allow-headers"].lower()

    widget = make_widget()
    for resp, status in [
        (api.post(TRACK, json=request_body(widget.id, [pageview()]), headers=origin), 204),
        (api.post(TRACK, json=request_body(widget.id, [custom("a" * 101)]), headers=origin), 400),
        (api.post(TRACK, json=request_body(uuid.uuid4(), [pageview()]), headers=origin), 404),
        (api.post(TRACK, content=b"{", headers={**origin, "content-type": "text/plain"}), 400),
        (api.post(TRACK, json=request_body(widget.id, [pageview() for _ in range(101)]), headers=origin), 413),
    ]:
        assert resp.status_code == status, resp.text
        assert resp.headers["access-control-allow-origin"] == "*", (status, dict(resp.headers))
    assert "retry-after" in api.post(TRACK, json={}, headers=origin).headers["access-control-expose-headers"].lower()


def test_probes_and_metrics(api: httpx.Client, make_widget: Callable[..., widgets.Widget]) -> None:
    assert api.get("/healthz").status_code == 200
    ready = api.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["kafka"]["ok"] and ready.json()["postgres"]["ok"] and ready.json()["widget_cache"]["ok"]

    widget = make_widget()
    assert api.post(TRACK, json=request_body(widget.id, [pageview(), custom(), identify()])).status_code == 204
    assert api.post(TRACK, json=request_body(widget.id, [pageview(), custom("")])).status_code == 400
    metrics = api.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'site_activity_api_requests_total{path="/api/widget/track",status="204"} 1.0' in text
    assert 'site_activity_api_requests_total{path="/api/widget/track",status="400"} 1.0' in text
    assert 'site_activity_api_events_total{outcome="accepted"} 4.0' in text
    assert 'site_activity_api_events_total{outcome="rejected"} 1.0' in text
    assert 'site_activity_api_request_seconds_count{path="/api/widget/track"} 2.0' in text
    assert "site_activity_api_produce_failures_total" in text


def test_widget_script_is_served_with_etag_and_gzip(api: httpx.Client) -> None:
    from widget.assets import widget_script

    script = widget_script()
    plain = api.get("/widget.js", headers={"accept-encoding": "identity"})
    assert plain.status_code == 200
    assert plain.headers["content-type"] == "application/javascript; charset=utf-8"
    assert plain.headers["cache-control"] == "public, max-age=300"
    assert plain.headers["access-control-allow-origin"] == "*"
    assert plain.headers["etag"] == script.etag
    assert plain.content == script.body
    assert "content-encoding" not in plain.headers

    zipped = api.get("/widget.js", headers={"accept-encoding": "gzip, br"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.content == script.body  # httpx inflates it
    assert int(zipped.headers["content-length"]) < len(script.body)

    for etag, encoding in [(plain.headers["etag"], "identity"), (zipped.headers["etag"], "gzip")]:
        again = api.get("/widget.js", headers={"if-none-match": etag, "accept-encoding": encoding})
        assert again.status_code == 304 and again.content == b""
        assert again.headers["etag"] == etag
    assert api.get("/widget.js", headers={"if-none-match": '"stale"'}).status_code == 200
    head = api.head("/widget.js", headers={"accept-encoding": "identity"})
    assert head.status_code == 200 and head.content == b"" and head.headers["etag"] == script.etag


def test_a_shuffled_request_is_published_in_event_time_order(
    api: httpx.Client, settings: Settings, make_widget: Callable[..., widgets.Widget]
) -> None:
    w = make_widget()
    base = now() - timedelta(minutes=10)
    events = [
        pageview(occurred_at=iso(base + timedelta(seconds=s)), url=f"https://shop.example/{s}")
        for s in (40, 5, 300, 0, 61)
    ]
    assert api.post("/api/widget/track", json=request_body(w.id, events)).status_code == 204
    urls = [record["url"] for _, record in decoded(settings, len(events))]
    assert urls == [f"https://shop.example/{s}" for s in (0, 5, 40, 61, 300)]


def test_unpaired_surrogates_cost_only_their_event(
    api: httpx.Client, settings: Settings, make_widget: Callable[..., widgets.Widget]
) -> None:
    """JSON.stringify turns a broken JS string into a lone "\\ud800" escape: valid JSON, invalid Unicode."""
    w = make_widget()
    good = custom(properties={"plan": "growth"})
    broken = custom(properties={"s": "PLACEHOLDER"})
    body = json.dumps(request_body(w.id, [good, broken])).replace("PLACEHOLDER", "\\ud800")
    resp = api.post("/api/widget/track", content=body, headers={"Content-Type": "text/plain"})
    rejected = assert_error(resp, 400, "invalid_events")["rejected"]
    assert [r["index"] for r in rejected] == [1] and "surrogate" in rejected[0]["reason"]
    assert [record["event_id"] for _, record in decoded(settings, 1)] == [uuid.UUID(good["event_id"])]
    bad_visitor = json.dumps(request_body(w.id, [pageview()], visitor_id="PLACEHOLDER")).replace(
        "PLACEHOLDER", "\\udfff"
    )
    assert_error(api.post("/api/widget/track", content=bad_visitor), 400, "invalid_request")
