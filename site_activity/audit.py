"""The audit log: one append-only row per change (widget settings, members, keys, erasures), whoever made it."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb


def audit(
    conn: psycopg.Connection,
    *,
    actor: str,
    action: str,
    tenant_id: uuid.UUID | None,
    entity: str,
    entity_id: str,
    old: dict[str, Any] | None,
    new: dict[str, Any] | None,
    request_id: str | None = None,
) -> None:
    """Writes one audit_log row in the caller's transaction (so it commits or rolls back with the change).
    `old`/`new` are the changed values as JSON objects (None when there is no before/after)."""
    conn.execute(
        "INSERT INTO audit_log (actor, action, tenant_id, entity, entity_id, old_value, new_value, request_id)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (
            actor,
            action,
            tenant_id,
            entity,
            entity_id,
            Jsonb(old) if old is not None else None,
            Jsonb(new) if new is not None else None,
            request_id,
        ),
    )


class JsonFields:
    """Mixin for dataclasses shown in API answers and audit values: `public()` is the fields as JSON values
    (uuids and datetimes as their text)."""

    def public(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, (uuid.UUID, datetime)) else v) for k, v in asdict(self).items()}  # type: ignore[call-overload]
