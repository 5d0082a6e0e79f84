"""Avro single-object encoding (magic C3 01 + CRC-64-AVRO fingerprint, little-endian) with fastavro.

Any consumer holding the .avsc files can decode a message: the 8-byte fingerprint names the writer
schema, so evolved schemas are resolved against the reader's schema without a registry.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

SCHEMA_DIR = Path(__file__).parent
MAGIC = b"\xc3\x01"
HEADER_LEN = 10


class DecodeError(ValueError):
    """A message that is not a single-object Avro datum of a known schema."""


def load_schema(path: Path) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def without_logical_types(schema: Any) -> Any:
    """The schema with every `logicalType` annotation removed: same Parsing Canonical Form (hence the same
    fingerprint and the same bytes on the wire), but fastavro then reads and writes the underlying
    primitives (uuid as str, timestamp-micros as int µs) instead of building uuid.UUID/datetime objects."""
    if isinstance(schema, dict):
        return {k: without_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [without_logical_types(x) for x in schema]
    return schema


def read_long(buf: io.BytesIO) -> int:
    """An Avro long (zigzag varint) read from `buf`."""
    shift = acc = 0
    while True:
        byte = buf.read(1)
        if not byte:
            raise DecodeError("truncated Avro long")
        acc |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return (acc >> 1) ^ -(acc & 1)
        shift += 7


def schema_fingerprint(schema: dict[str, Any]) -> bytes:
    parsed = fastavro.parse_schema(schema, _write_hint=False)
    hex_fp = fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")
    # fastavro's hex string already lists the bytes in the spec's little-endian wire order
    # (e.g. "int" -> 8f5c393f1ad57572 for CRC 0x7275d51a3f395c8f), same as avro's Schema.fingerprint().
    return bytes.fromhex(hex_fp)


class AvroCodec:
    """Encodes with the current schema; decodes any historical version of it (schemas/history).

    `logical_types=False` is the raw-values mode for hot paths: the same bytes, but uuid fields are plain
    str (as written, not validated or normalised) and timestamps int µs since the epoch, on decode and on
    encode. Converting to uuid.UUID/datetime costs about as much as the Avro decoding itself."""

    def __init__(self, name: str, logical_types: bool = True) -> None:
        self.name = name
        self.schema = load_schema(SCHEMA_DIR / f"{name}.avsc")
        self.header = MAGIC + schema_fingerprint(self.schema)
        self.parsed = self._parse(self.schema, logical_types)  # the current schema, parsed for fastavro
        self._writers: dict[bytes, Any] = {self.header[2:]: self.parsed}
        # every schema this codec decodes, by fingerprint (the current one first)
        self.versions: dict[bytes, dict[str, Any]] = {self.header[2:]: self.schema}
        for old in sorted((SCHEMA_DIR / "history").glob(f"{name}.v*.avsc")):
            old_schema = load_schema(old)
            self.versions.setdefault(schema_fingerprint(old_schema), old_schema)
            self._writers.setdefault(schema_fingerprint(old_schema), self._parse(old_schema, logical_types))

    @staticmethod
    def _parse(schema: dict[str, Any], logical_types: bool) -> Any:
        return fastavro.parse_schema(schema if logical_types else without_logical_types(schema))

    def encode(self, record: Mapping[str, Any]) -> bytes:
        buf = io.BytesIO()
        buf.write(self.header)
        fastavro.schemaless_writer(buf, self.parsed, record)
        return buf.getvalue()

    def encode_datum(self, record: dict[str, Any]) -> bytes:
        """The record's Avro binary encoding alone, without the single-object header (an item of an array)."""
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, self.parsed, record)
        return buf.getvalue()

    def knows(self, data: bytes) -> bool:
        """Whether `data` carries the fingerprint of this schema or of one of its released versions."""
        return bytes(data[2:HEADER_LEN]) in self._writers

    def decode(self, data: bytes | None) -> dict[str, Any]:
        if not data or len(data) < HEADER_LEN or data[:2] != MAGIC:
            raise DecodeError("not an Avro single-object message (bad magic)")
        writer = self._writers.get(bytes(data[2:HEADER_LEN]))
        if writer is None:
            raise DecodeError(f"unknown {self.name} schema fingerprint {bytes(data[2:HEADER_LEN]).hex()}")
        try:
            return cast(dict[str, Any], fastavro.schemaless_reader(io.BytesIO(data[HEADER_LEN:]), writer, self.parsed))
        except Exception as exc:  # fastavro raises a zoo of types on truncated/garbage input
            raise DecodeError(f"corrupt {self.name} payload: {exc}") from exc


VISITOR_EVENT = "visitor_event"
VISITOR_EVENT_BATCH = "visitor_event_batch"
IDENTITY_LINK = "identity_link"


class EventCodec:
    """Visitor events as they travel: a `VisitorEventBatch` per message (the raw topic: one ingest request's
    events; the enriched topic: those events stamped, with the session_starts they opened), or a single
    `VisitorEvent`. Readers take either, so a consumer never has to know which producer wrote a message.
    `logical_types=False`: raw values, see `AvroCodec`."""

    def __init__(self, logical_types: bool = True) -> None:
        self.event = AvroCodec(VISITOR_EVENT, logical_types)
        self.batch = AvroCodec(VISITOR_EVENT_BATCH, logical_types)

    def encode_event(self, record: dict[str, Any]) -> bytes:
        return self.event.encode(record)

    def encode_events(self, records: list[Any]) -> bytes:
        return self.batch.encode({"events": records})

    def decode_events(self, data: bytes | None) -> list[dict[str, Any]]:
        """The events of one message value, in the message's order: a `VisitorEventBatch` gives its `events`
        (1 or more), a single `VisitorEvent` a list of one. Each event is a dict of the reader schema's fields;
        with logical types on, times are timezone-aware `datetime`s (UTC) and ids `str`; otherwise raw Avro values
        (timestamps as int microseconds since the epoch). Raises `DecodeError` for anything that is not a
        single-object message of a known writer schema (no value, bad magic, unknown fingerprint, truncated or
        corrupt payload): the caller dead-letters such a message, it never becomes a retry."""
        if data and len(data) >= HEADER_LEN and self.batch.knows(data):
            events: list[dict[str, Any]] = self.batch.decode(data)["events"]
            return events
        return [self.event.decode(data)]


class EventDecoder:
    """`EventCodec(logical_types=False).decode_events` (raw values: ids as str, times as int µs), with a shortcut
    for the messages the consumers (sink, webhooks) see: a VisitorEventBatch or a single VisitorEvent in the current schema. Those are read straight from the message (no slice copies, and
    no per-call comparison of reader and writer schema); everything else, including every message the
    shortcut fails on, goes through the codec, which resolves old schemas and raises the DecodeError."""

    def __init__(self) -> None:
        self.codec = EventCodec(logical_types=False)
        self._event_header = self.codec.event.header
        self._batch_header = self.codec.batch.header
        self._event = self.codec.event.parsed
        self._batch = self.codec.batch.parsed

    def decode_events(self, data: bytes | None) -> list[dict[str, Any]]:
        if data is not None:
            try:
                if data.startswith(self._batch_header):
                    batch = cast(dict[str, Any], fastavro.schemaless_reader(self._body(data), self._batch, None))
                    return cast(list[dict[str, Any]], batch["events"])
                if data.startswith(self._event_header):
                    return [cast(dict[str, Any], fastavro.schemaless_reader(self._body(data), self._event, None))]
            except Exception:
                pass
        return self.codec.decode_events(data)

    @staticmethod
    def _body(data: bytes) -> io.BytesIO:
        buf = io.BytesIO(data)  # shares the bytes, no copy
        buf.seek(HEADER_LEN)
        return buf
