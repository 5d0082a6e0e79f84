"""Processors' state at scale (issue 14): many distinct visitors through one worker, on the embedded broker.

    .venv/bin/python bench/bench_processor_state.py [--visitors 2000000] [--store rocksdb://]

One raw message per visitor (a request of 2 events, as the API publishes it), every visitor new, produced
while one `site-activity processors` worker runs. Reports:

  rss        the worker's RSS once the first 1% of visitors are processed ("start") and at the end; target:
             end <= 2x start (state on disk, not in RAM)
  events/s   processed events per second, first to last observation of the worker's counter
  recovery   SIGKILL after everything was processed and committed, restart with the same data dir: seconds
             until /healthz (faust recovered its table) and until a new event is processed; target < 30 s

`--store memory://` runs the same with the in-memory store (recovery replays the whole changelog) as the
same-machine comparison. Messages are built from one encoded template by replacing fixed-width ids, so the
load generator costs little of the 2 cores.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psutil
from confluent_kafka import Producer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_processors import _healthy, fresh_broker, scrape, work_dir  # noqa: E402
from dev_stack.embedded import free_port, wait_until  # noqa: E402
from dev_stack.process import StageProcess  # noqa: E402
from schemas.codec import EventCodec  # noqa: E402
from site_activity.kafka import produce_waiting, producer_config  # noqa: E402
from site_activity.topics import event_key  # noqa: E402

EVENTS_PER_VISITOR = 2
COUNTER = "site_activity_processors_batch_events_sum"
VISITOR_PLACEHOLDER = "v_" + "f" * 16
EVENT_PLACEHOLDERS = [str(uuid.UUID(int=(0xEEEE << 112) + i)) for i in range(EVENTS_PER_VISITOR)]


class Messages:
    """Raw messages of distinct visitors from one encoded template (fixed-width visitor and event ids)."""

    def __init__(self) -> None:
        codec = EventCodec()
        self.widget = uuid.UUID(int=42)
        t = datetime(2026, 11, 24, 10, tzinfo=UTC)
        events = [
            {
                "event_id": EVENT_PLACEHOLDERS[i],
                "event_type": "pageview",
                "tenant_id": str(uuid.UUID(int=7)),
                "widget_id": str(self.widget),
                "visitor_id": VISITOR_PLACEHOLDER,
                "name": None,
                "url": f"https://shop.example.com/p/{i}",
                "referrer": None,
                "properties": "{}",
                "user_id": None,
                "occurred_at": t + timedelta(seconds=40 * i),
                "received_at": t + timedelta(seconds=40 * i + 1),
                "session_id": None,
                "customer_id": None,
            }
            for i in range(EVENTS_PER_VISITOR)
        ]
        self.template = codec.encode_events(events)

    def message(self, n: int) -> tuple[bytes, bytes]:
        visitor = f"v_{n:016x}"
        value = self.template.replace(VISITOR_PLACEHOLDER.encode(), visitor.encode())
        for i, placeholder in enumerate(EVENT_PLACEHOLDERS):
            value = value.replace(placeholder.encode(), str(uuid.UUID(int=(n << 8) + i, version=4)).encode())
        return event_key(str(self.widget), visitor), value


def produce(producer: Producer, topic: str, messages: Messages, first: int, count: int) -> None:
    for n in range(first, first + count):
        key, value = messages.message(n)
        produce_waiting(producer, topic, value, key)
        if n % 5000 == 0:
            producer.poll(0)


def processed(port: int) -> float:
    """The worker's processed-events counter; -1 while it does not answer (busy recovering, or loaded)."""
    try:
        return scrape(port, COUNTER)
    except httpx.HTTPError:
        return -1.0


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visitors", type=int, default=2_000_000)
    parser.add_argument("--store", default="rocksdb://")
    parser.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    total_events = args.visitors * EVENTS_PER_VISITOR
    messages = Messages()
    with fresh_broker("state") as (_, base, topics):
        s = base.model_copy(update={"processors_web_port": free_port(), "processors_store_url": args.store})
        worker = StageProcess("processors", s, work_dir() / "state-worker.log").start()
        pid = worker.pid
        assert pid is not None  # started
        try:
            port = s.processors_web_port
            wait_until(lambda: _healthy(port), 90, "processors worker")
            producer = Producer(producer_config(s, **{"linger.ms": 20}))
            deadline = time.monotonic() + args.timeout
            chunk = 20_000
            warm = max(chunk, args.visitors // 100)
            produce(producer, topics.raw_events, messages, 0, warm)
            producer.flush(60)
            wait_until(lambda: processed(port) >= warm * EVENTS_PER_VISITOR, 300, "warm-up")
            rss_start = rss_mib(pid)
            t0, done0 = time.perf_counter(), max(0.0, processed(port))
            sent, peak, report = warm, rss_start, 0.0
            print(
                f"store {args.store}: {args.visitors:,} visitors, {total_events:,} events; RSS after "
                f"{warm:,} visitors {rss_start:.0f} MiB",
                flush=True,
            )
            while time.monotonic() < deadline:
                done = processed(port)
                if done >= total_events:
                    break
                # keep about 200k events queued ahead of the worker, no more (bounded producer memory)
                if sent < args.visitors and sent * EVENTS_PER_VISITOR - done < 200_000:
                    n = min(chunk, args.visitors - sent)
                    produce(producer, topics.raw_events, messages, sent, n)
                    producer.poll(0)
                    sent += n
                else:
                    time.sleep(0.2)
                    peak = max(peak, rss_mib(worker.pid))  # type: ignore[arg-type]
                if time.monotonic() > report:
                    report = time.monotonic() + 15
                    print(f"  {done:,.0f} events processed, RSS {rss_mib(pid):.0f} MiB", flush=True)
            producer.flush(60)
            done = max(done, processed(port))
            elapsed = time.perf_counter() - t0
            if done < total_events:
                raise SystemExit(f"processed {done:.0f} of {total_events} in time; see {work_dir()}")
            rate = (done - done0) / elapsed
            rss_end = rss_mib(pid)
            peak = max(peak, rss_end)
            time.sleep(6)  # past the commit interval (2.8 s): offsets and changelog offsets recorded

            worker.kill()  # SIGKILL
            started = time.perf_counter()
            worker.start()
            wait_until(lambda: _healthy(port), 600, "recovered worker", interval=0.05)
            healthy_s = time.perf_counter() - started
            produce(producer, topics.raw_events, messages, args.visitors, 1)
            producer.flush(30)
            wait_until(lambda: processed(port) >= EVENTS_PER_VISITOR, 600, "first event after recovery", interval=0.05)
            first_event_s = time.perf_counter() - started
        finally:
            worker.stop()
    print(
        "\n| store | visitors | events/s | RSS start → end (peak) | end/start | recovery: healthy | "
        "recovery: first event processed |\n|---|---:|---:|---|---:|---:|---:|"
    )
    print(
        f"| {args.store} | {args.visitors:,} | {rate:,.0f} | {rss_start:.0f} → {rss_end:.0f} ({peak:.0f}) MiB "
        f"| {rss_end / rss_start:.2f}x | {healthy_s:.1f} s | {first_event_s:.1f} s |"
    )
    print(f"(logs in {work_dir()})")


if __name__ == "__main__":
    main()
