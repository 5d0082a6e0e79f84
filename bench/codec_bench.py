"""Avro encodes/s of one library on one VisitorEvent record, as single-object encoding (header + datum).

    python bench/codec_bench.py --lib fastavro|avro|avro-python3 --seconds 2

Prints one JSON line. Every library must produce exactly the bytes schemas.codec (fastavro) produces, or the
measurement is refused. avro-python3 installs under the import name `avro`, so the caller runs it with
PYTHONPATH pointing at an isolated install; it has no logical types, so it gets timestamps as the epoch
microseconds they are on the wire (the same bytes)."""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from schemas.codec import SCHEMA_DIR, VISITOR_EVENT, AvroCodec


def sample_record() -> dict[str, Any]:
    at = datetime(2026, 11, 24, 8, 0, 5, 120_000, tzinfo=UTC)
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": "custom",
        "tenant_id": str(uuid.uuid4()),
        "widget_id": str(uuid.uuid4()),
        "visitor_id": "v_5f1c2a9e0b7d4c3a",
        "name": "clicked_upgrade",
        "url": "https://shop.example.com/pricing",
        "referrer": "https://www.google.com/",
        "properties": '{"plan":"pro","position":5,"variant":"b"}',
        "user_id": None,
        "occurred_at": at,
        "received_at": at,
        "session_id": None,
        "customer_id": None,
    }


def _micros(at: datetime) -> int:
    return (at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def version(lib: str) -> str:
    try:
        return dist_version(lib)
    except PackageNotFoundError:
        return "?"


def apache_encoder(header: bytes, legacy: bool) -> Callable[[dict[str, Any]], bytes]:
    import avro.io
    import avro.schema

    text = (SCHEMA_DIR / f"{VISITOR_EVENT}.avsc").read_text()
    schema = avro.schema.parse(text)
    writer = avro.io.DatumWriter(schema)

    def encode(record: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        buf.write(header)
        writer.write(record, avro.io.BinaryEncoder(buf))
        return buf.getvalue()

    return encode


def measure(encode: Callable[[dict[str, Any]], bytes], record: dict[str, Any], seconds: float) -> tuple[int, float]:
    count, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(200):
            encode(record)
        count += 200
        now = time.perf_counter()
        if now >= deadline:
            return count, now - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--lib", choices=["fastavro", "avro", "avro-python3"], required=True)
    p.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args(argv)

    codec = AvroCodec(VISITOR_EVENT)
    record = sample_record()
    expected = codec.encode(record)
    encode: Callable[[dict[str, Any]], bytes]
    if args.lib == "fastavro":
        encode, datum = codec.encode, record
    else:
        legacy = args.lib == "avro-python3"
        encode = apache_encoder(codec.header, legacy)
        datum = (
            {**record, "occurred_at": _micros(record["occurred_at"]), "received_at": _micros(record["received_at"])}
            if legacy
            else record
        )
    import_from = sys.modules["fastavro" if args.lib == "fastavro" else "avro"].__file__
    if encode(datum) != expected:
        print(json.dumps({"lib": args.lib, "error": "encoded bytes differ from schemas.codec (fastavro)"}))
        return 1
    count, elapsed = measure(encode, datum, args.seconds)
    print(
        json.dumps(
            {
                "lib": args.lib,
                "encodes": count,
                "seconds": round(elapsed, 3),
                "encodes_per_s": count / elapsed,
                "bytes": len(expected),
                "module": import_from,
                "version": version(args.lib),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
