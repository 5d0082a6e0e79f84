"""Webhooks benchmark: first-attempt latency from the event's row commit at a steady event rate, and deliveries/s
to a fast local receiver.

    .venv/bin/python bench/bench_webhooks.py                          # 1,000 events/s for 60 s (the README row)
    .venv/bin/python bench/bench_webhooks.py --rate 200 --seconds 10  # smoke test, about a minute

Own embedded Postgres (track_commit_timestamp on) + the configured embedded broker on free ports in a temp dir,
a `site-activity sink` reading the raw topic, a `site-activity webhooks` stage and a receiver (uvicorn, a
separate process answering 200 at once) — all on 127.0.0.1, stopped by PID at the end.

1. Steady phase: `--rate` events/s (requests of 25, as the API writes them) for `--seconds`, one endpoint
   subscribed to every event. For each event: the commit time of its row (pg_xact_commit_timestamp of the
   row's xmin) and the arrival of its first attempt at the receiver; latency = arrival - commit.
   Target: p95 <= 2 s at 1,000 events/s.
2. Throughput phase: a replay of everything from phase 1 (the whole backlog due at once); deliveries/s =
   events / (last arrival - replay start).

Prints a table (and markdown for the README) and writes bench/results/webhooks.json."""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_purge import healthy  # noqa: E402
from bench.harness import report  # noqa: E402
from bench.workload import EVENTS_PER_BODY, encoded_requests, make_bodies  # noqa: E402
from dev_stack.embedded import EmbeddedPostgres, free_port, make_broker, stop_process, wait_until  # noqa: E402
from dev_stack.kafka_dist import broker_kind  # noqa: E402
from dev_stack.process import StageProcess  # noqa: E402
from site_activity import widgets  # noqa: E402
from site_activity.db import migrate  # noqa: E402
from site_activity.kafka import ensure_topics, producer_config  # noqa: E402
from site_activity.settings import Settings  # noqa: E402
from site_activity.topics import Topics  # noqa: E402
from webhooks import endpoints  # noqa: E402

P95_TARGET_S = 2.0


def say(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", flush=True)


# --- the receiver (a separate process: `bench_webhooks.py --receiver PORT FILE`) ------------------------


def receiver_main(port: int, out_path: str) -> None:
    """Answers 200 at once and appends `event_id <TAB> webhook-id <TAB> arrival (unix s)` per request."""
    import orjson
    import uvicorn

    out = open(out_path, "a", buffering=1)  # noqa: SIM115 - open for the receiver process's whole life

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        now = time.time()
        headers = dict(scope["headers"])
        out.write(f"{orjson.loads(body)['data']['event_id']}\t{headers[b'webhook-id'].decode()}\t{now:.6f}\n")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")


def arrivals(path: Path) -> list[tuple[str, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            out.append((parts[0], float(parts[2])))
    return out


# --- the stack ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def stack(workdir: Path) -> Iterator[tuple[EmbeddedPostgres, Settings]]:
    pg = EmbeddedPostgres(workdir / "pg", free_port())
    broker = make_broker(Settings(), workdir / "broker", free_ports=True)
    with contextlib.ExitStack() as stop:
        say(f"starting Postgres on 127.0.0.1:{pg.port} and the embedded broker")
        pg.start()
        with psycopg.connect(pg.dsn.replace("/site_activity", "/postgres"), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET track_commit_timestamp = on")  # read at start: restart once
        pg.stop()
        pg.start()
        stop.callback(pg.stop)
        broker.start()
        stop.callback(broker.stop)
        migrate(pg.dsn)
        settings = Settings(
            data_dir=workdir / "data",
            kafka_bootstrap=broker.bootstrap,
            postgres_dsn=pg.dsn,
            topic_prefix="bench-webhooks",
            sink_group="bench-webhooks-sink",
            sink_from_enriched=False,
            webhooks_group="bench-webhooks",
            webhooks_allow_private_urls=True,
            sink_http_port=free_port(),
            webhooks_http_port=free_port(),
            http_port=free_port(),
            processors_web_port=free_port(),
            consumer_session_timeout_ms=6000,
            consumer_heartbeat_interval_ms=1000,
        )
        ensure_topics(settings)
        yield pg, settings


@contextlib.contextmanager
def running(settings: Settings, workdir: Path, receiver_port: int, receiver_file: Path) -> Iterator[dict[str, int]]:
    recv = subprocess.Popen(
        [sys.executable, __file__, "--receiver", str(receiver_port), str(receiver_file)],
        stdout=open(workdir / "receiver.log", "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    stages = [StageProcess(s, settings, workdir / f"{s}.log") for s in ("sink", "webhooks")]
    try:
        for stage in stages:
            stage.start()
        wait_until(
            lambda: healthy(settings.sink_http_port) and healthy(settings.webhooks_http_port),
            60,
            "sink and webhooks",
            interval=0.2,
        )
        wait_until(lambda: _port_open(receiver_port), 30, "receiver", interval=0.1)
        yield {"webhooks": stages[1].pid, "sink": stages[0].pid, "receiver": recv.pid}  # type: ignore[dict-item]
    finally:
        for stage in reversed(stages):
            stage.stop()
        stop_process(recv)


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def produce_paced(settings: Settings, widget: widgets.Widget, rate: float, seconds: float, seed: int = 0) -> int:
    """`rate` events/s for `seconds`, one 25-event request message at a time; returns how many were sent."""
    from confluent_kafka import Producer

    producer = Producer(producer_config(settings))
    topic = Topics.from_settings(settings).raw_events
    bodies_total = max(1, int(rate * seconds) // EVENTS_PER_BODY)
    interval = EVENTS_PER_BODY / rate
    start = time.monotonic()
    sent = 0
    for i in range(bodies_total):
        wait = start + i * interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        # Distinct seeds per call: event ids must not repeat across widgets (results are keyed by event id).
        [(key, value)] = encoded_requests(make_bodies(str(widget.id), 1, seed=seed + i), str(widget.tenant_id))
        producer.produce(topic, value, key)
        producer.poll(0)
        sent += EVENTS_PER_BODY
    if producer.flush(60):
        raise RuntimeError("produce: undelivered messages")
    return sent


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    out = {}
    for name, pid in pids.items():
        times = psutil.Process(pid).cpu_times()
        out[name] = round(times.user + times.system, 2)
    return out


def stage_metrics(port: int) -> dict[str, float]:
    """The webhooks stage's own counters and histogram sums (where its time went)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    wanted = ("_total", "_sum", "_count")
    return {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("site_activity_webhooks") and line.split(" ")[0].split("{")[0].endswith(wanted)
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as tmp, stack(Path(tmp)) as (pg, settings):
        work = Path(tmp)
        port, got = free_port(), work / "arrivals.tsv"
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            w = widgets.create_widget(conn, name="bench", actor="bench", tracking_enabled=True)
            ep, _ = endpoints.create_endpoint(
                conn, w.tenant_id, f"http://127.0.0.1:{port}/hook", actor="bench", allow_private=True
            )
        with running(settings, work, port, got) as pids:
            # Warm-up (another widget of the tenant): both consumer groups have joined and fetched before the
            # measured events start, so group start-up is not counted as webhook latency.
            with psycopg.connect(pg.dsn, autocommit=True) as conn:
                warm = widgets.create_widget(
                    conn, name="warm-up", tenant_id=w.tenant_id, actor="bench", tracking_enabled=True
                )
            warm_sent = produce_paced(settings, warm, EVENTS_PER_BODY * 10, 1.0, seed=10**9)
            wait_until(lambda: len(arrivals(got)) >= warm_sent, 120, "warm-up deliveries", interval=0.2)
            say(f"steady phase: {args.rate:,.0f} events/s for {args.seconds:.0f} s")
            t0 = datetime.now(UTC)
            sent = produce_paced(settings, w, args.rate, args.seconds)
            wait_until(
                lambda: len({e for e, _ in arrivals(got)}) >= warm_sent + sent,
                max(60.0, args.seconds * 3),
                f"{sent:,} first deliveries",
                interval=0.5,
            )
            first: dict[str, float] = {}
            for event_id, at in arrivals(got):
                first.setdefault(event_id, at)
            with psycopg.connect(pg.dsn, autocommit=True) as conn:
                commits = {
                    str(r[0]): r[1].timestamp()
                    for r in conn.execute(
                        "SELECT event_id, pg_xact_commit_timestamp(xmin) FROM visitor_events WHERE widget_id = %s",
                        (w.id,),
                    )
                }
                # When the reader queued the delivery (its transaction's start; the rest is the dispatcher's).
                queued_at = {
                    str(r[0]): r[1].timestamp()
                    for r in conn.execute(
                        "SELECT event_id, created_at FROM webhook_deliveries WHERE endpoint_id = %s AND widget_id = %s",
                        (ep.id, w.id),
                    )
                }
            latencies = [first[e] - commits[e] for e in commits if e in first]
            to_queue = [queued_at[e] - commits[e] for e in commits if e in queued_at]
            to_send = [first[e] - queued_at[e] for e in queued_at if e in first]
            say(
                f"  row commit -> queued: p50 {statistics.median(to_queue):.3f} s, p95 {percentile(to_queue, 0.95):.3f} s;"
                f" queued -> first attempt: p50 {statistics.median(to_send):.3f} s, p95 {percentile(to_send, 0.95):.3f} s"
            )
            say(
                f"  {len(latencies):,} events: p50 {statistics.median(latencies):.3f} s,"
                f" p95 {percentile(latencies, 0.95):.3f} s, max {max(latencies):.3f} s"
            )

            say("throughput phase: replay of the whole steady phase")
            before = len(arrivals(got))
            r0 = time.time()
            with psycopg.connect(pg.dsn, autocommit=True) as conn:
                queued = endpoints.replay(
                    conn,
                    w.tenant_id,
                    ep.id,
                    t0 - timedelta(minutes=5),
                    datetime.now(UTC) + timedelta(minutes=5),
                    actor="bench",
                )
            wait_until(
                lambda: len(arrivals(got)) - before >= queued,
                max(60.0, queued / 100),
                f"{queued:,} replayed deliveries",
                interval=0.5,
            )
            replayed = arrivals(got)[before:]
            span = max(at for _, at in replayed) - r0
            say(f"  {queued:,} deliveries in {span:.2f} s: {queued / span:,.0f}/s")
            metrics = stage_metrics(settings.webhooks_http_port)
            cpu = cpu_seconds(pids)
            say(
                f"  CPU seconds over all phases: {cpu}; webhooks stage:"
                f" {cpu['webhooks'] * 1000 / (warm_sent + sent + queued):.2f} ms per delivery"
            )
    return {
        "offered_events_per_s": args.rate,
        "seconds": args.seconds,
        "events": sent,
        "first_attempt_latency_s": {
            "n": len(latencies),
            "p50": statistics.median(latencies),
            "p95": percentile(latencies, 0.95),
            "p99": percentile(latencies, 0.99),
            "max": max(latencies),
        },
        "row_commit_to_queued_s": {"p50": statistics.median(to_queue), "p95": percentile(to_queue, 0.95)},
        "queued_to_first_attempt_s": {"p50": statistics.median(to_send), "p95": percentile(to_send, 0.95)},
        "replay": {"deliveries": queued, "seconds": span, "deliveries_per_s": queued / span},
        "stage_metrics": metrics,
        "cpu_seconds": cpu,
        "settings": {
            "endpoint_concurrency": settings.webhooks_endpoint_concurrency,
            "max_in_flight": settings.webhooks_max_in_flight,
            "broker": broker_kind(settings),
        },
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def table(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    lat, rep = res["first_attempt_latency_s"], res["replay"]
    verdict = "PASS" if lat["p95"] <= P95_TARGET_S else "FAIL"
    return [
        (
            f"webhooks: first attempt after row commit, {res['offered_events_per_s']:,.0f} events/s x "
            f"{res['seconds']:.0f} s, 1 endpoint",
            f"p95 {lat['p95']:.2f} s (p50 {lat['p50']:.2f}, max {lat['max']:.2f})",
            f"target p95 <= {P95_TARGET_S:g} s",
            verdict,
        ),
        (
            "webhooks: deliveries/s to a fast local receiver (replayed backlog, 1 endpoint)",
            f"{rep['deliveries_per_s']:,.0f}/s",
            f"{rep['deliveries']:,} in {rep['seconds']:.1f} s",
            "-",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=1000.0, help="events/s offered in the steady phase")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the steady phase")
    p.add_argument("--receiver", nargs=2, metavar=("PORT", "FILE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.receiver:
        receiver_main(int(args.receiver[0]), args.receiver[1])
        return 0
    res = run(args)
    rows = table(res)
    for row in rows:
        print("  ".join(row))
    report("webhooks", res, ("measurement", "result", "context", "verdict"), rows, 3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
