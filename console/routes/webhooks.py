"""Webhook endpoints under /api/v1/webhook-endpoints (admins and owners only; Bearer API keys). Thin: the rules
live in webhooks/endpoints.py; errors map to 400 (WebhookError) and 404 (another tenant's or no endpoint)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from console.deps import ApiAdmin, ConnDep, RequestIdDep, SettingsDep
from console.errors import ConsoleError
from webhooks import endpoints
from webhooks.endpoints import EndpointNotFound, WebhookError

router = APIRouter(prefix="/api/v1/webhook-endpoints")


class EndpointIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: StrictStr
    event_types: list[StrictStr] | None = None
    widget_ids: list[StrictStr] | None = None
    description: StrictStr = ""
    enabled: StrictBool = True


class EndpointPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: StrictStr | None = None
    event_types: list[StrictStr] | None = None
    widget_ids: list[StrictStr] | None = None
    description: StrictStr | None = None
    enabled: StrictBool | None = None


class ReplayIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    since: datetime = Field(alias="from")
    until: datetime = Field(alias="to")


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except EndpointNotFound as exc:
        raise ConsoleError(404, str(exc)) from None
    except WebhookError as exc:
        raise ConsoleError(400, str(exc)) from None


@router.post("", status_code=201)
def create(
    body: EndpointIn, admin: ApiAdmin, conn: ConnDep, settings: SettingsDep, request_id: RequestIdDep
) -> dict[str, Any]:
    """The new endpoint with `secret`: the signing secret, returned only in this answer."""
    with _errors():
        endpoint, secret = endpoints.create_endpoint(
            conn,
            admin.tenant_id,
            body.url,
            actor=admin.email,
            allow_private=settings.webhooks_allow_private_urls,
            event_types=body.event_types,
            widget_ids=body.widget_ids,
            description=body.description,
            enabled=body.enabled,
            request_id=request_id,
        )
    return {**endpoint.public(), "secret": secret}


@router.get("")
def list_all(admin: ApiAdmin, conn: ConnDep) -> dict[str, Any]:
    return {"data": [e.public() for e in endpoints.list_endpoints(conn, admin.tenant_id)]}


@router.get("/{endpoint_id}")
def get(endpoint_id: str, admin: ApiAdmin, conn: ConnDep) -> dict[str, Any]:
    with _errors():
        return endpoints.get_endpoint(conn, admin.tenant_id, endpoint_id).public()


@router.patch("/{endpoint_id}")
def patch(
    endpoint_id: str,
    body: EndpointPatch,
    admin: ApiAdmin,
    conn: ConnDep,
    settings: SettingsDep,
    request_id: RequestIdDep,
) -> dict[str, Any]:
    """Only the fields present change; `"event_types": null` / `"widget_ids": null` remove that filter."""
    given = body.model_fields_set
    if "url" in given and body.url is None or "enabled" in given and body.enabled is None:
        raise ConsoleError(400, "url and enabled cannot be null")
    changes = {name: getattr(body, name) for name in given}
    if "description" in changes and changes["description"] is None:
        changes["description"] = ""
    with _errors():
        return endpoints.update_endpoint(
            conn,
            admin.tenant_id,
            endpoint_id,
            actor=admin.email,
            allow_private=settings.webhooks_allow_private_urls,
            request_id=request_id,
            **changes,
        ).public()


@router.delete("/{endpoint_id}", status_code=204)
def delete(endpoint_id: str, admin: ApiAdmin, conn: ConnDep, request_id: RequestIdDep) -> Response:
    with _errors():
        endpoints.delete_endpoint(conn, admin.tenant_id, endpoint_id, actor=admin.email, request_id=request_id)
    return Response(status_code=204)


@router.get("/{endpoint_id}/deliveries")
def deliveries(
    endpoint_id: str,
    admin: ApiAdmin,
    conn: ConnDep,
    limit: Annotated[int, Query()] = 50,
    cursor: Annotated[str | None, Query()] = None,
    status: Annotated[str | None, Query()] = None,
) -> dict[str, Any]:
    with _errors():
        return endpoints.deliveries_page(conn, admin.tenant_id, endpoint_id, limit=limit, cursor=cursor, status=status)


@router.post("/{endpoint_id}/replay", status_code=202)
def replay(
    endpoint_id: str, body: ReplayIn, admin: ApiAdmin, conn: ConnDep, request_id: RequestIdDep
) -> dict[str, Any]:
    """Queues again the stored events with from <= occurred_at < to (ISO 8601 with a time zone)."""
    with _errors():
        queued = endpoints.replay(
            conn, admin.tenant_id, endpoint_id, body.since, body.until, actor=admin.email, request_id=request_id
        )
    return {"queued": queued}
