"""Where the processors keep visitor state: a faust table whose store is RocksDB on local disk (default) or
memory, with every write also sent to the table's compacted changelog by `Outputs`.

The processor reads and writes state outside faust's table API, by partition: faust's `table[key]` picks
the partition of the "current event", which in a `take()` batch is merely the batch's last one, so a
visitor's record would land in another partition's store and changelog. Values are the state document as
JSON bytes, the same bytes in the local store and in the changelog, so faust's recovery (which copies
changelog records into the store as they are) restores exactly what was written.

RocksDB (`rocksdb://`, the `rocksdict` binding): state lives on disk, one database per partition under
`<data_dir>/processors`; RSS stays bounded by the memtables and the block cache (sizes below), not by the
number of visitors. After a restart faust restores a partition from the local database and reads only the
changelog written since the last offset it recorded as applied (`persisted_offset`). Our changelog records go
through the processors' own producer, not faust's, so faust never learns their offsets itself: `Outputs`
reports them once delivered and `record_persisted_offsets` (a commit barrier, after `Outputs.deliver`) stores
them, so recovery after a SIGKILL reads only the tail written since the last commit.

Memory (`memory://`): the state is rebuilt from the whole changelog on every start; kept for comparison.

Expiry (`expire`): a visitor idle (no event processed) for longer than `processors_state_horizon_s` loses its
sessions and recent event ids; its identity links are kept (a links-only document, at most
`processors_max_links` entries), so later events keep their contact. A visitor without links is deleted with a
changelog tombstone, so neither recovery nor compaction brings it back. The document records when it was last
written (`"a"`, wall-clock µs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import faust
import orjson
from faust.types import TP, TableT

from stream_processors import metrics
from stream_processors.outputs import Outputs
from stream_processors.transport import rocksdb_partition, rocksdb_partition_open

log = logging.getLogger(__name__)


# RocksDB sizes per partition database: faust's defaults (64 MiB write buffers x3, a 2 GiB block cache each)
# would let RSS grow to gigabytes; visitor documents are small and read once per batch.
# Per partition database at most 2 x 2 MiB of memtables and a 4 MiB block cache: 48 MiB for 6 partitions.
ROCKSDB_OPTIONS: dict[str, Any] = {
    "write_buffer_size": 2 << 20,
    "max_write_buffer_number": 2,
    "target_file_size_base": 16 << 20,
    "block_cache_size": 4 << 20,
    "block_cache_compressed_size": 0,
    "max_open_files": 256,
}


def is_rocksdb(url: str) -> bool:
    return url.startswith("rocksdb:")


def table_options(url: str) -> dict[str, Any] | None:
    """faust Table `options` for the store URL (RocksDB tuning; faust pops some keys, so a fresh dict)."""
    return {**ROCKSDB_OPTIONS, "driver": "rocksdict"} if is_rocksdb(url) else None


class TableStore:
    """Visitor state by (key, partition). Each write is a changelog record on the key's own partition (the
    table is co-partitioned with the raw topic), flushed with the outputs before every offset commit."""

    def __init__(self, table: TableT, outputs: Outputs, rocksdb: bool) -> None:
        self.table = table
        self.outputs = outputs
        self.rocksdb = rocksdb
        self.changelog = table.changelog_topic.get_topic_name()
        self._cursors: dict[int, bytes | None] = {}  # expiry scan position per partition
        # RocksDB documents are decoded anew on every get: the processor may change them in place.
        self.fresh_docs = rocksdb

    # --- reads and writes (the processor, the erasure agent) ---------------------------------------

    def get(self, key: bytes, partition: int) -> dict[str, Any] | None:
        if self.rocksdb:
            raw = self._db(partition).get(key)
            return None if raw is None else orjson.loads(raw)
        return self.table.data.get(key)

    def put(self, key: bytes, partition: int, doc: dict[str, Any]) -> None:
        raw = orjson.dumps(doc | {"a": time.time_ns() // 1000})  # a copy: callers may pass shared constants
        if self.rocksdb:
            self._db(partition).put(key, raw)
        else:
            self.table.data[key] = doc
        self.outputs.send_state(self.changelog, partition, key, raw)

    def has_key_prefix(self, partition: int, prefix: bytes) -> bool | None:
        """Whether any key of the partition's state starts with `prefix` (one seek in RocksDB); None for memory://,
        which cannot tell without a scan."""
        if not self.rocksdb:
            return None
        it = self._db(partition).iter()
        it.seek(prefix)
        found = bool(it.valid() and it.key().startswith(prefix))
        del it
        return found

    def delete(self, key: bytes, partition: int) -> None:
        if self.rocksdb:
            self._db(partition).delete(key)
        else:
            self.table.data.pop(key, None)
        self.outputs.send_state(self.changelog, partition, key, None)

    def _db(self, partition: int) -> Any:
        # faust's RocksDB store (faust.stores.rocksdb.Store) behind the table: its per-partition databases are
        # private (transport.py, the one module touching faust's internals, checks them at start-up)
        return rocksdb_partition(self.table.data, partition)

    # --- persisted offsets (RocksDB recovery reads only the changelog tail) ---------------------------

    def record_persisted_offsets(self) -> None:
        """Commit barrier, after `Outputs.deliver`: the changelog offsets delivered so far are applied in the
        local store (written before they were sent), so recovery may start after them."""
        offsets = self.outputs.take_state_offsets()
        if not self.rocksdb:
            return
        data: Any = self.table.data  # faust.stores.rocksdb.Store (typed StoreT, without set_persisted_offset)
        for (topic, partition), offset in offsets.items():
            if rocksdb_partition_open(data, partition):  # not a partition revoked meanwhile (would reopen it)
                data.set_persisted_offset(TP(topic, partition), offset)

    # --- expiry -------------------------------------------------------------------------------------

    def active_partitions(self, app: faust.App) -> list[int]:
        topic = self.changelog
        return sorted(tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic)

    def expire(self, partitions: list[int], horizon_s: float, max_keys: int) -> int:
        """Scans up to `max_keys` visitor records (round-robin over the partitions, resuming where the last
        scan stopped) and drops the session state of those idle for longer than `horizon_s`. Returns how many
        were expired. Only for RocksDB (memory:// keeps everything)."""
        if not self.rocksdb or not partitions:
            return 0
        cutoff = time.time_ns() // 1000 - int(horizon_s * 1_000_000)
        per_partition = max(1, max_keys // len(partitions))
        expired = 0
        for partition in partitions:
            for key, raw in self._scan(partition, per_partition):
                doc = orjson.loads(raw)
                if not _expirable(doc, cutoff):
                    continue
                links = doc.get("l")
                if links:
                    self.put(key, partition, {"s": [], "l": links, "e": [], "x": True})
                    metrics.STATE_EXPIRED.labels("links_kept").inc()
                else:
                    self.delete(key, partition)
                    metrics.STATE_EXPIRED.labels("deleted").inc()
                expired += 1
        return expired

    def _scan(self, partition: int, limit: int) -> Iterator[tuple[bytes, bytes]]:
        """Up to `limit` (key, value) records of one partition's database from the saved cursor on; wraps
        around at the end. Collected first, so deletes do not disturb the iterator."""
        db = self._db(partition)
        it = db.iter()
        cursor = self._cursors.get(partition)
        if cursor is None:
            it.seek_to_first()
        else:
            it.seek(cursor)
        out: list[tuple[bytes, bytes]] = []
        while it.valid() and len(out) < limit:
            key = it.key()
            if not key.startswith(b"__faust"):
                out.append((key, it.value()))
            it.next()
        self._cursors[partition] = it.key() if it.valid() else None
        del it
        return iter(out)


def _expirable(doc: dict[str, Any], cutoff_us: int) -> bool:
    """Idle since before the cutoff, holds session state, and is a visitor (erasure records never expire)."""
    if doc.get("erased") or doc.get("x"):
        return False
    return int(doc.get("a", 0)) < cutoff_us
