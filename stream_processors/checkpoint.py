"""The commit story of the processors, told once: when an offset of the raw topic may be committed, what makes it
safe, and what a kill at each point means. `Checkpoint` is the one step that runs right before every commit.

Like quix-streams' `Checkpoint` and arroyo's "commit is the last step": flush the outputs and the state, then
commit. faust owns the consumer group and the commit; `transport.py` (the one module patching faust and
aiokafka) calls `Checkpoint.flush` right before faust commits and hands over the offsets faust would commit
without having processed them.

1. **Consume.** faust's fetch loop reads raw messages and queues them on the agent's stream; the agent
   (`app.py`) takes them in batches (`take_events`: up to `processors_batch_max_messages`, or what arrived
   within `processors_batch_max_s`).
2. **Process.** `BatchProcessor.process` (`processor.py`) decodes the batch, checks the dead-letter limit
   (past it: exit 65, below), places each visitor's events and writes its state to the local store (RocksDB).
   Enriched events, identity links and dead letters go to `Outputs`' producer, each state write to the table's
   changelog through `Outputs`' state producer (`outputs.py`) — all handed over without waiting. faust acks the
   batch's messages when the agent returns; acked offsets are what faust may commit.
3. **Repair skipped offsets.** Before faust computes an offset to commit (`transport.Consumer._new_offset`),
   every offset between the committed one and the highest acked one that was never acked — a message faust
   dropped around a rebalance or a flow suspension, or recorded as a gap — goes to `repair.SkippedReader`,
   which reads those messages from Kafka and processes them like the agent (step 2), or exits 75 if it
   cannot read them in time. So does every offset faust delivered to the agent's queue and then lost with
   nothing acked after it (`transport.Consumer.process_lost`, at the start of every commit: faust's recovery
   empties the queues when it resumes flow control), which would otherwise never be committed past and leave
   the worker idle on them. Their outputs join everyone else's.
4. **Flush (this module).** Every few seconds, on rebalance and on shutdown, faust commits; right before, the
   transport runs `Checkpoint.flush`: `Outputs.deliver` blocks until every record produced so far (outputs,
   dead letters, changelog) is acknowledged — a record the broker can never take is dead-lettered first, one
   lost for good makes the process exit 75 — and then `TableStore.record_persisted_offsets` records the
   delivered changelog offsets in RocksDB, so a restart's recovery reads only the changelog written after them.
5. **Commit.** faust commits the acked offsets. Every output and state write of those messages is durable.

A kill (or an exit without committing: `exit_without_committing`, status 75 for lost records or skipped messages
not read, 65 for the dead-letter limit) at any point before step 5 commits nothing new: the next worker re-reads
every message after the last commit. Its outputs are the same records again (deterministic ids: the sink writes
them once) and its state writes change nothing a second time (an event already placed is a copy: stamped as its
first copy, deriving nothing new — `state.py`). Killed during step 4, some records are durable and the offsets
are not: the same duplicates. Killed after step 5, nothing is redone. At-least-once into Kafka, exactly once in
Postgres. `exactly_once` (Kafka transactions) is not used: faust's has open rebalance bugs.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:  # outputs.py and store.py import this module (exit_without_committing)
    from stream_processors.outputs import Outputs
    from stream_processors.store import TableStore

log = logging.getLogger(__name__)

# Exit status when records could not be delivered or skipped messages not read: a restart redoes them.
EXIT_DELIVERY_FAILED = 75


class Checkpoint:
    """Step 4 of the commit story: makes everything processed so far durable, or ends the process."""

    def __init__(self, outputs: Outputs, store: TableStore) -> None:
        self.outputs = outputs
        self.store = store

    def flush(self) -> None:
        """Blocks until every output and changelog record produced so far is delivered (or dead-lettered), then
        records the delivered changelog offsets as the store's recovery start. Exits (75) if a record is lost for
        good; returns only when faust may commit every offset acked so far."""
        self.outputs.deliver()
        self.store.record_persisted_offsets()  # after deliver: those offsets are durable


def exit_without_committing(status: int, message: str, **extra: Any) -> NoReturn:
    """Logs `message` (critical, with `extra`) and ends the process at once: no faust shutdown runs, so neither
    the checkpoint nor an offset commit does. The next worker redoes everything after the last commit."""
    log.critical(message, extra=extra)
    logging.shutdown()
    os._exit(status)
