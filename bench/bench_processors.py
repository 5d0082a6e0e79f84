"""Stream-processor throughput, next to its limit and its naive baseline, in one run on the embedded broker
(SITE_ACTIVITY_EMBEDDED_BROKER=kafka|tansu; default Apache Kafka where Java 17+ is found).

    .venv/bin/python bench/bench_processors.py [--events 200000] [--naive-events 20000]

Every scenario gets a fresh broker (Tansu's memory storage only grows) and the same pre-encoded raw messages,
as the API publishes them: one `VisitorEventBatch` per widget request (1..25 time-ordered events of one
visitor, keyed widget:visitor), requests of many visitors interleaved. All rates are in events/s:

  passthrough    bare confluent-kafka consume -> produce of the same messages (the limit)
  naive          a faust agent reading the same messages, then per event one table write and one send
  x1             `site-activity processors`, one worker process
  x2             two worker processes in one consumer group
  x1mem          x1 with the in-memory table store instead of RocksDB (not run by default)

Rates are measured from the first processed event to the last, so start-up and group joins are excluded.
`--only x1,x2` runs a subset (ratios need passthrough and naive in the same run).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import psutil
from confluent_kafka import Consumer, Producer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dev_stack.embedded import EmbeddedBroker, free_port, make_broker, wait_until  # noqa: E402
from dev_stack.kafka_dist import broker_kind, machine_settings  # noqa: E402
from dev_stack.process import StageProcess  # noqa: E402
from schemas.codec import EventCodec  # noqa: E402
from site_activity.kafka import consumer_config, ensure_topics, produce_waiting, producer_config  # noqa: E402
from site_activity.settings import Settings  # noqa: E402
from site_activity.topics import Topics, event_key  # noqa: E402

PARTITIONS = 6


@dataclass(frozen=True)
class Message:
    """One raw-topic message as the API publishes it: one ingest request's events, one visitor."""

    key: bytes
    value: bytes  # EventCodec().encode_events(events)
    events: int


# --- workload -----------------------------------------------------------------------------------------


def workload(n_events: int, seed: int = 42) -> list[Message]:
    """Visitors of one widget browsing over a day: gaps of seconds to hours, each visitor's timeline cut into
    widget requests of 1..25 events (one raw message each), requests of many visitors interleaved."""
    rng = random.Random(seed)
    codec = EventCodec()
    tenant, widget = uuid.UUID(int=rng.getrandbits(128)), uuid.UUID(int=rng.getrandbits(128))
    start = datetime(2026, 11, 24, tzinfo=UTC)
    gaps = [5, 10, 20, 40, 60, 120, 300, 29 * 60 + 59, 31 * 60, 2 * 3600]
    per_visitor: list[list[Message]] = []
    made = 0
    while made < n_events:
        visitor = f"v_{rng.getrandbits(64):016x}"
        key = event_key(str(widget), visitor)
        t = start + timedelta(seconds=rng.randrange(86_400))
        events = []
        for i in range(min(rng.randint(10, 90), n_events - made)):
            kind = "identify" if i == 7 else ("custom" if rng.random() < 0.12 else "pageview")
            events.append(
                {
                    "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    "event_type": kind,
                    "tenant_id": str(tenant),
                    "widget_id": str(widget),
                    "visitor_id": visitor,
                    "name": "clicked_upgrade" if kind == "custom" else None,
                    "url": f"https://shop.example.com/p/{rng.randrange(50)}",
                    "referrer": None,
                    "properties": '{"plan": "pro", "variant": "b"}' if kind != "pageview" else "{}",
                    "user_id": f"u_{rng.randrange(10**6)}" if kind == "identify" else None,
                    "occurred_at": t,
                    "received_at": t + timedelta(seconds=1),
                    "session_id": None,
                    "customer_id": None,
                }
            )
            t += timedelta(seconds=rng.choice(gaps))
        made += len(events)
        requests, i = [], 0
        while i < len(events):
            n = rng.randint(1, 25)
            requests.append(Message(key, codec.encode_events(events[i : i + n]), len(events[i : i + n])))
            i += n
        per_visitor.append(requests)
    # interleave visitors' requests, each visitor's requests staying in time order
    order = [v for v, requests in enumerate(per_visitor) for _ in requests]
    rng.shuffle(order)
    cursors = [iter(requests) for requests in per_visitor]
    return [next(cursors[v]) for v in order]


def prefix(messages: list[Message], n_events: int) -> list[Message]:
    """The first messages holding at least n_events events (the naive baseline runs on fewer)."""
    out, total = [], 0
    for msg in messages:
        if total >= n_events:
            break
        out.append(msg)
        total += msg.events
    return out


def count_events(messages: list[Message]) -> int:
    return sum(m.events for m in messages)


# --- infrastructure -----------------------------------------------------------------------------------


@cache
def work_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="bench-processors-"))


@contextmanager
def fresh_broker(name: str) -> Iterator[tuple[EmbeddedBroker, Settings, Topics]]:
    """A new broker per scenario (SITE_ACTIVITY_EMBEDDED_BROKER; Tansu's memory storage only grows), with the
    scenario's topics created."""
    chosen = machine_settings(ROOT)
    broker = make_broker(chosen, work_dir() / f"{broker_kind(chosen)}-{name}", free_ports=True)
    broker.start()
    try:
        settings = bench_settings(broker, name)
        ensure_topics(settings)
        yield broker, settings, Topics.from_settings(settings)
    finally:
        broker.stop()


def bench_settings(kafka: EmbeddedBroker, name: str) -> Settings:
    return Settings(
        data_dir=work_dir() / name,
        kafka_bootstrap=kafka.bootstrap,
        topic_prefix=name,
        topic_partitions=PARTITIONS,
        processors_app_id=f"bench-{name}",
        processors_web_port=free_port(),
        postgres_dsn="postgresql://unused",
        consumer_session_timeout_ms=3000,
        consumer_heartbeat_interval_ms=500,
        log_level="WARNING",
    )


def preload(settings: Settings, topic: str, messages: list[Message]) -> None:
    producer = Producer(producer_config(settings, **{"linger.ms": 20}))
    for i, msg in enumerate(messages):
        produce_waiting(producer, topic, msg.value, msg.key)
        if i % 5000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0, "preload not delivered"


# --- scenarios ----------------------------------------------------------------------------------------


def passthrough(messages: list[Message]) -> float:
    """Events/s of moving the raw messages unchanged: every message consumed and produced, rate in events."""
    with fresh_broker("passthrough") as (_, s, topics):
        preload(s, topics.raw_events, messages)
        consumer = Consumer(consumer_config(s, "bench-passthrough", **{"fetch.max.bytes": 8 << 20}))
        consumer.subscribe([topics.raw_events])
        producer = Producer(producer_config(s, **{"linger.ms": 2}))
        n, first, first_cpu = 0, None, 0.0
        while n < len(messages):
            for msg in consumer.consume(2000, timeout=1.0):
                if msg.error() is None:
                    if first is None:
                        first, first_cpu = time.perf_counter(), time.process_time()
                    producer.produce(topics.enriched_events, msg.value(), msg.key())
                    n += 1
            producer.poll(0)
        producer.flush(30)
        elapsed = time.perf_counter() - (first or 0)
        CPU_RATES["passthrough"] = count_events(messages) / max(1e-9, time.process_time() - first_cpu)
        consumer.close()
        return count_events(messages) / elapsed


def naive_agent(messages: list[Message]) -> float:
    with fresh_broker("naive") as (kafka, s, topics):
        preload(s, topics.raw_events, messages)
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--naive-worker",
                kafka.bootstrap,
                topics.raw_events,
                topics.enriched_events,
                str(count_events(messages)),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
        found = re.search(r"RESULT ([\d.]+)", out.stdout + out.stderr)  # faust may route print() to its log
        if not found:
            raise RuntimeError(f"naive agent failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        return float(found.group(1))


def run_naive_worker(bootstrap: str, raw: str, enriched: str, n: int) -> None:
    """The baseline: what a faust agent looks like written the obvious way, per event. It reads the same
    request messages as the processors (one per ingest request), then for every event: one table write, one
    send of the event."""
    import faust

    codec = EventCodec()
    app = faust.App(
        f"naive-{os.getpid()}",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        topic_partitions=PARTITIONS,
        broker_session_timeout=3,
        broker_heartbeat_interval=0.5,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        autodiscover=False,
    )
    source = app.topic(raw, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    sink = app.topic(enriched, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    last_seen = app.Table("last-seen", default=int, partitions=PARTITIONS, key_type=bytes)
    seen = {"n": 0, "first": 0.0}

    @app.agent(source)
    async def naive(stream: faust.StreamT) -> None:
        async for event in stream.events():
            seen["first"] = seen["first"] or time.perf_counter()
            for record in codec.decode_events(event.value):
                last_seen[event.key] = int(record["occurred_at"].timestamp())
                await sink.send(key=event.key, value=codec.encode_event(record))
                seen["n"] += 1
            if seen["n"] >= n:
                await app.producer.flush()
                print(f"RESULT {n / (time.perf_counter() - seen['first']):.1f}", flush=True)
                os._exit(0)

    faust.Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()


def scrape(port: int, metric: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    found = re.search(rf"^{metric} ([\d.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


PROFILER: Any = None  # bench_pipeline.Profiler when --py-spy is given


def processors(messages: list[Message], workers: int, store: str = "rocksdb://") -> float:
    name = f"proc{workers}{'mem' if store.startswith('memory') else ''}"
    with fresh_broker(name) as (_, base, topics):
        procs = []
        for i in range(workers):
            s = base.model_copy(update={"processors_web_port": free_port(), "processors_store_url": store})
            procs.append((s, StageProcess("processors", s, work_dir() / f"{name}-{i}.log").start()))
        try:
            for s, _ in procs:
                wait_until(lambda s=s: _healthy(s.processors_web_port), 60, "processors worker")
            time.sleep(3)  # let the group settle on its final assignment before the load arrives
            ports = [s.processors_web_port for s, _ in procs]
            profile = PROFILER.record(name, *(p for _, p in procs)) if PROFILER else contextlib.nullcontext()
            with profile:
                preload(base, topics.raw_events, messages)
                return _rate(ports, count_events(messages), [p.pid for _, p in procs if p.pid], name)
        finally:
            for _, p in procs:
                p.stop()


# Events per CPU second of the measured process(es) (all their threads), by scenario: on this shared 2-core machine
# the wall-clock rate depends on what else runs; the CPU cost per event does much less.
CPU_RATES: dict[str, float] = {}


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def _rate(ports: list[int], total: int, pids: list[int], name: str) -> float:
    """Events/s between the first and the last observation of the workers' processed-events counters (the
    events of batches finished before the first observation are excluded along with their time)."""

    def processed() -> float:
        return sum(scrape(p, "site_activity_processors_batch_events_sum") for p in ports)

    first: tuple[float, float, float] | None = None
    done, deadline = 0.0, time.monotonic() + 300
    while done < total and time.monotonic() < deadline:
        done = processed()
        if first is None and done > 0:
            first = (time.perf_counter(), done, _cpu_seconds(pids))
        time.sleep(0.02)
    if done < total or first is None:
        raise RuntimeError(f"processors handled {done:.0f} of {total}; see {work_dir()}")
    CPU_RATES[name] = (done - first[1]) / max(1e-9, _cpu_seconds(pids) - first[2])
    return (done - first[1]) / (time.perf_counter() - first[0])


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# --- report -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--naive-events", type=int, default=20_000, help="the baseline is slow; fewer events")
    parser.add_argument("--only", default="passthrough,naive,x1,x2", help="comma-separated scenarios to run")
    parser.add_argument(
        "--py-spy",
        action="store_true",
        help="profile the workers while measured (bench/results/profiles; numbers not for publishing)",
    )
    args = parser.parse_args()
    if args.py_spy:
        global PROFILER
        from bench.harness import Profiler

        PROFILER = Profiler(True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so brokers and workers are stopped on the way out
    started = time.monotonic()
    messages = workload(args.events)
    naive_messages = prefix(messages, args.naive_events)
    print(
        f"workload: {count_events(messages)} events in {len(messages)} messages, "
        f"{len({m.key for m in messages})} visitors "
        f"({time.monotonic() - started:.0f} s to build)",
        flush=True,
    )
    scenarios = {
        "passthrough": ("passthrough (confluent consume->produce)", messages, passthrough),
        "naive": ("naive faust agent (1 table write + 1 send per event)", naive_messages, naive_agent),
        "x1": ("processors, 1 worker", messages, lambda m: processors(m, 1)),
        "x2": ("processors, 2 workers (one group)", messages, lambda m: processors(m, 2)),
        "x1mem": ("processors, 1 worker, memory:// store", messages, lambda m: processors(m, 1, "memory://")),
    }
    results: dict[str, tuple[str, int, float]] = {}
    for name in args.only.split(","):
        label, msgs, run = scenarios[name]
        results[name] = (label, count_events(msgs), run(msgs))
        print(f"  {label}: {results[name][2]:,.0f} events/s", flush=True)

    naive_rate = results["naive"][2] if "naive" in results else None
    limit = results["passthrough"][2] if "passthrough" in results else None
    print(
        "\n| scenario | events | events/s | vs naive agent | vs passthrough | events per CPU second of the process |"
        "\n|---|---:|---:|---:|---:|---:|"
    )
    for name, (label, n, rate) in results.items():
        vs_naive = f"{rate / naive_rate:.1f}x" if naive_rate else "-"
        vs_limit = f"{rate / limit:.0%}" if limit else "-"
        cpu = CPU_RATES.get({"x1": "proc1", "x2": "proc2", "x1mem": "proc1mem"}.get(name, name))
        per_cpu = f"{cpu:,.0f}" if cpu else "-"
        print(f"| {label} | {n:,} | {rate:,.0f} | {vs_naive} | {vs_limit} | {per_cpu} |")
    print(f"\ntotal bench time {time.monotonic() - started:.0f} s (logs in {work_dir()})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--naive-worker":
        run_naive_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()
