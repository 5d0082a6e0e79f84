"""Backward-compatibility check for the Avro schemas: can the current schema READ what older versions wrote?

Layout: ``schemas/<name>.avsc`` is the current schema; ``schemas/history/<name>.v<N>.avsc`` are released
versions. The codec decodes a message written with ANY history version using the current schema as the
reader, so the current schema must be backward-compatible with every history version (transitively), not
only the newest one. Problems are reported against each history version it cannot read.

Rules (Avro specification, "Schema Resolution"), checked over the JSON schemas:
- records match by unqualified name or a reader alias; a reader field is matched to the writer field of the
  same name or one of the reader field's aliases; a reader field with no writer counterpart needs a
  default; writer fields the reader dropped are skipped (fine);
- primitives match when equal or by promotion: int -> long/float/double, long -> float/double,
  float -> double, string <-> bytes;
- enums: every writer symbol must exist in the reader, unless the reader enum has a default symbol;
- fixed: same name and size; arrays/maps: items/values resolve recursively;
- unions: every branch the writer could have written must resolve against the reader (a union branch,
  or the reader itself when the reader is not a union);
- logical types are resolved by their underlying type, but a change between two different logical types
  (e.g. timestamp-millis -> timestamp-micros) or of decimal precision/scale silently changes values, so it
  is reported too.
As a second opinion, a sample datum generated from each old schema is encoded with fastavro and decoded
with (writer=old, reader=current); a failure there that the rules missed is reported as well.

Release rule: the codec only knows the fingerprints of the current schema and the history files. When the
current schema's fingerprint matches no history file, it is an unreleased change: that is a *warning*
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
from typing import Any

import fastavro

from schemas.codec import SCHEMA_DIR, schema_fingerprint

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
NAMED = frozenset({"record", "error", "enum", "fixed"})
# writer type -> reader types that can read it (besides itself)
PROMOTIONS: dict[str, frozenset[str]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}
HISTORY_FILE = re.compile(r"^(?P<name>.+)\.v(?P<version>\d+)\.avsc$")

Node = dict[str, Any]  # a normalised schema node, see _Normaliser


# --------------------------------------------------------------------------------------------------------
# Normalisation: every node becomes a dict with a "type"; named references point at the definition node
# (so recursive types become cycles); unions become {"type": "union", "branches": [...]}; names are full.


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _full(name: str, namespace: str | None) -> str:
    return name if "." in name or not namespace else f"{namespace}.{name}"


@dataclass
class _Normaliser:
    names: dict[str, Node] = field(default_factory=dict)

    def node(self, schema: Any, namespace: str | None) -> Node:
        if isinstance(schema, list):
            return {"type": "union", "branches": [self.node(b, namespace) for b in schema]}
        if isinstance(schema, str):
            if schema in PRIMITIVES:
                return {"type": schema}
            return self._reference(schema, namespace)
        kind = schema["type"]
        if not isinstance(kind, str) or (kind not in PRIMITIVES and kind not in NAMED
                                         and kind not in ("array", "map")):
            return self.node(kind, namespace)  # {"type": <schema>} or {"type": "SomeNamedType"}
        if kind in NAMED:
            return self._named(schema, namespace)
        if kind == "array":
            return {"type": "array", "items": self.node(schema["items"], namespace)}
        if kind == "map":
            return {"type": "map", "values": self.node(schema["values"], namespace)}
        return dict(schema)  # primitive, possibly with a logicalType

    def _reference(self, name: str, namespace: str | None) -> Node:
        for candidate in (_full(name, namespace), name):
            if candidate in self.names:
                return self.names[candidate]
        raise ValueError(f"unknown type {name!r}")

    def _named(self, schema: dict[str, Any], namespace: str | None) -> Node:
        full = _full(schema["name"], schema.get("namespace", namespace))
        inner_ns = full.rsplit(".", 1)[0] if "." in full else None
        node: Node = {k: v for k, v in schema.items() if k not in ("fields", "namespace")}
        node["name"] = full
        node["aliases"] = [_full(a, inner_ns) for a in schema.get("aliases", [])]
        self.names[full] = node  # registered before the fields, so a record may refer to itself
        if schema["type"] in ("record", "error"):
            node["fields"] = [
                {**f, "type": self.node(f["type"], inner_ns)} for f in schema["fields"]
            ]
        return node


def normalise(schema: Any) -> Node:
    return _Normaliser().node(schema, None)


# --------------------------------------------------------------------------------------------------------
# Resolution rules


def _describe(node: Node) -> str:
    kind = node["type"]
    if kind == "union":
        return "[" + ", ".join(_describe(b) for b in node["branches"]) + "]"
    if kind in NAMED:
        return f"{kind} {_short(node['name'])}"
    if kind == "array":
        return f"array<{_describe(node['items'])}>"
    if kind == "map":
        return f"map<{_describe(node['values'])}>"
    return f"{kind} ({node['logicalType']})" if "logicalType" in node else kind


def _names_match(reader: Node, writer: Node) -> bool:
    accepted = {_short(reader["name"])} | {_short(a) for a in reader.get("aliases", [])}
    return _short(writer["name"]) in accepted


def _same_kind(reader: Node, writer: Node) -> bool:
    """The spec's "match" for picking a union branch, without promotions."""
    if reader["type"] != writer["type"]:
        return False
    return _names_match(reader, writer) if reader["type"] in NAMED else True


def _promotable(reader: Node, writer: Node) -> bool:
    return reader["type"] in PROMOTIONS.get(writer["type"], frozenset())


def _pick_branch(reader_union: Node, writer: Node) -> Node | None:
    branches = reader_union["branches"]
    return (next((b for b in branches if _same_kind(b, writer)), None)
            or next((b for b in branches if _promotable(b, writer)), None))


@dataclass
class _Checker:
    problems: list[str] = field(default_factory=list)
    _seen: set[tuple[int, int]] = field(default_factory=set)

    def check(self, reader: Node, writer: Node, path: str) -> None:
        if writer["type"] == "union":
            for branch in writer["branches"]:
                self._check_branch(reader, branch, path)
            return
        if reader["type"] == "union":
            chosen = _pick_branch(reader, writer)
            if chosen is None:
                self.problems.append(f"{path}: the old type {_describe(writer)} is not accepted by the new "
                                     f"union {_describe(reader)}")
            else:
                self.check(chosen, writer, path)
            return
        if reader["type"] != writer["type"]:
            if not _promotable(reader, writer):
                self.problems.append(f"{path}: type changed from {_describe(writer)} to {_describe(reader)}, "
                                     "which is not an Avro promotion")
            return
        getattr(self, f"_check_{reader['type']}", self._check_primitive)(reader, writer, path)

    def _check_branch(self, reader: Node, branch: Node, path: str) -> None:
        before = len(self.problems)
        self.check(reader, branch, path)
        if len(self.problems) > before and reader["type"] != "union":
            # Say which old union branch breaks, e.g. null written into a now non-nullable field.
            self.problems[before:] = [f"{p} (old data of union branch {_describe(branch)})"
                                      for p in self.problems[before:]]

    def _check_primitive(self, reader: Node, writer: Node, path: str) -> None:
        r_logical, w_logical = reader.get("logicalType"), writer.get("logicalType")
        if r_logical and w_logical and r_logical != w_logical:
            self.problems.append(f"{path}: logical type changed from {w_logical} to {r_logical}; the bytes "
                                 "resolve but the values would change meaning")
        elif r_logical == "decimal" == w_logical:
            for prop in ("precision", "scale"):
                if reader.get(prop, 0) != writer.get(prop, 0):
                    self.problems.append(f"{path}: decimal {prop} changed from {writer.get(prop, 0)} to "
                                         f"{reader.get(prop, 0)}")

    def _named_ok(self, reader: Node, writer: Node, path: str) -> bool:
        if not _names_match(reader, writer):
            self.problems.append(f"{path}: {reader['type']} renamed from {_short(writer['name'])} to "
                                 f"{_short(reader['name'])} without an alias for the old name")
            return False
        return True

    def _check_record(self, reader: Node, writer: Node, path: str) -> None:
        key = (id(reader), id(writer))
        if key in self._seen or not self._named_ok(reader, writer, path):
            return  # a recursive record pair already under check
        self._seen.add(key)
        by_name = {f["name"]: f for f in writer["fields"]}
        for r_field in reader["fields"]:
            field_path = f"{path}.{r_field['name']}"
            w_field = next((by_name[n] for n in (r_field["name"], *r_field.get("aliases", [])) if n in by_name),
                           None)
            if w_field is not None:
                self.check(r_field["type"], w_field["type"], field_path)
            elif "default" not in r_field:
                self.problems.append(f"{field_path}: field added without a default, so old data (which lacks "
                                     "it) cannot be read")

    _check_error = _check_record

    def _check_enum(self, reader: Node, writer: Node, path: str) -> None:
        if not self._named_ok(reader, writer, path):
            return
        missing = [s for s in writer["symbols"] if s not in reader["symbols"]]
        if missing and "default" not in reader:
            self.problems.append(f"{path}: enum {_short(reader['name'])} dropped symbol(s) "
                                 f"{', '.join(missing)} and has no default symbol, so old data using them "
                                 "cannot be read")

    def _check_fixed(self, reader: Node, writer: Node, path: str) -> None:
        if not self._named_ok(reader, writer, path):
            return
        if reader["size"] != writer["size"]:
            self.problems.append(f"{path}: fixed {_short(reader['name'])} size changed from {writer['size']} "
                                 f"to {reader['size']}")
        self._check_primitive(reader, writer, path)  # decimal on fixed

    def _check_array(self, reader: Node, writer: Node, path: str) -> None:
        self.check(reader["items"], writer["items"], f"{path}[]")

    def _check_map(self, reader: Node, writer: Node, path: str) -> None:
        self.check(reader["values"], writer["values"], f"{path}{{}}")


def incompatibilities(reader_schema: Any, writer_schema: Any) -> list[str]:
    """Why data written with writer_schema cannot be read with reader_schema (empty: it can).

    Each problem starts with the field path, e.g. ``VisitorEvent.event_type``."""
    reader, writer = normalise(reader_schema), normalise(writer_schema)
    root = _short(reader["name"]) if reader["type"] in NAMED else reader["type"]
    checker = _Checker()
    checker.check(reader, writer, root)
    return checker.problems


# --------------------------------------------------------------------------------------------------------
# fastavro second opinion: encode sample data of the old schema, decode it with the new one


def _sample(node: Node, variant: int, depth: int = 0) -> Any:
    """A datum valid for node; variant 0 takes first union branches/enum symbols, variant 1 the last."""
    kind, logical = node["type"], node.get("logicalType")
    if kind == "union":
        branches = node["branches"]
        if depth > 8:  # recursive types end in their null branch
            branches = [b for b in branches if b["type"] == "null"] or branches
        return _sample(branches[0] if variant == 0 else branches[-1], variant, depth + 1)
    if logical == "decimal":
        return decimal.Decimal(1).scaleb(-node.get("scale", 0))
    if logical == "uuid":
        return str(uuid.UUID(int=variant + 1))
    simple = {"null": None, "boolean": True, "int": 1, "long": 1, "float": 1.5, "double": 1.5,
              "bytes": b"x", "string": "x"}
    if kind in simple:
        return simple[kind]
    if kind == "fixed":
        return b"\x01" * node["size"]
    if kind == "enum":
        return node["symbols"][0 if variant == 0 else -1]
    if kind == "array":
        return [] if depth > 8 else [_sample(node["items"], variant, depth + 1)]
    if kind == "map":
        return {} if depth > 8 else {"k": _sample(node["values"], variant, depth + 1)}
    return {f["name"]: _sample(f["type"], variant, depth + 1) for f in node["fields"]}


def fastavro_resolution_error(reader_schema: Any, writer_schema: Any) -> str | None:
    writer = fastavro.parse_schema(writer_schema)
    reader = fastavro.parse_schema(reader_schema)
    for variant in (0, 1):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, writer, _sample(normalise(writer_schema), variant))
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
    found = [(int(m["version"]), p) for p in (schema_dir / "history").glob(f"{name}.v*.avsc")
             if (m := HISTORY_FILE.match(p.name)) and m["name"] == name]
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
    return (f"{current.path.name} is not released yet (its fingerprint matches no history file): when you "
            f"release it, copy it to history/{name}.v{next_version}.avsc, or consumers will not decode "
            "messages written with it after the next schema change")


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def check_all(schema_dir: Path | None = None,
              on_warning: Callable[[str], None] = _warn_stderr) -> list[str]:
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
