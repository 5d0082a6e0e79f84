"""Marketing → Site Activity: the dashboard page (signed-in members, session cookie) and the cookie-authenticated
JSON its "visitors now" panel refreshes from. Numbers come from console.stats, the same functions as
/api/v1/stats, so the page and the API always agree."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from console import services, stats
from console.deps import ConnDep, PageAuthDep
from console.errors import ConsoleError
from console.templating import render

router = APIRouter()

RANGES = {"today": "Today", "7d": "Last 7 days", "30d": "Last 30 days", "custom": "Custom"}
MAX_CUSTOM_DAYS = 366


def page_range(choice: str, start: str | None, end: str | None, today: date) -> stats.Range:
    """The dashboard's ranges in UTC days: today (hourly), the last 7 / 30 days including today (daily), or
    custom from..to dates, both included (hourly for one day, else daily)."""
    midnight = datetime.combine(today, datetime.min.time(), UTC)
    if choice == "today":
        return stats.Range(midnight, midnight + timedelta(days=1), "hour")
    if choice in ("7d", "30d"):
        days = 7 if choice == "7d" else 30
        return stats.Range(midnight - timedelta(days=days - 1), midnight + timedelta(days=1), "day")
    if choice != "custom":
        raise ConsoleError(400, f"range must be one of {', '.join(RANGES)}, got {choice!r}")
    if not start or not end:
        raise ConsoleError(400, "a custom range needs both a from and a to date")
    d0 = stats.floor_to(stats.parse_time(start, "from"), "day")
    d1 = stats.floor_to(stats.parse_time(end, "to"), "day") + timedelta(days=1)
    if d1 <= d0:
        raise ConsoleError(400, "the to date must not be before the from date")
    if (d1 - d0).days > MAX_CUSTOM_DAYS:
        raise ConsoleError(400, f"a custom range is at most {MAX_CUSTOM_DAYS} days")
    return stats.Range(d0, d1, "hour" if (d1 - d0).days == 1 else "day")


@router.get("/site-activity")
def dashboard(
    request: Request,
    auth: PageAuthDep,
    conn: ConnDep,
    widget_id: str | None = None,
    range: str = "7d",
    start: str | None = None,
    end: str | None = None,
) -> Response:
    widgets = services.list_widgets(conn, auth.member)
    context: dict[str, Any] = {
        "auth": auth,
        "widgets": widgets,
        "ranges": RANGES,
        "range": range,
        "start": start or "",
        "end": end or "",
        "widget": None,
    }
    if widget_id is None and widgets:
        widget_id = str(widgets[0].id)
    if widget_id is not None:
        widget = services.widget_for(conn, auth.member, widget_id)
        r = page_range(range, start, end, datetime.now(UTC).date())
        series = stats.timeseries(conn, widget.id, r, stats.DEFAULT_METRICS)
        context.update(
            widget=widget,
            period=r,
            series=series,
            period_label=_label(r),
            top_pages=stats.top_pages(conn, widget.id, r, 10)["results"],
            top_events=stats.top_events(conn, widget.id, r, 10)["results"],
            now=stats.realtime(conn, widget.id),
            chart={
                "interval": r.interval,
                "time": [
                    int(datetime.fromisoformat(b["time"].replace("Z", "+00:00")).timestamp()) for b in series["results"]
                ],
                "pageviews": [b["pageviews"] for b in series["results"]],
                "visitors": [b["visitors"] for b in series["results"]],
            },
        )
    return render(request, "site_activity.html", context)


def _label(r: stats.Range) -> str:
    first, last = r.start.date(), (r.end - timedelta(days=1)).date()
    return first.isoformat() if first == last else f"{first.isoformat()} – {last.isoformat()}"


@router.get("/site-activity/realtime.json")
def realtime_json(auth: PageAuthDep, conn: ConnDep, widget_id: str | None = None) -> dict[str, Any]:
    """The dashboard's "visitors now" refresh: stats.realtime for a widget of the signed-in member's tenant."""
    return stats.realtime(conn, stats.widget_id_for(conn, auth.member, widget_id))
