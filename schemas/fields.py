"""The event's fields, read once from schemas/visitor_event.avsc (the contract). Every other list of event fields
in the code — the TypedDict in site_activity.events, the sink's row layout, the export's columns, the processors'
wire layout — is checked against it when its module is imported, so a field added to the schema cannot be
forgotten in one of them: the process does not start until every list names it."""

from __future__ import annotations

from collections.abc import Iterable

from schemas.codec import SCHEMA_DIR, load_schema

# In schema order (the order of the Avro record's fields on the wire).
EVENT_FIELDS: tuple[str, ...] = tuple(f["name"] for f in load_schema(SCHEMA_DIR / "visitor_event.avsc")["fields"])


class FieldListDrift(RuntimeError):
    """A list of event fields in the code no longer matches schemas/visitor_event.avsc."""


def check_event_fields(names: Iterable[str], where: str) -> None:
    """Raises `FieldListDrift` unless `names` are exactly the schema's event fields (any order, no repeats)."""
    names = list(names)
    missing = [f for f in EVENT_FIELDS if f not in names]
    extra = [n for n in names if n not in EVENT_FIELDS]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if missing or extra or repeated:
        raise FieldListDrift(
            f"{where} does not match schemas/visitor_event.avsc: missing {missing}, unknown {extra}, "
            f"repeated {repeated}"
        )
