"""Property-based fuzzing of POST /api/widget/track against the real API, processors and sink (issue 8, case 2):
whatever the body, the answer is never a 5xx, and every event the API accepted (a 204, or counted in
`accepted` of a 400 invalid_events) becomes a row holding exactly the values that were sent."""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import psycopg
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from producer_api.json_body import Unfaithful, parse_body
from site_activity import widgets
from site_activity.settings import Settings
from tests.conftest import iso, wait_for_rows

TRACK = "/api/widget/track"

# Tokens the strategies put where JSON text must be spliced in after json.dumps (json.dumps cannot write
# these numbers or nest 3000 deep): "\u0001NUM:<text>\u0001" and "\u0001DEEP:<n>\u0001".
_SPLICE = re.compile(r'"\\u0001(NUM|DEEP):([^\\"]*)\\u0001"')
NEW_ID, NOW = "\u0001ID\u0001", "\u0001NOW\u0001"

NUMBER_TEXTS = [
    "1e400",
    "-1e400",
    "1e-400",
    "123456789012345678901234567890",
    "9007199254740993",
    "0.30000000000000001",
    "1E2",
    "-0",
    "5e-324",
    "12345678901234567000",
    "1.7976931348623157e308",
    "1" + "0" * 400,
    "0." + "0" * 30 + "1",
]
SPECIAL_STRINGS = [
    "\x00",
    "a\x00b",
    "\ud800",
    "x\udfff",
    "\ud83d\ude00",
    "😀",
    "é",
    "",
    " ",
    "undefined",
    "null",
    "[object Object]",
    "NaN",
    "0",
    "true",
    "\u2028",
    "\\",
    '"',
    "\ufeff",
]
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.just([]), st.just({}), st.sampled_from(SPECIAL_STRINGS)
)


def deep(n: int) -> str:
    return f"\u0001DEEP:{n}\u0001"


texts = st.one_of(
    st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=20),
    st.sampled_from(SPECIAL_STRINGS),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "😀", "\u0800"]), st.integers(0, 2100)),
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
    st.sampled_from(NUMBER_TEXTS).map(lambda t: f"\u0001NUM:{t}\u0001"),
    st.integers(0, 3000).map(deep),
)
json_values = st.recursive(
    leaves, lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(texts, kids, max_size=4)), max_leaves=12
)
objects = st.dictionaries(texts, json_values, max_size=5)

FIELDS = ["event_id", "type", "occurred_at", "name", "url", "referrer", "user_id", "properties", "traits", "extra"]


def sometimes(draw: st.DrawFn, in_ten: int) -> bool:
    return draw(st.integers(0, 9)) < in_ten


@st.composite
def events(draw: st.DrawFn) -> Any:
    """Mostly a well-formed event whose free-form parts (properties, traits, url, ...) are fuzzed; sometimes
    one field replaced by junk; sometimes not an event at all."""
    if sometimes(draw, 1):
        return draw(json_values)
    kind = draw(st.sampled_from(["pageview", "custom", "identify"]))
    e: dict[str, Any] = {"event_id": NEW_ID, "type": kind, "occurred_at": NOW}
    if sometimes(draw, 5):
        e["url"] = draw(texts)
    if sometimes(draw, 3):
        e["referrer"] = draw(texts)
    if kind == "custom":
        e["name"] = draw(st.one_of(st.just("clicked"), texts))
        e["properties"] = draw(objects)
    elif kind == "identify":
        e["user_id"] = draw(st.one_of(st.just("u_1"), texts))
        e["traits"] = draw(objects)
    if sometimes(draw, 2):
        e["extra"] = draw(json_values)
    if sometimes(draw, 3):  # one field junk (or dropped)
        field = draw(st.sampled_from(FIELDS))
        if sometimes(draw, 2):
            e.pop(field, None)
        else:
            e[field] = draw(
                st.one_of(
                    JUNK,
                    json_values,
                    st.just("session_start"),
                    st.just("not-a-uuid"),
                    st.just("2026-13-45T99:00:00Z"),
                    st.just("0001-01-01T00:00:00Z"),
                    st.just("9999-12-31T23:59:59+14:00"),
                )
            )
    return e


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """An envelope (mostly valid; the widget id is filled in at send time) and how to encode it."""
    envelope: dict[str, Any] = {
        "widget_id": "\u0001WIDGET\u0001"
        if sometimes(draw, 9)
        else draw(st.one_of(JUNK, st.just(str(uuid.UUID(int=7))))),
        "visitor_id": "v-fuzz" if sometimes(draw, 7) else draw(st.one_of(texts, JUNK)),
        "sent_at": NOW if sometimes(draw, 9) else draw(st.one_of(JUNK, st.just("1970-01-01T00:00:00Z"))),
        "events": draw(st.lists(events(), max_size=8)) if sometimes(draw, 9) else draw(JUNK),
    }
    if sometimes(draw, 2):
        envelope["extra"] = draw(json_values)
    truncate = draw(st.integers(0, 400)) if sometimes(draw, 1) else None
    return {"envelope": envelope, "ascii": draw(st.booleans()), "truncate": truncate}


def splice(text: str, now: str) -> str:
    text = text.replace(json.dumps(NOW), json.dumps(now))
    return _SPLICE.sub(
        lambda m: m.group(2) if m.group(1) == "NUM" else "[" * int(m.group(2)) + "]" * int(m.group(2)), text
    )


def exact(text: str) -> Any:
    return json.loads(text, parse_int=Decimal, parse_float=Decimal)


def test_no_body_gets_a_5xx_and_every_accepted_event_is_a_row(
    settings: Settings,
    full_pipeline: None,
    api_url: str,
    db: psycopg.Connection,
    make_widget: Callable[..., widgets.Widget],
) -> None:
    w = make_widget()
    expected: dict[str, Any] = {}  # event id -> exact properties/traits it must be stored with
    statuses: dict[int, int] = {}
    client = httpx.Client(base_url=api_url, timeout=20)

    # derandomize: a fixed seed, so a failure found here is found again on the next run; widen the search by
    # changing max_examples.
    @hsettings(
        max_examples=500,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(requests())
    def check(request: dict[str, Any]) -> None:
        envelope = request["envelope"]
        sent = envelope["events"] if isinstance(envelope["events"], list) else []
        ids: dict[int, str] = {}
        for index, e in enumerate(sent):
            if isinstance(e, dict) and e.get("event_id") == NEW_ID:
                e["event_id"] = ids[index] = str(uuid.uuid4())
        if envelope["widget_id"] == "\u0001WIDGET\u0001":
            envelope["widget_id"] = str(w.id)
        text = splice(json.dumps(envelope, ensure_ascii=request["ascii"]), iso(datetime.now(UTC)))
        raw = text.encode("utf-8", "surrogatepass")  # with ascii=False a lone surrogate is invalid UTF-8
        if request["truncate"] is not None:
            raw = raw[: request["truncate"]]
        resp = client.post(TRACK, content=raw, headers={"content-type": "text/plain"})
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        assert resp.status_code < 500, (resp.status_code, resp.text, raw[:300])
        assert resp.status_code in (204, 400, 404, 413), (resp.status_code, resp.text)
        if resp.status_code == 204:
            accepted = set(range(len(sent)))
        elif resp.status_code == 400 and resp.json()["error"] == "invalid_events":
            answer = resp.json()
            accepted = set(range(len(sent))) - {r["index"] for r in answer["rejected"]}
            assert answer["accepted"] == len(accepted)
            assert all(r["reason"] for r in answer["rejected"])
        else:
            assert resp.json()["error"] and resp.json()["reason"], resp.text
            return
        for index in accepted:
            assert index in ids, f"accepted event {index} had no valid event id: {sent[index]!r}"[:300]
            e = sent[index]
            field = {"custom": "properties", "identify": "traits"}.get(e["type"])
            value = e.get(field) if field else None
            expected[ids[index]] = exact(splice(json.dumps(value), "")) if value is not None else {}

    try:
        check()
    finally:
        client.close()
    # Not vacuous: plenty of requests were accepted whole or in part, so rows were really checked. Runs accept
    # about 75-85 whole requests and 78-110 events (the API's answers, not only the draw, decide which); the
    # floors leave room for that spread while still failing a run whose bodies are all refused.
    assert statuses.get(204, 0) >= 40 and len(expected) >= 50, (statuses, len(expected))
    if not expected:
        return
    wait_for_rows(
        db,
        "SELECT 1 FROM visitor_events WHERE event_id = ANY(%s)",
        ([uuid.UUID(i) for i in expected],),
        len(expected),
        timeout=60,
    )
    rows = db.execute(
        "SELECT event_id::text, properties::text FROM visitor_events WHERE event_id = ANY(%s) "
        "AND event_type <> 'session_start'",
        ([uuid.UUID(i) for i in expected],),
    ).fetchall()
    assert len(rows) == len(expected)
    for event_id, properties in rows:
        assert exact(properties) == expected[event_id], event_id


def faithful(text: str) -> bool:
    """The number rule (README, "Numbers"): a double reads `text` back as the same value."""
    double = float(text)
    return math.isfinite(double) and Decimal(repr(double)) == Decimal(text)


@hsettings(max_examples=2000, deadline=None, database=None)
@given(
    st.one_of(
        st.integers(-(10**40), 10**40).map(str),
        st.floats(allow_nan=False, allow_infinity=False).map(repr),
        st.decimals(allow_nan=False, allow_infinity=False).map(str),
        st.builds(lambda digits, exp: f"{digits}e{exp}", st.integers(-(10**20), 10**20), st.integers(-400, 400)),
    )
)
def test_a_parsed_number_is_the_number_sent_or_marked_unfaithful(text: str) -> None:
    """Both parsers (orjson for short numbers, the careful one for long ones) keep every number exactly or
    mark it, whatever surrounds it."""
    for body in (f'{{"n":{text}}}', f'{{"n":{text},"s":"{"1" * 16}"}}', f'{{"n":{text},"x":NaN}}'):
        value = parse_body(body.encode(), 36)["n"]
        if faithful(text):
            assert not isinstance(value, Unfaithful), (body, value)
            assert Decimal(json.dumps(value)) == Decimal(text), (body, value)  # what gets stored
        else:
            assert isinstance(value, Unfaithful), (body, value)
