"""Management REST API under /api/v1 (Bearer API keys). Thin: the rules live in console.services."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt

from console import services
from console.deps import ApiAdmin, ApiMember, ConnDep, NotifyDep, RequestIdDep

router = APIRouter(prefix="/api/v1")


class WidgetPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tracking_enabled: StrictBool | None = None
    event_retention_days: StrictInt | None = None


@router.get("/me")
def me(member: ApiMember) -> dict[str, Any]:
    return member.public()


@router.get("/widgets")
def list_widgets(member: ApiMember, conn: ConnDep) -> dict[str, Any]:
    return {"data": [w.public() for w in services.list_widgets(conn, member)]}


@router.get("/widgets/{widget_id}")
def get_widget(widget_id: str, member: ApiMember, conn: ConnDep) -> dict[str, Any]:
    return services.widget_for(conn, member, widget_id).public()


@router.patch("/widgets/{widget_id}")
def patch_widget(
    widget_id: str, body: WidgetPatch, admin: ApiAdmin, conn: ConnDep, request_id: RequestIdDep
) -> dict[str, Any]:
    return services.update_widget(
        conn,
        admin,
        widget_id,
        tracking_enabled=body.tracking_enabled,
        event_retention_days=body.event_retention_days,
        request_id=request_id,
    ).public()


@router.get("/audit-log")
def audit_log(
    admin: ApiAdmin, conn: ConnDep, limit: Annotated[int, Query()] = 50, cursor: Annotated[str | None, Query()] = None
) -> dict[str, Any]:
    return services.audit_page(conn, admin, limit=limit, cursor=cursor)


# {visitor_id:path}: visitor ids may contain "/" (the widget's are uuids, but any 1-128 character id is ingested).
@router.delete("/visitors/{visitor_id:path}")
def erase_visitor(
    visitor_id: str,
    widget_id: Annotated[str, Query()],
    admin: ApiAdmin,
    conn: ConnDep,
    notify: NotifyDep,
    request_id: RequestIdDep,
) -> dict[str, Any]:
    return services.erase_visitor(conn, admin, widget_id, visitor_id, notify, request_id)


@router.delete("/contacts/{customer_id}")
def erase_contact(
    customer_id: str, admin: ApiAdmin, conn: ConnDep, notify: NotifyDep, request_id: RequestIdDep
) -> dict[str, Any]:
    return services.erase_contact(conn, admin, customer_id, notify, request_id)
