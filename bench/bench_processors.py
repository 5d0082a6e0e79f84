"""Stream-processor throughput, next to its limit and its naive baseline, in one run on embedded Tansu.

    .venv/bin/python bench/bench_processors.py [--events 200000] [--naive-events 20000]

Every scenario gets a fresh broker (Tansu's memory storage only grows) and the same pre-encoded raw events
(realistic visitors: time-ordered batches of <= 25 events, batches of many visitors interleaved):

  passthrough    bare confluent-kafka consume -> produce of the same messages (the limit)
  naive agent    a faust agent doing one table write and one send per event (the baseline)
  processors x1  `site-activity processors`, one worker process
  processors x2  two worker processes in one consumer group

Rates are measured from the first processed event to the last, so start-up and group joins are excluded.
"""

from __future__ import annotations

import argparse
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
from functools import cache
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.codec import VISITOR_EVENT, AvroCodec  # noqa: E402
from site_activity.embedded import EmbeddedKafka, free_port, wait_until  # noqa: E402
from site_activity.kafka import consumer_config, ensure_topics, producer_config  # noqa: E402
from site_activity.process import StageProcess  # noqa: E402
from site_activity.settings import Settings  # noqa: E402
from site_activity.topics import Topics, event_key  # noqa: E402

PARTITIONS = 6
Message = tuple[bytes, bytes]  # (key, Avro value)


# --- workload -----------------------------------------------------------------------------------------

def workload(n_events: int, seed: int = 42) -> list[Message]:
    """Visitors of one widget browsing over a day: gaps of seconds to hours, batches of 1..25 events."""
    rng = random.Random(seed)
    codec = AvroCodec(VISITOR_EVENT)
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
            record = {
                "event_id": uuid.UUID(int=rng.getrandbits(128), version=4), "event_type": kind,
                "tenant_id": tenant, "widget_id": widget, "visitor_id": visitor,
                "name": "clicked_upgrade" if kind == "custom" else None,
                "url": f"https://shop.example.com/p/{rng.randrange(50)}", "referrer": None,
                "properties": '{"plan": "pro", "variant": "b"}' if kind != "pageview" else "{}",
                "user_id": f"u_{rng.randrange(10**6)}" if kind == "identify" else None,
                "occurred_at": t, "received_at": t + timedelta(seconds=1), "session_id": None, "customer_id": None,
            }
            events.append((key, codec.encode(record)))
            t += timedelta(seconds=rng.choice(gaps))
        made += len(events)
        batches, i = [], 0
        while i < len(events):
            n = rng.randint(1, 25)
            batches.append(events[i:i + n])
            i += n
        per_visitor.append(batches)  # type: ignore[arg-type]
    # interleave visitors' batches, each visitor's batches staying in time order
    order = [v for v, batches in enumerate(per_visitor) for _ in batches]
    rng.shuffle(order)
    cursors = [iter(batches) for batches in per_visitor]
    return [msg for v in order for msg in next(cursors[v])]  # type: ignore[arg-type]


# --- infrastructure -----------------------------------------------------------------------------------

@cache
def work_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="bench-processors-"))


@contextmanager
def fresh_broker(name: str) -> Iterator[EmbeddedKafka]:
    broker = EmbeddedKafka(free_port(), work_dir() / f"tansu-{name}.log")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def bench_settings(kafka: EmbeddedKafka, name: str) -> Settings:
    return Settings(
        data_dir=work_dir() / name, kafka_bootstrap=kafka.bootstrap, topic_prefix=name, topic_partitions=PARTITIONS,
        processors_app_id=f"bench-{name}", processors_web_port=free_port(), postgres_dsn="postgresql://unused",
        consumer_session_timeout_ms=3000, consumer_heartbeat_interval_ms=500, log_level="WARNING",
    )


def preload(settings: Settings, topic: str, messages: list[Message]) -> None:
    producer = Producer(producer_config(settings, **{"linger.ms": 20}))
    for i, (key, value) in enumerate(messages):
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 5000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0, "preload not delivered"


# --- scenarios ----------------------------------------------------------------------------------------

def passthrough(messages: list[Message]) -> float:
    with fresh_broker("passthrough") as kafka:
        s = bench_settings(kafka, "passthrough")
        topics = Topics.from_settings(s)
        ensure_topics(s)
        preload(s, topics.raw_events, messages)
        consumer = Consumer(consumer_config(s, "bench-passthrough", **{"fetch.max.bytes": 8 << 20}))
        consumer.subscribe([topics.raw_events])
        producer = Producer(producer_config(s, **{"linger.ms": 2}))
        n, first = 0, None
        while n < len(messages):
            for msg in consumer.consume(2000, timeout=1.0):
                if msg.error() is None:
                    first = first or time.perf_counter()
                    producer.produce(topics.enriched_events, msg.value(), msg.key())
                    n += 1
            producer.poll(0)
        producer.flush(30)
        elapsed = time.perf_counter() - (first or 0)
        consumer.close()
        return n / elapsed


def naive_agent(messages: list[Message]) -> float:
    with fresh_broker("naive") as kafka:
        s = bench_settings(kafka, "naive")
        topics = Topics.from_settings(s)
        ensure_topics(s)
        preload(s, topics.raw_events, messages)
        out = subprocess.run(
            [sys.executable, __file__, "--naive-worker", kafka.bootstrap, topics.raw_events, topics.enriched_events,
             str(len(messages))], capture_output=True, text=True, timeout=180)
        found = re.search(r"RESULT ([\d.]+)", out.stdout + out.stderr)  # faust may route print() to its log
        if not found:
            raise RuntimeError(f"naive agent failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        return float(found.group(1))


def run_naive_worker(bootstrap: str, raw: str, enriched: str, n: int) -> None:
    """The baseline: what a faust agent looks like written the obvious way."""
    import faust

    codec = AvroCodec(VISITOR_EVENT)
    app = faust.App(f"naive-{os.getpid()}", broker=f"kafka://{bootstrap}", store="memory://",
                    topic_partitions=PARTITIONS, broker_session_timeout=3, broker_heartbeat_interval=0.5,
                    consumer_auto_offset_reset="earliest", web_enabled=False, autodiscover=False)
    source = app.topic(raw, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    sink = app.topic(enriched, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    last_seen = app.Table("last-seen", default=int, partitions=PARTITIONS, key_type=bytes)
    seen = {"n": 0, "first": 0.0}

    @app.agent(source)
    async def naive(stream: faust.StreamT) -> None:
        async for event in stream.events():
            seen["first"] = seen["first"] or time.perf_counter()
            record = codec.decode(event.value)
            last_seen[event.key] = int(record["occurred_at"].timestamp())
            await sink.send(key=event.key, value=event.value)
            seen["n"] += 1
            if seen["n"] == n:
                await app.producer.flush()
                print(f"RESULT {n / (time.perf_counter() - seen['first']):.1f}", flush=True)
                os._exit(0)

    faust.Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()


def scrape(port: int, metric: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    found = re.search(rf"^{metric} ([\d.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def processors(messages: list[Message], workers: int) -> float:
    name = f"proc{workers}"
    with fresh_broker(name) as kafka:
        base = bench_settings(kafka, name)
        ensure_topics(base)
        procs = []
        for i in range(workers):
            s = base.model_copy(update={"processors_web_port": free_port()})
            procs.append((s, StageProcess("processors", s, work_dir() / f"{name}-{i}.log").start()))
        try:
            for s, p in procs:
                wait_until(lambda s=s: _healthy(s.processors_web_port), 60, "processors worker")
            time.sleep(3)  # let the group settle on its final assignment before the load arrives
            preload(base, Topics.from_settings(base).raw_events, messages)
            ports = [s.processors_web_port for s, _ in procs]
            first, done = None, 0.0
            deadline = time.monotonic() + 300
            while done < len(messages) and time.monotonic() < deadline:
                if first is None and sum(scrape(p, "site_activity_processors_events_in_total") for p in ports) > 0:
                    first = time.perf_counter()
                done = sum(scrape(p, "site_activity_processors_batch_events_sum") for p in ports)
                time.sleep(0.05)
            if done < len(messages):
                raise RuntimeError(f"processors handled {done:.0f} of {len(messages)}; see {work_dir()}")
            return len(messages) / (time.perf_counter() - (first or 0))
        finally:
            for _, p in procs:
                p.stop()


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
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so brokers and workers are stopped on the way out
    started = time.monotonic()
    messages = workload(args.events)
    print(f"workload: {len(messages)} events, {len({k for k, _ in messages})} visitors "
          f"({time.monotonic() - started:.0f} s to build)", flush=True)
    results: list[tuple[str, int, float]] = []
    for label, n, run in [
        ("passthrough (confluent consume->produce)", len(messages), lambda: passthrough(messages)),
        ("naive faust agent (1 table write + 1 send per event)", args.naive_events,
         lambda: naive_agent(messages[:args.naive_events])),
        ("processors, 1 worker", len(messages), lambda: processors(messages, 1)),
        ("processors, 2 workers (one group)", len(messages), lambda: processors(messages, 2)),
    ]:
        rate = run()
        results.append((label, n, rate))
        print(f"  {label}: {rate:,.0f} events/s", flush=True)

    passthrough_rate, naive_rate = results[0][2], results[1][2]
    print(f"\n| scenario | events | events/s | vs naive agent | vs passthrough |\n|---|---:|---:|---:|---:|")
    for label, n, rate in results:
        print(f"| {label} | {n:,} | {rate:,.0f} | {rate / naive_rate:.1f}x | {rate / passthrough_rate:.0%} |")
    print(f"\ntotal bench time {time.monotonic() - started:.0f} s (logs in {work_dir()})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--naive-worker":
        run_naive_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()
