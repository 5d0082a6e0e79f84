"""REST /api/v1/stats (Bearer API key, tenant-scoped): dashboard numbers from the rollups. Thin: the rules and
shapes live in console.stats. Query values are taken as strings and validated there, so a bad one is a 400
with a reason (never FastAPI's 422); another tenant's widget is a 404."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from console import stats
from console.deps import ApiMember, ConnDep

router = APIRouter(prefix="/api/v1/stats", tags=["stats"])

From = Annotated[str | None, Query(alias="from", description="ISO 8601 time or YYYY-MM-DD (UTC), inclusive")]
To = Annotated[str | None, Query(description="ISO 8601 time or YYYY-MM-DD (UTC), exclusive; default now")]


@router.get("/timeseries")
def timeseries(
    member: ApiMember,
    conn: ConnDep,
    widget_id: str | None = None,
    start: From = None,
    to: To = None,
    interval: Annotated[str | None, Query(description="hour or day")] = None,
    metrics: Annotated[str | None, Query(description="comma-separated: " + ",".join(stats.METRICS))] = None,
) -> dict[str, Any]:
    r = stats.parse_range(start, to, interval)
    wanted = stats.parse_metrics(metrics)
    return stats.timeseries(conn, stats.widget_id_for(conn, member, widget_id), r, wanted)


@router.get("/top-pages")
def top_pages(
    member: ApiMember,
    conn: ConnDep,
    widget_id: str | None = None,
    start: From = None,
    to: To = None,
    limit: str | None = None,
) -> dict[str, Any]:
    r = stats.parse_range(start, to, "hour", max_buckets={"hour": 24 * 366})
    return stats.top_pages(conn, stats.widget_id_for(conn, member, widget_id), r, stats.parse_limit(limit))


@router.get("/top-events")
def top_events(
    member: ApiMember,
    conn: ConnDep,
    widget_id: str | None = None,
    start: From = None,
    to: To = None,
    limit: str | None = None,
) -> dict[str, Any]:
    r = stats.parse_range(start, to, "hour", max_buckets={"hour": 24 * 366})
    return stats.top_events(conn, stats.widget_id_for(conn, member, widget_id), r, stats.parse_limit(limit))


@router.get("/realtime")
def realtime(member: ApiMember, conn: ConnDep, widget_id: str | None = None) -> dict[str, Any]:
    return stats.realtime(conn, stats.widget_id_for(conn, member, widget_id))
