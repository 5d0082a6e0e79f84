"""Building blocks the benchmarks share: output rows and tables, CPU accounting, py-spy profiles, the load
generator as a child process, and the small waits around a running stack. No measurement logic lives here."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg
from confluent_kafka import Producer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.workload import http_request  # noqa: E402
from dev_stack.embedded import wait_until  # noqa: E402
from dev_stack.process import StageProcess  # noqa: E402
from site_activity.kafka import DeliveryReports, flush_or_raise, produce_waiting, producer_config  # noqa: E402
from site_activity.settings import Settings  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
LOADGEN = ROOT / "bench" / "loadgen.py"
INGEST_P99_TARGET_MS = 50.0
# Other processes' CPU during a phase above which the run is flagged as not clean.
NOISY_OTHER_CORES = 0.25


@dataclass
class Row:
    what: str
    measured: str
    limit: str
    ratio: str
    target: str
    result: str  # PASS / FAIL / info / n/a


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# --- CPU and profiles ------------------------------------------------------------------------------


class CpuMeter:
    """CPU used by this benchmark's process tree vs the whole machine during a phase: on a shared 2-core box
    other processes' load shows up as latency tails, and this says whether it was there."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}

    @staticmethod
    def _ours() -> float:
        me = psutil.Process()
        total = 0.0
        for proc in [me, *me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                # children_* holds the reaped children (a finished load generator, exited Postgres backends).
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
        return total

    @staticmethod
    def _machine() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)

    @contextlib.contextmanager
    def measure(self, phase: str) -> Iterator[None]:
        t0, ours0, all0 = time.monotonic(), self._ours(), self._machine()
        try:
            yield
        finally:
            wall = time.monotonic() - t0
            ours, machine = (self._ours() - ours0) / wall, (self._machine() - all0) / wall
            self.phases[phase] = {
                "seconds": round(wall, 2),
                "bench_cores": round(ours, 2),
                "other_cores": round(max(machine - ours, 0.0), 2),
                "cpus": psutil.cpu_count() or 0,
            }
            say(
                f"    [{phase}] CPU: this benchmark {ours:.2f} cores, other processes {max(machine - ours, 0):.2f} "
                f"cores (of {psutil.cpu_count()})"
            )


class Profiler:
    """--py-spy: samples a stage while it is being measured and writes its collapsed stacks plus a summary of
    where the time goes to bench/results/profiles/. Idle (waiting) samples are kept and stacks are per thread,
    so the summary splits wall time, e.g. decoding vs waiting for Postgres. Sampling costs a little CPU: do
    not publish numbers from a profiled run."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.dir = RESULTS_DIR / "profiles"
        self.exe = str(Path(sys.executable).parent / "py-spy")
        if enabled:
            if not Path(self.exe).exists():
                raise SystemExit("--py-spy needs py-spy: .venv/bin/pip install -e '.[bench]'")
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)

    @contextlib.contextmanager
    def record(self, name: str, *procs: StageProcess) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        spies = [
            (
                proc,
                subprocess.Popen(
                    [
                        self.exe,
                        "record",
                        "--pid",
                        str(proc.pid),
                        "--rate",
                        "100",
                        "--nonblocking",
                        "--idle",
                        "--threads",
                        "--format",
                        "raw",
                        "--output",
                        str(self.dir / f"{name}-{proc.stage}.txt"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ),
            )
            for proc in procs
            if proc.pid
        ]
        try:
            yield
        finally:
            for proc, spy in spies:
                spy.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait(5)
                self._summarise(self.dir / f"{name}-{proc.stage}.txt")

    @staticmethod
    def _summarise(raw: Path, top: int = 15) -> None:
        """Per thread: its share of the samples, and the functions it spends them in (self and inclusive).
        Idle samples are included, so an event loop waiting in select() shows up as such."""
        threads: dict[str, dict[str, dict[str, int]]] = {}
        for line in raw.read_text(errors="replace").splitlines() if raw.exists() else []:
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            frames = stack.split(";")
            thread = frames[0] if frames[0].startswith("thread") else "all threads"
            stats = threads.setdefault(thread, {"total": {"": 0}, "self": {}, "incl": {}})
            count = int(n)
            stats["total"][""] += count
            stats["self"][frames[-1]] = stats["self"].get(frames[-1], 0) + count
            for frame in set(frames[1:]):
                stats["incl"][frame] = stats["incl"].get(frame, 0) + count
        if not threads:
            return
        grand = sum(t["total"][""] for t in threads.values())
        lines = [f"{grand} samples at 100 Hz (idle included), {len(threads)} thread(s)"]
        for name, stats in sorted(threads.items(), key=lambda kv: -kv[1]["total"][""]):
            total = stats["total"][""]
            lines += [
                "",
                f"== {name}: {100 * total / grand:.1f}% of samples",
                "self %  function (share of this thread)",
            ]
            lines += [
                f"{100 * c / total:5.1f}  {f}" for f, c in sorted(stats["self"].items(), key=lambda kv: -kv[1])[:top]
            ]
            lines += ["incl %  function"]
            lines += [
                f"{100 * c / total:5.1f}  {f}"
                for f, c in sorted(stats["incl"].items(), key=lambda kv: -kv[1])[: top * 2]
            ]
        raw.with_suffix(".summary.txt").write_text("\n".join(lines) + "\n")


# --- load and waits --------------------------------------------------------------------------------


def bare_produce(settings: Settings, topic: str, messages: list[tuple[bytes, bytes]], label: str) -> dict[str, Any]:
    """The limit for the API: the same librdkafka producer settings and bytes, no HTTP, no validation."""
    producer = Producer(producer_config(settings))
    reports = DeliveryReports()
    start = time.perf_counter()
    for i, (key, value) in enumerate(messages, 1):
        produce_waiting(producer, topic, value, key, on_delivery=reports)
        producer.poll(0)
        if i % 100_000 == 0:
            say(f"    [{label}] {i:,} messages queued")
    flush_or_raise(producer, 120, reports)
    elapsed = time.perf_counter() - start
    return {
        "messages": len(messages),
        "seconds": round(elapsed, 3),
        "msgs_per_s": len(messages) / elapsed,
        "avg_bytes": sum(len(v) for _, v in messages) / len(messages),
    }


class Loadgen:
    """bench/loadgen.py as a child process; its marker lines are handed to a callback from a reader thread."""

    def __init__(
        self, label: str, port: int, widget: str, *options: str, on_marker: Callable[[str, float], None] | None = None
    ):
        cmd = [sys.executable, str(LOADGEN), "--port", str(port), "--widget", widget, "--label", label, *options]
        if on_marker is not None:
            cmd.append("--markers")
        self.on_marker = on_marker
        self.result: dict[str, Any] | None = None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("M ") and self.on_marker is not None:
                _, marker, t_done = line.split()
                self.on_marker(marker, float(t_done))
            elif line.startswith("R "):
                self.result = json.loads(line[2:])

    def running(self) -> bool:
        return self.proc.poll() is None or self.reader.is_alive()

    def wait(self, timeout: float) -> dict[str, Any]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"load generator overran its {timeout:.0f}s bound") from None
        except BaseException:  # Ctrl-C / SIGTERM: it runs in its own session, so stop it ourselves
            self.stop()
            raise
        self.reader.join(10)
        if self.proc.returncode != 0 or self.result is None:
            raise RuntimeError(f"load generator failed (exit {self.proc.returncode})")
        return self.result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def post_until_accepted(port: int, body: dict[str, Any], timeout: float = 30.0) -> None:
    """The API learns about widgets from a periodically refreshed cache: retry until it accepts the request."""
    raw = http_request(body, port)
    payload = raw[raw.index(b"\r\n\r\n") + 4 :]
    last = ""

    def accepted() -> bool:
        nonlocal last
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/widget/track",
            data=payload,
            headers={"Content-Type": "text/plain"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return bool(resp.status == 204)
        except urllib.error.HTTPError as exc:
            last = f"{exc.code} {exc.read()[:200]!r}"
            return False

    try:
        wait_until(accepted, timeout, "API accepting the benchmark widget", interval=0.3)
    except TimeoutError as exc:
        raise RuntimeError(f"{exc}; last answer: {last}") from None


def wait_rows(dsn: str, widget_id: str, expected: int, timeout: float) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        wait_until(
            lambda: (
                conn.execute("SELECT count(*) FROM visitor_events WHERE widget_id = %s", (widget_id,)).fetchone()[0]
                >= expected
            ),
            timeout,
            f"{expected} rows",
            0.2,
        )


# --- output ----------------------------------------------------------------------------------------


HEADERS = ("what", "measured", "baseline / limit", "ratio", "target", "result")


def text_table(rows: list[Row]) -> str:
    cells = [HEADERS, *[tuple(asdict(r).values()) for r in rows]]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(HEADERS))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(str(v) for v in asdict(r).values()) + " |" for r in rows]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        rev = ""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": rev,
        "loadavg_at_start": os.getloadavg(),
    }


def report(
    name: str, res: dict[str, Any], header: tuple[str, ...], rows: Sequence[Sequence[str]], verdict_column: int
) -> int:
    """Writes bench/results/<name>.json, prints the rows as a markdown table (for the README) and returns the exit
    status: 1 when any row's verdict column says FAIL."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nfull results: {RESULTS_DIR / (name + '.json')}")
    return 1 if any("FAIL" in row[verdict_column] for row in rows) else 0
