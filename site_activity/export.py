"""Export bundles: one zip archive with a tenant's events, the contacts they link to, and a manifest.

Used by `site-activity export` (command_line/main.py) and by the console's export jobs
(site_activity/export_jobs.py); both call `write_bundle`.

Archive (zip, ZIP64 so any size works):
    events.<ext>     every visitor_events row of the tenant that matches the filters
    contacts.<ext>   every contact (customers row) that at least one exported event links to (customer_id)
    manifest.json    format version, filters, row counts, SHA-256 and size of each file, column schemas
<ext> is ndjson, csv or parquet. CSV and NDJSON entries are deflated (level 1: speed over size), Parquet
entries are stored as they are (they are zstd-compressed inside).

Consistency: the counts, the events and the contacts are read in ONE read-only REPEATABLE READ transaction,
so the archive is a snapshot of one instant even while the sink keeps writing: the manifest's counts equal the
files' rows, and every customer_id in the events file is a contact in the contacts file (the foreign key is ON
DELETE SET NULL, so in one snapshot a linked contact always exists).

Erased subjects: an erase deletes the subject's events and contact in the same transaction that suppresses
them (site_activity/erasure.py), and the sink never stores a suppressed subject's events, so no snapshot
holds an erased subject. `erasures_seen` (the tenant's erased_subjects count in the snapshot) lets the caller
notice an erase that committed after the snapshot (export_jobs.py then withdraws the file).

Memory: rows are streamed (server-side cursor, or COPY for CSV) and written as they arrive; nothing holds more
than one fetch of the cursor (Parquet: one row group of PARQUET_ROW_GROUP_ROWS rows)."""

from __future__ import annotations

import hashlib
import io
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import IO, Any, Literal

import orjson
import psycopg
from psycopg import sql

from schemas.fields import check_event_fields

FORMAT_VERSION = 1
Format = Literal["ndjson", "csv", "parquet"]
FORMATS: tuple[Format, ...] = ("ndjson", "csv", "parquet")
# Rows per Parquet row group: the writer holds one group in Arrow memory (~0.4 KB a row here) plus the column
# encoders' buffers, so this bounds its peak: at 50k rows a 5M-row export grew the process by 106 MB
# (bench/bench_export.py), over the 100 MB budget; 25k rows (groups of ~5-10 MB compressed) keeps readers'
# row-group skipping useful.
PARQUET_ROW_GROUP_ROWS = 25_000
# Rows per round trip of the server-side cursor: 2,000 keeps the Python rows and libpq's result buffer of one
# fetch small (10,000 cost ~35 MB more peak RSS in the benchmark) for ~2,500 round trips per 5M rows.
FETCH_ROWS = 2_000
DEFLATE_LEVEL = 1

# Progress callback: (file name, rows written so far, rows in total).
Progress = Callable[[str, int, int], None]


class ExportError(ValueError):
    """The export cannot be made as asked (unknown format, widget of another tenant, bad range)."""


@dataclass(frozen=True)
class Column:
    name: str
    sql: str  # the visitor_events / customers column
    type: str  # the logical type, as the manifest names it
    nullable: bool


# The exported columns, in file order. Logical types map to: Parquet (string, timestamp[us, UTC], string
# holding JSON), CSV (text; timestamps as ISO 8601 "YYYY-MM-DD HH:MM:SS[.ffffff]+00"; json as JSON text),
# NDJSON (strings; timestamps "YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00"; json as a nested object).
EVENT_COLUMNS: tuple[Column, ...] = (
    Column("event_id", "event_id", "uuid", False),
    Column("widget_id", "widget_id", "uuid", False),
    Column("tenant_id", "tenant_id", "uuid", False),
    Column("visitor_id", "visitor_id", "string", False),
    Column("event_type", "event_type", "string", False),
    Column("name", "name", "string", True),
    Column("url", "url", "string", True),
    Column("referrer", "referrer", "string", True),
    Column("properties", "properties", "json", False),
    Column("user_id", "user_id", "string", True),
    Column("customer_id", "customer_id", "uuid", True),
    Column("session_id", "session_id", "uuid", True),
    Column("occurred_at", "occurred_at", "timestamp", False),
    Column("received_at", "received_at", "timestamp", False),
)
check_event_fields((c.name for c in EVENT_COLUMNS), "site_activity.export.EVENT_COLUMNS")
CONTACT_COLUMNS: tuple[Column, ...] = (
    Column("id", "id", "uuid", False),
    Column("external_id", "external_id", "string", False),
    Column("email", "email", "string", True),
    Column("name", "name", "string", True),
    Column("traits", "traits", "json", False),
    Column("created_at", "created_at", "timestamp", False),
    Column("updated_at", "updated_at", "timestamp", False),
)

CSV_DIALECT = {
    "encoding": "utf-8",
    "delimiter": ",",
    "quotechar": '"',
    "escapechar": None,
    "doublequote": True,
    "lineterminator": "\n",
    "header": True,
    "quoting": "every non-NULL value is quoted",
    "null": 'an empty unquoted field (an empty string is "")',
}


@dataclass(frozen=True)
class ExportFilter:
    """Which events: the tenant's, optionally one widget's, with occurred_at in [from_at, to_at)."""

    tenant_id: uuid.UUID
    widget_id: uuid.UUID | None = None
    from_at: datetime | None = None
    to_at: datetime | None = None

    def public(self) -> dict[str, Any]:
        return {
            "tenant_id": str(self.tenant_id),
            "widget_id": str(self.widget_id) if self.widget_id else None,
            "from": self.from_at.isoformat() if self.from_at else None,
            "to": self.to_at.isoformat() if self.to_at else None,
            "time_field": "occurred_at",
            "interval": "[from, to)",
        }


@dataclass
class BundleResult:
    manifest: dict[str, Any]
    erasures_seen: int  # the tenant's erased_subjects rows in the snapshot (see module docstring)
    bytes: int = 0  # size of the archive
    sha256: str = ""  # of the archive
    seconds: float = 0.0

    @property
    def rows(self) -> dict[str, int]:
        return dict(self.manifest["row_counts"])


def parse_time(value: str | date | datetime | None, what: str) -> datetime | None:
    """A filter bound: ISO 8601 date (midnight UTC) or date-time (without offset: UTC). Raises ExportError."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ExportError(f"{what}: not an ISO 8601 date or date-time: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def make_filter(
    tenant_id: uuid.UUID, widget_id: uuid.UUID | None, from_at: str | datetime | None, to_at: str | datetime | None
) -> ExportFilter:
    flt = ExportFilter(tenant_id, widget_id, parse_time(from_at, "from"), parse_time(to_at, "to"))
    if flt.from_at and flt.to_at and flt.from_at >= flt.to_at:
        raise ExportError("from must be before to (the range is [from, to))")
    return flt


def check_scope(conn: psycopg.Connection, flt: ExportFilter) -> None:
    """Raises ExportError when the tenant does not exist or the widget is not the tenant's."""
    if conn.execute("SELECT 1 FROM tenants WHERE id = %s", (flt.tenant_id,)).fetchone() is None:
        raise ExportError(f"no tenant {flt.tenant_id}")
    if (
        flt.widget_id is not None
        and conn.execute(
            "SELECT 1 FROM widget_configs WHERE id = %s AND tenant_id = %s", (flt.widget_id, flt.tenant_id)
        ).fetchone()
        is None
    ):
        raise ExportError(f"no widget {flt.widget_id}")


# --- SQL -------------------------------------------------------------------------------------------------
def _where(flt: ExportFilter, alias: str = "e") -> tuple[sql.Composable, dict[str, Any]]:
    """The events filter over visitor_events aliased `alias`, and its parameters."""
    parts = [sql.SQL("{}.tenant_id = %(tenant)s").format(sql.Identifier(alias))]
    params: dict[str, Any] = {"tenant": flt.tenant_id}
    if flt.widget_id is not None:
        parts.append(sql.SQL("{}.widget_id = %(widget)s").format(sql.Identifier(alias)))
        params["widget"] = flt.widget_id
    if flt.from_at is not None:
        parts.append(sql.SQL("{}.occurred_at >= %(from)s").format(sql.Identifier(alias)))
        params["from"] = flt.from_at
    if flt.to_at is not None:
        parts.append(sql.SQL("{}.occurred_at < %(to)s").format(sql.Identifier(alias)))
        params["to"] = flt.to_at
    return sql.SQL(" AND ").join(parts), params


def _select(
    columns: tuple[Column, ...],
    render: Callable[[Column], sql.Composable],
    source: str,
    where: sql.Composable,
    order: str,
) -> sql.Composed:
    return sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY {}").format(
        sql.SQL(", ").join(render(c) for c in columns), sql.SQL(source), where, sql.SQL(order)
    )


_EVENTS_SOURCE = "visitor_events e"
_EVENTS_ORDER = "e.occurred_at, e.event_id, e.widget_id"
_CONTACTS_SOURCE = "customers e"
_CONTACTS_ORDER = "e.id"


def _contacts_where(flt: ExportFilter) -> tuple[sql.Composable, dict[str, Any]]:
    events_where, params = _where(flt, "ev")
    # Contacts in scope: the tenant's contacts that at least one exported event links to.
    where = sql.SQL(
        "e.tenant_id = %(tenant)s AND EXISTS (SELECT 1 FROM visitor_events ev WHERE ev.customer_id = e.id AND {})"
    ).format(events_where)
    return where, params


def _text(c: Column) -> sql.Composable:
    # CSV: COPY renders each value (DateStyle ISO, UTC set for the transaction); jsonb as its JSON text.
    return sql.SQL("e.{} AS {}").format(sql.Identifier(c.sql), sql.Identifier(c.name))


def _json_object(columns: tuple[Column, ...]) -> sql.Composable:
    # NDJSON: Postgres builds each line's object (jsonb nested as it is, timestamps ISO 8601 with 'T').
    pairs = sql.SQL(", ").join(sql.SQL("{}, e.{}").format(sql.Literal(c.name), sql.Identifier(c.sql)) for c in columns)
    return sql.SQL("json_build_object({})::text").format(pairs)


def _arrow_col(c: Column) -> sql.Composable:
    # Parquet: timestamps as epoch microseconds (cheap to turn into an Arrow timestamp column), the rest as text.
    if c.type == "timestamp":
        return sql.SQL("(extract(epoch FROM e.{0}) * 1000000)::int8").format(sql.Identifier(c.sql))
    if c.type in ("uuid", "json"):
        return sql.SQL("e.{0}::text").format(sql.Identifier(c.sql))
    return sql.SQL("e.{0}").format(sql.Identifier(c.sql))


# --- writing ---------------------------------------------------------------------------------------------
class _HashingWriter(io.RawIOBase):
    """Passes bytes to the zip entry and keeps their SHA-256 and count (the file's, before compression)."""

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.size += len(view)
        self._inner.write(view)
        return len(view)

    def tell(self) -> int:
        return self.size


@dataclass
class _FileOut:
    name: str
    rows: int = 0
    bytes: int = 0
    sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _count(conn: psycopg.Connection, source: str, where: sql.Composable, params: dict[str, Any]) -> int:
    query = sql.SQL("SELECT count(*) FROM {} WHERE {}").format(sql.SQL(source), where)
    return int(conn.execute(query, params).fetchone()[0])  # type: ignore[index]


def _progress_of(on_progress: Progress, name: str, total: int) -> Callable[[int], None]:
    """One file's row count as it is written, reported as (file, rows so far, rows in the file)."""
    return lambda n: on_progress(name, min(n, total), total)


def _stream_rows(
    conn: psycopg.Connection, query: sql.Composed, params: dict[str, Any], size: int
) -> Iterator[list[tuple[Any, ...]]]:
    """Fetches (lists of rows) from a server-side (named) cursor: Postgres keeps the result, we hold `size` rows."""
    with conn.cursor(name=f"export_{uuid.uuid4().hex[:8]}") as cur:
        cur.itersize = size
        cur.execute(query, params)
        while rows := cur.fetchmany(size):
            yield rows


def _write_ndjson(
    conn: psycopg.Connection,
    out: _HashingWriter,
    columns: tuple[Column, ...],
    source: str,
    where: sql.Composable,
    order: str,
    params: dict[str, Any],
    tick: Callable[[int], None],
) -> int:
    rows = 0
    query = sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY {}").format(
        _json_object(columns), sql.SQL(source), where, sql.SQL(order)
    )
    for fetched in _stream_rows(conn, query, params, FETCH_ROWS):
        out.write("".join(f"{r[0]}\n" for r in fetched).encode())
        rows += len(fetched)
        tick(rows)
    return rows


def _write_csv(
    conn: psycopg.Connection,
    out: _HashingWriter,
    columns: tuple[Column, ...],
    source: str,
    where: sql.Composable,
    order: str,
    params: dict[str, Any],
    tick: Callable[[int], None],
) -> int:
    query = _select(columns, _text, source, where, order)
    copy_sql = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER true, FORCE_QUOTE *, ENCODING 'UTF8')").format(
        query
    )
    seen = 0
    with conn.cursor() as cur:
        with cur.copy(copy_sql, params) as copy:
            for block in copy:
                out.write(block)
                # Progress only (a quoted value may hold a newline): the exact count is COPY's own, below.
                seen += bytes(block).count(b"\n")
                tick(max(0, seen - 1))
        return cur.rowcount


def _arrow_schema(columns: tuple[Column, ...]) -> Any:
    import pyarrow as pa

    types = {"uuid": pa.string(), "string": pa.string(), "json": pa.string(), "timestamp": pa.timestamp("us", tz="UTC")}
    meta = {c.name: c.type for c in columns}
    return pa.schema(
        [pa.field(c.name, types[c.type], nullable=c.nullable, metadata={"logical_type": meta[c.name]}) for c in columns]
    )


def _write_parquet(
    conn: psycopg.Connection,
    out: _HashingWriter,
    columns: tuple[Column, ...],
    source: str,
    where: sql.Composable,
    order: str,
    params: dict[str, Any],
    tick: Callable[[int], None],
) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _arrow_schema(columns)
    # The system allocator hands freed row groups back to the OS; Arrow's default (mimalloc) keeps them cached,
    # which showed as more peak RSS in bench/bench_export.py.
    pool = pa.system_memory_pool()
    ts_type = pa.timestamp("us", tz="UTC")
    query = _select(columns, _arrow_col, source, where, order)
    rows = 0
    pending: list[Any] = []  # Arrow record batches (pyarrow's term) of the row group being filled
    pending_rows = 0
    # Dictionary encoding only where values repeat: for ids unique per row (event_id, session_id) it only costs
    # memory (a hash table per column chunk) before Parquet falls back to plain encoding anyway.
    dictionary = [c.name for c in columns if c.name in _DICTIONARY_COLUMNS]
    with pq.ParquetWriter(out, schema, compression="zstd", memory_pool=pool, use_dictionary=dictionary) as writer:
        for fetched in _stream_rows(conn, query, params, FETCH_ROWS):
            arrays = [
                pa.array(values, type=pa.int64(), memory_pool=pool).cast(ts_type, memory_pool=pool)
                if f.type == ts_type
                else pa.array(values, type=f.type, memory_pool=pool)
                for f, values in zip(schema, zip(*fetched, strict=True), strict=True)
            ]
            pending.append(pa.RecordBatch.from_arrays(arrays, schema=schema))
            pending_rows += len(fetched)
            rows += len(fetched)
            if pending_rows >= PARQUET_ROW_GROUP_ROWS:
                writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=pending_rows)
                pending, pending_rows = [], 0
            tick(rows)
        if pending:
            writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=pending_rows)
    return rows


_DICTIONARY_COLUMNS = frozenset(
    {"widget_id", "tenant_id", "event_type", "name", "url", "referrer", "customer_id", "user_id", "visitor_id"}
)
_WRITERS = {"ndjson": _write_ndjson, "csv": _write_csv, "parquet": _write_parquet}


def _schema_doc(columns: tuple[Column, ...], fmt: Format) -> list[dict[str, Any]]:
    physical = {
        "parquet": {
            "uuid": "string",
            "string": "string",
            "json": "string (JSON text)",
            "timestamp": "timestamp[us, tz=UTC]",
        },
        "csv": {
            "uuid": "text",
            "string": "text",
            "json": "text (JSON)",
            "timestamp": "text (ISO 8601, YYYY-MM-DD HH:MM:SS[.ffffff]+00)",
        },
        "ndjson": {
            "uuid": "string",
            "string": "string",
            "json": "object",
            "timestamp": "string (ISO 8601, YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00)",
        },
    }[fmt]
    return [{"name": c.name, "type": c.type, "format_type": physical[c.type], "nullable": c.nullable} for c in columns]


def write_bundle(
    dsn: str,
    flt: ExportFilter,
    fmt: Format,
    out: Path,
    *,
    export_id: uuid.UUID | None = None,
    on_progress: Progress = lambda name, done, total: None,
) -> BundleResult:
    """Writes the archive to `out` (overwritten) from one REPEATABLE READ snapshot and returns its manifest.
    `on_progress(file name, rows written, rows total)` is called after every fetch. Raises ExportError for a
    bad format/scope (before anything is written) and psycopg/OSError on failure (`out` is then incomplete;
    the caller removes it)."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    started = time.perf_counter()
    created_at = datetime.now(UTC)
    with psycopg.connect(dsn, application_name="site-activity-export") as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            conn.execute("SET LOCAL timezone = 'UTC'")
            conn.execute("SET LOCAL DateStyle = 'ISO, YMD'")
            check_scope(conn, flt)
            snapshot_at = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
            erased = conn.execute("SELECT count(*) FROM erased_subjects WHERE tenant_id = %s", (flt.tenant_id,))
            erasures = int(erased.fetchone()[0])  # type: ignore[index]
            ev_where, params = _where(flt)
            ct_where, _ = _contacts_where(flt)
            plan = [
                (f"events.{fmt}", EVENT_COLUMNS, _EVENTS_SOURCE, ev_where, _EVENTS_ORDER),
                (f"contacts.{fmt}", CONTACT_COLUMNS, _CONTACTS_SOURCE, ct_where, _CONTACTS_ORDER),
            ]
            files: list[_FileOut] = []
            with zipfile.ZipFile(out, "w", allowZip64=True) as zf:
                for name, columns, source, where, order in plan:
                    total = _count(conn, source, where, params)  # same snapshot: exactly the rows written below
                    on_progress(name, 0, total)
                    entry = _zip_entry(name, fmt, created_at)
                    with zf.open(entry, "w", force_zip64=True) as raw:
                        hashing = _HashingWriter(raw)
                        rows = _WRITERS[fmt](
                            conn, hashing, columns, source, where, order, params, _progress_of(on_progress, name, total)
                        )
                    if rows != total:  # impossible within one snapshot; refuse to hand out a wrong manifest
                        raise RuntimeError(f"{name}: wrote {rows} rows, the snapshot counted {total}")
                    on_progress(name, rows, total)
                    files.append(
                        _FileOut(
                            name, rows, hashing.size, hashing.sha.hexdigest(), {"columns": _schema_doc(columns, fmt)}
                        )
                    )
                manifest = _manifest(export_id, flt, fmt, created_at, snapshot_at, files)
                zf.writestr(
                    _zip_entry("manifest.json", "ndjson", created_at),
                    orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n",
                )
    result = BundleResult(manifest, erasures, seconds=time.perf_counter() - started)
    result.bytes, result.sha256 = out.stat().st_size, file_sha256(out)
    return result


def _zip_entry(name: str, fmt: Format, at: datetime) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=at.timetuple()[:6])
    info.compress_type = zipfile.ZIP_STORED if fmt == "parquet" else zipfile.ZIP_DEFLATED
    info._compresslevel = DEFLATE_LEVEL  # type: ignore[attr-defined]  # ZipFile.open has no level argument
    info.external_attr = 0o644 << 16
    return info


def _manifest(
    export_id: uuid.UUID | None,
    flt: ExportFilter,
    fmt: Format,
    created_at: datetime,
    snapshot_at: datetime,
    files: list[_FileOut],
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "export_id": str(export_id) if export_id else None,
        "created_at": created_at.isoformat(),
        "snapshot_at": snapshot_at.isoformat(),
        "tenant_id": str(flt.tenant_id),
        "format": fmt,
        "filters": flt.public(),
        "contacts_scope": "contacts linked (customer_id) to at least one exported event",
        "row_counts": {f.name.split(".")[0]: f.rows for f in files},
        "files": [{"name": f.name, "rows": f.rows, "bytes": f.bytes, "sha256": f.sha256, **f.extra} for f in files],
        **({"csv_dialect": CSV_DIALECT} if fmt == "csv" else {}),
    }


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()
