"""The documented placement rules of stream_processors/state.py, one case each, and the raw-values fast path of
the processors (byte-identical output, exact ids). Pure logic, no services."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from faust.stores.rocksdb import RocksDBOptions
from faust.transport import consumer as faust_consumer
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from schemas.codec import DecodeError, EventCodec
from site_activity.dead_letters import dead_letter_headers, fit_dead_letter
from site_activity.erasure import CONTACT_MARKER_PREFIX
from site_activity.events import customer_id_text, session_id_for, session_id_text, session_start_event_id_text
from site_activity.settings import Settings
from site_activity.topics import event_key
from stream_processors import erasures
from stream_processors.erasures import apply_erasures
from stream_processors.processor import BatchProcessor, InvalidEvent, contact_id, session_ids, validate
from stream_processors.state import Seen, VisitorState
from stream_processors.store import ROCKSDB_OPTIONS, TableStore
from stream_processors.transport import _continue, check_internals, unacked_offsets
from stream_processors.wire import (
    EventReader,
    SessionStartWriter,
    _long,
    _NotLean,
    frame_message,
    frame_messages,
    read_current_items,
    restamp,
    stamp_bytes,
)

MIN = 60_000_000  # µs
GAP = 30 * MIN


def place_all(state: VisitorState, *times: int) -> list[tuple[int, bool]]:
    return [(p.session_start_us, p.opens_session) for p in (state.place(t, GAP, 16) for t in times)]


def test_in_order_events_follow_the_offline_definition() -> None:
    s = VisitorState()
    assert place_all(s, 0, 10 * MIN, 40 * MIN, 70 * MIN + 1) == [
        (0, True),
        (0, False),
        (0, False),
        (70 * MIN + 1, True),
    ]


def test_late_event_inside_or_just_after_a_session_joins_it() -> None:
    s = VisitorState()
    place_all(s, 0, 5 * MIN, 180 * MIN)
    assert place_all(s, 2 * MIN, 25 * MIN) == [(0, False), (0, False)]
    assert s.sessions == [[0, 0, 25 * MIN], [180 * MIN, 180 * MIN, 180 * MIN]]


def test_bridging_event_joins_the_earlier_session_and_keeps_the_later_one() -> None:
    s = VisitorState()
    place_all(s, 0, 50 * MIN)  # two sessions: silence of 50 min
    assert place_all(s, 25 * MIN) == [(0, False)]
    assert [x[0] for x in s.sessions] == [0, 50 * MIN]


def test_event_shortly_before_a_session_extends_it_backwards_without_a_new_start() -> None:
    s = VisitorState()
    place_all(s, 100 * MIN)
    assert place_all(s, 75 * MIN, 100 * MIN) == [(100 * MIN, False), (100 * MIN, True)]
    assert s.sessions == [[100 * MIN, 75 * MIN, 100 * MIN]]


def test_event_far_before_every_session_opens_its_own() -> None:
    s = VisitorState()
    place_all(s, 100 * MIN)
    assert place_all(s, 10 * MIN) == [(10 * MIN, True)]


def test_replaying_the_opener_emits_the_same_session_start_again() -> None:
    s = VisitorState()
    place_all(s, 0, 5 * MIN)
    assert place_all(s, 0) == [(0, True)]  # same session, same deterministic session_start id
    assert len(s.sessions) == 1


def test_history_is_bounded() -> None:
    s = VisitorState()
    for i in range(20):
        s.place(i * 60 * MIN, GAP, 4)
    assert [x[0] for x in s.sessions] == [16 * 60 * MIN, 17 * 60 * MIN, 18 * 60 * MIN, 19 * 60 * MIN]


def test_links_in_force_and_retro_link_for_earlier_events() -> None:
    s = VisitorState()
    assert s.user_at(5) is None
    assert s.link(10 * MIN, "a", 8) is True
    assert s.link(30 * MIN, "b", 8) is True
    assert s.link(20 * MIN, "c", 8) is False  # late identify: not the latest link, not published
    assert [s.user_at(t) for t in (0, 10 * MIN, 25 * MIN, 30 * MIN, 99 * MIN)] == ["a", "a", "c", "b", "b"]
    assert s.link(30 * MIN, "b", 8) is True and len(s.links) == 3  # a replay adds nothing
    assert VisitorState.from_doc(s.to_doc()) == s


# --- the processors' raw-values fast path (stream_processors/wire.py, processor.py) -----------------------


def raw_event(i: int, **fields: Any) -> dict[str, Any]:
    """A raw event in raw values (uuid text, int µs), as EventCodec(logical_types=False) decodes it."""
    record = {
        "event_id": str(uuid.UUID(int=i * 7919 + 1, version=4)),
        "event_type": ["pageview", "custom", "identify"][i % 3],
        "tenant_id": str(TENANT),
        "widget_id": str(WIDGET),
        "visitor_id": f"v-{i % 4}",
        "name": "clicked" if i % 3 == 1 else None,
        "url": None if i % 5 == 0 else f"https://ex.example/p/{i}?q=é✓",
        "referrer": "https://r.example/" + "x" * (i * 13),
        "properties": json.dumps({"i": i, "s": "ü" * i}),
        "user_id": f"u-{i}" if i % 3 == 2 else None,
        "occurred_at": 1_795_513_650_000_000 + i * 977_001,
        "received_at": 1_795_513_651_000_000 + i,
        "session_id": None,
        "customer_id": None,
    }
    record.update(fields)
    return record


def from_us(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


def test_id_text_functions_are_rfc_4122_uuid5() -> None:
    """The processors' text ids are exactly uuid.uuid5 of the documented names (site_activity.events)."""
    ns = uuid.UUID("6f1c1d1e-5a3b-4b7e-9a51-0c2f6c1f5e01")
    for visitor, us in [("v", 0), ("ü✓-visitor", 1_795_513_650_123_457), ("", -62_135_596_800_000_000)]:
        sid = session_id_text(str(WIDGET), visitor, us)
        assert sid == str(uuid.uuid5(ns, f"{WIDGET}|{visitor}|{us}"))
        assert session_id_for(WIDGET, visitor, from_us(us)) == uuid.UUID(sid)
        assert session_start_event_id_text(sid) == str(uuid.uuid5(ns, f"start|{sid}"))
    assert customer_id_text(str(TENANT), "u-ü") == str(
        uuid.uuid5(uuid.UUID("6f1c1d1e-5a3b-4b7e-9a51-0c2f6c1f5e02"), f"{TENANT}|u-ü")
    )


TENANT, WIDGET = uuid.UUID("0b6f2f3c-5f0e-4a53-9d2e-1f6c3b0a9e11"), uuid.UUID("7d1e0c55-2a4b-4c7e-8f10-3a2b1c0d9e8f")
RAW = EventCodec(logical_types=False)


def test_reader_gives_the_decoded_events_and_restamp_equals_encoding() -> None:
    events = [raw_event(i) for i in range(40)]
    reader = EventReader(RAW)
    stamps = [("5b0c5cf4-8a43-5d46-a9f1-1d2f0a8a3f10", None), ("x", "y" * 200), (None, None)]
    for data in (RAW.encode_events(events), RAW.encode_events(events[:1])):
        read = reader.read(data)
        assert [r for r, _ in read] == RAW.decode_events(data)
        for sid, cid in stamps:
            stamped = [{**record, "session_id": sid, "customer_id": cid} for record, _ in read]
            datums = [restamp(datum, sid, cid) for _, datum in read]  # type: ignore[arg-type]
            assert datums == [RAW.event.encode_datum(r) for r in stamped]
            assert frame_message(RAW.batch.header, datums) == RAW.encode_events(stamped)
    # a single-event message (older producers) works the same way
    [(record, datum)] = reader.read(RAW.encode_event(events[3]))
    assert record == events[3]
    assert datum is not None
    assert RAW.event.header + restamp(datum, "s", "c") == RAW.encode_event(
        {
            **events[3],
            "session_id": "s",
            "customer_id": "c",
        }
    )
    # events whose ids are already set are not restampable (their datum does not end with two nulls)
    [(_, datum)] = reader.read(RAW.encode_events([raw_event(1, session_id="s")]))
    assert datum is None


def _fastavro_read(reader: EventReader, data: bytes) -> Any:
    """What EventReader gave before the lean reader: fastavro item by item, or the DecodeError's type."""
    try:
        return reader._read_items(data, None, True)
    except Exception as exc:
        return type(exc).__name__ if isinstance(exc, DecodeError) else "DecodeError"


def _read(reader: EventReader, data: bytes) -> Any:
    try:
        return reader.read(data)
    except DecodeError:
        return "DecodeError"


LEAN_EVENTS = [raw_event(i) for i in range(12)] + [
    raw_event(1, url="https://ex.example/" + "ü" * 3000, referrer=None, user_id="ü✓" * 100),  # multi-byte lengths
    raw_event(2, event_type="session_start", occurred_at=-62_135_596_800_000_000, received_at=253_402_300_799_999_999),
    raw_event(3, occurred_at=0, received_at=-1, visitor_id="", properties="", name=""),
    raw_event(4, occurred_at=-(1 << 63), received_at=(1 << 63) - 1, event_id="not a uuid", tenant_id="x" * 70),
    raw_event(5, received_at=0),  # one time of 8 bytes, one of 1 (the two are read together when both take 8)
    raw_event(6, occurred_at=1 << 55, received_at=(1 << 55) - 1),  # 9 bytes, then 8
    raw_event(7, properties="{}"),  # the usual properties (read without a slice)
    raw_event(8, properties="{}x", event_id="e" * 36),  # longer properties starting with "{}"; a 36-byte non-uuid id
]


def test_lean_reader_gives_what_fastavro_gives() -> None:
    """The lean reader (wire.read_current_items) builds the very records and datums of the fastavro path."""
    reader = EventReader(RAW)
    for n in (1, 2, 13, len(LEAN_EVENTS)):
        for events in (LEAN_EVENTS[:n], LEAN_EVENTS[-n:]):
            data = RAW.encode_events(events)
            assert read_current_items(data) == reader._read_items(data, None, True)
            assert [r for r, _ in read_current_items(data)] == events
    # one request's events share tenant, widget and visitor (read once, then compared as bytes): runs of the same
    # ones, and a change back and forth
    same = [raw_event(i, visitor_id="v-0") for i in range(12)]
    mixed = same[:3] + [raw_event(3, visitor_id="v-1"), raw_event(4, tenant_id="t" * 36)] + same[5:]
    for events in (same, mixed, [*mixed, raw_event(5, widget_id="w" * 200, visitor_id="v-0")]):
        data = RAW.encode_events(events)
        assert read_current_items(data) == reader._read_items(data, None, True)
        assert [r for r, _ in read_current_items(data)] == events
    # several array blocks (other writers may split the array): the same events
    datums = [RAW.event.encode_datum(e) for e in LEAN_EVENTS[:5]]
    blocks = RAW.batch.header + b"\x04" + b"".join(datums[:2]) + b"\x06" + b"".join(datums[2:]) + b"\x00"
    assert read_current_items(blocks) == reader._read_items(blocks, None, True)
    # events whose ids are set, and sized blocks, are left to fastavro: the same result through EventReader.read
    stamped = RAW.encode_events([raw_event(1, session_id="s")])
    sized = RAW.batch.header + b"\x01" + _long(len(datums[0])) + datums[0] + b"\x00"  # count -1, then the size
    for data in (stamped, sized):
        with pytest.raises(_NotLean):
            read_current_items(data)
        assert reader.read(data) == reader._read_items(data, None, True)


@hypothesis_settings(max_examples=400, deadline=None)
@given(st.data())
def test_lean_reader_on_corrupted_batches_gives_what_fastavro_gives(data: st.DataObject) -> None:
    """Any byte flipped, cut or inserted: EventReader.read gives the fastavro path's records, or a DecodeError
    where it gave one (the lean reader never accepts what fastavro refuses, nor reads it differently)."""
    reader = EventReader(RAW)
    events = data.draw(st.lists(st.sampled_from(LEAN_EVENTS), min_size=1, max_size=4))
    raw = bytearray(RAW.encode_events(events))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(10, len(raw) - 1))
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if kind == "flip":
            raw[at] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del raw[at:]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=3))
        if len(raw) <= 11:
            break
    blob = bytes(raw)
    assert _read(reader, blob) == _fastavro_read(reader, blob)


def session_start_for(opener: dict[str, Any], event_id: str) -> dict[str, Any]:
    """The derived event that marks a session: the opener's who, where and when, with a deterministic id."""
    return {
        **opener,
        "event_id": event_id,
        "event_type": "session_start",
        "name": None,
        "properties": "{}",
        "user_id": None,
    }


def test_session_start_writer_equals_fastavro() -> None:
    """The hand-written session_start datum is byte for byte what fastavro writes for session_start_for()."""
    writer = SessionStartWriter(RAW)
    openers = [raw_event(i) for i in range(30)] + [
        raw_event(1, visitor_id="ü-✓" * 40, url="", referrer=None),
        raw_event(2, occurred_at=-62_135_596_800_000_000, received_at=253_402_300_799_999_999),  # years 1 and 9999
        raw_event(3, occurred_at=0, received_at=-1),
        raw_event(4, occurred_at=(1 << 48) - 1, received_at=1 << 48),  # 7 and 8 bytes
        raw_event(5, occurred_at=(1 << 55) - 1, received_at=1 << 55),  # 8 and 9 bytes
    ]
    for i, opener in enumerate(openers):
        event_id = str(uuid.UUID(int=i, version=5))
        for session_id, customer_id in [("5b0c5cf4-8a43-5d46-a9f1-1d2f0a8a3f10", None), ("s" * i, "c" * 70)]:
            expected = {**session_start_for(opener, event_id), "session_id": session_id, "customer_id": customer_id}
            assert writer.datum(opener, event_id, session_id, customer_id) == RAW.event.encode_datum(expected)
            # the hot loop's form: the event times taken from the opener's own datum where they take 8 bytes each
            opener_datum = RAW.event.encode_datum(opener)
            stamps = stamp_bytes(session_id, customer_id)
            assert writer.stamped(opener, opener_datum, event_id, stamps) == RAW.event.encode_datum(expected)


def _padded_long(n: int, extra: int) -> bytes:
    """A valid but not shortest varint of `n`: `extra` continuation bytes of zero bits appended."""
    minimal = bytearray(RAW.event.encode_datum({**raw_event(0), "occurred_at": n})[-18:-10])  # 8-byte times
    minimal[-1] |= 0x80
    return bytes(minimal) + b"\x80" * (extra - 1) + b"\x00"


def test_session_start_from_an_opener_with_padded_times_is_still_exact() -> None:
    """A message not written by fastavro may encode a time in more bytes than needed (valid Avro, read as the same
    value); the session_start then encodes the times itself instead of copying the opener's bytes."""
    writer = SessionStartWriter(RAW)
    opener = raw_event(7)
    opener_datum = RAW.event.encode_datum(opener)
    occurred, received = opener_datum[-18:-10], opener_datum[-10:-2]
    event_id, session_id = str(uuid.UUID(int=7, version=5)), "5b0c5cf4-8a43-5d46-a9f1-1d2f0a8a3f10"
    expected = RAW.event.encode_datum({**session_start_for(opener, event_id), "session_id": session_id})
    stamps = stamp_bytes(session_id, None)
    head = opener_datum[:-18]
    for padded in (
        head + _padded_long(opener["occurred_at"], 1) + received + b"\x00\x00",
        head + occurred + _padded_long(opener["received_at"], 2) + b"\x00\x00",
    ):
        assert writer.stamped(opener, padded, event_id, stamps) == expected


def test_framed_messages_of_any_size_decode() -> None:
    """Block counts are zigzag varints: 0, 1, 63, 64 (two bytes) and 200 items all read back."""
    for n in (0, 1, 63, 64, 200):
        records = [{**raw_event(i), "session_id": f"s{i}"} for i in range(n)]
        data = frame_message(RAW.batch.header, [RAW.event.encode_datum(r) for r in records])
        assert data == RAW.encode_events(records)
        assert RAW.decode_events(data) == records


def test_raw_values_and_logical_types_read_the_same_bytes() -> None:
    data = RAW.encode_events([raw_event(i) for i in range(6)])
    typed = EventCodec().decode_events(data)
    for raw, obj in zip(RAW.decode_events(data), typed, strict=True):
        assert uuid.UUID(raw["event_id"]) == obj["event_id"] and str(obj["widget_id"]) == raw["widget_id"]
        assert obj["occurred_at"] == from_us(raw["occurred_at"])
    assert EventCodec().encode_events(typed) == data


def test_validate_normalises_uuid_text_like_the_typed_decoding() -> None:
    record = raw_event(0, event_id="{" + str(uuid.UUID(int=5)).upper() + "}")
    assert validate(record, event_key(str(WIDGET), "v-0")) is False  # changed: re-encode, no restamp
    assert record["event_id"] == str(uuid.UUID(int=5))
    assert validate(raw_event(0), event_key(str(WIDGET), "v-0")) is True
    with pytest.raises(InvalidEvent):
        validate(raw_event(0, tenant_id="not-a-uuid"), event_key(str(WIDGET), "v-0"))
    with pytest.raises(InvalidEvent):
        validate(raw_event(0), event_key(str(WIDGET), "v-1"))


def test_cached_ids_are_the_documented_deterministic_ids() -> None:
    """The processors' cached ids equal uuid5 of the documented names, computed here independently."""
    session_ns = uuid.UUID("6f1c1d1e-5a3b-4b7e-9a51-0c2f6c1f5e01")
    customer_ns = uuid.UUID("6f1c1d1e-5a3b-4b7e-9a51-0c2f6c1f5e02")
    for i, us in enumerate([0, 1, 999_999, 1_795_513_650_123_457, 1_795_513_650_999_999, 253_402_300_799_999_999]):
        sid, start_id = session_ids(str(WIDGET), f"v{i}", us)
        expected_sid = uuid.uuid5(session_ns, f"{WIDGET}|v{i}|{us}")
        assert sid == str(expected_sid)
        assert start_id == str(uuid.uuid5(session_ns, f"start|{expected_sid}"))
    assert contact_id(str(TENANT), "u-1") == str(uuid.uuid5(customer_ns, f"{TENANT}|u-1"))


# --- duplicates (issue 8, case 6) ---------------------------------------------------------------------------


def test_a_copy_is_placed_like_its_first_copy_and_changes_nothing() -> None:
    s = VisitorState()
    assert s.seen("e") is None
    placed = s.place(10 * MIN, GAP, 16)
    s.remember("e", 10 * MIN, placed.session_start_us, 100)
    before = s.to_doc()
    first = s.seen("e")
    assert first is not None and (first.t, first.placement) == (10 * MIN, placed)
    assert VisitorState.from_doc(s.to_doc()).seen("e") == first  # survives the changelog
    assert s.to_doc() == before


def test_remembered_event_ids_are_bounded() -> None:
    s = VisitorState()
    for i in range(10):
        s.remember(f"e{i}", i, 0, 4)
        assert s.seen(f"e{i}") is not None
    doc = s.to_doc()  # what the changelog keeps: the last 4
    assert [e[0] for e in doc["e"]] == ["e6", "e7", "e8", "e9"]
    kept = VisitorState.from_doc(doc)
    assert kept.seen("e5") is None and kept.seen("e6") == Seen(6, 0)


class _Outputs:
    """What BatchProcessor hands to the producer, kept in memory (a pure test of one batch's logic)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    def send(
        self,
        topic: str,
        key: bytes,
        value: bytes,
        partition: int | None = None,
        headers: Any = None,
        source: Any = None,
    ) -> None:
        self.sent.append((topic, key, value))

    def check(self) -> None:
        pass


class _Store:
    def __init__(self) -> None:
        self.docs: dict[bytes, dict[str, Any]] = {}

    def get(self, key: bytes, partition: int = 0) -> dict[str, Any] | None:
        return self.docs.get(key)

    def put(self, key: bytes, partition: int, doc: dict[str, Any]) -> None:
        self.docs[key] = doc


@dataclass
class _Msg:
    value: bytes
    key: bytes
    topic: str = "raw"
    partition: int = 0
    offset: int = 0
    timestamp: float = 0.0


def test_duplicates_derive_nothing_and_are_stamped_like_the_first_copy() -> None:
    """E, its copy with an occurred_at 45 min earlier, F 5 min after E: one session, one session_start id."""
    settings = Settings()
    outputs, store = _Outputs(), _Store()
    processor = BatchProcessor(settings, store, outputs)
    key = event_key(str(WIDGET), "v-0")
    t = 1_795_513_650_000_000
    e = raw_event(0, event_type="pageview", visitor_id="v-0", occurred_at=t)
    copy = {**e, "occurred_at": t - 45 * MIN}
    f = raw_event(3, event_type="pageview", visitor_id="v-0", occurred_at=t + 5 * MIN)
    for i, r in enumerate([e, copy, f]):
        processor.process([_Msg(RAW.encode_events([r]), key, offset=i)])
    out = [RAW.decode_events(v) for topic, _, v in outputs.sent if topic.endswith("enriched")]
    starts = {r["event_id"] for message in out for r in message if r["event_type"] == "session_start"}
    sessions = {r["session_id"] for message in out for r in message}
    assert len(starts) == 1 and len(sessions) == 1
    assert [r["occurred_at"] for r in out[1] if r["event_type"] != "session_start"] == [t]  # as the first copy
    assert VisitorState.from_doc(store.docs[key]).sessions == [[t, t, t + 5 * MIN]]


class _StateOutputs(_Outputs):
    def send_state(self, changelog: str, partition: int, key: bytes, value: bytes | None) -> None:
        self.sent.append((changelog, key, value or b""))


def _rocksdb_store(tmp_path: Path, outputs: _StateOutputs, partitions: int) -> TableStore:
    """A TableStore over real RocksDB databases opened as faust opens them, without faust around them."""
    options = RocksDBOptions(**ROCKSDB_OPTIONS, use_rocksdict=True)
    dbs = {p: options.open(tmp_path / str(p)) for p in range(partitions)}
    data = SimpleNamespace(_db_for_partition=dbs.__getitem__, _dbs=dbs)
    table = SimpleNamespace(data=data, changelog_topic=SimpleNamespace(get_topic_name=lambda: "state-changelog"))
    return TableStore(table, outputs, rocksdb=True)  # type: ignore[arg-type]


def test_erased_contacts_are_looked_up_only_where_a_partition_holds_any(tmp_path: Path) -> None:
    """The processor skips the per-link erased-contact lookups of a partition whose state holds no erased contact
    (one RocksDB seek per batch); where it holds one, a visitor is still never linked to an erased contact."""
    outputs = _StateOutputs()
    store = _rocksdb_store(tmp_path, outputs, 3)
    assert [erasures.any_contact_erased(store, p) for p in range(3)] == [False, False, False]
    erased = contact_id(str(TENANT), "u-2")
    apply_erasures(store, [SimpleNamespace(key=CONTACT_MARKER_PREFIX + erased.encode(), partition=1)])
    store.put(event_key(str(WIDGET), "v-9"), 2, {"s": [], "l": [], "e": []})  # visitor keys are no erasures
    assert [erasures.any_contact_erased(store, p) for p in range(3)] == [False, True, False]
    assert erasures.is_contact_erased(store, 1, erased) and not erasures.is_contact_erased(store, 0, erased)
    processor = BatchProcessor(Settings(), store, outputs)
    identify = raw_event(2)  # identifies as u-2
    key = event_key(str(WIDGET), identify["visitor_id"])
    for partition in (0, 1):
        outputs.sent.clear()
        processor.process([_Msg(RAW.encode_events([identify]), key, partition=partition, offset=partition)])
        links = [v for topic, _, v in outputs.sent if topic.endswith("identity.links")]
        enriched = [RAW.decode_events(v) for topic, _, v in outputs.sent if topic.endswith("enriched")]
        assert len(links) == (1 if partition == 0 else 0)  # erased on partition 1 only
        assert [r["customer_id"] for r in enriched[0]] == ([erased, erased] if partition == 0 else [None, None])


# --- oversized output (issue 8, case 3) ---------------------------------------------------------------------


def test_frame_messages_splits_by_size_deterministically_and_in_order() -> None:
    datums = [RAW.event.encode_datum(raw_event(i, referrer="r" * (i * 997 % 5000))) for i in range(60)]
    whole = frame_message(RAW.batch.header, datums)
    assert frame_messages(RAW.batch.header, datums, len(whole)) == [whole]
    for limit in (len(whole) // 2, 20_000, 6_000):
        parts = frame_messages(RAW.batch.header, datums, limit)
        assert parts == frame_messages(RAW.batch.header, datums, limit)  # same split on every replay
        assert len(parts) > 1 and all(len(p) <= limit for p in parts)
        decoded = [r for p in parts for r in RAW.decode_events(p)]
        assert decoded == RAW.decode_events(whole)
    alone = frame_messages(RAW.batch.header, [b"x" * 100, b"y" * 10_000, b"z" * 100], 1_000)
    assert [len(p) for p in alone] == [
        len(frame_message(RAW.batch.header, [d])) for d in (b"x" * 100, b"y" * 10_000, b"z" * 100)
    ]


def test_dead_letters_keep_the_payload_when_it_fits() -> None:
    headers = dead_letter_headers("processors", "why", "t", 0, 1)
    assert fit_dead_letter(b"k", b"v" * 100, headers, 10_000) == (b"v" * 100, headers)
    value, with_drop = fit_dead_letter(b"k", b"v" * 20_000, headers, 10_000)
    assert value == b"" and with_drop == [*headers, ("x-dropped-bytes", b"20000")]


# --- the faust repair (issue 8, cases 15 and 16) ------------------------------------------------------------


def test_unacked_offsets_cover_the_head_and_every_hole() -> None:
    assert unacked_offsets([4, 5], 2) == [2, 3]
    assert unacked_offsets([6, 8, 9, 12], 6) == [7, 10, 11]
    assert unacked_offsets([10, 11], 10) == []


def test_start_up_checks_the_faust_and_aiokafka_internals_it_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    check_internals()  # the pinned versions have them
    monkeypatch.delattr(faust_consumer.Consumer, "_new_offset")  # a faust without the method we override
    with pytest.raises(RuntimeError, match=r"faust Consumer\._new_offset.*pinned in pyproject"):
        check_internals()


def test_a_callback_run_to_its_first_suspension_continues_in_a_task() -> None:
    """transport.Consumer.wait_first runs faust's per-message callback directly; one that suspends (a full stream
    buffer) continues in a task (`_continue`), with its result, its exceptions and its cancellation intact."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[int] = loop.create_future()

        async def callback() -> int:
            await asyncio.sleep(0)
            value = await ready
            await asyncio.sleep(0.001)
            return value + 1

        coro = callback()
        task = asyncio.ensure_future(_continue(coro, coro.send(None)))
        await asyncio.sleep(0.01)
        assert not task.done()
        ready.set_result(41)
        assert await task == 42

        async def failing() -> None:
            await asyncio.sleep(0)
            raise KeyError("x")

        coro2 = failing()
        with pytest.raises(KeyError):
            await _continue(coro2, coro2.send(None))

        never: asyncio.Future[None] = loop.create_future()
        cancelled = []

        async def waiting() -> None:
            try:
                await never
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        coro3 = waiting()
        task3 = asyncio.ensure_future(_continue(coro3, coro3.send(None)))
        await asyncio.sleep(0)
        task3.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task3
        assert cancelled == [True] and never.cancelled()

    asyncio.run(main())
