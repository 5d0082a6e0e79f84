"""Export jobs survive a crash: a `site-activity console` killed (SIGKILL) while its worker is in the middle of
an export leaves the job running under a lease nobody renews; the restarted console claims it again once the
lease lapses and finishes it, and the download is complete. Its own module, so that no other console process
(test_export.py's) competes for the job."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import httpx
import psycopg

from dev_stack.embedded import EmbeddedBroker, EmbeddedPostgres, wait_until
from tests.conftest import Service, http_ok, make_settings
from tests.console_helpers import make_tenant
from tests.test_export import seed_tenant


def start_console(settings, log_dir: Path) -> Service:
    svc = Service("console", settings, log_dir)
    svc.ready = http_ok(settings.health_url("console"))
    return svc.start()


def test_job_of_a_killed_console_is_finished_after_restart(
    kafka: EmbeddedBroker, postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    settings = make_settings(kafka, postgres, tmp_path / "data", export_poll_s=0.2, export_lease_s=2.0)
    tenant = make_tenant(postgres.dsn, "Crash")
    seed_tenant(postgres.dsn, tenant.id, tenant.widget.id, n=200)
    base = f"http://127.0.0.1:{settings.console_port}"
    victim = start_console(settings, tmp_path / "victim")
    with (
        psycopg.connect(postgres.dsn) as blocker,
        psycopg.connect(postgres.dsn, autocommit=True) as db,
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        # Hold the contacts table so the export stops half-way (events written, contacts waiting) — then kill.
        blocker.execute("LOCK TABLE customers IN ACCESS EXCLUSIVE MODE")
        resp = client.post("/api/v1/exports", json={"format": "parquet"}, headers=tenant.auth("admin"))
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        wait_until(
            lambda: (
                db.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = 'site-activity-export'"
                    " AND wait_event_type = 'Lock'"
                ).fetchone()
                is not None
            ),
            30,
            "the export to wait for the contacts",
        )
        partial = list((settings.exports_path / str(tenant.id)).glob(f"{job_id}-1.zip.partial"))
        assert len(partial) == 1 and partial[0].stat().st_size > 0  # the events file is (being) written
        owner = db.execute("SELECT lease_owner FROM exports WHERE id = %s AND status = 'running'", (job_id,)).fetchone()
        assert owner is not None and owner[0]
        victim.kill()
        blocker.rollback()

        # Nobody renews the lease now; the job must not be lost or stuck.
        status = db.execute("SELECT status, attempts FROM exports WHERE id = %s", (job_id,)).fetchone()
        assert status == ("running", 1)
        restarted = start_console(settings, tmp_path / "restarted")
        try:
            wait_until(
                lambda: (
                    db.execute("SELECT status FROM exports WHERE id = %s", (job_id,)).fetchone()[0]
                    in ("done", "failed")
                ),
                60,
                "the job to finish after the restart",
            )
            job = client.get(f"/api/v1/exports/{job_id}", headers=tenant.auth("admin")).json()
            assert job["status"] == "done" and job["attempts"] == 2, job
            new_owner = db.execute(
                "SELECT count(*) FROM audit_log WHERE entity_id = %s AND action = 'export.completed'", (job_id,)
            ).fetchone()[0]
            assert new_owner == 1
            resp = client.get(f"/api/v1/exports/{job_id}/download", headers=tenant.auth("admin"))
            assert resp.status_code == 200
            assert hashlib.sha256(resp.content).hexdigest() == job["sha256"]
            manifest = json.loads(zipfile.ZipFile(io.BytesIO(resp.content)).read("manifest.json"))
            assert manifest["row_counts"] == {"events": 300, "contacts": 3} == job["row_counts"]
            # Only the finished attempt's archive is left: the dead attempt's partial file was removed.
            files = sorted(p.name for p in (settings.exports_path / str(tenant.id)).iterdir())
            assert files == [f"{job_id}-2.zip"]
        finally:
            restarted.stop()


def test_an_erase_during_a_running_export_makes_it_start_over(
    kafka: EmbeddedBroker, postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    """The export's snapshot is taken, then a visitor is erased before it finishes: the job must not publish
    that snapshot (it may hold the erased visitor); it runs again from a snapshot after the erase."""
    from site_activity import erasure

    settings = make_settings(kafka, postgres, tmp_path / "data", export_poll_s=0.2, export_lease_s=2.0)
    tenant = make_tenant(postgres.dsn, "EraseDuring")
    seed_tenant(postgres.dsn, tenant.id, tenant.widget.id, n=40)
    console = start_console(settings, tmp_path / "console")
    try:
        with (
            psycopg.connect(postgres.dsn) as blocker,
            psycopg.connect(postgres.dsn, autocommit=True) as db,
            httpx.Client(base_url=f"http://127.0.0.1:{settings.console_port}", timeout=30) as client,
        ):
            before = db.execute(
                "SELECT count(*) FROM visitor_events WHERE tenant_id = %s AND widget_id = %s"
                " AND visitor_id = 'visitor-3'",
                (tenant.id, tenant.widget.id),
            ).fetchone()[0]
            assert before > 0
            blocker.execute("LOCK TABLE customers IN ACCESS EXCLUSIVE MODE")
            resp = client.post("/api/v1/exports", json={"format": "ndjson"}, headers=tenant.auth("admin"))
            job_id = resp.json()["id"]
            wait_until(
                lambda: (
                    db.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'site-activity-export'"
                        " AND wait_event_type = 'Lock'"
                    ).fetchone()
                    is not None
                ),
                30,
                "the export to wait for the contacts",
            )
            erasure.erase_visitor(db, tenant.id, tenant.widget.id, "visitor-3", actor="tests", notify=lambda keys: None)
            blocker.rollback()
            wait_until(
                lambda: (
                    db.execute("SELECT status FROM exports WHERE id = %s", (job_id,)).fetchone()[0]
                    in ("done", "failed")
                ),
                60,
                "the job to finish",
            )
            job = client.get(f"/api/v1/exports/{job_id}", headers=tenant.auth("admin")).json()
            assert job["status"] == "done" and job["attempts"] == 2, job
            resp = client.get(f"/api/v1/exports/{job_id}/download", headers=tenant.auth("admin"))
            assert resp.status_code == 200
            lines = zipfile.ZipFile(io.BytesIO(resp.content)).read("events.ndjson").decode().splitlines()
            events = [json.loads(line) for line in lines]
            assert len(events) == 60 - before
            assert not [e for e in events if e["visitor_id"] == "visitor-3" and e["widget_id"] == str(tenant.widget.id)]
    finally:
        console.stop()
