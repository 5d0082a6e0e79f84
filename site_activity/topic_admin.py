"""`site-activity topics`: makes the cluster's topics match the settings, idempotently, and says what differs.

Desired state (from Settings): every topic of topics.Topics.specs plus the processors' table changelog
(faust's `<processors_app_id>-visitor-state-changelog`, compacted; faust would create it itself where
topic creation is allowed), each with
  * its partition count (topic_partitions; the dead-letter topic has 1),
  * replication factor topic_replication_factor, and min.insync.replicas topic_min_insync_replicas when
    replicated (RF 3 + min ISR 2 + producers' acks=all: one broker may fail without losing acknowledged
    writes),
  * cleanup.policy compact (identity links, erasures, changelog) or delete with retention.ms
    (raw and enriched events: topic_events_retention_ms; dead letters: topic_dead_letter_retention_ms).

apply(): creates missing topics; sets differing managed configs on existing topics with
incremental_alter_configs (only the keys above; other configs are left alone); never changes a partition
count or a replication factor (more partitions remap keys, so per-visitor order and the processors' co-
partitioned state break; fewer is impossible; RF needs a reassignment): those differences are reported and
make the command exit 1."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic, ResourceType

from site_activity.kafka import admin
from site_activity.settings import Settings
from site_activity.topics import Topics, TopicSpec

log = logging.getLogger(__name__)

CHANGELOG_TABLE = "visitor-state"  # stream_processors.app.STATE_TABLE (the kernel does not import stages)


@dataclass(frozen=True)
class DesiredTopic:
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str]


@dataclass
class TopicReport:
    name: str
    action: str  # "created" | "altered" | "exists" (nothing to change) | "would create" | "would alter"
    changed: dict[str, tuple[str | None, str]] = field(default_factory=dict)  # key -> (before, after)
    problems: list[str] = field(default_factory=list)  # differences apply() does not fix


def desired_topics(settings: Settings) -> list[DesiredTopic]:
    rf = settings.topic_replication_factor
    isr = {"min.insync.replicas": str(settings.topic_min_insync_replicas)} if rf > 1 else {}
    changelog = TopicSpec(
        f"{settings.processors_app_id}-{CHANGELOG_TABLE}-changelog",
        settings.topic_partitions,
        {"cleanup.policy": "compact"},
    )
    specs = [*Topics.from_settings(settings).specs(settings), changelog]
    return [DesiredTopic(s.name, s.partitions, rf, {**s.config, **isr}) for s in specs]


def apply_topics(
    settings: Settings, dry_run: bool = False, timeout: float = 30.0, client: AdminClient | None = None
) -> list[TopicReport]:
    """Makes the cluster match desired_topics(settings) as far as it safely can (module docstring); returns
    one report per topic. dry_run: changes nothing, reports what would change. Raises KafkaException when
    the cluster cannot be reached or refuses a change."""
    client = client or admin(settings)
    meta = client.list_topics(timeout=timeout).topics
    wanted = desired_topics(settings)
    reports: list[TopicReport] = []
    missing = [t for t in wanted if t.name not in meta]
    existing = [t for t in wanted if t.name in meta]
    current = _configs(client, [t.name for t in existing], timeout)
    for t in missing:
        reports.append(
            TopicReport(t.name, "would create" if dry_run else "created", {k: (None, v) for k, v in t.config.items()})
        )
    if missing and not dry_run:
        futures = client.create_topics(
            [
                NewTopic(t.name, num_partitions=t.partitions, replication_factor=t.replication_factor, config=t.config)
                for t in missing
            ],
            operation_timeout=timeout,
        )
        for future in futures.values():
            try:
                future.result()
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":  # a concurrent creator won the race
                    raise
    alters: list[ConfigResource] = []
    for t in existing:
        report = TopicReport(t.name, "exists")
        parts = meta[t.name].partitions
        if len(parts) != t.partitions:
            report.problems.append(
                f"has {len(parts)} partitions, settings say {t.partitions}: not changed "
                "(changing it remaps keys; create a new topic and migrate instead)"
            )
        rf = min((len(p.replicas) for p in parts.values()), default=0)
        if rf != t.replication_factor:
            report.problems.append(
                f"replication factor {rf}, settings say {t.replication_factor}: not changed "
                "(use kafka-reassign-partitions)"
            )
        have = current.get(t.name, {})
        report.changed = {k: (have.get(k), v) for k, v in t.config.items() if have.get(k) != v}
        if report.changed:
            report.action = "would alter" if dry_run else "altered"
            alters.append(
                ConfigResource(
                    ResourceType.TOPIC,
                    t.name,
                    incremental_configs=[
                        ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
                        for k, v in t.config.items()
                        if k in report.changed
                    ],
                )
            )
        reports.append(report)
    if alters and not dry_run:
        for future in client.incremental_alter_configs(alters, request_timeout=timeout).values():
            future.result()
    log.info(
        "topics applied",
        extra={
            "dry_run": dry_run,
            "topics": {r.name: r.action for r in reports},
            "problems": sum(len(r.problems) for r in reports),
        },
    )
    return reports


def _configs(client: AdminClient, names: list[str], timeout: float) -> dict[str, dict[str, str]]:
    if not names:
        return {}
    futures = client.describe_configs([ConfigResource(ResourceType.TOPIC, n) for n in names], request_timeout=timeout)
    return {res.name: {k: e.value for k, e in future.result().items()} for res, future in futures.items()}


def print_reports(reports: list[TopicReport]) -> int:
    """Human-readable report; returns 1 when a difference was left unfixed (partitions, RF), else 0."""
    for r in reports:
        changes = ", ".join(
            f"{k}: {before if before is not None else '-'} -> {after}"
            for k, (before, after) in sorted(r.changed.items())
        )
        print(f"{r.name:55} {r.action:12} {changes}")
        for problem in r.problems:
            print(f"{'':55} DIFFERS      {problem}")
    return 1 if any(r.problems for r in reports) else 0
