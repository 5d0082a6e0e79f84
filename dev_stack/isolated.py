"""Settings for a run that shares a broker and Postgres with other runs: the tests (one per test, in parallel
workers and worktrees) and the benchmarks."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from dev_stack.embedded import free_port
from site_activity.settings import STAGE_HTTP_PORT, Settings


def isolated_settings(
    kafka_bootstrap: str, postgres_dsn: str, data_dir: Path, /, prefix: str = "t", **overrides: object
) -> Settings:
    """Settings() (so SITE_ACTIVITY_* still apply) on the given broker and database, with every stage's HTTP port
    and the demo's a free port on 127.0.0.1, and their own topics, consumer groups and processors app id
    (`<prefix><10 hex digits>`, `sink-…`, `proc-…`, `hooks-…`); `overrides` (any field, the three positional
    ones too) are applied last. Creates nothing:
    call site_activity.kafka.ensure_topics for the topics."""
    tag = uuid.uuid4().hex[:10]
    fields: dict[str, Any] = {
        "data_dir": data_dir,
        "kafka_bootstrap": kafka_bootstrap,
        "postgres_dsn": postgres_dsn,
        "topic_prefix": f"{prefix}{tag}",
        "sink_group": f"sink-{tag}",
        "processors_app_id": f"proc-{tag}",
        "webhooks_group": f"hooks-{tag}",
    }
    fields |= {name: free_port() for name in (*STAGE_HTTP_PORT.values(), "demo_port")}
    return Settings(**fields).model_copy(update=overrides)
