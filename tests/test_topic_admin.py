"""`site-activity topics` on the suite's real broker: creates what is missing, aligns the managed configs of
existing topics (compaction, retention, min.insync.replicas), is idempotent, and reports — never changes —
partition counts and replication factors that differ."""

from __future__ import annotations

import os
import subprocess
import sys

from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic, ResourceType

from dev_stack.embedded import wait_until
from site_activity.kafka import admin
from site_activity.settings import Settings
from site_activity.topic_admin import apply_topics, desired_topics
from site_activity.topics import Topics
from tests.conftest import ROOT


def configs(settings: Settings, name: str) -> dict[str, str]:
    res = ConfigResource(ResourceType.TOPIC, name)
    client = admin(settings)  # kept alive until the future is done
    return {k: e.value for k, e in client.describe_configs([res])[res].result().items()}


def partitions(settings: Settings, name: str) -> int:
    client = admin(settings)
    return len(client.list_topics(name, timeout=10).topics[name].partitions)


def test_desired_state_for_a_real_cluster() -> None:
    s = Settings(
        topic_prefix="p",
        processors_app_id="proc",
        topic_replication_factor=3,
        topic_min_insync_replicas=2,
        topic_partitions=12,
    )
    by_name = {t.name: t for t in desired_topics(s)}
    t = Topics.from_settings(s)
    assert by_name[t.raw_events].config == {
        "cleanup.policy": "delete",
        "retention.ms": str(7 * 86400_000),
        "min.insync.replicas": "2",
    }
    assert (
        by_name[t.dead_letter].config["retention.ms"] == str(30 * 86400_000) and by_name[t.dead_letter].partitions == 1
    )
    for compacted in (t.identity_links, t.erasures, "proc-visitor-state-changelog"):
        assert by_name[compacted].config["cleanup.policy"] == "compact"
    assert {x.replication_factor for x in by_name.values()} == {3}
    assert by_name["proc-visitor-state-changelog"].partitions == 12
    # one replica: min.insync.replicas is not set (nothing to say)
    assert all("min.insync.replicas" not in x.config for x in desired_topics(Settings()))


def test_apply_aligns_drifted_configs_reports_partitions_and_is_idempotent(settings: Settings) -> None:
    t = Topics.from_settings(settings)
    client = admin(settings)
    # drift: retention on the raw topic, compaction off on the links; a changelog with the wrong partition count
    changelog = f"{settings.processors_app_id}-visitor-state-changelog"

    def setting(topic: str, key: str, value: str) -> ConfigResource:
        return ConfigResource(
            ResourceType.TOPIC,
            topic,
            incremental_configs=[ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET)],
        )

    alter = [setting(t.raw_events, "retention.ms", "1000"), setting(t.identity_links, "cleanup.policy", "delete")]
    for f in client.incremental_alter_configs(alter).values():
        f.result()
    for f in client.create_topics([NewTopic(changelog, num_partitions=1, replication_factor=1)]).values():
        f.result()
    # config changes reach the brokers' metadata asynchronously (KRaft): wait until describe shows them
    wait_until(
        lambda: (
            configs(settings, t.raw_events)["retention.ms"] == "1000"
            and configs(settings, t.identity_links)["cleanup.policy"] == "delete"
        ),
        20,
        "drift visible",
    )

    dry = {r.name: r for r in apply_topics(settings, dry_run=True)}
    assert dry[t.raw_events].action == "would alter"
    assert configs(settings, t.raw_events)["retention.ms"] == "1000"  # dry run changed nothing

    reports = {r.name: r for r in apply_topics(settings)}
    assert reports[t.raw_events].changed == {"retention.ms": ("1000", str(settings.topic_events_retention_ms))}
    assert reports[t.identity_links].changed == {"cleanup.policy": ("delete", "compact")}
    assert reports[changelog].changed == {"cleanup.policy": ("delete", "compact")}
    assert reports[changelog].problems and "1 partitions" in reports[changelog].problems[0]
    wait_until(
        lambda: (
            configs(settings, t.raw_events)["retention.ms"] == str(settings.topic_events_retention_ms)
            and configs(settings, t.identity_links)["cleanup.policy"] == "compact"
            and configs(settings, changelog)["cleanup.policy"] == "compact"
        ),
        20,
        "applied configs visible",
    )
    assert configs(settings, t.erasures)["cleanup.policy"] == "compact"
    assert configs(settings, t.dead_letter)["retention.ms"] == str(settings.topic_dead_letter_retention_ms)
    assert partitions(settings, changelog) == 1  # never changed silently

    again = apply_topics(settings)
    assert all(r.action == "exists" and not r.changed for r in again)
    assert [r.name for r in again if r.problems] == [changelog]

    # the CLI: exit 1 while a difference is left, with the reason on the topic's line
    env = {**os.environ, **settings.to_env()}
    out = subprocess.run(
        [sys.executable, "-m", "command_line", "topics"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1, out.stderr
    assert "DIFFERS" in out.stdout and "not changed" in out.stdout and f"{t.raw_events}" in out.stdout
