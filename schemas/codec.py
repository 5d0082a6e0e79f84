"""Avro single-object encoding (magic C3 01 + CRC-64-AVRO fingerprint, little-endian) with fastavro.

Any consumer holding the .avsc files can decode a message: the 8-byte fingerprint names the writer
schema, so evolved schemas are resolved against the reader's schema without a registry.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

SCHEMA_DIR = Path(__file__).parent
MAGIC = b"\xc3\x01"
HEADER_LEN = 10


class DecodeError(ValueError):
    """A message that is not a single-object Avro datum of a known schema."""


def load_schema(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def schema_fingerprint(schema: dict[str, Any]) -> bytes:
    parsed = fastavro.parse_schema(schema, _write_hint=False)
    hex_fp = fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")
    # fastavro's hex string already lists the bytes in the spec's little-endian wire order
    # (e.g. "int" -> 8f5c393f1ad57572 for CRC 0x7275d51a3f395c8f), same as avro's Schema.fingerprint().
    return bytes.fromhex(hex_fp)


class AvroCodec:
    """Encodes with the current schema; decodes any historical version of it (schemas/history)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.schema = load_schema(SCHEMA_DIR / f"{name}.avsc")
        self._parsed = fastavro.parse_schema(self.schema)
        self.header = MAGIC + schema_fingerprint(self.schema)
        self._writers: dict[bytes, Any] = {self.header[2:]: self._parsed}
        for old in sorted((SCHEMA_DIR / "history").glob(f"{name}.v*.avsc")):
            old_schema = load_schema(old)
            self._writers.setdefault(schema_fingerprint(old_schema), fastavro.parse_schema(old_schema))

    def encode(self, record: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        buf.write(self.header)
        fastavro.schemaless_writer(buf, self._parsed, record)
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
            return fastavro.schemaless_reader(io.BytesIO(data[HEADER_LEN:]), writer, self._parsed)  # type: ignore[no-any-return]
        except Exception as exc:  # fastavro raises a zoo of types on truncated/garbage input
            raise DecodeError(f"corrupt {self.name} payload: {exc}") from exc


VISITOR_EVENT = "visitor_event"
VISITOR_EVENT_BATCH = "visitor_event_batch"
IDENTITY_LINK = "identity_link"


class EventCodec:
    """Visitor events as they travel: one `VisitorEvent` per message (enriched topic), or one
    `VisitorEventBatch` per ingest request (raw topic). Readers take either, so a consumer never has to
    know which producer wrote a message."""

    def __init__(self) -> None:
        self.event = AvroCodec(VISITOR_EVENT)
        self.batch = AvroCodec(VISITOR_EVENT_BATCH)

    def encode_event(self, record: dict[str, Any]) -> bytes:
        return self.event.encode(record)

    def encode_batch(self, records: list[Any]) -> bytes:
        return self.batch.encode({"events": records})

    def decode_events(self, data: bytes | None) -> list[dict[str, Any]]:
        if data and len(data) >= HEADER_LEN and self.batch.knows(data):
            events: list[dict[str, Any]] = self.batch.decode(data)["events"]
            return events
        return [self.event.decode(data)]
