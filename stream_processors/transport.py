"""faust's aiokafka transport with three additions: a fetch wait from our settings, commit barriers, and a
repair for offsets faust would commit without having processed them.

* faust creates its worker consumer with a fixed `fetch_max_wait_ms=1500`. Kafka answers a fetch as soon as
  data is there, so on a busy Kafka cluster that number only bounds idle polling; a broker that holds
  fetches for part of the wait (the embedded Tansu does) turns it straight into latency on the
  raw -> enriched hop. `consumer_fetch_wait_max_ms` is the same bound the sink's consumer uses.
* faust flushes its own producer before it commits offsets, but knows nothing of the processors'
  confluent-kafka producer. `App.commit_barriers` run right before every offset commit (periodic,
  rebalance, shutdown): the processors' one barrier is `checkpoint.Checkpoint.flush` (the commit story,
  told once: `checkpoint.py`).
* faust computes the offset to commit from the offsets its streams acked, and commits past offsets that were
  never processed in two ways: it compares the first acked offset with the committed one off by one
  (`min(acked) - committed > 1`), so a message *at* the committed offset that never reached the agent is
  committed past; and it fills "gaps" into the acked offsets — offsets its fetch loop did not see delivered
  (`Consumer._add_gap`, meant for compaction and transaction markers), which also include messages faust
  itself dropped (records taken from the fetcher but not handed on around a rebalance or a flow suspension).
  Either way the message is lost for good. `Consumer._new_offset` hands every offset between the committed
  one and the highest acked one that was not acked, gaps included, to `App.skipped_offsets_handler`
  (`repair.SkippedReader`), which reads them from Kafka and processes those that exist, before faust computes
  the commit; the handler either processes them all or ends the process without committing. Their outputs
  are flushed by the checkpoint like every other output.

  Cause of the loss of one acknowledged request after a processors kill (issue 8, case 16): the first
  version of this repair only looked at offsets below the first acked one and skipped those faust had
  recorded as gaps. After a restart the group rebalanced while records were in flight; the message faust
  dropped *after* the first acked one was recorded as a gap (one missing offset between two delivered ones),
  so faust committed past it while the repair, firing for a message at the head, never looked at it.

* A message can also be lost *after* the fetch loop delivered it to the agent's queue. mode's
  `FlowControlEvent.resume()` empties every agent queue, and faust's table recovery calls it after it has
  resumed the consumer's flow and sought the stream partitions to their committed offsets: what the fetch loop
  delivered in between (it runs as soon as the flow is resumed) is dropped, while the Kafka consumer's position
  is already past it, so it is never fetched again. The stream also skips, unacked, an event whose fetch-time
  consumer generation is not the current one. Below a later acked offset such a loss is a hole the repair above
  sees; at the tail of a partition nothing later is acked, so faust never commits past it and the worker sits
  idle until its next restart. The restart test caught that after a SIGKILL restart (about one CI run in ten,
  more on a loaded machine): a worker healthy and idle for a minute, one partition's consumer position at the
  end of the log, its messages delivered, its queue empty, nothing acked past the first two. So
  `Consumer.force_commit` (every commit while flow control is active: the periodic one, every few seconds)
  first runs `process_lost`: per partition, with none of its messages waiting in the agent's queue (one queue
  for all partitions: the messages in it are looked at) or taken and not yet acked, every offset delivered
  while it is assigned, from the committed one on, must be acked; those that are not go to the same handler,
  and the commit moves past them. A partition the group never committed (faust keeps no committed offset for
  it, nor for a committed 0) is checked from the log's start offset, by both repairs: faust would otherwise
  commit past a lost head as soon as a later offset is acked. This relies on faust's compiled stream iterator,
  which leaves the events it skips unacked (its pure-Python one acks them: checked at start-up).

* Throughput (issue 14): faust's fetch loop (`Consumer._drain_messages`) hands every message to the conductor
  through `Service.wait_first(callback(message), self.suspend_flow.wait())`, which wraps both in tasks, adds two
  more for the service's `_stopped`/`_crashed` events, waits for the first and cancels the other three: five
  tasks, an `asyncio.wait` and three cancellations per message (a large share of a worker: bench/README.md).
  The callback (decode the key/value, put the event in the stream's queue) almost always finishes without
  suspending, so
  `Consumer.wait_first` runs it to its first suspension first; if it finished, that is the result
  `wait_first` would have returned (flow not suspended, service neither stopping nor crashed: checked before),
  with none of the tasks. If it suspends (the stream's buffer is full), the suspended callback continues under
  faust's own `wait_first` as before (`_continue`), so a flow suspension still interrupts it.

The processors' state store (`store.py`) reads faust's RocksDB table store's per-partition databases directly
(`rocksdb_partition`, `rocksdb_partition_open`: `Store._db_for_partition`, `Store._dbs`).

This module overrides private parts of faust and aiokafka: `check_internals()` fails start-up with a clear
message if an installed version lacks them (pyproject pins the versions it was written against).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import logging
import types
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import aiokafka
import faust
import faust.stores.rocksdb
import faust.streams
import faust.transport.conductor
import faust.transport.consumer
import mode
from faust.transport.drivers import aiokafka as driver
from faust.types import TP
from mode.services import WaitResults

log = logging.getLogger(__name__)


class SkippedOffsetsHandler(Protocol):
    """Processes messages faust would commit past without having processed them (`repair.SkippedReader`)."""

    def handles(self, topic: str) -> bool:
        """Whether messages of `topic` are this handler's (the topics an agent consumes)."""

    def __call__(self, topic: str, partition: int, offsets: list[int]) -> None:
        """Processes the messages at `offsets` (sorted) of that partition of a topic it handles (some offsets may
        hold no message); returns once they are all processed, never having processed only part of them (it
        ends the process instead)."""


# The private parts of faust and aiokafka this module relies on (see check_internals).
_FAUST_CONSUMER_METHODS = ("_new_offset", "_commit", "_new_consumer_thread", "_add_gap", "force_commit", "perform_seek")
_FAUST_CONSUMER_STATE = ("_acked", "_acked_index", "_committed_offset", "_gap", "_unacked_messages", "callback")
_FAUST_THREAD_METHODS = ("_create_worker_consumer",)


def check_internals() -> None:
    """Fails fast, with a clear message, if the installed faust/aiokafka lack what this module overrides."""
    missing = [f"faust Consumer.{name}" for name in _FAUST_CONSUMER_METHODS if not hasattr(driver.Consumer, name)]
    missing += [
        f"faust AIOKafkaConsumerThread.{name}"
        for name in _FAUST_THREAD_METHODS
        if not hasattr(driver.AIOKafkaConsumerThread, name)
    ]
    init_source = _source(faust.transport.consumer.Consumer.__init__)
    missing += [f"faust Consumer().{name}" for name in _FAUST_CONSUMER_STATE if f"self.{name} =" not in init_source]
    if "self._tp_index =" not in _source(faust.transport.conductor.Conductor.__init__):
        missing.append("faust Conductor()._tp_index")
    if "callback = self.callback" not in _source(faust.transport.consumer.Consumer._drain_messages):
        missing.append("faust Consumer._drain_messages reading self.callback")
    if not hasattr(asyncio.Queue(), "_queue"):
        missing.append("asyncio Queue()._queue")
    if faust.streams._CStreamIterator is None:
        # faust's pure-Python stream iterator acks the events it skips (stale generation, flow suspended):
        # committed past unprocessed, out of sight of both repairs. The compiled one leaves them unacked.
        missing.append("faust's compiled stream iterator (faust._cython.streams)")
    if not hasattr(faust.stores.rocksdb.Store, "_db_for_partition") or "self._dbs =" not in _source(
        faust.stores.rocksdb.Store.__init__
    ):
        missing.append("faust stores.rocksdb.Store._db_for_partition/_dbs")
    if "self.suspend_flow.wait()" not in _source(faust.transport.consumer.Consumer._drain_messages):
        missing.append("faust Consumer._drain_messages calling wait_first(callback(message), suspend_flow.wait())")
    if not all(f"self.{name} =" in _source(mode.Service.__init__) for name in ("_stopped", "_crashed")):
        missing.append("mode Service()._stopped/_crashed")
    if "self._fetch_max_wait_ms" not in _source(aiokafka.AIOKafkaConsumer.__init__):
        missing.append("aiokafka AIOKafkaConsumer()._fetch_max_wait_ms")
    if missing:
        raise RuntimeError(
            "stream_processors.transport overrides private parts of faust-streaming/aiokafka that the installed "
            f"versions (faust-streaming {_version('faust-streaming')}, aiokafka {_version('aiokafka')}) lack: "
            f"{', '.join(missing)}. Install the versions pinned in pyproject.toml, or port transport.py."
        )


def _source(obj: Any) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Read by AIOKafkaConsumer.start() when it builds its fetcher; no constructor hook is left to us.
        consumer._fetch_max_wait_ms = self.app.fetch_wait_max_ms  # type: ignore[attr-defined]
        return consumer


class Consumer(driver.Consumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Per partition, the highest offset whose message faust's fetch loop handed to the agents' queues while the
        # partition is assigned: what `_lost_offsets` checks against. Kept across faust's seeks back to the
        # committed offset: a queue cleared after the seek (what lost messages here) loses messages delivered
        # before it.
        self._delivered: dict[TP, int] = {}
        # Per partition the group never committed (faust's committed offset is None; also for a committed 0): the
        # offset its messages start at, from which `_lost_offsets` and `_new_offset` check instead. The log's
        # start offset (`perform_seek`), else the first offset delivered.
        self._floor: dict[TP, int] = {}
        self.callback = self._recording_delivery(self.callback)

    def _recording_delivery(self, deliver: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Any]:
        delivered, floor = self._delivered, self._floor

        async def on_message(message: Any) -> None:
            # Recorded first: a delivery that is cancelled or fails may have queued the message all the same.
            tp, offset = message.tp, message.offset
            if offset > delivered.get(tp, -1):
                delivered[tp] = offset
            if tp not in floor:
                floor[tp] = offset
            await deliver(message)

        return on_message

    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def wait_first(self, *coros: Any, timeout: Any = None) -> WaitResults:
        """faust's `wait_first`, with a fast path for the fetch loop's call (see the module docstring)."""
        flow = self.suspend_flow
        if (
            timeout is None
            and len(coros) == 2
            and inspect.iscoroutine(coros[0])
            and _waits_on(coros[1], flow)
            and not flow.is_set()
            and not self._stopped.is_set()
            and not self._crashed.is_set()
        ):
            callback, suspended = coros
            try:
                yielded = callback.send(None)
            except StopIteration as finished:  # done without suspending: what wait_first would return
                suspended.close()
                return WaitResults([callback], [finished.value], False)
            except BaseException:
                suspended.close()
                raise
            coros = (_continue(callback, yielded), suspended)
        return await super().wait_first(*coros, timeout=timeout)

    async def on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
        # faust logs rebalances only at INFO, which site_activity.logs silences for faust; ops (and a failed
        # restart test) need to see when a worker got which partitions.
        log.info(
            "partitions assigned",
            extra={"generation": generation_id, "partitions": _tps(assigned)},
        )
        await super().on_partitions_assigned(assigned, generation_id)

    async def perform_seek(self) -> None:
        # faust seeks its stream partitions to the committed offsets once their tables are recovered.
        await super().perform_seek()
        handler: SkippedOffsetsHandler | None = self.app.skipped_offsets_handler  # type: ignore[attr-defined]
        never_committed = [
            tp
            for tp in self.assignment()
            if self._committed_offset.get(tp) is None and handler is not None and handler.handles(tp.topic)
        ]
        if never_committed:
            # A partition the group never committed is read from the log's start (auto_offset_reset=earliest).
            try:
                self._floor.update(await self.earliest_offsets(*never_committed))
            except Exception as exc:  # the first offset delivered stands in (recorded on delivery)
                log.warning("could not read the log start offsets", extra={"error": repr(exc)})
        log.info(
            "resuming from the committed offsets",
            extra={"committed": _tps(self._committed_offset), "never_committed_from": _tps(self._floor)},
        )

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        log.info("partitions revoked", extra={"partitions": _tps(revoked)})
        for tp in revoked:
            self._delivered.pop(tp, None)
            self._floor.pop(tp, None)
        await super().on_partitions_revoked(revoked)

    async def force_commit(self, topics: Any = None, start_new_transaction: bool = True) -> bool:
        # Every commit goes through here: messages faust lost after delivering them are processed first, so the
        # commit can move past them (and the worker does not sit idle on them until its next restart). Not while
        # flow control is suspended (a rebalance or a shutdown, which empty the queues on purpose: the next
        # owner of a partition reads on from the committed offset).
        if self.app.flow_control.is_active():
            self.process_lost()
        did_commit: bool = await super().force_commit(topics, start_new_transaction=start_new_transaction)
        return did_commit

    def process_lost(self) -> None:
        """Processes, and acks, the messages of every partition that `_lost_offsets` finds lost."""
        busy = self._partitions_in_progress()
        for tp in list(self._delivered):
            if tp not in busy:
                lost = self._lost_offsets(tp)
                if lost:
                    self._process_skipped(tp, lost, "delivered to the agent's queue but never processed")

    def _partitions_in_progress(self) -> set[TP]:
        """The partitions with a message waiting in an agent's queue, or taken by an agent and not yet acked."""
        busy = {message.tp for message in list(self._unacked_messages) if not message.acked}
        channels = {channel for channels in self.app.topics._tp_index.values() for channel in channels}  # type: ignore[attr-defined]
        for channel in channels:  # one queue per agent, shared by all its partitions
            busy.update(event.message.tp for event in list(channel.queue._queue) if hasattr(event, "message"))
        return busy

    def _lost_offsets(self, tp: TP) -> list[int]:
        """Offsets of `tp` that faust delivered (up to `_delivered[tp]`) but never acked, for a partition with
        nothing in progress (`_partitions_in_progress`): then every delivered offset from the committed one on
        must have been acked; one that was not was dropped between the fetch loop and the agent (see the module
        docstring). After faust seeks back, an offset it is about to deliver again can count as lost too: it is
        then processed twice, which changes nothing (outputs and state writes are idempotent: checkpoint.py).
        """
        delivered, start = self._delivered.get(tp), self._start(tp)
        if delivered is None or start is None or delivered < start:
            return []
        return unacked_offsets([*self._acked[tp], delivered + 1], start)

    def _start(self, tp: TP) -> int | None:
        """The offset `tp`'s unprocessed messages start at: the committed one, or for a partition never committed
        its floor."""
        committed = self._committed_offset.get(tp)
        return committed if committed is not None else self._floor.get(tp)

    async def _commit(self, offsets: Mapping[Any, int]) -> bool:
        for barrier in self.app.commit_barriers:  # type: ignore[attr-defined]
            barrier()
        return await super()._commit(offsets)

    def _new_offset(self, tp: TP) -> int | None:
        acked, start = self._acked[tp], self._start(tp)
        if acked and start is not None:
            missing = unacked_offsets(acked, start)
            if missing:
                self._process_skipped(tp, missing, "below the highest acked offset")
        return super()._new_offset(tp)

    def _process_skipped(self, tp: TP, missing: list[int], why: str) -> None:
        """Has the handler process the messages at `missing` (sorted offsets of `tp`, none acked) and acks
        them, so faust's commit covers them; returns only once they are processed (or the handler ended the
        process). Partitions of topics the handler does not take are left to faust."""
        handler: SkippedOffsetsHandler | None = self.app.skipped_offsets_handler  # type: ignore[attr-defined]
        if handler is None or not handler.handles(tp.topic):
            return
        acked = self._acked[tp]
        log.warning(
            "faust would commit past messages that were never processed; processing them now",
            extra={
                "topic": tp.topic,
                "partition": tp.partition,
                "why": why,
                "first": missing[0],
                "last": missing[-1],
                "offsets": len(missing),
                "committed": self._committed_offset[tp],
                "first_acked": min(acked, default=None),
                "recorded_as_gap": sum(1 for offset in missing if self._gap[tp].overlaps(offset)),
            },
        )
        handler(tp.topic, tp.partition, missing)  # returns only once they are processed
        acked.extend(missing)
        acked.sort()
        self._acked_index[tp].update(missing)
        # faust would add these again from its gap records (duplicates in `acked` end its consecutive run early);
        # they are handled now.
        self._gap[tp].chop(missing[0], missing[-1] + 1)


def rocksdb_partition(store: Any, partition: int) -> Any:
    """The RocksDB database of one partition of faust's RocksDB table store (`faust.stores.rocksdb.Store`, whose
    `_db_for_partition` is private): the processors' state store reads and writes it directly (store.py), one
    call per visitor instead of faust's per-key table machinery. Opens the database if it is not open."""
    return store._db_for_partition(partition)


def rocksdb_partition_open(store: Any, partition: int) -> bool:
    """Whether faust's RocksDB table store has the partition's database open (its private `_dbs`): false once the
    partition is revoked, when opening it again would be wrong."""
    return partition in store._dbs


def _tps(tps: Any) -> dict[str, Any]:
    """TPs (a set, or a mapping to offsets) as {"topic[partition]": offset or None}, for a log line."""
    items = tps.items() if isinstance(tps, Mapping) else ((tp, None) for tp in tps)
    return {f"{tp.topic}[{tp.partition}]": offset for tp, offset in sorted(items)}


def _waits_on(coro: Any, event: Any) -> bool:
    """Whether `coro` is `event.wait()`, not started yet."""
    frame = getattr(coro, "cr_frame", None)
    return frame is not None and coro.cr_code is type(event).wait.__code__ and frame.f_locals.get("self") is event


async def _continue(coro: Any, yielded: Any) -> Any:
    """`coro`, already run to its first suspension (where it yielded `yielded`), run on to its end: a coroutine
    that a Task (faust's `wait_first`) can drive and cancel like the original."""
    return await _resume(coro, yielded)


@types.coroutine
def _resume(coro: Any, yielded: Any) -> Any:
    # What `await` does for the suspended coroutine: pass what it yields up to the task, and what the task
    # sends or throws back down, until it returns.
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation and the like: the coroutine decides
            try:
                yielded = coro.throw(exc)
            except StopIteration as finished:
                return finished.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as finished:
                return finished.value


def unacked_offsets(acked: list[int], committed: int) -> list[int]:
    """The offsets from `committed` (the next offset to read) up to the highest acked one that were not acked:
    messages that never reached the agent, or offsets without a message (which reading the log reveals)."""
    have = set(acked)
    return [offset for offset in range(committed, max(acked)) if offset not in have]


class Transport(driver.Transport):
    Consumer = Consumer


class App(faust.App):
    """A faust App whose Kafka consumer fetches with `fetch_wait_max_ms`, honours `commit_barriers` and
    hands skipped offsets to `skipped_offsets_handler`."""

    def __init__(self, *args: Any, fetch_wait_max_ms: int, **kwargs: Any) -> None:
        self.fetch_wait_max_ms = fetch_wait_max_ms
        # Called, in order, before every offset commit; each must return only once the outputs of all the
        # messages processed so far are durable (or end the process).
        self.commit_barriers: list[Callable[[], None]] = []
        self.skipped_offsets_handler: SkippedOffsetsHandler | None = None
        self.state_store: Any = None  # stream_processors.store.TableStore, set by create_app
        check_internals()
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)
