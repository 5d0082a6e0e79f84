"""Avro schemas: the evolution check (`site-activity schemas check`) and wire interoperability of the codec
with the Apache `avro` reference library."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import avro.io
import avro.schema
import psycopg
import pytest

from schemas.codec import SCHEMA_DIR, AvroCodec
from schemas.compat import check_all, fastavro_resolution_error, incompatibilities
from schemas.fields import EVENT_FIELDS, FieldListDrift, check_event_fields
from site_activity.events import VisitorEvent
from tests.avro_spec import crc64_avro, parsing_canonical_form

REPO = Path(__file__).resolve().parents[1]


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "command_line", "schemas", "check", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def schema_dir(tmp_path: Path) -> Path:
    """A scratch copy of the repo's schemas (current + history) to evolve."""
    target = tmp_path / "schemas"
    shutil.copytree(SCHEMA_DIR, target, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return target


def evolve(schema_dir: Path, change: Callable[[dict[str, Any]], None], name: str = "visitor_event") -> None:
    path = schema_dir / f"{name}.avsc"
    schema = json.loads(path.read_text())
    change(schema)
    path.write_text(json.dumps(schema, indent=2))


def field(schema: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in schema["fields"] if f["name"] == name)


# --- the evolution check ---------------------------------------------------------------------------------


def test_repo_schemas_pass_the_cli_check() -> None:
    result = run_check()
    assert result.returncode == 0, result.stderr
    assert "backward-compatible" in result.stdout


def test_adding_a_field_with_a_default_is_compatible_but_asks_for_a_history_file(schema_dir: Path) -> None:
    evolve(schema_dir, lambda s: s["fields"].append({"name": "locale", "type": ["null", "string"], "default": None}))
    warnings: list[str] = []
    assert check_all(schema_dir, on_warning=warnings.append) == []
    assert len(warnings) == 1 and "history/visitor_event.v2.avsc" in warnings[0]


def test_released_history_file_silences_the_warning(schema_dir: Path) -> None:
    evolve(schema_dir, lambda s: s["fields"].append({"name": "locale", "type": "string", "default": ""}))
    shutil.copy(schema_dir / "visitor_event.avsc", schema_dir / "history" / "visitor_event.v2.avsc")
    warnings: list[str] = []
    assert check_all(schema_dir, on_warning=warnings.append) == []
    assert warnings == []


def test_adding_a_field_without_a_default_fails_naming_the_field(schema_dir: Path) -> None:
    evolve(schema_dir, lambda s: s["fields"].append({"name": "locale", "type": "string"}))
    problems = check_all(schema_dir, on_warning=lambda _: None)
    assert len(problems) == 1
    assert "VisitorEvent.locale" in problems[0] and "without a default" in problems[0]
    assert "history/visitor_event.v1.avsc" in problems[0]


def test_changing_string_to_int_fails(schema_dir: Path) -> None:
    evolve(schema_dir, lambda s: field(s, "visitor_id").update(type="int"))
    problems = check_all(schema_dir, on_warning=lambda _: None)
    assert len(problems) == 1
    assert "VisitorEvent.visitor_id" in problems[0] and "string to int" in problems[0]


def test_promotions_and_dropped_fields_are_compatible(schema_dir: Path) -> None:
    def change(s: dict[str, Any]) -> None:
        s["fields"] = [f for f in s["fields"] if f["name"] != "referrer"]  # readers may drop fields
        field(s, "occurred_at")["type"] = "long"  # logical type dropped: same bytes

    evolve(schema_dir, change)
    # int -> long on a field of the other schema: add an int field to a released version, widen it now.
    link = schema_dir / "identity_link.avsc"
    released = json.loads(link.read_text())
    released["fields"].append({"name": "hops", "type": "int", "default": 0})
    (schema_dir / "history" / "identity_link.v2.avsc").write_text(json.dumps(released))
    evolve(
        schema_dir, lambda s: s["fields"].append({"name": "hops", "type": "long", "default": 0}), name="identity_link"
    )
    assert check_all(schema_dir, on_warning=lambda _: None) == []


def test_long_to_int_is_not_a_promotion(schema_dir: Path) -> None:
    evolve(schema_dir, lambda s: field(s, "received_at").update(type="int"))
    problems = check_all(schema_dir, on_warning=lambda _: None)
    assert ["VisitorEvent.received_at" in p and "long" in p and "int" in p for p in problems] == [True]


def test_removing_an_enum_symbol_fails(schema_dir: Path) -> None:
    evolve(schema_dir, lambda s: field(s, "event_type")["type"]["symbols"].remove("custom"))
    problems = check_all(schema_dir, on_warning=lambda _: None)
    assert len(problems) == 1
    assert "VisitorEvent.event_type" in problems[0] and "custom" in problems[0]


def test_removing_an_enum_symbol_is_fine_with_a_default_symbol(schema_dir: Path) -> None:
    def change(s: dict[str, Any]) -> None:
        enum = field(s, "event_type")["type"]
        enum["symbols"].remove("custom")
        enum["default"] = "pageview"

    evolve(schema_dir, change)
    assert check_all(schema_dir, on_warning=lambda _: None) == []


def test_making_a_nullable_field_required_fails(schema_dir: Path) -> None:
    def change(s: dict[str, Any]) -> None:
        url = field(s, "url")
        url["type"], url["default"] = "string", ""

    evolve(schema_dir, change)
    problems = check_all(schema_dir, on_warning=lambda _: None)
    assert len(problems) == 1 and "VisitorEvent.url" in problems[0] and "null" in problems[0]


def test_renames_need_aliases(schema_dir: Path) -> None:
    evolve(schema_dir, lambda s: field(s, "visitor_id").update(name="anonymous_id"))
    problems = check_all(schema_dir, on_warning=lambda _: None)
    assert len(problems) == 1 and "VisitorEvent.anonymous_id" in problems[0]
    evolve(schema_dir, lambda s: field(s, "anonymous_id").update(aliases=["visitor_id"]))
    assert check_all(schema_dir, on_warning=lambda _: None) == []


def test_nested_records_are_checked_recursively(schema_dir: Path) -> None:
    # Released: an optional nested "device" record. Now: a required field inside it.
    def device(extra: list[dict[str, Any]]) -> dict[str, Any]:
        record = {"type": "record", "name": "Device", "fields": [{"name": "os", "type": "string"}, *extra]}
        return {"name": "device", "type": ["null", record], "default": None}

    released = json.loads((schema_dir / "visitor_event.avsc").read_text())
    released["fields"].append(device([]))
    (schema_dir / "history" / "visitor_event.v2.avsc").write_text(json.dumps(released))
    evolve(schema_dir, lambda s: s["fields"].append(device([{"name": "model", "type": "string"}])))
    problems = check_all(schema_dir, on_warning=lambda _: None)
    assert len(problems) == 1
    assert "VisitorEvent.device.model" in problems[0] and "history/visitor_event.v2.avsc" in problems[0]


def test_every_history_version_must_stay_readable(schema_dir: Path) -> None:
    # v2 dropped "referrer"; a v3 that re-adds it as a required int breaks reading v1 only.
    v2 = json.loads((schema_dir / "visitor_event.avsc").read_text())
    v2["fields"] = [f for f in v2["fields"] if f["name"] != "referrer"]
    (schema_dir / "history" / "visitor_event.v2.avsc").write_text(json.dumps(v2))
    evolve(schema_dir, lambda s: field(s, "referrer").update(type="int", default=0))
    problems = check_all(schema_dir, on_warning=lambda _: None)
    # one line per old union branch (null, string) that an int cannot read
    assert len(problems) == 2
    assert all("history/visitor_event.v1.avsc" in p and "VisitorEvent.referrer" in p for p in problems)


def test_invalid_schema_is_reported_not_crashed(schema_dir: Path) -> None:
    evolve(schema_dir, lambda s: field(s, "properties").update(default=42))  # default must be a string
    problems = check_all(schema_dir, on_warning=lambda _: None)
    assert len(problems) == 1 and "visitor_event.avsc: not a valid Avro schema" in problems[0]


EVOLUTIONS: dict[str, tuple[Callable[[dict[str, Any]], object], bool]] = {
    # change -> still compatible? (each break is one that fastavro's sample data runs into)
    "add optional field": (lambda s: s["fields"].append({"name": "x", "type": "int", "default": 0}), True),
    "add required field": (lambda s: s["fields"].append({"name": "x", "type": "int"}), False),
    "drop a field": (lambda s: s["fields"].pop(4), True),
    "string to bytes": (lambda s: field(s, "visitor_id").update(type="bytes"), True),
    "string to int": (lambda s: field(s, "visitor_id").update(type="int"), False),
    "long to double": (lambda s: field(s, "received_at").update(type="double"), True),
    "long to int": (lambda s: field(s, "received_at").update(type="int"), False),
    "drop last enum symbol": (lambda s: field(s, "event_type")["type"]["symbols"].pop(), False),
    "nullable to required": (lambda s: (field(s, "url").update(type="string"), field(s, "url").pop("default")), False),
    "rename record with alias": (lambda s: s.update(name="Event", aliases=["VisitorEvent"]), True),
    "rename record": (lambda s: s.update(name="Event"), False),
}


@pytest.mark.parametrize("change", EVOLUTIONS)
def test_rules_agree_with_fastavro_resolution(change: str) -> None:
    """The hand-written rules and fastavro's own resolver (the check's second opinion) agree."""
    old = json.loads((SCHEMA_DIR / "visitor_event.avsc").read_text())
    new = json.loads(json.dumps(old))
    apply, compatible = EVOLUTIONS[change]
    apply(new)
    assert (incompatibilities(new, old) == []) is compatible
    assert (fastavro_resolution_error(new, old) is None) is compatible


def test_cli_exits_1_with_the_problem_on_stderr(schema_dir: Path) -> None:
    evolve(schema_dir, lambda s: s["fields"].append({"name": "locale", "type": "string"}))
    result = run_check("--dir", str(schema_dir))
    assert result.returncode == 1
    assert "VisitorEvent.locale" in result.stderr and "without a default" in result.stderr
    assert "backward-compatible" not in result.stdout


def test_cli_warns_about_an_unreleased_compatible_change(schema_dir: Path) -> None:
    evolve(schema_dir, lambda s: s["fields"].append({"name": "locale", "type": "string", "default": ""}))
    result = run_check("--dir", str(schema_dir))
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "history/visitor_event.v2.avsc" in result.stderr


# --- wire interoperability with the Apache avro reference library -----------------------------------------


def test_crc64_avro_matches_the_spec_test_vectors() -> None:
    # From the Avro spec's test suite (share/test/data/schema-tests.txt): fingerprints of primitive schemas.
    assert crc64_avro(b'"null"') == 0x63DD24E7CC258F8A
    assert crc64_avro(b'"int"') == 0x7275D51A3F395C8F


def sample_event(**overrides: Any) -> VisitorEvent:
    event: VisitorEvent = {
        "event_id": str(uuid.uuid4()),
        "event_type": "custom",
        "tenant_id": str(uuid.uuid4()),
        "widget_id": str(uuid.uuid4()),
        "visitor_id": "v-ünïcode-42",
        "name": "clicked_upgrade",
        "url": "https://example.com/pricing?x=1",
        "referrer": None,
        "properties": json.dumps({"plan": "growth", "emoji": "🚀"}),
        "user_id": None,
        "occurred_at": datetime(2026, 11, 24, 8, 0, 5, 120_000, tzinfo=UTC),
        "received_at": datetime(2026, 11, 24, 8, 0, 5, 987_654, tzinfo=UTC),
        "session_id": str(uuid.uuid4()),
        "customer_id": None,
    }
    event.update(overrides)  # type: ignore[typeddict-item]
    return event


def test_single_object_encoding_is_readable_by_the_reference_library() -> None:
    codec = AvroCodec("visitor_event")
    event = sample_event()
    data = codec.encode(event)

    assert data[:2] == b"\xc3\x01"
    canonical = parsing_canonical_form(codec.schema)
    assert '"logicalType"' not in canonical and "doc" not in canonical
    assert data[2:10] == crc64_avro(canonical.encode()).to_bytes(8, "little")

    reader = avro.io.DatumReader(avro.schema.parse(json.dumps(codec.schema)))
    decoded = cast(dict[str, Any], reader.read(avro.io.BinaryDecoder(io.BytesIO(data[10:]))))
    # uuid fields come back as str or UUID depending on the library: compare their text.
    normalised = {k: str(v) if isinstance(v, uuid.UUID) else v for k, v in decoded.items()}
    assert normalised == {k: str(v) if isinstance(v, uuid.UUID) else v for k, v in event.items()}


def test_identity_link_is_readable_by_the_reference_library() -> None:
    codec = AvroCodec("identity_link")
    link = {
        "tenant_id": str(uuid.uuid4()),
        "widget_id": str(uuid.uuid4()),
        "visitor_id": "v1",
        "user_id": "u_88291",
        "customer_id": str(uuid.uuid4()),
        "linked_at": datetime(2026, 11, 24, 8, 0, 5, 1, tzinfo=UTC),
    }
    data = codec.encode(link)
    assert data[2:10] == crc64_avro(parsing_canonical_form(codec.schema).encode()).to_bytes(8, "little")
    decoded = cast(
        dict[str, Any],
        avro.io.DatumReader(avro.schema.parse(json.dumps(codec.schema))).read(
            avro.io.BinaryDecoder(io.BytesIO(data[10:]))
        ),
    )
    assert {k: str(v) if isinstance(v, uuid.UUID) else v for k, v in decoded.items()} == link


def test_batch_schema_inlines_the_current_event_schema() -> None:
    """visitor_event_batch.avsc carries VisitorEvent inline (so the file alone decodes a raw message);
    the copy must never drift from visitor_event.avsc."""
    import json as _json

    from schemas.codec import SCHEMA_DIR as _DIR

    event = _json.loads((_DIR / "visitor_event.avsc").read_text())
    batch = _json.loads((_DIR / "visitor_event_batch.avsc").read_text())
    [events_field] = batch["fields"]
    assert events_field["type"]["items"] == event


# --- one field list (issue 10): every list of event fields in the code is checked against the schema ---------


def test_a_field_list_that_drifted_from_the_schema_is_refused() -> None:
    check_event_fields(reversed(EVENT_FIELDS), "any order")
    with pytest.raises(FieldListDrift, match=r"missing \['customer_id'\]"):
        check_event_fields([f for f in EVENT_FIELDS if f != "customer_id"], "a list without a field")
    with pytest.raises(FieldListDrift, match=r"unknown \['device'\]"):
        check_event_fields([*EVENT_FIELDS, "device"], "a list with a field the schema lacks")
    with pytest.raises(FieldListDrift, match=r"repeated \['url'\]"):
        check_event_fields([*EVENT_FIELDS, "url"], "a list naming a field twice")


def test_the_event_table_has_a_column_per_schema_field(db: psycopg.Connection) -> None:
    columns = {
        r[0]
        for r in db.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'visitor_events'")
    }
    assert set(EVENT_FIELDS) <= columns, set(EVENT_FIELDS) - columns
