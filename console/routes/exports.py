"""Export bundles over the console API (issue 13): queue an export, poll it, download the archive.

    POST /api/v1/exports                  admins; {"format", "widget_id"?, "from"?, "to"?} -> 202 + the job
    GET  /api/v1/exports/{id}             admins; status queued|running|done|failed|expired, row counts, size
    GET  /api/v1/exports/{id}/download    admins; the zip (application/zip), streamed from export_dir

Another tenant's id answers 404, like an unknown one. The job runs in the console process's export worker
(site_activity/export_jobs.py), never inside the request."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from console.deps import ApiAdmin, ConnDep, RequestIdDep, SettingsDep
from console.errors import ConsoleError, not_found
from console.services import parse_uuid
from site_activity import export_jobs
from site_activity.export import ExportError, make_filter

router = APIRouter(prefix="/api/v1/exports")


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    format: Literal["ndjson", "csv", "parquet"]
    widget_id: uuid.UUID | None = None
    # ISO 8601 date or date-time (no offset: UTC); events with occurred_at in [from, to).
    from_: str | None = Field(default=None, alias="from")
    to: str | None = None


def _job_error(exc: export_jobs.JobError) -> ConsoleError:
    slug = {409: "not_ready", 410: "gone"}.get(exc.status)
    return ConsoleError(exc.status, exc.reason, error=slug)


@router.post("", status_code=202)
def create_export(body: ExportRequest, admin: ApiAdmin, conn: ConnDep, request_id: RequestIdDep) -> JSONResponse:
    try:
        flt = make_filter(admin.tenant_id, body.widget_id, body.from_, body.to)
    except ExportError as exc:
        raise ConsoleError(400, str(exc)) from None
    try:
        job = export_jobs.create_job(conn, flt, body.format, actor=admin.email, request_id=request_id)
    except export_jobs.JobError as exc:
        raise _job_error(exc) from None
    return JSONResponse(job.public(), status_code=202, headers={"Location": f"/api/v1/exports/{job.id}"})


@router.get("/{export_id}")
def get_export(export_id: str, admin: ApiAdmin, conn: ConnDep) -> dict[str, Any]:
    job = export_jobs.get_job(conn, admin.tenant_id, parse_uuid(export_id, "export"))
    if job is None:
        raise not_found(f"no export {export_id}")
    return job.public()


@router.get("/{export_id}/download")
def download_export(
    export_id: str, admin: ApiAdmin, conn: ConnDep, settings: SettingsDep, request_id: RequestIdDep
) -> StreamingResponse:
    try:
        job, path = export_jobs.open_download(
            conn, settings, admin.tenant_id, parse_uuid(export_id, "export"), actor=admin.email, request_id=request_id
        )
    except export_jobs.JobError as exc:
        raise _job_error(exc) from None
    # Opened here, streamed in chunks after: the open descriptor keeps serving the whole file even if the sweep
    # deletes the path meanwhile (expiry or an erasure exactly now).
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        raise ConsoleError(410, export_jobs.EXPIRED, error="gone") from None
    size = os.fstat(fh.fileno()).st_size

    def chunks() -> Iterator[bytes]:
        with fh:
            while chunk := fh.read(1 << 20):
                yield chunk

    return StreamingResponse(
        chunks(),
        media_type="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="site-activity-export-{job.id}.zip"',
            "Content-Length": str(size),
            "X-Content-SHA256": job.sha256 or "",
        },
    )
