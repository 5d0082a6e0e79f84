"""The processors' batch work alone: `BatchProcessor.process` on bench_processors' workload, in this process, no
broker. State goes through the real `TableStore` into real RocksDB databases (rocksdict, one per partition, in a
temporary directory); the records it would produce are kept in memory. CPU time per event, the main thread's
share of a worker without faust's per-message path and without the producer's threads.

    .venv/bin/python bench/bench_process.py [--events 200000] [--batch 2000] [--repeat 3] [--digest]

`--digest` prints a hash of every record produced (enriched events, identity links, dead letters) and of every
state document written (decoded, without its wall-clock `"a"`), for the workload and then three replays that
exercise duplicates and late events (the first 1,000 messages again, then in reverse order, then every third
message again): equal digests before and after a change mean equal outputs and state. Profile with
`py-spy record -o out.txt --format raw -- .venv/bin/python bench/bench_process.py`.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from faust.stores.rocksdb import RocksDBOptions
from rocksdict import Rdict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_processors import PARTITIONS, workload  # noqa: E402
from site_activity.settings import Settings  # noqa: E402
from stream_processors.main import tune_gc  # noqa: E402
from stream_processors.processor import BatchProcessor  # noqa: E402
from stream_processors.store import ROCKSDB_OPTIONS, TableStore  # noqa: E402


@dataclass
class Msg:
    """A consumed raw message (processor.RawMessage)."""

    topic: str
    partition: int
    offset: int
    timestamp: float
    key: bytes
    value: bytes


class Outputs:
    """The records `BatchProcessor` and `TableStore` hand over, kept (digest) or only counted."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.records: list[tuple[Any, ...]] = []
        self.count = 0

    def send(
        self, topic: str, key: bytes, value: bytes, partition: Any = None, headers: Any = None, source: Any = None
    ) -> None:
        self.count += 1
        if self.keep:
            self.records.append((topic, key, value, partition, headers, source))

    def send_state(self, changelog: str, partition: int, key: bytes, value: bytes | None) -> None:
        self.count += 1
        if self.keep:
            self.records.append(("state", partition, key, _state_doc(value)))

    def check(self) -> None:
        pass


def _state_doc(raw: bytes | None) -> bytes | None:
    """A state record as its decoded document without the wall-clock write time, in one canonical JSON form."""
    if raw is None:
        return None
    doc = orjson.loads(raw)
    doc.pop("a", None)
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


class Table:
    """What TableStore needs of a faust table with a RocksDB store: one database per partition."""

    def __init__(self, directory: Path) -> None:
        self.data = self
        self.changelog_topic = self
        # opened as faust's store opens them (raw mode, the processors' sizes: store.ROCKSDB_OPTIONS)
        options = RocksDBOptions(**ROCKSDB_OPTIONS, use_rocksdict=True)
        self._dbs = {p: options.open(directory / str(p)) for p in range(PARTITIONS)}

    def get_topic_name(self) -> str:
        return "visitor-state-changelog"

    def _db_for_partition(self, partition: int) -> Rdict:
        return self._dbs[partition]

    def close(self) -> None:
        for db in self._dbs.values():
            db.close()


def raw_messages(n_events: int) -> list[Msg]:
    offsets = [0] * PARTITIONS
    out = []
    for m in workload(n_events):
        p = zlib.crc32(m.key) % PARTITIONS
        out.append(Msg("raw", p, offsets[p], 0.0, m.key, m.value))
        offsets[p] += 1
    return out


def run(messages: list[Msg], batch: int, keep: bool) -> tuple[float, Outputs]:
    """CPU seconds of processing `messages` in batches on fresh state, and what was produced."""
    with tempfile.TemporaryDirectory(prefix="bench-process-") as tmp:
        table = Table(Path(tmp))
        outputs = Outputs(keep)
        settings = Settings(postgres_dsn="postgresql://unused", log_level="WARNING")
        processor = BatchProcessor(settings, TableStore(table, outputs, rocksdb=True), outputs)  # type: ignore[arg-type]
        started = time.process_time()
        for i in range(0, len(messages), batch):
            processor.process(messages[i : i + batch])
        elapsed = time.process_time() - started
        if keep:
            for replay in (messages[:1000], messages[:1000][::-1], messages[::3]):
                for i in range(0, len(replay), batch):
                    processor.process(replay[i : i + batch])
        table.close()
    return elapsed, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=2_000, help="messages per process() call")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--digest", action="store_true", help="hash of every output and state write")
    parser.add_argument("--default-gc", action="store_true", help="CPython's GC thresholds, not the worker's")
    args = parser.parse_args()
    if not args.default_gc:
        tune_gc()  # as the worker does at start-up (stream_processors/main.py)
    messages = raw_messages(args.events)
    events = args.events
    if args.digest:
        _, outputs = run(messages, args.batch, keep=True)
        # in order per topic (the enriched events and the changelog go through different producers)
        per_topic: dict[str, Any] = {}
        for record in outputs.records:
            per_topic.setdefault(record[0], hashlib.sha256()).update(repr(record).encode())
        h = hashlib.sha256(repr(sorted((topic, d.hexdigest()) for topic, d in per_topic.items())).encode())
        print(f"digest {h.hexdigest()} of {len(outputs.records)} records")
        return
    times = sorted(run(messages, args.batch, keep=False)[0] for _ in range(args.repeat))
    print(
        f"process(): {events} events in {len(messages)} messages, batches of {args.batch}: "
        f"µs per event (CPU) best {times[0] / events * 1e6:.2f}, all {[round(t / events * 1e6, 2) for t in times]}"
    )


if __name__ == "__main__":
    main()
