"""`site-activity webhooks` (no action: run the stage) and `site-activity webhooks add|list|disable|remove`
(endpoint admin, audited like the console's API; rules in webhooks/endpoints.py)."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import Any

from site_activity.settings import Settings


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {value!r}") from None


def add_parser(sub: Any) -> None:
    w = sub.add_parser("webhooks", help="run the webhooks stage; or add|list|disable|remove webhook endpoints")
    w.set_defaults(func=run)
    wsub = w.add_subparsers(dest="webhooks_action", required=False)
    add = wsub.add_parser("add", help="add an endpoint; prints its signing secret (shown only now)")
    add.add_argument("--url", required=True)
    add.add_argument(
        "--event-type", action="append", dest="event_types", help="only these event types (repeatable; default: all)"
    )
    add.add_argument("--widget", action="append", dest="widget_ids", help="only these widgets (repeatable)")
    add.add_argument("--description", default="")
    lst = wsub.add_parser("list", help="the tenant's endpoints")
    lst.add_argument("--json", action="store_true")
    dis = wsub.add_parser("disable", help="stop deliveries to an endpoint (enable again through the API)")
    rem = wsub.add_parser("remove", help="delete an endpoint with its queued deliveries")
    for p in (dis, rem):
        p.add_argument("endpoint_id", type=_uuid)
    for p in (add, lst, dis, rem):
        p.add_argument("--tenant", type=_uuid, required=True)
    for p in (add, dis, rem):
        p.add_argument("--actor", required=True, help="who asked for the change (recorded in the audit log)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.webhooks_action is None:
        from webhooks.main import run as run_stage

        return run_stage(settings)
    from site_activity.db import connect
    from webhooks import endpoints

    try:
        with connect(settings.postgres_dsn, autocommit=True) as conn:
            return _admin(args, settings, conn, endpoints)
    except endpoints.WebhookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _admin(args: argparse.Namespace, settings: Settings, conn: Any, endpoints: Any) -> int:
    action = args.webhooks_action
    if action == "add":
        ep, secret = endpoints.create_endpoint(
            conn,
            args.tenant,
            args.url,
            actor=args.actor,
            allow_private=settings.webhooks_allow_private_urls,
            event_types=args.event_types,
            widget_ids=args.widget_ids,
            description=args.description,
        )
        print(secret)
        print(f"webhook endpoint {ep.id} -> {ep.url}: the signing secret above is shown only now.", file=sys.stderr)
    elif action == "list":
        rows = endpoints.list_endpoints(conn, args.tenant)
        if args.json:
            print(json.dumps([e.public() for e in rows], indent=2))
        for e in rows if not args.json else ():
            state = "enabled" if e.enabled else f"disabled ({e.disabled_reason})"
            types = ",".join(e.event_types) if e.event_types else "all events"
            print(f"{e.id!s:36}  {e.url:50}  {types:30}  {state}")
    elif action == "disable":
        ep = endpoints.update_endpoint(
            conn,
            args.tenant,
            args.endpoint_id,
            actor=args.actor,
            allow_private=settings.webhooks_allow_private_urls,
            enabled=False,
        )
        print(f"disabled {ep.id}")
    else:
        endpoints.delete_endpoint(conn, args.tenant, args.endpoint_id, actor=args.actor)
        print(f"removed {args.endpoint_id} (its queued deliveries and log with it)")
    return 0
