"""The processors' shortcut through the Avro wire format: an enriched event is its raw event with
`session_id` and `customer_id` filled in, so it is built from the raw event's bytes instead of being
encoded again (re-encoding with fastavro cost about a third of the per-event CPU).

Avro's binary encoding of a record is the concatenation of its fields' encodings, in schema order. The
VisitorEvent schema ends with the two nullable strings the processors fill in; an event whose two fields
are null ends with the bytes ``00 00`` (union branch 0, "null", for each). Replacing those two bytes with
the encodings of the values yields exactly the datum fastavro writes for the stamped record. An array is a
block count followed by its items' datums and a zero, so a VisitorEventBatch is framed from datums the same
way (tests/test_processors_state.py checks byte equality with `EventCodec.encode_events`). The shortcut is
taken only for events written with the current VisitorEvent schema; anything else (older schema versions,
ids already set, uuid text that needed normalising) is encoded the ordinary way.
"""

from __future__ import annotations

import io
from functools import lru_cache
from typing import Any, cast

import fastavro

from schemas.codec import HEADER_LEN, DecodeError, EventCodec, read_long, schema_fingerprint, without_logical_types

STAMPED = ["session_id", "customer_id"]  # the fields the processors fill in, last in the schema
_NULL_STAMPS = b"\x00\x00"

RawEvent = tuple[dict[str, Any], bytes | None]  # (raw values, the event's own datum if restampable)


def _long(n: int) -> bytes:
    zigzag = (n << 1) ^ (n >> 63)
    if 1 << 49 <= zigzag < 1 << 56:  # exactly 8 bytes: every event time of this century, without a loop
        return (_spread_seven_bit_groups(zigzag) | 0x0080808080808080).to_bytes(8, "little")
    out = bytearray()
    while zigzag > 0x7F:
        out.append((zigzag & 0x7F) | 0x80)
        zigzag >>= 7
    out.append(zigzag)
    return bytes(out)


def _spread_seven_bit_groups(z: int) -> int:
    """z < 2**56 as eight 7-bit groups, one per byte (little-endian), continuation bits not set yet."""
    return (
        (z & 0x7F)
        | (z & 0x3F80) << 1
        | (z & 0x1FC000) << 2
        | (z & 0xFE00000) << 3
        | (z & 0x7F0000000) << 4
        | (z & 0x3F800000000) << 5
        | (z & 0x1FC0000000000) << 6
        | (z & 0xFE000000000000) << 7
    )


# Non-negative longs whose zigzag encoding takes exactly 8 bytes (every event time from 1978 to 3111).
_EIGHT_BYTE_MIN, _EIGHT_BYTE_END = 1 << 48, 1 << 55


def _two_minimal_eight_byte_longs(chunk: bytes) -> bool:
    """Whether `chunk` is two 8-byte varints in their shortest form (seven bytes with the continuation bit, then a
    last byte that is not zero: a padded, longer encoding of the same value ends in a zero byte)."""
    return (
        len(chunk) == 16
        and 0 < chunk[7] < 0x80
        and 0 < chunk[15] < 0x80
        and min(chunk[0:7]) >= 0x80
        and min(chunk[8:15]) >= 0x80
    )


@lru_cache(maxsize=16_384)  # session and contact ids repeat across a visitor's events
def _optional_string(value: str | None) -> bytes:
    """The encoding of a ["null", "string"] union."""
    if value is None:
        return b"\x00"
    text = value.encode()
    return b"\x02" + _long(len(text)) + text


@lru_cache(maxsize=16_384)
def _string(value: str) -> bytes:
    text = value.encode()
    return _long(len(text)) + text


@lru_cache(maxsize=16_384)  # one visitor's events share these three
def _strings(*values: str) -> bytes:
    return b"".join(map(_string, values))


class SessionStartWriter:
    """Writes the datum of a derived session_start event straight from its opener's raw values: what fastavro
    writes for the opener with event_type session_start, its own deterministic event_id, no name, no user_id,
    properties "{}" and the ids set — in a third of the time (a quarter of all events open a session on a busy
    site). Checked against fastavro in tests/test_processors_state.py; the layout below is checked against the
    schema at start-up."""

    LAYOUT = [
        "event_id",
        "event_type",
        "tenant_id",
        "widget_id",
        "visitor_id",
        "name",
        "url",
        "referrer",
        "properties",
        "user_id",
        "occurred_at",
        "received_at",
        "session_id",
        "customer_id",
    ]

    def __init__(self, codec: EventCodec) -> None:
        fields = codec.event.schema["fields"]
        if [f["name"] for f in fields] != self.LAYOUT:
            raise RuntimeError(f"visitor_event.avsc fields changed: update {__name__}.SessionStartWriter")
        symbols = fields[1]["type"]["symbols"]
        self._type = _long(symbols.index("session_start"))
        self._properties = _string("{}")

    def datum(self, opener: dict[str, Any], event_id: str, session_id: str, customer_id: str | None) -> bytes:
        return self.stamped(opener, None, event_id, stamp_bytes(session_id, customer_id))

    def stamped(self, opener: dict[str, Any], opener_datum: bytes | None, event_id: str, stamps: bytes) -> bytes:
        """`datum` for the hot loop: the ids given as their encoding (`stamp_bytes`), and the opener's own datum
        (from `EventReader`, or None) to take the encoded event times from."""
        o, null = opener, b"\x00"
        occurred, received = o["occurred_at"], o["received_at"]
        # Both times of today take 8 bytes (zigzag values 2**49 ..< 2**56), so they are the 16 bytes before the
        # opener datum's two null ids: no need to encode them again (a new session's time is new: no cache).
        times = b""
        if (
            opener_datum is not None
            and _EIGHT_BYTE_MIN <= occurred < _EIGHT_BYTE_END
            and _EIGHT_BYTE_MIN <= received < _EIGHT_BYTE_END
        ):
            times = opener_datum[-18:-2]
        if not _two_minimal_eight_byte_longs(times):  # e.g. a hand-made message with padded varints
            times = _long(occurred) + _long(received)
        text = event_id.encode()
        return b"".join(
            (
                _long(len(text)),
                text,
                self._type,
                _strings(o["tenant_id"], o["widget_id"], o["visitor_id"]),
                null,
                _optional_string(o["url"]),
                _optional_string(o["referrer"]),
                self._properties,
                null,
                times,
                stamps,
            )
        )


class EventReader:
    """Decodes raw-topic messages (VisitorEventBatch or single VisitorEvent) into the values of `codec` (the
    processors': raw values, uuid text and int µs), each event with its own datum bytes when `restamp` may be
    used on it."""

    def __init__(self, codec: EventCodec) -> None:
        self.codec = codec
        event_schema = codec.event.schema
        if [f["name"] for f in event_schema["fields"][-len(STAMPED) :]] != STAMPED:
            raise RuntimeError(f"visitor_event.avsc must end with {STAMPED}: the restamp shortcut depends on it")
        self._event_fp = codec.event.header[2:]
        self._reader = codec.event.parsed
        # batch schema versions -> (parsed item writer schema, whose layout is the current VisitorEvent's)
        self._items: dict[bytes, tuple[Any, bool]] = {}
        for fp, batch_schema in codec.batch.versions.items():
            items = batch_schema["fields"][0]["type"]["items"]  # inlined in every batch schema version
            same = schema_fingerprint(items) == self._event_fp
            self._items[fp] = (None if same else fastavro.parse_schema(without_logical_types(items)), same)

    def read(self, data: bytes | None) -> list[RawEvent]:
        item = self._items.get(bytes(data[2:HEADER_LEN])) if data and len(data) >= HEADER_LEN else None
        if item is None:  # a single VisitorEvent, or garbage
            record = self.codec.event.decode(data)
            assert data is not None  # it decoded
            current = bytes(data[2:HEADER_LEN]) == self._event_fp
            return [(record, self._restampable(record, data[HEADER_LEN:] if current else None))]
        assert data is not None  # it has a batch header
        writer, current = item
        if current and type(data) is bytes:
            try:
                return read_current_items(data)
            except Exception:  # anything unusual: fastavro below gives the values or the error
                pass
        try:
            return self._read_items(data, writer, current)
        except DecodeError:
            raise
        except Exception as exc:  # fastavro raises a zoo of types on truncated/garbage input
            raise DecodeError(f"corrupt visitor_event_batch payload: {exc}") from exc

    def _read_items(self, data: bytes, writer: Any, current: bool) -> list[RawEvent]:
        """The array of the batch record, one item at a time so that each item's bytes are known."""
        buf, out = io.BytesIO(data), []
        buf.seek(HEADER_LEN)
        reader = self._reader
        while count := read_long(buf):
            if count < 0:  # a block with its byte size (other writers): skip the size
                count = -count
                read_long(buf)
            for _ in range(count):
                start = buf.tell()
                if current:
                    record = cast(dict[str, Any], fastavro.schemaless_reader(buf, reader, None))  # a record schema
                    out.append((record, self._restampable(record, data[start : buf.tell()])))
                else:
                    out.append((cast(dict[str, Any], fastavro.schemaless_reader(buf, writer, reader)), None))
        return out

    @staticmethod
    def _restampable(record: dict[str, Any], datum: bytes | None) -> bytes | None:
        if datum is None or record["session_id"] is not None or record["customer_id"] is not None:
            return None
        return datum


def restamp(datum: bytes, session_id: str | None, customer_id: str | None) -> bytes:
    """The datum (from `EventReader`) of the same event with session_id and customer_id set."""
    return datum[:-2] + stamp_bytes(session_id, customer_id)


def stamp_bytes(session_id: str | None, customer_id: str | None) -> bytes:
    """What `restamp` puts in place of a restampable datum's last two bytes (`datum[:-2] + stamp_bytes(...)`)."""
    return _optional_string(session_id) + _optional_string(customer_id)


def frame_messages(header: bytes, datums: list[bytes], max_bytes: int) -> list[bytes]:
    """The datums as VisitorEventBatch messages of at most max_bytes each where possible, in order: greedy, so
    the same datums always give the same messages (a replay writes the same records). A datum that alone
    exceeds max_bytes gets a message of its own (the producer then refuses it and it is dead-lettered)."""
    whole = len(header) + len(_long(len(datums))) + sum(map(len, datums)) + 1
    if whole <= max_bytes:  # the usual case: one message
        return [frame_message(header, datums)]
    framing = len(header) + 6  # header, block count (<= 5 bytes for any list that fits), end of array
    out: list[bytes] = []
    chunk: list[bytes] = []
    size = framing
    for datum in datums:
        if chunk and size + len(datum) > max_bytes:
            out.append(frame_message(header, chunk))
            chunk, size = [], framing
        chunk.append(datum)
        size += len(datum)
    if chunk or not out:
        out.append(frame_message(header, chunk))
    return out


def frame_message(header: bytes, datums: list[bytes]) -> bytes:
    """A VisitorEventBatch message (`header`: the batch codec's) whose events are the given item datums:
    one array block of len(datums) items, then the empty block that ends the array."""
    if not datums:
        return header + b"\x00"
    return b"".join((header, _long(len(datums)), *datums, b"\x00"))


# --- the lean reader: VisitorEventBatch values of current-schema events, without fastavro -----------------------
# fastavro reads an item field by field from a file object (a Python call per field), and `EventReader` reads one
# item per call to learn each item's bytes: costly per event (figures: bench/README.md). The function below walks the
# bytes of a VisitorEventBatch of current VisitorEvents directly and builds the very dicts fastavro builds (raw values:
# str, int µs). It takes only what it is sure of: any other input (a block with a byte size, an enum or union index
# out of range, a negative length, a varint over 64 bits, invalid UTF-8, truncation) raises, and the caller reads
# the message with fastavro instead, which gives the values or the error exactly as before
# (tests/test_processors_state.py compares the two on generated and corrupted VisitorEventBatch values).

_EVENT_TYPES = {2 * i: symbol for i, symbol in enumerate(["pageview", "session_start", "custom", "identify"])}


class _NotLean(ValueError):
    """Input the lean reader leaves to fastavro."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The unsigned varint at pos (its zigzag form) and the position after it; at most 64 bits."""
    shift = acc = 0
    while True:
        b = data[pos]
        pos += 1
        acc |= (b & 0x7F) << shift
        if b < 0x80:
            if acc >> 64:
                raise _NotLean("varint over 64 bits")
            return acc, pos
        shift += 7
        if shift > 63:
            raise _NotLean("varint over 10 bytes")


_CONTINUATIONS_8 = 0x8080808080808080  # the continuation bits of 8 bytes read as a little-endian int
_EIGHT_BYTES = 0x0080808080808080  # a varint of exactly 8 bytes: the first seven continue, the eighth ends it


# Two 8-byte varints read as one little-endian 128-bit int: the continuation bits of both, and the k-th seven-bit
# group of both (masked, then shifted right by k, each lands where its value's bits go: the groups joined).
_CONTINUATIONS_16 = _CONTINUATIONS_8 | _CONTINUATIONS_8 << 64
_EIGHT_BYTES_16 = _EIGHT_BYTES | _EIGHT_BYTES << 64
_GROUPS_16 = tuple((0x7F << 8 * k) | (0x7F << (64 + 8 * k)) for k in range(8))


def read_current_items(data: bytes) -> list[RawEvent]:
    """The events of a VisitorEventBatch message whose items are current VisitorEvents (header already
    checked by the caller), each with its own datum when it can be restamped. Raises on anything unusual.

    Written for speed (a third of a worker's batch work was spent here): fields inline, no helper calls on the
    usual path. The events of one message are one visitor's (one ingest request), so their tenant_id,
    widget_id and visitor_id are usually the very bytes of the event before: those are compared as one run
    of bytes and the strings read for the first event are used again."""
    types = _EVENT_TYPES
    continuations, eight_bytes, (g0, g1, g2, g3, g4, g5, g6, g7) = _CONTINUATIONS_16, _EIGHT_BYTES_16, _GROUPS_16
    end = len(data)
    pos = HEADER_LEN
    out: list[RawEvent] = []
    shared = b""  # the encoded tenant_id, widget_id, visitor_id of the event before
    tenant_id = widget_id = visitor_id = ""
    while True:
        n, pos = _varint(data, pos)
        if n == 0:
            break
        if n & 1:  # a negative count: a block with its byte size
            raise _NotLean("sized block")
        for _ in range(n >> 1):
            start = pos
            # event_id (uuid text: 36 bytes, length byte 0x48), event_type
            if data[pos] == 0x48:
                event_id = data[pos + 1 : pos + 37].decode()
                pos += 37
            else:
                n = data[pos]
                pos += 1
                if n >= 0x80:
                    n, pos = _varint(data, pos - 1)
                if n & 1:
                    raise _NotLean("negative length")
                event_id = data[pos : pos + (n >> 1)].decode()
                pos += n >> 1
            event_type = types[data[pos]]
            pos += 1
            # tenant_id, widget_id, visitor_id: those of the event before, or read anew
            if shared and data.startswith(shared, pos):
                pos += len(shared)
            else:
                first = pos
                n = data[pos]
                pos += 1
                if n >= 0x80:
                    n, pos = _varint(data, pos - 1)
                if n & 1:
                    raise _NotLean("negative length")
                tenant_id = data[pos : pos + (n >> 1)].decode()
                pos += n >> 1
                n = data[pos]
                pos += 1
                if n >= 0x80:
                    n, pos = _varint(data, pos - 1)
                if n & 1:
                    raise _NotLean("negative length")
                widget_id = data[pos : pos + (n >> 1)].decode()
                pos += n >> 1
                n = data[pos]
                pos += 1
                if n >= 0x80:
                    n, pos = _varint(data, pos - 1)
                if n & 1:
                    raise _NotLean("negative length")
                visitor_id = data[pos : pos + (n >> 1)].decode()
                pos += n >> 1
                if pos > end:
                    raise _NotLean("truncated")  # (a short slice decodes without complaint)
                shared = data[first:pos]
            # name, url, referrer: ["null", "string"]
            branch = data[pos]
            pos += 1
            if branch == 0:
                name = None
            elif branch == 2:
                n = data[pos]
                pos += 1
                if n >= 0x80:
                    n, pos = _varint(data, pos - 1)
                if n & 1:
                    raise _NotLean("negative length")
                name = data[pos : pos + (n >> 1)].decode()
                pos += n >> 1
            else:
                raise _NotLean("union index")
            branch = data[pos]
            pos += 1
            if branch == 0:
                url = None
            elif branch == 2:
                n = data[pos]
                pos += 1
                if n >= 0x80:
                    n, pos = _varint(data, pos - 1)
                if n & 1:
                    raise _NotLean("negative length")
                url = data[pos : pos + (n >> 1)].decode()
                pos += n >> 1
            else:
                raise _NotLean("union index")
            branch = data[pos]
            pos += 1
            if branch == 0:
                referrer = None
            elif branch == 2:
                n = data[pos]
                pos += 1
                if n >= 0x80:
                    n, pos = _varint(data, pos - 1)
                if n & 1:
                    raise _NotLean("negative length")
                referrer = data[pos : pos + (n >> 1)].decode()
                pos += n >> 1
            else:
                raise _NotLean("union index")
            # properties: most often "{}"
            if data.startswith(b"\x04{}", pos):
                properties = "{}"
                pos += 3
            else:
                n = data[pos]
                pos += 1
                if n >= 0x80:
                    n, pos = _varint(data, pos - 1)
                if n & 1:
                    raise _NotLean("negative length")
                properties = data[pos : pos + (n >> 1)].decode()
                pos += n >> 1
            # user_id: ["null", "string"]
            branch = data[pos]
            pos += 1
            if branch == 0:
                user_id = None
            elif branch == 2:
                n = data[pos]
                pos += 1
                if n >= 0x80:
                    n, pos = _varint(data, pos - 1)
                if n & 1:
                    raise _NotLean("negative length")
                user_id = data[pos : pos + (n >> 1)].decode()
                pos += n >> 1
            else:
                raise _NotLean("union index")
            # occurred_at, received_at: zigzag longs, 8 bytes each for today's times (51 bits): both read as one
            # 128-bit int and the seven-bit groups of both joined at once
            n = int.from_bytes(data[pos : pos + 16], "little")
            if n & continuations == eight_bytes:
                n = (
                    (n & g0)
                    | (n & g1) >> 1
                    | (n & g2) >> 2
                    | (n & g3) >> 3
                    | (n & g4) >> 4
                    | (n & g5) >> 5
                    | (n & g6) >> 6
                    | (n & g7) >> 7
                )
                pos += 16
                z = n & 0xFFFFFFFFFFFFFF
                occurred_at = (z >> 1) ^ -(z & 1)
                n >>= 64
            else:
                n, pos = _varint(data, pos)
                occurred_at = (n >> 1) ^ -(n & 1)
                n, pos = _varint(data, pos)
            received_at = (n >> 1) ^ -(n & 1)
            # session_id, customer_id: null on the raw topic (then the datum can be restamped)
            if data[pos] or data[pos + 1]:
                raise _NotLean("ids already set")  # not from the API: the general path handles it
            pos += 2
            if pos > end:
                raise _NotLean("truncated")
            out.append(
                (
                    {
                        "event_id": event_id,
                        "event_type": event_type,
                        "tenant_id": tenant_id,
                        "widget_id": widget_id,
                        "visitor_id": visitor_id,
                        "name": name,
                        "url": url,
                        "referrer": referrer,
                        "properties": properties,
                        "user_id": user_id,
                        "occurred_at": occurred_at,
                        "received_at": received_at,
                        "session_id": None,
                        "customer_id": None,
                    },
                    data[start:pos],
                )
            )
    if pos > end:
        raise _NotLean("truncated")
    return out
