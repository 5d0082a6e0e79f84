"""Opaque pagination cursors and inbox-rail tokens, signed with the console's secret (itsdangerous).

A cursor is a listing kind + a keyset position (console.reads), signed so a client cannot forge a position or
use one listing's cursor on another; anything that does not verify is a 400, never a 500 or a silent restart."""

from __future__ import annotations

from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer, URLSafeTimedSerializer

from console.errors import ConsoleError


class Cursors:
    def __init__(self, secret: str) -> None:
        self._s = URLSafeSerializer(secret, salt="site-activity-read-cursor")

    def dump(self, kind: str, position: list[Any] | None) -> str | None:
        return None if position is None else self._s.dumps({"k": kind, "p": position})

    def load(self, kind: str, cursor: str | None) -> list[Any] | None:
        """The position in `cursor`; None for no cursor. ConsoleError(400) when forged, garbled or of another
        listing."""
        if cursor is None:
            return None
        try:
            data = self._s.loads(cursor)
        except BadSignature:
            raise ConsoleError(
                400, "cursor is not a 'next' value returned by this endpoint", error="bad_cursor"
            ) from None
        if not isinstance(data, dict) or data.get("k") != kind or not isinstance(data.get("p"), list):
            raise ConsoleError(400, f"cursor belongs to another listing (expected one from {kind})", error="bad_cursor")
        return data["p"]  # type: ignore[no-any-return]


class RailTokens:
    """Short-lived, read-only grants for the inbox rail panel: one tenant, one subject (a contact, or a visitor
    on a widget)."""

    def __init__(self, secret: str, ttl_s: int) -> None:
        self.ttl_s = ttl_s
        self._s = URLSafeTimedSerializer(secret, salt="site-activity-rail")

    def issue(self, subject: dict[str, str]) -> str:
        return self._s.dumps(subject)

    def subject(self, token: str) -> dict[str, str]:
        """The signed subject ({"t": tenant, "c": contact} or {"t", "w": widget, "v": visitor}); 401 when the
        token is forged, garbled or expired."""
        try:
            data = self._s.loads(token, max_age=self.ttl_s)
        except BadSignature:
            raise ConsoleError(
                401, "this panel link is invalid or expired; reload the conversation", error="rail_token_invalid"
            ) from None
        if not isinstance(data, dict) or "t" not in data:
            raise ConsoleError(401, "this panel link is invalid", error="rail_token_invalid")
        return data
