"""`site-activity`: the single entry point. Each pipeline stage runs as its own process for production;
`dev` runs them all on the embedded stack."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

from site_activity.logs import setup_logging
from site_activity.settings import Settings, get_settings


class _DeprecatedFlag(argparse.Action):
    """An old option name kept working: stores like the new one (same dest), warns on stderr."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object, option: str | None = None
    ) -> None:
        new = "--" + self.dest.replace("_", "-")
        print(f"warning: {option} is deprecated, use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


# Each stage is imported only when its command runs: `site-activity migrate` should not load faust or uvicorn.
def _dev(_: argparse.Namespace, settings: Settings) -> int:
    from dev_stack.supervisor import run

    return run(settings)


def _api(_: argparse.Namespace, settings: Settings) -> int:
    from producer_api.main import run

    return run(settings)


def _sink(_: argparse.Namespace, settings: Settings) -> int:
    from sink.main import run

    return run(settings)


def _processors(_: argparse.Namespace, settings: Settings) -> int:
    from stream_processors.main import run

    return run(settings)


def _console(_: argparse.Namespace, settings: Settings) -> int:
    from console.main import run

    return run(settings)


def _migrate(_: argparse.Namespace, settings: Settings) -> int:
    from site_activity.db import ensure_database, migrate

    ensure_database(settings.postgres_dsn)
    applied = migrate(settings.postgres_dsn)
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
    return 0


def _topics(args: argparse.Namespace, settings: Settings) -> int:
    # issue 13: create missing topics and bring existing ones' configs in line (site_activity/topic_admin.py)
    from site_activity.topic_admin import apply_topics, print_reports

    return print_reports(apply_topics(settings, dry_run=args.dry_run))


def _schemas_check(args: argparse.Namespace, _: Settings) -> int:
    from schemas.compat import check_all

    problems = check_all(args.dir)
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print("schemas: every schema is backward-compatible with its previous version")
    return 1 if problems else 0


def _widgets(args: argparse.Namespace, settings: Settings) -> int:
    from site_activity import widgets
    from site_activity.db import connect

    with connect(settings.postgres_dsn) as conn:
        action = args.widgets_action
        if action == "create":
            w = widgets.create_widget(
                conn, name=args.name, actor=args.actor, tenant_id=args.tenant, tenant_name=args.tenant_name
            )
            print(w.id)
            return 0
        if action == "list":
            rows = widgets.list_widgets(conn, args.tenant)
            if args.json:
                print(json.dumps([w.public() for w in rows], indent=2))
            else:
                print(f"{'id':36}  {'tenant':36}  {'tracking':8}  {'retention':9}  name")
                for w in rows:
                    print(
                        f"{w.id!s:36}  {w.tenant_id!s:36}  {'on' if w.tracking_enabled else 'off':8}  "
                        f"{w.event_retention_days:>5} d    {w.name}"
                    )
            return 0
        if action == "show":
            print(json.dumps(widgets.get_widget(conn, args.widget_id).public(), indent=2))
            return 0
        if action in ("enable", "disable"):
            w = widgets.set_tracking(conn, args.widget_id, action == "enable", actor=args.actor)
        elif action == "set-retention":
            w = widgets.set_retention(conn, args.widget_id, args.days, actor=args.actor)
        elif action == "delete":
            n = widgets.delete_widget(conn, args.widget_id, actor=args.actor)
            print(f"deleted widget {args.widget_id} and {n} event(s)")
            return 0
        print(json.dumps(w.public(), indent=2))
    return 0


def _events_recent(args: argparse.Namespace, settings: Settings) -> int:
    """Prints the newest events; with --follow keeps printing new ones (how a newcomer watches rows arrive)."""
    import time

    from site_activity.db import connect

    sql = (
        "SELECT received_at, occurred_at, event_type, coalesce(name, user_id, ''), url, visitor_id,"
        " session_id, customer_id FROM visitor_events WHERE (%(w)s::uuid IS NULL OR widget_id = %(w)s)"
        " AND received_at > %(since)s ORDER BY received_at DESC, occurred_at DESC, (event_type = 'session_start') LIMIT %(n)s"
    )
    since = "-infinity"
    with connect(settings.postgres_dsn, autocommit=True) as conn:
        while True:
            rows = conn.execute(sql, {"w": args.widget, "since": since, "n": args.limit}).fetchall()
            for _rx, at, kind, label, url, visitor, session, customer in reversed(rows):
                print(
                    f"{at:%Y-%m-%d %H:%M:%S}  {kind:13}  {label[:24]:24}  {url or '':50}  visitor={visitor[:8]}"
                    f"  session={str(session)[:8] if session else '-'}  contact={str(customer)[:8] if customer else '-'}",
                    flush=True,
                )
            if rows:
                since = rows[0][0]
            if not args.follow:
                return 0
            time.sleep(1)


def _members(args: argparse.Namespace, settings: Settings) -> int:
    from console import accounts
    from site_activity.db import connect

    with connect(settings.postgres_dsn, autocommit=True) as conn:
        action = args.members_action
        if action == "add":
            m = accounts.add_member(conn, args.tenant, args.email, args.role, actor=args.actor)
            print(f"added {m.email} as {m.role}")
        elif action == "set-role":
            m = accounts.set_role(conn, args.tenant, args.email, args.role, actor=args.actor)
            print(f"{m.email} is now {m.role}")
        elif action == "remove":
            accounts.remove_member(conn, args.tenant, args.email, actor=args.actor)
            print(f"removed {args.email} (their API keys and sign-in links with them)")
        else:
            rows = accounts.list_members(conn, args.tenant)
            if args.json:
                print(json.dumps([m.public() for m in rows], indent=2))
            for m in rows if not args.json else ():
                print(f"{m.email:40}  {m.role:7}  since {m.created_at:%Y-%m-%d}")
    return 0


def _keys(args: argparse.Namespace, settings: Settings) -> int:
    from console import accounts
    from site_activity.db import connect

    with connect(settings.postgres_dsn, autocommit=True) as conn:
        action = args.keys_action
        if action == "create":
            key, secret = accounts.create_key(conn, args.tenant, args.email, args.name, actor=args.actor or args.email)
            print(secret)
            print(
                f"API key {key.id} ({key.prefix}…) for {key.email}: the secret above is shown only now.",
                file=sys.stderr,
            )
        elif action == "revoke":
            accounts.revoke_key(conn, args.tenant, args.key_id, actor=args.actor)
            print(f"revoked {args.key_id}")
        else:
            rows = accounts.list_keys(conn, args.tenant, args.email)
            if args.json:
                print(json.dumps([k.public() for k in rows], indent=2))
            for k in rows if not args.json else ():
                state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
                used = f"{k.last_used_at:%Y-%m-%d %H:%M}" if k.last_used_at else "never"
                print(f"{k.id!s:36}  {k.prefix}…  {k.email:30}  {k.name:20}  {state:18}  last used {used}")
    return 0


def _login_link(args: argparse.Namespace, settings: Settings) -> int:
    from console import accounts
    from site_activity.db import connect

    if args.next is not None and not accounts.is_local_path(args.next):
        print(f"--next must be a path on the console (like /site-activity), not {args.next!r}", file=sys.stderr)
        return 2
    with connect(settings.postgres_dsn, autocommit=True) as conn:
        print(
            accounts.login_link(
                conn,
                settings.console_origin,
                args.tenant,
                args.email,
                settings.console_login_link_ttl_s,
                next_path=args.next,
            )
        )
    print(
        f"one-time sign-in link for {args.email}; expires in {settings.console_login_link_ttl_s // 60} minutes",
        file=sys.stderr,
    )
    return 0


def _purge(args: argparse.Namespace, settings: Settings) -> int:
    from site_activity.retention import purge_every, run_with_progress

    if args.loop:
        import signal
        import threading

        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        purge_every(
            settings.postgres_dsn,
            settings.purge_interval_s,
            stop,
            chunk_rows=args.chunk_rows or settings.purge_chunk_rows,
            duty_cycle=settings.purge_duty_cycle,
        )
        return 0
    run_with_progress(
        settings.postgres_dsn,
        chunk_rows=args.chunk_rows or settings.purge_chunk_rows,
        dry_run=args.dry_run,
        duty_cycle=settings.purge_duty_cycle,
    )
    return 0


def _erase(args: argparse.Namespace, settings: Settings) -> int:
    from site_activity import erasure
    from site_activity.db import connect

    with connect(settings.postgres_dsn, autocommit=True) as conn:
        notify = erasure.kafka_notifier(settings)
        if args.erase_kind == "visitor":
            done = erasure.erase_visitor(conn, args.tenant, args.widget, args.visitor, actor=args.actor, notify=notify)
        else:
            done = erasure.erase_contact(conn, args.tenant, args.contact, actor=args.actor, notify=notify)
    print(json.dumps(done.public(), indent=2))
    return 0


# --- export bundles (issue 13) ------------------------------------------------------------------------
def _export(args: argparse.Namespace, settings: Settings) -> int:
    from command_line.export import run_export

    return run_export(
        settings,
        tenant=args.tenant,
        widget=args.widget,
        from_=args.from_,
        to=args.to,
        fmt=args.format,
        out=args.out,
        actor=args.actor,
    )


# --- rollups (read surfaces, issue 12) ---------------------------------------------------------------------
def _rollups(args: argparse.Namespace, settings: Settings) -> int:
    from site_activity import rollups
    from site_activity.db import connect

    with connect(settings.postgres_dsn, autocommit=True) as conn:
        if args.rollups_action == "rebuild":
            counted, seconds = rollups.rebuild(conn, args.widget)
            print(f"rollups rebuilt for {args.widget or 'every widget'}: {counted:,} events counted in {seconds:.2f} s")
            return 0
        widget_ids = [args.widget] if args.widget else rollups.widgets_with_rows(conn)
        with conn.transaction():  # one snapshot for rollups and raw rows
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            bad = {w: rollups.mismatches(conn, w) for w in widget_ids}
    bad = {w: tables for w, tables in bad.items() if tables}
    for w, tables in bad.items():
        print(f"{w}: differs in {', '.join(tables)}")
    print(
        f"{len(widget_ids) - len(bad)} of {len(widget_ids)} widget(s) exact"
        + ("" if not bad else "; run `site-activity rollups rebuild` to repair")
    )
    return 1 if bad else 0


# --- issue 13: consumer lag (lag + security helper) ---------------------------------------------------------
def _lag(args: argparse.Namespace, settings: Settings) -> int:
    from site_activity.lag import run_cli

    return run_cli(
        settings,
        as_json=args.json,
        watch=args.watch,
        serve=args.serve,
        groups=args.group,
        interval_s=args.interval,
        samples=args.samples,
        port=args.port,
    )


def _add_lag_parser(sub: argparse._SubParsersAction) -> None:
    lag = sub.add_parser("lag", help="consumer lag of the pipeline's groups: offsets, lag, Burrow-style status")
    lag.set_defaults(func=_lag)
    lag.add_argument("--json", action="store_true", help="JSON (one document per evaluation)")
    lag.add_argument("--watch", action="store_true", help="re-evaluate every --interval seconds until Ctrl-C")
    lag.add_argument(
        "--serve",
        action="store_true",
        help="Prometheus exporter: /metrics on --port (default SITE_ACTIVITY_LAG_EXPORTER_PORT)",
    )
    lag.add_argument("--group", action="append", default=[], help="also watch this consumer group (repeatable)")
    lag.add_argument(
        "--interval",
        type=float,
        help="seconds between evaluations (default: 1 one-shot, SITE_ACTIVITY_LAG_INTERVAL_S otherwise)",
    )
    lag.add_argument("--samples", type=int, default=3, help="one-shot: evaluations taken before printing")
    lag.add_argument("--port", type=int)


# --- end issue 13: consumer lag -------------------------------------------------------------------------------


def _uuid_arg(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="site-activity", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dev", help="run the whole pipeline on the embedded stack").set_defaults(func=_dev)
    sub.add_parser("api", help="run the ingest API (uvicorn)").set_defaults(func=_api)
    sub.add_parser("sink", help="run the Kafka -> Postgres sink").set_defaults(func=_sink)
    sub.add_parser("processors", help="run the faust stream processors").set_defaults(func=_processors)
    sub.add_parser("console", help="run the console: management API and pages").set_defaults(func=_console)
    # --- webhooks (issue 13): the stage (no action) and endpoint admin (add|list|disable|remove) ---
    from webhooks.cli import add_parser as add_webhooks_parser

    add_webhooks_parser(sub)
    pg = sub.add_parser("purge", help="delete events older than their widget's retention (run daily)")
    pg.set_defaults(func=_purge)
    pg.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    pg.add_argument("--chunk-rows", type=int, help="rows per DELETE transaction (default: purge_chunk_rows)")
    # --- one name per batch concept (issue 10): the flag's old name still works, with a warning ---
    pg.add_argument("--batch-rows", type=int, dest="chunk_rows", action=_DeprecatedFlag, help=argparse.SUPPRESS)
    pg.add_argument(
        "--loop",
        action="store_true",
        help="run now and then every SITE_ACTIVITY_PURGE_INTERVAL_S until stopped (a scheduler's job)",
    )
    # --- rollups (read surfaces, issue 12) ---
    ru = sub.add_parser("rollups", help="dashboard rollups: rebuild from the raw events, or check they are exact")
    rusub = ru.add_subparsers(dest="rollups_action", required=True)
    for name, help_ in (
        ("rebuild", "recompute from visitor_events (blocks the sink's writes while it runs)"),
        ("check", "compare with the same counts over visitor_events; exit 1 if any differs"),
    ):
        rp = rusub.add_parser(name, help=help_)
        rp.add_argument("--widget", type=_uuid_arg, help="only this widget (default: every widget)")
        rp.set_defaults(func=_rollups)
    sub.add_parser("migrate", help="apply pending Postgres migrations").set_defaults(func=_migrate)
    tp = sub.add_parser(
        "topics",
        help="create missing Kafka topics and align the configs of existing ones "
        "(replication, min.insync.replicas, compaction, retention); reports what differs",
    )
    tp.set_defaults(func=_topics)
    tp.add_argument("--dry-run", action="store_true", help="only report what would change")

    schemas = sub.add_parser("schemas", help="Avro schema tools")
    schemas_sub = schemas.add_subparsers(dest="schemas_action", required=True)
    check = schemas_sub.add_parser(
        "check", help="fail when a schema is not backward-compatible with its previous version"
    )
    check.set_defaults(func=_schemas_check)
    check.add_argument(
        "--dir", type=Path, help="schema directory with a history/ folder (default: the packaged schemas)"
    )

    events = sub.add_parser("events", help="look at stored events")
    events_sub = events.add_subparsers(dest="events_action", required=True)
    recent = events_sub.add_parser("recent", help="print the newest events (--follow to keep watching)")
    recent.set_defaults(func=_events_recent)
    recent.add_argument("--widget", type=_uuid_arg)
    recent.add_argument("--limit", type=int, default=20)
    recent.add_argument("--follow", "-f", action="store_true")

    w = sub.add_parser("widgets", help="admin commands over widget configs")
    w.set_defaults(func=_widgets)
    wsub = w.add_subparsers(dest="widgets_action", required=True)
    create = wsub.add_parser("create", help="create a widget (tracking off); prints its id")
    create.add_argument("--name", required=True)
    create.add_argument("--tenant", type=_uuid_arg, help="existing tenant id (default: a new tenant)")
    create.add_argument("--tenant-name")
    lst = wsub.add_parser("list")
    lst.add_argument("--tenant", type=_uuid_arg)
    lst.add_argument("--json", action="store_true")
    for name in ("show", "enable", "disable", "delete", "set-retention"):
        p = wsub.add_parser(name)
        p.add_argument("widget_id", type=_uuid_arg)
        if name == "set-retention":
            p.add_argument("days", type=int)
    for p in (create, *(wsub.choices[n] for n in ("enable", "disable", "delete", "set-retention"))):
        p.add_argument("--actor", required=True, help="who asked for the change (recorded in the audit log)")

    m = sub.add_parser("members", help="tenant members and their roles (owner, admin, member)")
    m.set_defaults(func=_members)
    msub = m.add_subparsers(dest="members_action", required=True)
    for name in ("add", "list", "set-role", "remove"):
        p = msub.add_parser(name)
        p.add_argument("--tenant", type=_uuid_arg, required=True)
        if name != "list":
            p.add_argument("--email", required=True)
            p.add_argument("--actor", required=True, help="who asked for the change (recorded in the audit log)")
        if name in ("add", "set-role"):
            p.add_argument("--role", required=True, choices=("owner", "admin", "member"))
        if name == "list":
            p.add_argument("--json", action="store_true")

    k = sub.add_parser("keys", help="personal API keys for the console's REST API")
    k.set_defaults(func=_keys)
    ksub = k.add_subparsers(dest="keys_action", required=True)
    kc = ksub.add_parser("create", help="create a key; prints the secret once")
    kc.add_argument("--tenant", type=_uuid_arg, required=True)
    kc.add_argument("--email", required=True, help="the member the key acts as")
    kc.add_argument("--name", default="cli")
    kc.add_argument("--actor", help="who asked for it (default: the member)")
    kl = ksub.add_parser("list")
    kl.add_argument("--tenant", type=_uuid_arg, required=True)
    kl.add_argument("--email")
    kl.add_argument("--json", action="store_true")
    kr = ksub.add_parser("revoke")
    kr.add_argument("key_id", type=_uuid_arg)
    kr.add_argument("--tenant", type=_uuid_arg, required=True)
    kr.add_argument("--actor", required=True)

    er = sub.add_parser("erase", help="erase a person (GDPR): delete their events and suppress them from now on")
    er.set_defaults(func=_erase)
    ersub = er.add_subparsers(dest="erase_kind", required=True)
    ev = ersub.add_parser("visitor", help="one anonymous visitor id of one widget")
    ev.add_argument("--widget", type=_uuid_arg, required=True)
    ev.add_argument("--visitor", required=True)
    ec = ersub.add_parser("contact", help="a contact, every visitor linked to it, and its user id")
    ec.add_argument("--contact", type=_uuid_arg, required=True, help="the contact's (customer) id")
    for p in (ev, ec):
        p.add_argument("--tenant", type=_uuid_arg, required=True)
        p.add_argument("--actor", required=True, help="who asked for it (recorded in the audit log)")

    # --- export bundles (issue 13) ---
    ex = sub.add_parser("export", help="write one zip of a tenant's events, their contacts and a manifest")
    ex.set_defaults(func=_export)
    ex.add_argument("--tenant", type=_uuid_arg, required=True)
    ex.add_argument("--widget", type=_uuid_arg, help="only this widget's events (default: every widget)")
    ex.add_argument(
        "--from", dest="from_", metavar="DATE", help="occurred_at >= this ISO 8601 date or date-time (UTC if no offset)"
    )
    ex.add_argument("--to", metavar="DATE", help="occurred_at < this ISO 8601 date or date-time (exclusive)")
    ex.add_argument("--format", required=True, choices=("ndjson", "csv", "parquet"))
    ex.add_argument("--out", type=Path, required=True, help="the zip to write (replaced if it exists)")
    ex.add_argument("--actor", help="who asked for it, for the audit log (default: cli:<OS user>)")
    _add_lag_parser(sub)  # issue 13: consumer lag

    ll = sub.add_parser("login-link", help="print a one-time console sign-in link (15 minutes)")
    ll.set_defaults(func=_login_link)
    ll.add_argument("--tenant", type=_uuid_arg, required=True)
    ll.add_argument("--email", required=True)
    ll.add_argument("--next", help="console page to open after signing in, e.g. /site-activity")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)
    try:
        return int(args.func(args, settings))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # operator-facing: one clear line, not a traceback
        from console.accounts import AccountError
        from dev_stack.embedded import DevExtraMissing  # `dev` where the dev extra is not installed
        from site_activity.erasure import ErasureError, NotifyError
        from site_activity.export import ExportError
        from site_activity.kafka_security import KafkaSecurityError  # incomplete security settings
        from site_activity.widgets import WidgetError

        if isinstance(
            exc,
            (WidgetError, AccountError, ErasureError, NotifyError, ExportError, KafkaSecurityError, DevExtraMissing),
        ):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        import psycopg

        if isinstance(exc, psycopg.OperationalError):
            print(f"error: cannot reach Postgres at {settings.postgres_dsn}: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
