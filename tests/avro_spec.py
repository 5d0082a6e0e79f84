"""The Avro specification's fingerprinting, written out from the spec itself, so tests can check our wire
format without trusting the library that produced it."""

from __future__ import annotations

import json
from typing import Any

CRC64_EMPTY = 0xC15D213AA4D7A795


def _crc64_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (CRC64_EMPTY & -(fp & 1))
        table.append(fp)
    return table


CRC64_TABLE = _crc64_table()


def crc64_avro(data: bytes) -> int:
    """The Avro specification's Rabin fingerprint ("CRC-64-AVRO"), written out from the spec."""
    fp = CRC64_EMPTY
    for byte in data:
        fp = (fp >> 8) ^ CRC64_TABLE[(fp ^ byte) & 0xFF]
    return fp


def parsing_canonical_form(schema: Any, namespace: str | None = None) -> str:
    """The spec's Parsing Canonical Form: full names, only type/name/fields/symbols/items/values/size, in that
    order, no whitespace. Attributes such as logicalType are stripped, so {"type": "string",
    "logicalType": "uuid"} becomes "string". (The Apache avro library's canonical_form keeps
    {"type":"string"} there, so its fingerprint of this schema differs: it is not spec-conformant.)"""
    primitives = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
    if isinstance(schema, str):
        full = schema if schema in primitives or "." in schema or not namespace else f"{namespace}.{schema}"
        return json.dumps(full)
    if isinstance(schema, list):
        return "[" + ",".join(parsing_canonical_form(b, namespace) for b in schema) + "]"
    kind = schema["type"]
    if kind in primitives or not isinstance(kind, str) or kind not in ("record", "enum", "fixed", "array", "map"):
        return parsing_canonical_form(kind, namespace)
    parts: list[str] = []
    if kind in ("record", "enum", "fixed"):
        name = schema["name"]
        ns = schema.get("namespace", namespace)
        name = name if "." in name or not ns else f"{ns}.{name}"
        namespace = name.rsplit(".", 1)[0] if "." in name else None
        parts.append(f'"name":{json.dumps(name)}')
    parts.append(f'"type":{json.dumps(kind)}')
    if kind == "record":
        fields = ",".join(
            f'{{"name":{json.dumps(f["name"])},"type":{parsing_canonical_form(f["type"], namespace)}}}'
            for f in schema["fields"]
        )
        parts.append(f'"fields":[{fields}]')
    if kind == "enum":
        parts.append(f'"symbols":[{",".join(json.dumps(s) for s in schema["symbols"])}]')
    if kind == "array":
        parts.append(f'"items":{parsing_canonical_form(schema["items"], namespace)}')
    if kind == "map":
        parts.append(f'"values":{parsing_canonical_form(schema["values"], namespace)}')
    if kind == "fixed":
        parts.append(f'"size":{schema["size"]}')
    return "{" + ",".join(parts) + "}"
