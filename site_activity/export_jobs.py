"""Export jobs: asked for through the console API, run by a background worker in the console process.

Life of a job (table `exports`, migration 0009):
    queued --claim--> running --archive written--> done --export_ttl_s--> expired
                         |                           \\--an erasure committed after the snapshot--> expired
                         +--error--> failed (or queued again for a lost database connection)
                         +--worker died: lease lapses--> claimed again (attempts + 1), failed after
                            export_max_attempts claims

Claiming is `FOR UPDATE SKIP LOCKED`, so any number of console replicas share the queue without running a job
twice at once. The claiming worker holds a lease (`lease_until`), renewed every third of export_lease_s while
it writes; a worker that dies stops renewing, and once the lease lapses another worker (or the same process
after a restart) claims the job again and starts over from a new snapshot. Every attempt writes its own file
(<export dir>/<tenant>/<id>-<attempt>.zip, ".partial" until complete); finishing is fenced on the lease owner,
so a worker that lost its lease can never mark a job done with its file. Left-over partial files of dead
attempts are removed when the job is claimed again.

The same worker deletes archives past `expires_at` and withdraws (deletes) archives of a tenant that erased a
subject after the archive's snapshot (GDPR: an erased person must not stay downloadable); both end as
`expired` with the reason in `error`. Downloads check the same two conditions, so nothing is served between
two sweeps. Requests, completions, downloads, expiries and withdrawals are audited (site_activity/audit.py)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import class_row

from site_activity.audit import audit
from site_activity.export import FORMATS, BundleResult, ExportError, ExportFilter, check_scope, write_bundle
from site_activity.settings import Settings

log = logging.getLogger(__name__)

SYSTEM_ACTOR = "system:export-worker"
WITHDRAWN_ERASURE = "withdrawn: a subject of this tenant was erased after the export's snapshot; request a new export"
EXPIRED = "expired: the archive was deleted after its retention (export_ttl_s)"


class JobError(Exception):
    """An export request or download that cannot be served; `status` is the HTTP status it maps to."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class ExportJob:
    id: uuid.UUID
    tenant_id: uuid.UUID
    requested_by: str
    format: str
    widget_id: uuid.UUID | None
    from_at: datetime | None
    to_at: datetime | None
    status: str
    attempts: int
    rows_done: int
    events_count: int | None
    contacts_count: int | None
    size_bytes: int | None
    sha256: str | None
    file_name: str | None
    erasures_seen: int | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None

    @property
    def filter(self) -> ExportFilter:
        return ExportFilter(self.tenant_id, self.widget_id, self.from_at, self.to_at)

    def public(self) -> dict[str, Any]:
        """The API's view of a job (GET /api/v1/exports/{id})."""

        def ts(v: datetime | None) -> str | None:
            return v.isoformat() if v else None

        done = self.status == "done"
        return {
            "id": str(self.id),
            "status": self.status,
            "format": self.format,
            "filters": {k: v for k, v in self.filter.public().items() if k != "tenant_id"},
            "requested_by": self.requested_by,
            "row_counts": (
                {"events": self.events_count, "contacts": self.contacts_count}
                if self.events_count is not None
                else None
            ),
            "rows_written": self.rows_done if self.status == "running" else None,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "attempts": self.attempts,
            "error": self.error,
            "created_at": ts(self.created_at),
            "started_at": ts(self.started_at),
            "finished_at": ts(self.finished_at),
            "expires_at": ts(self.expires_at),
            "download_url": f"/api/v1/exports/{self.id}/download" if done else None,
        }


_COLUMNS = ", ".join(ExportJob.__dataclass_fields__)


def _job(conn: psycopg.Connection, where: str, params: tuple[Any, ...]) -> ExportJob | None:
    with conn.cursor(row_factory=class_row(ExportJob)) as cur:
        return cur.execute(f"SELECT {_COLUMNS} FROM exports WHERE {where}", params).fetchone()


# --- API side --------------------------------------------------------------------------------------------
def create_job(
    conn: psycopg.Connection, flt: ExportFilter, fmt: str, *, actor: str, request_id: str | None = None
) -> ExportJob:
    """Queues an export (status queued) and audits the request in the same transaction. Raises JobError(404)
    for a widget outside the tenant, JobError(400) for an unknown format."""
    if fmt not in FORMATS:
        raise JobError(400, f"format must be one of {', '.join(FORMATS)}")
    job_id = uuid.uuid4()
    with conn.transaction():
        try:
            check_scope(conn, flt)
        except ExportError as exc:
            raise JobError(404, str(exc)) from None
        conn.execute(
            "INSERT INTO exports (id, tenant_id, requested_by, format, widget_id, from_at, to_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (job_id, flt.tenant_id, actor, fmt, flt.widget_id, flt.from_at, flt.to_at),
        )
        audit(
            conn,
            actor=actor,
            action="export.requested",
            tenant_id=flt.tenant_id,
            entity="export",
            entity_id=str(job_id),
            old=None,
            new={"format": fmt, **flt.public()},
            request_id=request_id,
        )
    job = get_job(conn, flt.tenant_id, job_id)
    assert job is not None
    return job


def get_job(conn: psycopg.Connection, tenant_id: uuid.UUID, job_id: uuid.UUID) -> ExportJob | None:
    """The tenant's job, or None (also for another tenant's id: callers answer 404 either way)."""
    return _job(conn, "id = %s AND tenant_id = %s", (job_id, tenant_id))


def open_download(
    conn: psycopg.Connection,
    settings: Settings,
    tenant_id: uuid.UUID,
    job_id: uuid.UUID,
    *,
    actor: str,
    request_id: str | None = None,
) -> tuple[ExportJob, Path]:
    """The archive to stream for a finished job, after auditing the download. JobError: 404 (no such job in the
    tenant), 409 (not finished yet, or failed), 410 (expired or withdrawn after an erasure)."""
    with conn.transaction():
        job = _job(conn, "id = %s AND tenant_id = %s FOR UPDATE", (job_id, tenant_id))
        if job is None:
            raise JobError(404, f"no export {job_id}")
        if job.status == "expired":
            raise JobError(410, job.error or EXPIRED)
        if job.status != "done":
            raise JobError(409, f"export {job_id} is {job.status}" + (f": {job.error}" if job.error else ""))
        reason = _withdraw_reason(conn, job)
        path = settings.exports_path / (job.file_name or "")
        if reason is None and not path.is_file():
            reason = EXPIRED
        if reason is not None:
            _withdraw(conn, settings, job, reason)  # committed with the transaction, then refused below
        else:
            audit(
                conn,
                actor=actor,
                action="export.downloaded",
                tenant_id=tenant_id,
                entity="export",
                entity_id=str(job_id),
                old=None,
                new={"bytes": job.size_bytes, "sha256": job.sha256},
                request_id=request_id,
            )
    if reason is not None:
        raise JobError(410, reason)
    return job, path


def _withdraw_reason(conn: psycopg.Connection, job: ExportJob) -> str | None:
    if job.expires_at is not None and conn.execute("SELECT %s <= now()", (job.expires_at,)).fetchone()[0]:  # type: ignore[index]
        return EXPIRED
    erasures = conn.execute("SELECT count(*) FROM erased_subjects WHERE tenant_id = %s", (job.tenant_id,)).fetchone()[0]  # type: ignore[index]
    if job.erasures_seen is not None and erasures > job.erasures_seen:
        return WITHDRAWN_ERASURE
    return None


def _withdraw(conn: psycopg.Connection, settings: Settings, job: ExportJob, reason: str) -> None:
    """Deletes the archive and marks the job expired (caller's transaction, row locked)."""
    if job.file_name:
        (settings.exports_path / job.file_name).unlink(missing_ok=True)
    conn.execute("UPDATE exports SET status = 'expired', error = %s WHERE id = %s", (reason, job.id))
    audit(
        conn,
        actor=SYSTEM_ACTOR,
        action="export.expired" if reason == EXPIRED else "export.withdrawn",
        tenant_id=job.tenant_id,
        entity="export",
        entity_id=str(job.id),
        old={"status": job.status},
        new={"status": "expired", "reason": reason},
    )


# --- worker side -----------------------------------------------------------------------------------------
def claim(conn: psycopg.Connection, owner: str, lease_s: float, max_attempts: int) -> ExportJob | None:
    """Takes the oldest job that is queued or whose worker's lease lapsed, and leases it to `owner`. Jobs
    that used up their attempts by lapsing are marked failed first."""
    with conn.transaction():
        for row in conn.execute(
            "UPDATE exports SET status = 'failed', lease_owner = NULL, finished_at = now(),"
            " error = 'the export worker stopped (crashed or was killed) during every one of '"
            "         || attempts || ' attempts'"
            " WHERE status = 'running' AND lease_until < now() AND attempts >= %s RETURNING id, tenant_id",
            (max_attempts,),
        ).fetchall():
            audit(
                conn,
                actor=SYSTEM_ACTOR,
                action="export.failed",
                tenant_id=row[1],
                entity="export",
                entity_id=str(row[0]),
                old=None,
                new={"reason": "attempts exhausted"},
            )
        claimed = conn.execute(
            "UPDATE exports SET status = 'running', attempts = attempts + 1, lease_owner = %s,"
            " lease_until = now() + make_interval(secs => %s), started_at = now(), rows_done = 0, error = NULL"
            " WHERE id = (SELECT id FROM exports WHERE status = 'queued' OR (status = 'running' AND lease_until < now())"
            "             ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)"
            " RETURNING id",
            (owner, lease_s),
        ).fetchone()
        if claimed is None:
            return None
        return _job(conn, "id = %s", (claimed[0],))


class _LeaseLost(Exception):
    pass


class _Stopping(Exception):
    pass


class _Heartbeat:
    """Renews the job's lease and publishes progress every lease/3 s on its own connection; notices a lost
    lease (another worker took the job over) so the export stops."""

    def __init__(self, dsn: str, job_id: uuid.UUID, owner: str, lease_s: float) -> None:
        self.rows = 0
        self.lost = threading.Event()
        self._done = threading.Event()
        self._args = (dsn, job_id, owner, lease_s)
        self._thread = threading.Thread(target=self._run, name=f"export-lease-{job_id}", daemon=True)

    def _run(self) -> None:
        dsn, job_id, owner, lease_s = self._args
        with psycopg.connect(dsn, autocommit=True, application_name="site-activity-export-lease") as conn:
            while not self._done.wait(lease_s / 3):
                try:
                    renewed = conn.execute(
                        "UPDATE exports SET lease_until = now() + make_interval(secs => %s), rows_done = %s"
                        " WHERE id = %s AND lease_owner = %s AND status = 'running'",
                        (lease_s, self.rows, job_id, owner),
                    ).rowcount
                except psycopg.Error:
                    log.warning("export lease renewal failed; retrying", exc_info=True)
                    continue
                if not renewed:
                    self.lost.set()
                    return

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()


def run_job(settings: Settings, job: ExportJob, owner: str, stop: threading.Event | None = None) -> str:
    """Writes the claimed job's archive and records the outcome; returns the job's new status. Never raises
    for a failed export (the job records the error)."""
    root = settings.exports_path
    tenant_dir = root / str(job.tenant_id)
    tenant_dir.mkdir(parents=True, exist_ok=True)
    for old in tenant_dir.glob(f"{job.id}-*"):  # what a dead attempt left behind (a claimed job has no file)
        old.unlink(missing_ok=True)
    final = tenant_dir / f"{job.id}-{job.attempts}.zip"
    partial = final.with_name(final.name + ".partial")
    log.info("export started", extra={"export_id": str(job.id), "attempt": job.attempts, "format": job.format})
    try:
        with _Heartbeat(settings.postgres_dsn, job.id, owner, settings.export_lease_s) as beat:

            def progress(name: str, done: int, total: int) -> None:
                beat.rows = done if name.startswith("events") else beat.rows
                if beat.lost.is_set():
                    raise _LeaseLost()
                if stop is not None and stop.is_set():
                    raise _Stopping()

            result = write_bundle(
                settings.postgres_dsn,
                job.filter,
                job.format,  # type: ignore[arg-type]
                partial,
                export_id=job.id,
                on_progress=progress,
            )
        partial.rename(final)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        return _record_failure(settings, job, owner, exc)
    return _record_done(settings, job, owner, final, result)


def _record_done(settings: Settings, job: ExportJob, owner: str, final: Path, result: BundleResult) -> str:
    rel = str(final.relative_to(settings.exports_path))
    with psycopg.connect(settings.postgres_dsn, autocommit=True) as conn, conn.transaction():
        erasures = conn.execute(
            "SELECT count(*) FROM erased_subjects WHERE tenant_id = %s", (job.tenant_id,)
        ).fetchone()[0]  # type: ignore[index]
        if erasures > result.erasures_seen:
            # An erase committed while we wrote: the snapshot may hold the erased subject. Do it again.
            status, done = (
                "queued",
                conn.execute(
                    "UPDATE exports SET status = 'queued', lease_owner = NULL, lease_until = NULL"
                    " WHERE id = %s AND lease_owner = %s AND status = 'running'",
                    (job.id, owner),
                ).rowcount,
            )
        else:
            status, done = (
                "done",
                conn.execute(
                    "UPDATE exports SET status = 'done', lease_owner = NULL, lease_until = NULL, finished_at = now(),"
                    " expires_at = now() + make_interval(secs => %s), events_count = %s, contacts_count = %s,"
                    " size_bytes = %s, sha256 = %s, file_name = %s, erasures_seen = %s, rows_done = %s"
                    " WHERE id = %s AND lease_owner = %s AND status = 'running'",
                    (
                        settings.export_ttl_s,
                        result.rows["events"],
                        result.rows["contacts"],
                        result.bytes,
                        result.sha256,
                        rel,
                        result.erasures_seen,
                        result.rows["events"],
                        job.id,
                        owner,
                    ),
                ).rowcount,
            )
            if done:
                audit(
                    conn,
                    actor=SYSTEM_ACTOR,
                    action="export.completed",
                    tenant_id=job.tenant_id,
                    entity="export",
                    entity_id=str(job.id),
                    old=None,
                    new={
                        "row_counts": result.rows,
                        "bytes": result.bytes,
                        "sha256": result.sha256,
                        "attempt": job.attempts,
                    },
                )
    if not done or status != "done":  # fenced out (another worker owns the job now) or redone: drop our file
        final.unlink(missing_ok=True)
    log.info(
        "export finished",
        extra={
            "export_id": str(job.id),
            "status": status if done else "lease lost",
            "rows": result.rows,
            "bytes": result.bytes,
            "seconds": round(result.seconds, 3),
        },
    )
    return status if done else "lost"


def _record_failure(settings: Settings, job: ExportJob, owner: str, exc: BaseException) -> str:
    if isinstance(exc, _LeaseLost):
        log.warning("export lease lost; another worker owns the job now", extra={"export_id": str(job.id)})
        return "lost"
    if isinstance(exc, (_Stopping, KeyboardInterrupt, SystemExit)):
        status, error, attempts_back = "queued", None, 1  # shutting down: hand the job back untouched
    elif isinstance(exc, psycopg.OperationalError) and job.attempts < settings.export_max_attempts:
        status, error, attempts_back = "queued", f"retrying after: {exc}", 0
    else:
        status, error, attempts_back = "failed", f"{type(exc).__name__}: {exc}", 0
        log.error("export failed", extra={"export_id": str(job.id)}, exc_info=exc)
    try:
        with psycopg.connect(settings.postgres_dsn, autocommit=True) as conn, conn.transaction():
            changed = conn.execute(
                "UPDATE exports SET status = %s, error = %s, attempts = attempts - %s, lease_owner = NULL,"
                " lease_until = NULL, finished_at = CASE WHEN %s = 'failed' THEN now() END"
                " WHERE id = %s AND lease_owner = %s AND status = 'running'",
                (status, error, attempts_back, status, job.id, owner),
            ).rowcount
            if changed and status == "failed":
                audit(
                    conn,
                    actor=SYSTEM_ACTOR,
                    action="export.failed",
                    tenant_id=job.tenant_id,
                    entity="export",
                    entity_id=str(job.id),
                    old=None,
                    new={"error": error},
                )
    except psycopg.Error:  # the lease lapses and the job is claimed again
        log.warning("could not record the export's outcome", extra={"export_id": str(job.id)}, exc_info=True)
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        raise exc
    return status


def sweep(settings: Settings, limit: int = 100) -> int:
    """Deletes archives past expires_at and withdraws those of tenants that erased a subject after the
    archive's snapshot; returns how many. Safe to run from several workers at once (SKIP LOCKED)."""
    with psycopg.connect(settings.postgres_dsn, autocommit=True) as conn, conn.transaction():
        with conn.cursor(row_factory=class_row(ExportJob)) as cur:
            jobs = cur.execute(
                f"SELECT {_COLUMNS} FROM exports x WHERE status = 'done' AND (expires_at <= now() OR erasures_seen <"
                " (SELECT count(*) FROM erased_subjects s WHERE s.tenant_id = x.tenant_id))"
                " ORDER BY expires_at LIMIT %s FOR UPDATE SKIP LOCKED",
                (limit,),
            ).fetchall()
        for job in jobs:
            _withdraw(conn, settings, job, _withdraw_reason(conn, job) or EXPIRED)
    for job in jobs:
        log.info("export archive deleted", extra={"export_id": str(job.id)})
    return len(jobs)


class ExportWorker:
    """The console process's export worker: one daemon thread that sweeps expired archives and runs queued
    jobs one at a time (bounded: an export never competes with another in the same process)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.model_copy(update={"export_dir": settings.exports_path.resolve()})
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.stop_event = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="export-worker", daemon=True)

    def start(self) -> ExportWorker:
        """Starts the thread; when export_dir cannot be created or written, logs why and does not start (the
        rest of the console keeps serving; export jobs stay queued until a worker that can write runs)."""
        try:
            self.settings.exports_path.mkdir(parents=True, exist_ok=True)
            probe = self.settings.exports_path / f".probe-{self.owner.replace(':', '-')}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            log.error(
                "export worker not started: export_dir is not writable; set SITE_ACTIVITY_EXPORT_DIR",
                extra={"dir": str(self.settings.exports_path), "error": str(exc)},
            )
            return self
        self._thread.start()
        log.info("export worker started", extra={"owner": self.owner, "dir": str(self.settings.exports_path)})
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def run_once(self) -> bool:
        """One sweep and at most one job; True when a job was run (so the loop looks again at once)."""
        sweep(self.settings)
        with psycopg.connect(self.settings.postgres_dsn, autocommit=True) as conn:
            job = claim(conn, self.owner, self.settings.export_lease_s, self.settings.export_max_attempts)
        if job is None:
            return False
        run_job(self.settings, job, self.owner, self.stop_event)
        return True

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                if self.run_once():
                    continue
            except Exception:
                log.exception("export worker pass failed; trying again")
            self.stop_event.wait(self.settings.export_poll_s)
