"""The operator's commands: widgets admin (with audit log), migrate, topics — run as a user would run them."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import psycopg
import pytest

from site_activity.settings import Settings


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "command_line", *args],
        env={**settings.to_env(), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_widget_lifecycle_is_audited(settings: Settings, db: psycopg.Connection) -> None:
    created = cli(settings, "widgets", "create", "--name", "Marketing site", "--actor", "ops@hydra")
    assert created.returncode == 0, created.stderr
    widget_id = uuid.UUID(created.stdout.strip())

    shown = json.loads(cli(settings, "widgets", "show", str(widget_id)).stdout)
    assert shown["tracking_enabled"] is False and shown["event_retention_days"] == 90

    assert cli(settings, "widgets", "enable", str(widget_id), "--actor", "ops@hydra").returncode == 0
    assert cli(settings, "widgets", "set-retention", str(widget_id), "365", "--actor", "ops@hydra").returncode == 0
    assert cli(settings, "widgets", "set-retention", str(widget_id), "1", "--actor", "ops@hydra").returncode == 0
    assert cli(settings, "widgets", "disable", str(widget_id), "--actor", "alice").returncode == 0
    listed = json.loads(cli(settings, "widgets", "list", "--json").stdout)
    mine = next(w for w in listed if w["id"] == str(widget_id))
    assert mine["tracking_enabled"] is False and mine["event_retention_days"] == 1

    audit = db.execute(
        "SELECT actor, action, old_value, new_value FROM audit_log WHERE entity_id = %s ORDER BY id", (str(widget_id),)
    ).fetchall()
    assert [(a, act) for a, act, _, _ in audit] == [
        ("ops@hydra", "create"),
        ("ops@hydra", "enable"),
        ("ops@hydra", "set-retention"),
        ("ops@hydra", "set-retention"),
        ("alice", "disable"),
    ]
    assert audit[1][2:] == ({"tracking_enabled": False}, {"tracking_enabled": True})
    assert audit[2][2:] == ({"event_retention_days": 90}, {"event_retention_days": 365})

    deleted = cli(settings, "widgets", "delete", str(widget_id), "--actor", "ops@hydra")
    assert deleted.returncode == 0 and "deleted widget" in deleted.stdout
    assert db.execute("SELECT count(*) FROM widget_configs WHERE id = %s", (widget_id,)).fetchone() == (0,)
    assert db.execute(
        "SELECT action, old_value->>'name' FROM audit_log WHERE entity_id = %s ORDER BY id DESC LIMIT 1",
        (str(widget_id),),
    ).fetchone() == ("delete", "Marketing site")


@pytest.mark.parametrize("days", ["0", "366", "-5"])
def test_retention_out_of_range_is_a_clear_error(settings: Settings, days: str) -> None:
    widget_id = cli(settings, "widgets", "create", "--name", "w", "--actor", "ops").stdout.strip()
    result = cli(settings, "widgets", "set-retention", widget_id, days, "--actor", "ops")
    assert result.returncode == 2
    assert "retention must be between 1 and 365 days" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_widget_ids_and_missing_actor(settings: Settings) -> None:
    missing = cli(settings, "widgets", "enable", str(uuid.uuid4()), "--actor", "ops")
    assert missing.returncode == 2 and "no widget with id" in missing.stderr
    not_uuid = cli(settings, "widgets", "show", "not-a-uuid")
    assert not_uuid.returncode == 2 and "not a UUID" in not_uuid.stderr
    no_actor = cli(settings, "widgets", "create", "--name", "x")
    assert no_actor.returncode == 2 and "--actor" in no_actor.stderr


def test_widgets_share_a_tenant(settings: Settings, db: psycopg.Connection) -> None:
    first = cli(settings, "widgets", "create", "--name", "app", "--actor", "ops").stdout.strip()
    tenant = db.execute("SELECT tenant_id FROM widget_configs WHERE id = %s", (uuid.UUID(first),)).fetchone()[0]
    second = cli(settings, "widgets", "create", "--name", "docs", "--tenant", str(tenant), "--actor", "ops")
    assert second.returncode == 0
    listed = json.loads(cli(settings, "widgets", "list", "--tenant", str(tenant), "--json").stdout)
    assert sorted(w["name"] for w in listed) == ["app", "docs"]


def test_postgres_unreachable_is_a_clear_error(settings: Settings) -> None:
    down = settings.model_copy(update={"postgres_dsn": "postgresql://postgres@127.0.0.1:1/site_activity"})
    result = cli(down, "widgets", "list")
    assert result.returncode == 2 and "cannot reach Postgres" in result.stderr


def test_migrate_and_topics_are_idempotent(settings: Settings) -> None:
    first = cli(settings, "migrate")
    assert first.returncode == 0 and "none pending" in first.stdout
    topics = cli(settings, "topics")
    assert topics.returncode == 0, topics.stderr
    assert f"{settings.topic_prefix}.events.raw" in topics.stdout and "exists" in topics.stdout


def test_events_recent_prints_the_newest_rows(settings: Settings, db: psycopg.Connection, make_widget) -> None:
    w = make_widget()
    for i, (kind, name) in enumerate([("pageview", None), ("custom", "clicked_upgrade")]):
        db.execute(
            "INSERT INTO visitor_events (widget_id, event_id, tenant_id, visitor_id, event_type, name, url,"
            " occurred_at, received_at) VALUES (%s, %s, %s, 'visitor-1', %s, %s, %s, now(), now() + %s * interval '1 ms')",
            (w.id, uuid.uuid4(), w.tenant_id, kind, name, f"https://shop.example/{i}", i),
        )
    out = cli(settings, "events", "recent", "--widget", str(w.id)).stdout.splitlines()
    assert len(out) == 2
    assert "pageview" in out[0] and "https://shop.example/0" in out[0]
    assert "clicked_upgrade" in out[1]
