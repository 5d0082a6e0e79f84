"""Session cookie and CSRF tokens, both signed with the console's secret (itsdangerous).

The session cookie holds {member id, random session id}; it is HttpOnly, SameSite=Lax and expires. The member
is loaded from Postgres on every request, so a removed member or a changed role takes effect at once.
CSRF: every form carries a token that is the session id signed under another salt (a signed double-submit);
a state-changing form is accepted only when its token matches the session presented with it."""

from __future__ import annotations

import contextlib
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, URLSafeTimedSerializer

from site_activity.settings import Settings

COOKIE = "sa_session"


# The example values shipped in deploy/ (compose requires its own; the k8s example must be replaced).
_PLACEHOLDER_KEYS = ("REPLACE_ME", "change-me")


class SecretError(RuntimeError):
    """The console has no usable signing key; it must not start (it would sign with a guessable key)."""


def load_secret(settings: Settings) -> str:
    """The configured key, else one kept in <data_dir>/console-secret (created once, mode 0600). Raises
    SecretError for an empty or placeholder key.

    Several console processes may start at once on one data dir: the key is written to a temp file and
    renamed into place (atomic), so a reader sees either no file or the whole key, never an empty one; when
    two create one at once, os.link makes exactly one win and both use the winner's."""
    if settings.console_secret_key:
        return _checked(settings.console_secret_key, "SITE_ACTIVITY_CONSOLE_SECRET_KEY")
    path = Path(settings.data_dir) / "console-secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f".console-secret.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)  # atomic, and fails if another process got there first (rename would replace)
        finally:
            tmp.unlink(missing_ok=True)
    return _checked(path.read_text().strip(), str(path))


def _checked(key: str, source: str) -> str:
    key = key.strip()
    if not key:
        raise SecretError(f"the console's signing key ({source}) is empty")
    if key.startswith(_PLACEHOLDER_KEYS):
        raise SecretError(f"the console's signing key ({source}) is the documented placeholder: set a random one")
    return key


@dataclass(frozen=True)
class Session:
    member_id: uuid.UUID
    sid: str


class Signer:
    def __init__(self, secret: str, ttl_s: int) -> None:
        self.ttl_s = ttl_s
        self._session = URLSafeTimedSerializer(secret, salt="site-activity-console-session")
        self._csrf = URLSafeTimedSerializer(secret, salt="site-activity-console-csrf")

    def new_session(self, member_id: uuid.UUID) -> str:
        return self._session.dumps({"m": str(member_id), "s": secrets.token_urlsafe(16)})

    def session(self, cookie: str | None) -> Session | None:
        if not cookie:
            return None
        try:
            data = self._session.loads(cookie, max_age=self.ttl_s)
            return Session(uuid.UUID(data["m"]), str(data["s"]))
        except (BadSignature, KeyError, TypeError, ValueError):
            return None

    def csrf_token(self, session: Session) -> str:
        return self._csrf.dumps(session.sid)

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        if not token:
            return False
        try:
            return bool(secrets.compare_digest(str(self._csrf.loads(token, max_age=self.ttl_s)), session.sid))
        except BadSignature:
            return False
