"""One metrics convention for every stage (issue 10), checked on the registries themselves:

- each stage process has its own `CollectorRegistry` (nothing on prometheus_client's global default registry, so
  two stages in one process, as in tests, never share or clash);
- names are `site_activity_<stage>_…` (or the `kafka_consumergroup_…` names lag exporters use);
- a counter is exposed as `…_total`; a gauge or histogram ends in its unit or in what it counts;
- every metric has help text.

A stage may add prometheus_client's process/platform/GC collectors to its registry (operators keep RSS and CPU):
their `process_…`/`python_…` names are Prometheus' own convention, not ours, and are left out of the name check.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import Metric
from psycopg_pool import ConnectionPool

from console.metrics import ConsoleMetrics
from producer_api.metrics import ApiMetrics
from sink.metrics import SinkMetrics
from stream_processors import metrics as processors_metrics
from webhooks.metrics import WebhookMetrics

UNITS = (
    "seconds",
    "bytes",
    "messages",
    "events",
    "rows",
    "connections",
    "requests",
    "configs",
    "deliveries",
    "ratio",
    "info",
)


def registries() -> Iterator[tuple[str, CollectorRegistry]]:
    yield "api", ApiMetrics().registry
    yield "sink", SinkMetrics().registry
    yield "processors", processors_metrics.REGISTRY  # one per process: module level
    yield "console", ConsoleMetrics(ConnectionPool("dbname=unused", open=False)).registry
    yield "webhooks", WebhookMetrics().registry


_standard = CollectorRegistry()
for _collector in (ProcessCollector, PlatformCollector, GCCollector):
    _collector(registry=_standard)
STANDARD = {family.name for family in _standard.collect()}


def families() -> Iterator[tuple[str, Metric]]:
    for stage, registry in registries():
        for family in registry.collect():
            if family.name not in STANDARD:
                yield stage, family


@pytest.mark.parametrize(("stage", "family"), list(families()), ids=lambda v: v if isinstance(v, str) else v.name)
def test_names_units_and_help(stage: str, family: Metric) -> None:
    assert family.name.startswith(f"site_activity_{stage}_"), family.name
    assert family.documentation.strip(), f"{family.name} has no help text"
    if family.type == "counter":
        assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
    else:
        assert family.name.endswith(UNITS), f"{family.name}: a {family.type} ends in its unit ({', '.join(UNITS)})"


def test_every_stage_has_its_own_registry() -> None:
    regs = [registry for _, registry in registries()]
    assert len({id(r) for r in regs}) == len(regs)


def test_the_processors_registry_keeps_the_process_metrics() -> None:
    """Off the default registry, the processors still expose RSS and CPU (what operators watched before)."""
    names = {family.name for family in processors_metrics.REGISTRY.collect()}
    assert {"process_resident_memory_bytes", "process_cpu_seconds", "python_info"} <= names, names
