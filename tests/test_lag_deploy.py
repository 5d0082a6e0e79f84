"""deploy/prometheus/alerts.yaml and the Grafana dashboard: they parse, have the shape Prometheus / Grafana
load, and every metric they use is one the lag exporter serves (tests/test_lag.py checks the exporter serves
all of METRIC_NAMES). Where Prometheus's own `promtool` is installed (Debian: `prometheus`), it checks the
rules too and runs the alert unit tests below."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from site_activity.lag import METRIC_NAMES

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "site-activity-lag.json"
METRIC = re.compile(r"\bkafka_[a-z_]+\b")
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    assert set(doc) == {"groups"}
    out = []
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"} and group["name"]
        out += group["rules"]
    return out


def test_alert_rules_have_prometheus_rule_shape_and_use_exported_metrics() -> None:
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
        assert rule["alert"] and rule["expr"]
        assert DURATION.match(rule.get("for", "0s")), rule
        used = set(METRIC.findall(rule["expr"]))
        assert used and used <= set(METRIC_NAMES), (rule["alert"], used - set(METRIC_NAMES))
        assert rule["expr"].count("(") == rule["expr"].count(")")


def test_alerts_say_what_the_issue_asks() -> None:
    by_name = {r["alert"]: r for r in rules()}
    lag = by_name["SiteActivityConsumerLagHigh"]
    assert "kafka_consumergroup_group_max_lag_seconds" in lag["expr"] and lag["expr"].rstrip().endswith("> 60")
    for status, name in (("STOP", "SiteActivityConsumerStopped"), ("STALL", "SiteActivityConsumerStalled")):
        assert f'status="{status}"' in by_name[name]["expr"] and by_name[name]["for"] == "2m"


def rendered_annotations(alert: str, value: str) -> dict[str, str]:
    """The alert's annotations as Prometheus renders them for group "sink" and the given $value."""
    rule = next(r for r in rules() if r["alert"] == alert)
    return {
        k: v.replace("{{ $labels.group }}", "sink").replace("{{ $value | humanizeDuration }}", value).strip()
        for k, v in rule["annotations"].items()
    }


def test_promtool_checks_and_unit_tests_the_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:  # not a Python dependency; the checks above still ran
        return
    check = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # Alert unit tests: a group whose STOP status holds for 3 minutes fires after 2; lag of 90 s fires.
    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "30s",
        "tests": [
            {
                "interval": "30s",
                "input_series": [
                    {"series": 'kafka_consumergroup_group_status{group="sink",status="STOP"}', "values": "0 0 1x8"},
                    {"series": 'kafka_consumergroup_group_status{group="sink",status="STALL"}', "values": "0x10"},
                    {"series": 'kafka_consumergroup_group_max_lag_seconds{group="sink"}', "values": "5 5 90x8"},
                    {"series": "kafka_consumergroup_lag_evaluation_timestamp_seconds", "values": "0+30x10"},
                ],
                "alert_rule_test": [
                    {"eval_time": "1m30s", "alertname": "SiteActivityConsumerStopped", "exp_alerts": []},
                    {
                        "eval_time": "3m30s",
                        "alertname": "SiteActivityConsumerStopped",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical", "group": "sink"},
                                "exp_annotations": rendered_annotations("SiteActivityConsumerStopped", ""),
                            }
                        ],
                    },
                    {"eval_time": "3m30s", "alertname": "SiteActivityConsumerStalled", "exp_alerts": []},
                    {
                        "eval_time": "2m30s",
                        "alertname": "SiteActivityConsumerLagHigh",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "group": "sink"},
                                "exp_annotations": rendered_annotations("SiteActivityConsumerLagHigh", "1m 30s"),
                            }
                        ],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "alerts_test.yaml"
    path.write_text(yaml.safe_dump(tests))
    run = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_grafana_dashboard_parses_and_queries_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["panels"]
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    assert len(exprs) >= 7
    for expr in exprs:
        used = set(METRIC.findall(expr))
        assert used and used <= set(METRIC_NAMES), (expr, used - set(METRIC_NAMES))
    assert {
        "kafka_consumergroup_group_max_lag_seconds",
        "kafka_consumergroup_group_lag",
        "kafka_consumergroup_group_status",
    } <= {m for e in exprs for m in METRIC.findall(e)}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
