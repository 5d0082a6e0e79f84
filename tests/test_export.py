"""Export bundles (issue 13): the archive's files read back equal to SQL over the tables, in each format; the
manifest's counts and hashes match the files; filters are exact; one snapshot; erased subjects never appear.
Then the console API (202 -> done -> download; admins only; tenant-scoped; expiry; audit) against a real
`site-activity console` process, and the CLI with its progress output. Real Postgres (and the session broker
the console fixture needs)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import threading
import uuid
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from dev_stack.embedded import EmbeddedBroker, EmbeddedPostgres, free_port, wait_until
from site_activity import erasure, export, widgets
from site_activity.settings import Settings
from tests.conftest import make_settings
from tests.console_helpers import Tenant, cli, make_tenant

EVENT_COLS = [c.name for c in export.EVENT_COLUMNS]
CONTACT_COLS = [c.name for c in export.CONTACT_COLUMNS]
BASE = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)

# Values that break naive writers: quotes, commas, newlines, backslashes, non-BMP unicode, RTL, an empty string
# (which must stay distinct from NULL).
AWKWARD = [
    "plain",
    'with "quotes", commas',
    "line\nbreak\r\nand\ttab",
    "back\\slash \\n not a newline",
    "emoji 🎉 and 中文 and עברית",
    "",
    " leading and trailing spaces ",
]


@pytest.fixture(scope="module")
def console_settings(
    kafka: EmbeddedBroker, postgres: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    """This module's console: the export worker polls every 0.2 s and leases jobs for 3 s."""
    return make_settings(
        kafka,
        postgres,
        tmp_path_factory.mktemp("console") / "data",
        console_port=free_port(),
        export_poll_s=0.2,
        export_lease_s=3.0,
    )


@pytest.fixture(scope="module")
def acme(postgres: EmbeddedPostgres) -> Tenant:
    tenant = make_tenant(postgres.dsn, "Acme")
    seed_tenant(postgres.dsn, tenant.id, tenant.widget.id)
    return tenant


@pytest.fixture(scope="module")
def globex(postgres: EmbeddedPostgres) -> Tenant:
    tenant = make_tenant(postgres.dsn, "Globex")
    seed_tenant(postgres.dsn, tenant.id, tenant.widget.id)
    return tenant


def seed_tenant(dsn: str, tenant_id: uuid.UUID, widget_id: uuid.UUID, n: int = 60) -> dict[str, Any]:
    """n events on the given widget and n/2 on a second widget of the tenant, three contacts (one linked only to
    the second widget's events), NULLs, awkward strings and nested jsonb; occurred_at one hour apart from BASE."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        other = widgets.create_widget(
            conn, name="second site", tenant_id=tenant_id, actor="tests", tracking_enabled=True
        )
        contacts = [uuid.uuid4() for _ in range(3)]
        for i, cid in enumerate(contacts):
            conn.execute(
                "INSERT INTO customers (id, tenant_id, external_id, email, name, traits) VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    cid,
                    tenant_id,
                    f"user-{cid.hex[:8]}",
                    None if i == 1 else f"c{i}@example.com",
                    AWKWARD[i + 3],
                    json.dumps({"plan": "growth", "seats": i, "tags": ["a", "ü"], "nested": {"x": None, "y": 1.5}}),
                ),
            )
        rows = []
        for widget, count, linkable in ((widget_id, n, contacts[:2]), (other.id, n // 2, contacts[2:])):
            for i in range(count):
                at = BASE + timedelta(hours=i)
                rows.append(
                    (
                        widget,
                        uuid.uuid4(),
                        tenant_id,
                        f"visitor-{i % 7}",
                        ("pageview", "custom", "identify")[i % 3],
                        AWKWARD[i % len(AWKWARD)] if i % 4 else None,
                        f'https://shop.example/p/{i}?q=ä&x="y"' if i % 5 else None,
                        "" if i % 6 == 0 else (None if i % 6 == 1 else "https://ref.example/"),
                        json.dumps(
                            {
                                "i": i,
                                "label": AWKWARD[i % len(AWKWARD)],
                                "big": 2**53 + i,
                                "f": i / 3,
                                "list": [1, "two", None],
                                "deep": {"k": {"v": True}},
                            }
                        ),
                        f"user-{i}" if i % 3 == 2 else None,
                        linkable[(i // 2) % len(linkable)] if i % 2 else None,
                        uuid.uuid4() if i % 4 != 3 else None,
                        at,
                        at + timedelta(seconds=1, microseconds=i),
                    )
                )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO visitor_events (widget_id, event_id, tenant_id, visitor_id, event_type, name, url,"
                " referrer, properties, user_id, customer_id, session_id, occurred_at, received_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                rows,
            )
    return {"other_widget": other.id, "contacts": contacts}


# --- reading a bundle back into Python values --------------------------------------------------------------
def sql_events(conn: psycopg.Connection, where: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
    cur = conn.execute(
        f"SELECT {', '.join(EVENT_COLS)} FROM visitor_events WHERE {where} ORDER BY occurred_at, event_id, widget_id",
        params,
    )
    return [dict(zip(EVENT_COLS, r, strict=True)) for r in cur.fetchall()]


def sql_contacts(conn: psycopg.Connection, ids: set[uuid.UUID]) -> list[dict[str, Any]]:
    cur = conn.execute(f"SELECT {', '.join(CONTACT_COLS)} FROM customers WHERE id = ANY(%s) ORDER BY id", (list(ids),))
    return [dict(zip(CONTACT_COLS, r, strict=True)) for r in cur.fetchall()]


def typed(row: dict[str, Any], columns: tuple[export.Column, ...]) -> dict[str, Any]:
    """A row read from a file as the Python values psycopg gives for the table's columns."""
    out = {}
    for c in columns:
        v = row[c.name]
        if v is not None:
            if c.type == "uuid":
                v = uuid.UUID(v)
            elif c.type == "json" and isinstance(v, str):
                v = json.loads(v)
            elif c.type == "timestamp" and isinstance(v, str):
                v = datetime.fromisoformat(v)
        out[c.name] = v
    return out


def read_file(zf: zipfile.ZipFile, name: str, fmt: str, columns: tuple[export.Column, ...]) -> list[dict[str, Any]]:
    data = zf.read(name)
    if fmt == "ndjson":
        lines = data.decode("utf-8").split("\n")
        assert lines[-1] == "", "every line ends with a newline"
        rows = [json.loads(line) for line in lines[:-1]]
        for r in rows:
            assert list(r) == [c.name for c in columns]
            for c in columns:  # nested objects, not JSON-in-a-string
                assert r[c.name] is None or c.type != "json" or isinstance(r[c.name], dict)
    elif fmt == "csv":
        # Unquoted empty = NULL, quoted "" = empty string (the documented dialect): pyarrow tells them apart.
        table = pacsv.read_csv(
            io.BytesIO(data),
            convert_options=pacsv.ConvertOptions(
                column_types={c.name: pa.string() for c in columns},
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
            ),
        )
        assert table.column_names == [c.name for c in columns]
        rows = table.to_pylist()
        if rows:  # FORCE_QUOTE: a non-NULL value is always quoted (the first column is never NULL)
            assert data.split(b"\n")[1].startswith(b'"')
        # The stdlib reader agrees on the values (it cannot tell NULL from "", so compare as text).
        std = list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))
        assert [{k: v or "" for k, v in r.items()} for r in rows] == std
    else:
        table = pq.read_table(io.BytesIO(data))
        assert table.schema == export._arrow_schema(columns)
        for c in columns:
            if c.type == "timestamp":
                assert table.schema.field(c.name).type == pa.timestamp("us", tz="UTC")
        rows = table.to_pylist()
    return [typed(r, columns) for r in rows]


def open_bundle(path: Path) -> tuple[zipfile.ZipFile, dict[str, Any]]:
    zf = zipfile.ZipFile(path)
    return zf, json.loads(zf.read("manifest.json"))


def check_manifest(zf: zipfile.ZipFile, manifest: dict[str, Any], fmt: str, counts: dict[str, int]) -> None:
    assert zf.namelist() == [f"events.{fmt}", f"contacts.{fmt}", "manifest.json"]
    assert manifest["format_version"] == export.FORMAT_VERSION and manifest["format"] == fmt
    assert manifest["row_counts"] == counts
    for f in manifest["files"]:
        data = zf.read(f["name"])
        assert hashlib.sha256(data).hexdigest() == f["sha256"]
        assert len(data) == f["bytes"]
        assert [c["name"] for c in f["columns"]] == (EVENT_COLS if f["name"].startswith("events") else CONTACT_COLS)
    assert datetime.fromisoformat(manifest["created_at"]).tzinfo is not None


def bundle(
    dsn: str,
    tmp_path: Path,
    fmt: str,
    tenant_id: uuid.UUID,
    widget: uuid.UUID | None = None,
    from_: Any = None,
    to: Any = None,
) -> tuple[zipfile.ZipFile, dict[str, Any], export.BundleResult]:
    out = tmp_path / f"bundle-{uuid.uuid4().hex[:6]}.zip"
    res = export.write_bundle(dsn, export.make_filter(tenant_id, widget, from_, to), fmt, out)  # type: ignore[arg-type]
    zf, manifest = open_bundle(out)
    assert res.manifest == manifest and res.bytes == out.stat().st_size
    assert res.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    return zf, manifest, res


def check_bundle(
    db: psycopg.Connection, zf: zipfile.ZipFile, manifest: dict[str, Any], fmt: str, where: str, params: tuple[Any, ...]
) -> list[dict[str, Any]]:
    """The files equal SQL over the tables (same rows, order, values and types); contacts = those linked."""
    expected = sql_events(db, where, params)
    got = read_file(zf, f"events.{fmt}", fmt, export.EVENT_COLUMNS)
    assert got == expected
    linked = {r["customer_id"] for r in expected if r["customer_id"] is not None}
    contacts = read_file(zf, f"contacts.{fmt}", fmt, export.CONTACT_COLUMNS)
    assert contacts == sql_contacts(db, linked)
    check_manifest(zf, manifest, fmt, {"events": len(expected), "contacts": len(linked)})
    return expected


# --- the writer ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", export.FORMATS)
def test_each_format_round_trips_to_the_rows_in_postgres(
    fmt: str, acme: Tenant, globex: Tenant, db: psycopg.Connection, postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    zf, manifest, _ = bundle(postgres.dsn, tmp_path, fmt, acme.id)
    rows = check_bundle(db, zf, manifest, fmt, "tenant_id = %s", (acme.id,))
    assert len(rows) == 90 and manifest["row_counts"]["contacts"] == 3
    # What the file holds really exercises NULLs, "" and the awkward strings.
    assert {r["referrer"] for r in rows} >= {None, "", "https://ref.example/"}
    assert {r["name"] for r in rows} >= set(AWKWARD) | {None}
    assert manifest["filters"] == {
        "tenant_id": str(acme.id),
        "widget_id": None,
        "from": None,
        "to": None,
        "time_field": "occurred_at",
        "interval": "[from, to)",
    }
    assert not any(r["tenant_id"] == globex.id for r in rows)
    if fmt == "csv":
        assert manifest["csv_dialect"]["quoting"] == "every non-NULL value is quoted"


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_widget_and_time_filters_are_exact(
    fmt: str, acme: Tenant, db: psycopg.Connection, postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    # Bounds on exact event times: `from` is kept, `to` is not; one microsecond either side flips it.
    start, end = BASE + timedelta(hours=10), BASE + timedelta(hours=20)
    zf, manifest, _ = bundle(postgres.dsn, tmp_path, fmt, acme.id, acme.widget.id, start.isoformat(), end.isoformat())
    rows = check_bundle(
        db, zf, manifest, fmt, "widget_id = %s AND occurred_at >= %s AND occurred_at < %s", (acme.widget.id, start, end)
    )
    assert [r["occurred_at"] for r in rows] == [BASE + timedelta(hours=h) for h in range(10, 20)]
    assert manifest["filters"]["widget_id"] == str(acme.widget.id)
    zf, manifest, _ = bundle(
        postgres.dsn,
        tmp_path,
        fmt,
        acme.id,
        acme.widget.id,
        start + timedelta(microseconds=1),
        end + timedelta(microseconds=1),
    )
    rows = check_bundle(
        db, zf, manifest, fmt, "widget_id = %s AND occurred_at > %s AND occurred_at <= %s", (acme.widget.id, start, end)
    )
    assert [r["occurred_at"] for r in rows] == [BASE + timedelta(hours=h) for h in range(11, 21)]
    # A date means midnight UTC; a range with no events gives empty files with their header/schema.
    zf, manifest, _ = bundle(postgres.dsn, tmp_path, fmt, acme.id, None, "2020-01-01", "2020-01-02")
    assert manifest["row_counts"] == {"events": 0, "contacts": 0}
    assert manifest["filters"]["from"] == "2020-01-01T00:00:00+00:00"
    check_bundle(db, zf, manifest, fmt, "false", ())


def test_contacts_are_those_linked_to_exported_events(
    acme: Tenant, db: psycopg.Connection, postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    other_widget = db.execute(
        "SELECT id FROM widget_configs WHERE tenant_id = %s AND id <> %s", (acme.id, acme.widget.id)
    ).fetchone()[0]
    for widget in (acme.widget.id, other_widget):
        zf, manifest, _ = bundle(postgres.dsn, tmp_path, "ndjson", acme.id, widget)
        rows = check_bundle(db, zf, manifest, "ndjson", "widget_id = %s", (widget,))
        linked = {r["customer_id"] for r in rows} - {None}
        assert len(linked) == (2 if widget == acme.widget.id else 1)
    # An unlinked contact of the tenant is not exported.
    db.execute("INSERT INTO customers (id, tenant_id, external_id) VALUES (%s, %s, 'nobody')", (uuid.uuid4(), acme.id))
    _, manifest, _ = bundle(postgres.dsn, tmp_path, "ndjson", acme.id)
    assert manifest["row_counts"]["contacts"] == 3


def test_parquet_is_written_in_row_groups(
    acme: Tenant, postgres: EmbeddedPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db: psycopg.Connection
) -> None:
    monkeypatch.setattr(export, "PARQUET_ROW_GROUP_ROWS", 20)
    monkeypatch.setattr(export, "FETCH_ROWS", 7)
    zf, manifest, _ = bundle(postgres.dsn, tmp_path, "parquet", acme.id)
    meta = pq.ParquetFile(io.BytesIO(zf.read("events.parquet"))).metadata
    assert meta.num_rows == 90 and meta.num_row_groups == 5  # 21, 21, 21, 21, 6: a group closes at >= 20 rows
    check_bundle(db, zf, manifest, "parquet", "tenant_id = %s", (acme.id,))


def test_bundle_is_one_snapshot_while_rows_keep_arriving(
    postgres: EmbeddedPostgres, db: psycopg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer adds events (linked to brand-new contacts) and deletes contacts throughout the export: the
    archive still agrees with itself (counts = files, every linked contact present) and with one instant."""
    tenant = make_tenant(postgres.dsn, "Snapshot")
    seed_tenant(postgres.dsn, tenant.id, tenant.widget.id, n=3000)
    monkeypatch.setattr(export, "FETCH_ROWS", 100)  # many round trips, so the writer interleaves with them
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            while not stop.is_set():
                with conn.transaction():
                    cid = uuid.uuid4()
                    conn.execute(
                        "INSERT INTO customers (id, tenant_id, external_id) VALUES (%s, %s, %s)",
                        (cid, tenant.id, cid.hex),
                    )
                    conn.execute(
                        "INSERT INTO visitor_events (widget_id, event_id, tenant_id, visitor_id, event_type,"
                        " customer_id, occurred_at, received_at) VALUES (%s, %s, %s, 'late', 'pageview', %s, %s, now())",
                        (tenant.widget.id, uuid.uuid4(), tenant.id, cid, BASE + timedelta(minutes=written[0])),
                    )
                    # Deleting a linked contact nulls its events' customer_id (ON DELETE SET NULL).
                    conn.execute(
                        "DELETE FROM customers WHERE id = (SELECT id FROM customers WHERE tenant_id = %s"
                        " AND external_id NOT LIKE 'user-%%' ORDER BY random() LIMIT 1)",
                        (tenant.id,),
                    )
                written[0] += 1

    before = db.execute("SELECT count(*) FROM visitor_events WHERE tenant_id = %s", (tenant.id,)).fetchone()[0]
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_until(lambda: written[0] > 5, 30, "writer")
        zf, manifest, _ = bundle(postgres.dsn, tmp_path, "ndjson", tenant.id)
        during = written[0]
    finally:
        stop.set()
        thread.join()
    events = read_file(zf, "events.ndjson", "ndjson", export.EVENT_COLUMNS)
    contacts = read_file(zf, "contacts.ndjson", "ndjson", export.CONTACT_COLUMNS)
    check_manifest(zf, manifest, "ndjson", {"events": len(events), "contacts": len(contacts)})
    assert {e["customer_id"] for e in events} - {None} == {c["id"] for c in contacts}
    assert before < len(events) < before + during + 1  # some of the writer's rows, from one instant
    late = sum(1 for e in events if e["visitor_id"] == "late")
    assert len(events) == before + late


def test_erased_subjects_never_appear(postgres: EmbeddedPostgres, db: psycopg.Connection, tmp_path: Path) -> None:
    tenant = make_tenant(postgres.dsn, "Erase")
    seeded = seed_tenant(postgres.dsn, tenant.id, tenant.widget.id)
    contact = seeded["contacts"][0]
    visitors = db.execute(
        "SELECT DISTINCT widget_id, visitor_id FROM visitor_events WHERE customer_id = %s", (contact,)
    ).fetchall()
    erasure.erase_contact(db, tenant.id, contact, actor="tests", notify=lambda keys: None)
    erasure.erase_visitor(db, tenant.id, tenant.widget.id, "visitor-2", actor="tests", notify=lambda keys: None)
    for fmt in export.FORMATS:
        zf, manifest, result = bundle(postgres.dsn, tmp_path, fmt, tenant.id)
        events = check_bundle(db, zf, manifest, fmt, "tenant_id = %s", (tenant.id,))
        assert events and all(e["customer_id"] != contact for e in events)
        assert not {(e["widget_id"], e["visitor_id"]) for e in events} & (
            set(visitors) | {(tenant.widget.id, "visitor-2")}
        )
        assert contact not in {c["id"] for c in read_file(zf, f"contacts.{fmt}", fmt, export.CONTACT_COLUMNS)}
        assert result.erasures_seen >= 3


def test_bad_requests_are_refused_before_writing(
    acme: Tenant, globex: Tenant, postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    out = tmp_path / "never.zip"
    with pytest.raises(export.ExportError, match="no widget"):
        export.write_bundle(postgres.dsn, export.make_filter(acme.id, globex.widget.id, None, None), "csv", out)
    with pytest.raises(export.ExportError, match="format"):
        export.write_bundle(postgres.dsn, export.make_filter(acme.id, None, None, None), "xlsx", out)  # type: ignore[arg-type]
    with pytest.raises(export.ExportError, match="before"):
        export.make_filter(acme.id, None, "2026-03-02", "2026-03-01")
    with pytest.raises(export.ExportError, match="ISO 8601"):
        export.make_filter(acme.id, None, "yesterday", None)
    assert not out.exists()


# --- CLI -----------------------------------------------------------------------------------------------------
def test_cli_writes_the_bundle_with_progress_and_an_audit_row(
    console_settings: Settings, acme: Tenant, db: psycopg.Connection, tmp_path: Path
) -> None:
    out = tmp_path / "sub" / "acme.zip"
    done = cli(
        console_settings,
        "export",
        "--tenant",
        str(acme.id),
        "--widget",
        str(acme.widget.id),
        "--from",
        "2026-03-01",
        "--to",
        "2026-03-02T00:00:00Z",
        "--format",
        "csv",
        "--out",
        str(out),
        "--actor",
        "ops@acme.example",
    )
    assert done.returncode == 0, done.stderr
    zf, manifest = open_bundle(out)
    check_bundle(
        db,
        zf,
        manifest,
        "csv",
        "widget_id = %s AND occurred_at >= %s AND occurred_at < %s",
        (acme.widget.id, datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC)),
    )
    n = manifest["row_counts"]["events"]
    assert n == 12  # 12:00 .. 23:00 on March 1st
    progress = [line for line in done.stderr.splitlines() if line.startswith(("events.csv:", "contacts.csv:"))]
    assert progress[0] == "events.csv: 0 / 12 rows (0%)" and f"events.csv: {n} / {n} rows (100%)" in progress
    assert progress[-1].startswith("contacts.csv: ") and progress[-1].endswith("(100%)")
    assert str(out) in done.stdout and hashlib.sha256(out.read_bytes()).hexdigest() in done.stdout
    assert not [p for p in out.parent.iterdir() if p.name != "acme.zip"], "no temporary file left behind"
    row = db.execute(
        "SELECT actor, new_value FROM audit_log WHERE tenant_id = %s AND action = 'export.written'"
        " ORDER BY id DESC LIMIT 1",
        (acme.id,),
    ).fetchone()
    assert row is not None and row[0] == "ops@acme.example"
    assert row[1]["row_counts"] == manifest["row_counts"] and row[1]["widget_id"] == str(acme.widget.id)
    assert row[1]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()

    bad = cli(
        console_settings,
        "export",
        "--tenant",
        str(acme.id),
        "--widget",
        str(uuid.uuid4()),
        "--format",
        "csv",
        "--out",
        str(tmp_path / "bad.zip"),
    )
    assert bad.returncode == 2 and "no widget" in bad.stderr and not (tmp_path / "bad.zip").exists()


# --- console API ---------------------------------------------------------------------------------------------
def wait_status(
    console: httpx.Client, tenant: Tenant, export_id: str, statuses: set[str], timeout: float = 60.0
) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def check() -> bool:
        nonlocal seen
        resp = console.get(f"/api/v1/exports/{export_id}", headers=tenant.auth("admin"))
        assert resp.status_code == 200, resp.text
        seen = resp.json()
        return seen["status"] in statuses

    try:
        wait_until(check, timeout, f"export {export_id} to be {statuses}", interval=0.2)
    except TimeoutError:
        raise AssertionError(f"export never reached {statuses}: {seen}") from None
    return seen


def request_export(console: httpx.Client, tenant: Tenant, **body: Any) -> dict[str, Any]:
    resp = console.post("/api/v1/exports", json=body, headers=tenant.auth("admin"))
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/api/v1/exports/{job['id']}"
    return job


def download(console: httpx.Client, tenant: Tenant, export_id: str, tmp_path: Path) -> Path:
    out = tmp_path / f"{export_id}.zip"
    with console.stream("GET", f"/api/v1/exports/{export_id}/download", headers=tenant.auth("admin")) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"] == "application/zip"
        assert f"site-activity-export-{export_id}.zip" in resp.headers["content-disposition"]
        with out.open("wb") as fh:
            for chunk in resp.iter_bytes():
                fh.write(chunk)
    return out


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_api_export_202_then_done_then_download(
    fmt: str, console: httpx.Client, acme: Tenant, db: psycopg.Connection, tmp_path: Path
) -> None:
    job = request_export(console, acme, format=fmt, widget_id=str(acme.widget.id), **{"from": "2026-03-02"})
    assert job["status"] in ("queued", "running") and job["download_url"] is None
    done = wait_status(console, acme, job["id"], {"done", "failed"})
    assert done["status"] == "done", done
    path = download(console, acme, job["id"], tmp_path)
    assert done["size_bytes"] == path.stat().st_size
    assert done["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    zf, manifest = open_bundle(path)
    assert manifest["export_id"] == job["id"]
    check_bundle(
        db,
        zf,
        manifest,
        fmt,
        "widget_id = %s AND occurred_at >= %s",
        (acme.widget.id, datetime(2026, 3, 2, tzinfo=UTC)),
    )
    assert done["row_counts"] == manifest["row_counts"] and done["row_counts"]["events"] == 48
    assert done["filters"] == {k: v for k, v in manifest["filters"].items() if k != "tenant_id"}
    # Audited: who asked, what, the completion, and the download.
    actions = db.execute(
        "SELECT action, actor, new_value FROM audit_log WHERE entity = 'export' AND entity_id = %s ORDER BY id",
        (job["id"],),
    ).fetchall()
    assert [a[0] for a in actions] == ["export.requested", "export.completed", "export.downloaded"]
    assert actions[0][1] == acme.emails["admin"] and actions[0][2]["format"] == fmt
    assert actions[0][2]["widget_id"] == str(acme.widget.id) and actions[0][2]["from"] == "2026-03-02T00:00:00+00:00"
    assert actions[2][1] == acme.emails["admin"] and actions[2][2]["sha256"] == done["sha256"]


def test_api_is_for_admins_only(console: httpx.Client, acme: Tenant) -> None:
    job = request_export(console, acme, format="ndjson")
    wait_status(console, acme, job["id"], {"done"})
    for method, path, body in (
        ("POST", "/api/v1/exports", {"format": "csv"}),
        ("GET", f"/api/v1/exports/{job['id']}", None),
        ("GET", f"/api/v1/exports/{job['id']}/download", None),
    ):
        resp = console.request(method, path, json=body, headers=acme.auth("member"))
        assert resp.status_code == 403, (path, resp.text)
        assert resp.json()["error"] == "forbidden"
        assert console.request(method, path, json=body).status_code == 401
    resp = console.get(f"/api/v1/exports/{job['id']}", headers=acme.auth("owner"))
    assert resp.status_code == 200


def test_api_is_tenant_scoped(console: httpx.Client, acme: Tenant, globex: Tenant) -> None:
    job = request_export(console, acme, format="csv")
    wait_status(console, acme, job["id"], {"done"})
    for path in (
        f"/api/v1/exports/{job['id']}",
        f"/api/v1/exports/{job['id']}/download",
        f"/api/v1/exports/{uuid.uuid4()}",
        "/api/v1/exports/not-a-uuid/download",
    ):
        resp = console.get(path, headers=globex.auth("admin"))
        assert resp.status_code == 404, (path, resp.text)
    # Another tenant's widget as a filter is 404 too, and queues nothing.
    resp = console.post(
        "/api/v1/exports", json={"format": "csv", "widget_id": str(acme.widget.id)}, headers=globex.auth("admin")
    )
    assert resp.status_code == 404 and "no widget" in resp.json()["reason"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"format": "xlsx"},
        {"format": "csv", "from": "soon"},
        {"format": "csv", "from": "2026-03-02", "to": "2026-03-01"},
        {"format": "csv", "widget_id": "nope"},
        {"format": "csv", "extra": 1},
    ],
)
def test_api_refuses_bad_requests_with_400(
    console: httpx.Client, acme: Tenant, body: dict[str, Any], db: psycopg.Connection
) -> None:
    before = db.execute("SELECT count(*) FROM exports WHERE tenant_id = %s", (acme.id,)).fetchone()[0]
    resp = console.post("/api/v1/exports", json=body, headers=acme.auth("admin"))
    assert resp.status_code == 400, resp.text
    assert resp.json()["reason"]
    assert db.execute("SELECT count(*) FROM exports WHERE tenant_id = %s", (acme.id,)).fetchone()[0] == before


def test_download_before_done_is_409(console: httpx.Client, acme: Tenant, db: psycopg.Connection) -> None:
    # A job no worker may touch yet: running under a live lease of another (absent) worker.
    job_id = uuid.uuid4()
    db.execute(
        "INSERT INTO exports (id, tenant_id, requested_by, format, status, attempts, lease_owner, lease_until)"
        " VALUES (%s, %s, 'tests', 'csv', 'running', 1, 'elsewhere', now() + interval '1 hour')",
        (job_id, acme.id),
    )
    try:
        resp = console.get(f"/api/v1/exports/{job_id}/download", headers=acme.auth("admin"))
        assert resp.status_code == 409 and resp.json()["error"] == "not_ready"
        assert console.get(f"/api/v1/exports/{job_id}", headers=acme.auth("admin")).json()["status"] == "running"
    finally:
        db.execute("UPDATE exports SET status = 'failed', lease_owner = NULL WHERE id = %s", (job_id,))


def test_expired_archive_is_deleted_and_gone(
    console: httpx.Client, console_settings: Settings, acme: Tenant, db: psycopg.Connection
) -> None:
    job = request_export(console, acme, format="parquet")
    done = wait_status(console, acme, job["id"], {"done"})
    created = datetime.fromisoformat(done["finished_at"])
    assert datetime.fromisoformat(done["expires_at"]) - created == timedelta(seconds=console_settings.export_ttl_s)
    file_name = db.execute("SELECT file_name FROM exports WHERE id = %s", (job["id"],)).fetchone()[0]
    path = console_settings.exports_path / file_name
    assert path.is_file()
    db.execute("UPDATE exports SET expires_at = now() WHERE id = %s", (job["id"],))  # as if the TTL passed
    expired = wait_status(console, acme, job["id"], {"expired"})
    assert not path.exists() and expired["download_url"] is None and "expired" in expired["error"]
    resp = console.get(f"/api/v1/exports/{job['id']}/download", headers=acme.auth("admin"))
    assert resp.status_code == 410 and resp.json()["error"] == "gone"
    row = db.execute(
        "SELECT actor FROM audit_log WHERE entity_id = %s AND action = 'export.expired'", (job["id"],)
    ).fetchone()
    assert row is not None and row[0].startswith("system")


def test_an_erase_after_the_snapshot_withdraws_the_archive(
    console: httpx.Client, console_settings: Settings, postgres: EmbeddedPostgres, db: psycopg.Connection
) -> None:
    tenant = make_tenant(postgres.dsn, "Withdraw")
    seeded = seed_tenant(postgres.dsn, tenant.id, tenant.widget.id, n=10)
    job = request_export(console, tenant, format="csv")
    wait_status(console, tenant, job["id"], {"done"})
    file_name = db.execute("SELECT file_name FROM exports WHERE id = %s", (job["id"],)).fetchone()[0]
    erasure.erase_contact(db, tenant.id, seeded["contacts"][0], actor="tests", notify=lambda keys: None)
    resp = console.get(f"/api/v1/exports/{job['id']}/download", headers=tenant.auth("admin"))
    assert resp.status_code == 410 and "erased" in resp.json()["reason"]
    gone = wait_status(console, tenant, job["id"], {"expired"})
    assert "erased" in gone["error"] and not (console_settings.exports_path / file_name).exists()
    # A new export from after the erase works and leaves the contact out.
    job = request_export(console, tenant, format="csv")
    assert wait_status(console, tenant, job["id"], {"done"})["row_counts"]["contacts"] == 2


def test_orphaned_job_is_claimed_again_after_its_lease_lapses(
    console: httpx.Client, console_settings: Settings, acme: Tenant, db: psycopg.Connection
) -> None:
    """A job whose worker died mid-run (the state it leaves: running, a lapsing lease, a partial file) is
    finished by a live worker; a job that used up its attempts that way is marked failed."""
    job_id, spent = uuid.uuid4(), uuid.uuid4()
    tenant_dir = console_settings.exports_path / str(acme.id)
    tenant_dir.mkdir(parents=True, exist_ok=True)
    partial = tenant_dir / f"{job_id}-1.zip.partial"
    partial.write_bytes(b"half an archive")
    db.execute(
        "INSERT INTO exports (id, tenant_id, requested_by, format, status, attempts, lease_owner, lease_until)"
        " VALUES (%s, %s, 'tests', 'ndjson', 'running', 1, 'dead-worker', now() + interval '1 second'),"
        " (%s, %s, 'tests', 'ndjson', 'running', %s, 'dead-worker', now())",
        (job_id, acme.id, spent, acme.id, console_settings.export_max_attempts),
    )
    done = wait_status(console, acme, str(job_id), {"done", "failed"})
    assert done["status"] == "done" and done["attempts"] == 2, done
    assert not partial.exists()
    failed = wait_status(console, acme, str(spent), {"failed"})
    assert "stopped" in failed["error"] and failed["attempts"] == console_settings.export_max_attempts


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_cli_shows_a_progress_bar_on_a_terminal(
    acme: Tenant,
    postgres: EmbeddedPostgres,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    db: psycopg.Connection,
) -> None:
    from command_line.export import run_export

    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setenv("COLUMNS", "120")
    settings = Settings(postgres_dsn=postgres.dsn, data_dir=tmp_path)
    out = tmp_path / "bar.zip"
    assert (
        run_export(settings, tenant=acme.id, widget=None, from_=None, to=None, fmt="ndjson", out=out, actor="tests")
        == 0
    )
    shown = terminal.getvalue()
    assert "events.ndjson" in shown and "contacts.ndjson" in shown and "━" in shown  # rich's bar
    assert "90/90" in shown  # MofN column at the end
    zf, manifest = open_bundle(out)
    check_bundle(db, zf, manifest, "ndjson", "tenant_id = %s", (acme.id,))
    assert "wrote" in capsys.readouterr().out
