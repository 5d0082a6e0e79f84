"""A lean HTTP/1.1 load generator for `POST /api/widget/track`, run as its own process so that it does not
compete with the API's event loop: uvloop, raw keep-alive sockets, request bytes built before the clock
starts, and a minimal response parser (status line + Content-Length).

    python bench/loadgen.py --port P --widget W --mode closed --clients 32 --duration 10
    python bench/loadgen.py --port P --widget W --mode open --rate 400 --duration 30 --bodies 12000 --markers

closed: every client sends its next request as soon as the previous one is answered (max throughput).
open:   requests are issued on a fixed schedule; latency counts from the scheduled time, so time spent
        waiting for a free connection is included (no coordinated omission).

stdout: with --markers one line "M <first event id> <monotonic time of the 204>" per accepted request,
then one final line "R <json result>". Progress goes to stderr once a second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.workload import EVENTS_PER_BODY, http_request, make_bodies

_CONTENT_LENGTH = b"\r\ncontent-length:"


class Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is None:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        length = 0
        at = head.find(_CONTENT_LENGTH)
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + len(_CONTENT_LENGTH) : stop if stop >= 0 else None])
        if len(self.buf) < end + 4 + length:
            return
        del self.buf[: end + 4 + length]
        waiter, self.waiter = self.waiter, None
        if not waiter.done():
            waiter.set_result(int(head[9:12]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    def request(self, data: bytes) -> asyncio.Future[int]:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter


async def connect(port: int) -> Connection:
    _, conn = await asyncio.get_running_loop().create_connection(Connection, "127.0.0.1", port)
    return conn


@dataclass
class Stats:
    markers: bool
    recording: bool = False
    latencies: list[float] = field(default_factory=list)
    done_at: list[float] = field(default_factory=list)  # when each recorded 204 arrived, for the per-second view
    statuses: Counter[str] = field(default_factory=Counter)
    done: int = 0  # all answered requests, including warmup (for progress)
    marker_lines: list[str] = field(default_factory=list)

    def record(self, status: int | str, latency: float, marker: str | None, t_done: float) -> None:
        self.done += 1
        if not self.recording:
            return
        self.statuses[str(status)] += 1
        if status == 204:
            self.latencies.append(latency)
            self.done_at.append(t_done)
            if self.markers and marker is not None:
                self.marker_lines.append(f"M {marker} {t_done:.6f}\n")

    def flush_markers(self) -> None:
        if self.marker_lines:
            sys.stdout.write("".join(self.marker_lines))
            sys.stdout.flush()
            self.marker_lines.clear()


async def send(
    conn: Connection, data: bytes, t_sched: float, marker: str | None, stats: Stats, port: int
) -> Connection:
    """Sends one request; returns a usable connection (a fresh one if this one broke)."""
    try:
        status: int | str = await conn.request(data)
    except (ConnectionError, OSError) as exc:
        status = type(exc).__name__
    t_done = time.monotonic()
    stats.record(status, t_done - t_sched, marker, t_done)
    if conn.closed:
        conn = await connect(port)
    return conn


async def closed_loop(reqs: list[tuple[bytes, str]], args: argparse.Namespace, stats: Stats, stop_at: float) -> None:
    cursor = 0

    async def client() -> None:
        nonlocal cursor
        conn = await connect(args.port)
        try:
            while time.monotonic() < stop_at and cursor < args.max_requests:
                data, marker = reqs[cursor % len(reqs)]
                cursor += 1
                conn = await send(conn, data, time.monotonic(), marker, stats, args.port)
        finally:
            conn.transport.close()

    await asyncio.gather(*(client() for _ in range(args.clients)))


async def open_loop(
    reqs: list[tuple[bytes, str]], args: argparse.Namespace, stats: Stats, start: float, stop_at: float
) -> None:
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for conn in await asyncio.gather(*(connect(args.port) for _ in range(args.clients))):
        idle.put_nowait(conn)
    in_flight: set[asyncio.Task[None]] = set()

    async def one(data: bytes, t_sched: float, marker: str) -> None:
        conn = await idle.get()
        idle.put_nowait(await send(conn, data, t_sched, marker, stats, args.port))

    interval = 1.0 / args.rate
    i = 0
    while i < args.max_requests:
        t_sched = start + i * interval
        if t_sched >= stop_at:
            break
        delay = t_sched - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        data, marker = reqs[i % len(reqs)]
        task = asyncio.create_task(one(data, t_sched, marker))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        i += 1
    if in_flight:
        await asyncio.wait(in_flight, timeout=args.grace)
    if in_flight:
        stats.statuses["unanswered"] += len(in_flight)
    for task in list(in_flight):
        task.cancel()
    while not idle.empty():
        idle.get_nowait().transport.close()


async def progress(stats: Stats, args: argparse.Namespace) -> None:
    last, t_last = 0, time.monotonic()
    while True:
        await asyncio.sleep(1.0)
        stats.flush_markers()
        now = time.monotonic()
        rate = (stats.done - last) / (now - t_last) * EVENTS_PER_BODY
        last, t_last = stats.done, now
        print(
            f"    [{args.label}] {stats.done:>7} requests answered, {rate:>9,.0f} events/s", file=sys.stderr, flush=True
        )


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    bodies = make_bodies(args.widget, args.bodies, seed=args.seed)
    reqs = [(http_request(b, args.port), b["events"][0]["event_id"]) for b in bodies]
    del bodies
    stats = Stats(markers=args.markers)
    reporter = asyncio.create_task(progress(stats, args))
    cpu_start = _cpu_seconds()
    start = time.monotonic()
    measure_from = start + args.warmup
    stop_at = measure_from + args.duration
    # Warmup requests are sent but not recorded: the API's first requests pay for connection setup and caches.
    asyncio.get_running_loop().call_at(
        asyncio.get_running_loop().time() + args.warmup, lambda: setattr(stats, "recording", True)
    )
    if args.warmup <= 0:
        stats.recording = True
    if args.mode == "closed":
        try:
            await asyncio.wait_for(closed_loop(reqs, args, stats, stop_at), args.warmup + args.duration + args.grace)
        except TimeoutError:
            stats.statuses["unanswered"] += args.clients
    else:
        await open_loop(reqs, args, stats, start, stop_at)
    end = time.monotonic()
    cpu_used = _cpu_seconds() - cpu_start
    reporter.cancel()
    stats.flush_markers()
    window = min(end, stop_at) - measure_from
    per_second = per_second_view(stats, measure_from)
    lat = sorted(stats.latencies)
    ok = len(lat)
    return {
        "mode": args.mode,
        "clients": args.clients,
        "rate_req_s": args.rate if args.mode == "open" else None,
        "window_s": round(window, 3),
        "t_start": measure_from,
        "t_end": end,
        "requests_ok": ok,
        "events_ok": ok * EVENTS_PER_BODY,
        "statuses": dict(stats.statuses),
        "errors": sum(n for s, n in stats.statuses.items() if s != "204"),
        "req_per_s": ok / window if window > 0 else 0.0,
        "events_per_s": ok * EVENTS_PER_BODY / window if window > 0 else 0.0,
        "latency_ms": {
            name: (round(v * 1000, 2) if v is not None else None)
            for name, v in (
                ("p50", percentile(lat, 0.50)),
                ("p90", percentile(lat, 0.90)),
                ("p99", percentile(lat, 0.99)),
                ("max", lat[-1] if lat else None),
            )
        },
        "per_second": per_second,
        # The generator's own CPU (cores), to check it is not what limits the server on a small machine.
        "client_cores": round(cpu_used / (end - start), 3),
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def per_second_view(stats: Stats, origin: float) -> list[dict[str, Any]]:
    """Answers and latency per second of the run: shows whether a tail is steady or a few stalls."""
    buckets: dict[int, list[float]] = {}
    for t_done, latency in zip(stats.done_at, stats.latencies, strict=True):
        buckets.setdefault(int(t_done - origin), []).append(latency)
    out = []
    for second in sorted(buckets):
        values = sorted(buckets[second])
        out.append(
            {
                "s": second,
                "ok": len(values),
                "p50_ms": round(percentile(values, 0.5) * 1000, 1),  # type: ignore[operator]
                "p99_ms": round(percentile(values, 0.99) * 1000, 1),  # type: ignore[operator]
                "max_ms": round(values[-1] * 1000, 1),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--widget", required=True)
    p.add_argument("--mode", choices=["closed", "open"], required=True)
    p.add_argument("--clients", type=int, default=32, help="connections (closed: concurrent clients)")
    p.add_argument("--rate", type=float, default=400.0, help="open loop: requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (after warmup)")
    p.add_argument("--warmup", type=float, default=0.0)
    p.add_argument("--grace", type=float, default=10.0, help="seconds to wait for in-flight requests at the end")
    p.add_argument("--bodies", type=int, default=2000, help="distinct pre-built bodies, cycled")
    p.add_argument("--max-requests", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=os.getpid())
    p.add_argument("--markers", action="store_true")
    p.add_argument("--label", default="load")
    args = p.parse_args(argv)
    result = uvloop.run(run(args))
    sys.stdout.write("R " + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
