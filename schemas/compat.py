"""Backward-compatibility check for the Avro schemas: can the current schema READ what older versions wrote?

Layout: ``schemas/<name>.avsc`` is the current schema; ``schemas/history/<name>.v<N>.avsc`` are released
versions. The codec decodes a message written with ANY history version using the current schema as the
reader, so the current schema must be backward-compatible with every history version (transitively), not
only the newest one. Problems are reported against each history version it cannot read.

Avro's schema-resolution rules (records, aliases, defaults, promotions, enums, fixed, unions) are decided by
the Apache `avro` package's reference checker, `avro.compatibility.ReaderWriterCompatibilityChecker`. Its
messages and locations are unordered sets, and it loses the location inside unions, so this module walks the
two schemas side by side only to say WHERE each pair the checker refuses is (``VisitorEvent.url``) and in
words a schema author reads. What the reference checker does not cover stays here:
- a change between two logical types (e.g. timestamp-millis -> timestamp-micros) or of decimal
  precision/scale resolves byte-wise but silently changes values, so it is reported too;
- a second opinion: a sample datum generated from each old schema is encoded with fastavro (the codec's
  library) and decoded with (writer=old, reader=current); a failure there is reported as well;
- the release rule: the codec only knows the fingerprints of the current schema and the history files. When
  the current schema's fingerprint matches no history file, it is an unreleased change: that is a *warning*
  (not a failure) saying which history file to add when the change is released, because once the schema
  changes again, messages written with this version could no longer be decoded otherwise.
"""

from __future__ import annotations

import decimal
import io
import json
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import avro.schema
import fastavro
from avro.compatibility import (
    ReaderWriterCompatibilityChecker,
    SchemaCompatibilityType,
    lookup_writer_field,
    schema_name_equals,
)
from avro.schema import ArraySchema, EnumSchema, FixedSchema, MapSchema, NamedSchema, RecordSchema, Schema, UnionSchema

from schemas.codec import SCHEMA_DIR, schema_fingerprint

HISTORY_FILE = re.compile(r"^(?P<name>.+)\.v(?P<version>\d+)\.avsc$")
NAMED = frozenset({"record", "error", "enum", "fixed"})


def _describe(schema: Schema) -> str:
    if isinstance(schema, UnionSchema):
        return "[" + ", ".join(_describe(b) for b in schema.schemas) + "]"
    if isinstance(schema, NamedSchema):
        return f"{schema.type} {schema.name}"
    if isinstance(schema, ArraySchema):
        return f"array<{_describe(schema.items)}>"
    if isinstance(schema, MapSchema):
        return f"map<{_describe(schema.values)}>"
    logical = schema.get_prop("logicalType")
    return f"{schema.type} ({logical})" if logical else str(schema.type)


def _logical_change(reader: Schema, writer: Schema, path: str) -> Iterator[str]:
    """What the reference checker does not look at: logical types over the same underlying type."""
    r_logical, w_logical = reader.get_prop("logicalType"), writer.get_prop("logicalType")
    if r_logical and w_logical and r_logical != w_logical:
        yield (
            f"{path}: logical type changed from {w_logical} to {r_logical}; the bytes resolve but the values "
            "would change meaning"
        )
    elif r_logical == "decimal" == w_logical:
        for prop in ("precision", "scale"):
            if (reader.get_prop(prop) or 0) != (writer.get_prop(prop) or 0):
                yield (
                    f"{path}: decimal {prop} changed from {writer.get_prop(prop) or 0} to {reader.get_prop(prop) or 0}"
                )


@dataclass
class _Explainer:
    """Walks reader and writer together; every pair the reference checker refuses becomes one line naming its
    path; compatible leaves are checked for logical-type changes."""

    checker: ReaderWriterCompatibilityChecker = field(default_factory=ReaderWriterCompatibilityChecker)
    _seen: set[tuple[int, int]] = field(default_factory=set)

    def ok(self, reader: Schema, writer: Schema) -> bool:
        verdict = self.checker.get_compatibility(reader, writer).compatibility
        return verdict is not SchemaCompatibilityType.incompatible

    def explain(self, reader: Schema, writer: Schema, path: str) -> Iterator[str]:
        if isinstance(writer, UnionSchema):
            for branch in writer.schemas:
                suffix = "" if isinstance(reader, UnionSchema) else f" (old data of union branch {_describe(branch)})"
                yield from (p + suffix for p in self.explain(reader, branch, path))
        elif isinstance(reader, UnionSchema):
            # The branch Avro resolves to: a readable one (same type first, then a promotion); else the branch of
            # the same kind, so the problem is named inside it (VisitorEvent.device.model).
            accepted = [b for b in reader.schemas if self.ok(b, writer)]
            same = [
                b
                for b in reader.schemas
                if b.type == writer.type
                and (not isinstance(b, NamedSchema) or schema_name_equals(b, cast(NamedSchema, writer)))
            ]
            branch = next((b for b in accepted if b in same), accepted[0]) if accepted else next(iter(same), None)
            if branch is None:
                yield f"{path}: the old type {_describe(writer)} is not accepted by the new union {_describe(reader)}"
            else:
                yield from self.explain(branch, writer, path)
        elif reader.type != writer.type:
            if not self.ok(reader, writer):
                yield (
                    f"{path}: type changed from {_describe(writer)} to {_describe(reader)}, which is not an Avro "
                    "promotion"
                )
        elif isinstance(reader, NamedSchema) and not schema_name_equals(reader, cast(NamedSchema, writer)):
            yield (
                f"{path}: {reader.type} renamed from {cast(NamedSchema, writer).name} to {reader.name} without an "
                "alias for the old name"
            )
        elif isinstance(reader, RecordSchema):
            yield from self._record(reader, writer, path)  # type: ignore[arg-type]
        elif isinstance(reader, EnumSchema) and not self.ok(reader, writer):
            missing = [s for s in writer.symbols if s not in reader.symbols]  # type: ignore[attr-defined]
            yield (
                f"{path}: enum {reader.name} dropped symbol(s) {', '.join(missing)} and has no default symbol, "
                "so old data using them cannot be read"
            )
        elif isinstance(reader, ArraySchema):
            yield from self.explain(reader.items, writer.items, f"{path}[]")  # type: ignore[attr-defined]
        elif isinstance(reader, MapSchema):
            yield from self.explain(reader.values, writer.values, f"{path}{{}}")  # type: ignore[attr-defined]
        else:
            if isinstance(reader, FixedSchema) and not self.ok(reader, writer):
                yield f"{path}: fixed {reader.name} size changed from {writer.size} to {reader.size}"  # type: ignore[attr-defined]
            yield from _logical_change(reader, writer, path)

    def _record(self, reader: RecordSchema, writer: RecordSchema, path: str) -> Iterator[str]:
        if (id(reader), id(writer)) in self._seen:
            return  # a recursive record pair already under way
        self._seen.add((id(reader), id(writer)))
        for r_field in reader.fields:
            field_path = f"{path}.{r_field.name}"
            w_field = lookup_writer_field(writer, r_field)
            if w_field is not None:
                yield from self.explain(r_field.type, w_field.type, field_path)
            elif not r_field.has_default:
                yield (f"{field_path}: field added without a default, so old data (which lacks it) cannot be read")


def _qualified_aliases(schema: Any, namespace: str | None = None) -> Any:
    """The schema with every named type's aliases made full names, as the spec resolves them (relative to the
    type's namespace): the Python checker compares a writer's full name with the aliases as written."""
    if isinstance(schema, list):
        return [_qualified_aliases(b, namespace) for b in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if out.get("type") in NAMED and "name" in out:
        name = out["name"]
        full = name if "." in name else ".".join(filter(None, (out.get("namespace", namespace), name)))
        namespace = full.rpartition(".")[0] or None
        if "aliases" in out:
            out["aliases"] = [a if "." in a or not namespace else f"{namespace}.{a}" for a in out["aliases"]]
    for key in ("type", "items", "values"):
        if key in out and not isinstance(out[key], str):
            out[key] = _qualified_aliases(out[key], namespace)
    if "fields" in out:
        out["fields"] = [{**f, "type": _qualified_aliases(f["type"], namespace)} for f in out["fields"]]
    return out


def _parse(schema: Any) -> Schema:
    return avro.schema.parse(json.dumps(_qualified_aliases(schema)))


def incompatibilities(reader_schema: Any, writer_schema: Any) -> list[str]:
    """Why data written with writer_schema cannot be read with reader_schema (empty: it can), as decided by
    Avro's reference checker, plus logical-type changes it does not look at.

    Each problem starts with the field path, e.g. ``VisitorEvent.event_type``."""
    reader, writer = _parse(reader_schema), _parse(writer_schema)
    root = reader.name if isinstance(reader, NamedSchema) else str(reader.type)
    explainer = _Explainer()
    problems = list(explainer.explain(reader, writer, root))
    if not problems and not explainer.ok(reader, writer):  # a refusal the walk could not place: say it as is
        result = explainer.checker.get_compatibility(reader, writer)
        problems.append(f"{root}: {'; '.join(sorted(result.messages))} (at {', '.join(sorted(result.locations))})")
    return problems


# --------------------------------------------------------------------------------------------------------
# fastavro second opinion: encode sample data of the old schema, decode it with the new one


def _sample(schema: Schema, variant: int, depth: int = 0) -> Any:
    """A datum valid for schema; variant 0 takes first union branches/enum symbols, variant 1 the last."""
    if isinstance(schema, UnionSchema):
        branches = schema.schemas
        if depth > 8:  # recursive types end in their null branch
            branches = [b for b in branches if b.type == "null"] or branches
        return _sample(branches[0] if variant == 0 else branches[-1], variant, depth + 1)
    logical = schema.get_prop("logicalType")
    if logical == "decimal":
        scale = schema.get_prop("scale")
        return decimal.Decimal(1).scaleb(-scale if isinstance(scale, int) else 0)
    if logical == "uuid":
        return str(uuid.UUID(int=variant + 1))
    simple = {
        "null": None,
        "boolean": True,
        "int": 1,
        "long": 1,
        "float": 1.5,
        "double": 1.5,
        "bytes": b"x",
        "string": "x",
    }
    if schema.type in simple:
        return simple[schema.type]
    if isinstance(schema, FixedSchema):
        return b"\x01" * schema.size
    if isinstance(schema, EnumSchema):
        return schema.symbols[0 if variant == 0 else -1]
    if isinstance(schema, ArraySchema):
        return [] if depth > 8 else [_sample(schema.items, variant, depth + 1)]
    if isinstance(schema, MapSchema):
        return {} if depth > 8 else {"k": _sample(schema.values, variant, depth + 1)}
    assert isinstance(schema, RecordSchema), schema
    return {f.name: _sample(f.type, variant, depth + 1) for f in schema.fields}


def fastavro_resolution_error(reader_schema: Any, writer_schema: Any) -> str | None:
    writer = fastavro.parse_schema(writer_schema)
    reader = fastavro.parse_schema(reader_schema)
    for variant in (0, 1):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, writer, _sample(_parse(writer_schema), variant))
        buf.seek(0)
        try:
            fastavro.schemaless_reader(buf, writer, reader)
        except Exception as exc:  # fastavro's resolution errors have no common base class
            message = f"{type(exc).__name__}: {exc}"
            return message if len(message) <= 300 else message[:300] + "..."  # it may dump whole schemas
    return None


# --------------------------------------------------------------------------------------------------------
# The repository check


@dataclass(frozen=True)
class SchemaFile:
    path: Path
    schema: Any


def _load(path: Path, problems: list[str]) -> SchemaFile | None:
    try:
        schema = json.loads(path.read_text())
        fastavro.parse_schema(schema)  # also validates defaults against their field types
    except Exception as exc:  # JSON or Avro syntax: report it instead of crashing the check
        problems.append(f"{path.name}: not a valid Avro schema: {exc}")
        return None
    return SchemaFile(path, schema)


def history_versions(schema_dir: Path, name: str) -> list[tuple[int, Path]]:
    """Released versions of one schema as (N, path), oldest first (numeric order: v10 after v9)."""
    found = [
        (int(m["version"]), p)
        for p in (schema_dir / "history").glob(f"{name}.v*.avsc")
        if (m := HISTORY_FILE.match(p.name)) and m["name"] == name
    ]
    return sorted(found)


def _check_one(current: SchemaFile, history: list[SchemaFile]) -> Iterator[str]:
    for old in history:
        label = f"{current.path.name} cannot read data written with history/{old.path.name}"
        rule_problems = incompatibilities(current.schema, old.schema)
        yield from (f"{label}: {p}" for p in rule_problems)
        if not rule_problems and (error := fastavro_resolution_error(current.schema, old.schema)):
            yield f"{label}: fastavro could not resolve a sample record: {error}"


def _release_warning(schema_dir: Path, current: SchemaFile, history: list[SchemaFile]) -> str | None:
    fingerprint = schema_fingerprint(current.schema)
    if any(schema_fingerprint(old.schema) == fingerprint for old in history):
        return None
    name = current.path.stem
    next_version = max((n for n, _ in history_versions(schema_dir, name)), default=0) + 1
    return (
        f"{current.path.name} is not released yet (its fingerprint matches no history file): when you "
        f"release it, copy it to history/{name}.v{next_version}.avsc, or consumers will not decode "
        "messages written with it after the next schema change"
    )


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def check_all(schema_dir: Path | None = None, on_warning: Callable[[str], None] = _warn_stderr) -> list[str]:
    """Every backward-compatibility problem of the schemas in schema_dir (default: this package).

    Unreleased-but-compatible changes are not problems; they are passed to on_warning (stderr by default).
    """
    schema_dir = Path(schema_dir) if schema_dir is not None else SCHEMA_DIR
    problems: list[str] = []
    for path in sorted(schema_dir.glob("*.avsc")):
        current = _load(path, problems)
        history = [h for _, p in history_versions(schema_dir, path.stem) if (h := _load(p, problems))]
        if current is None:
            continue
        problems.extend(_check_one(current, history))
        if warning := _release_warning(schema_dir, current, history):
            on_warning(warning)
    return problems
