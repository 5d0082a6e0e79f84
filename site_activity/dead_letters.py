"""The dead-letter contract shared by every stage: the original key and value, and why, in headers; and the one
policy for produce errors: which ones mean "this record can never be written" (dead-letter it, move on) rather
than "not now" (retry, or exit without committing so a restart redoes it); the reasons every stage uses; and the
limit after which a stage stops instead of dead-lettering a whole stream (arroyo's `DlqLimit`)."""

from __future__ import annotations

from collections import deque
from enum import StrEnum

from confluent_kafka import KafkaError

from site_activity.settings import Settings


class Reason(StrEnum):
    """Why a record was dead-lettered: the start of every `x-reason` header ("<reason>: <detail>") and the
    `reason` label of every stage's dead-letter counter."""

    UNDECODABLE = "undecodable"  # not an Avro message of a known writer schema
    INVALID_EVENT = "invalid_event"  # decodes, but breaks a rule the ingest API enforces
    DB_REJECTED = "db_rejected"  # Postgres refused the row's data
    UNWRITABLE_OUTPUT = "unwritable_output"  # a derived record the broker can never take (size, validation)


def reason_text(reason: Reason, detail: str) -> str:
    """The `x-reason` header value: the reason, then what exactly went wrong."""
    return f"{reason.value}: {detail}"


# Exit status of a stage the dead-letter limit stopped (EX_DATAERR): nothing of the batch was committed, so a
# restart reads the same messages again.
EXIT_DEAD_LETTER_LIMIT = 65


class DeadLetterLimitExceeded(RuntimeError):
    """Too many invalid records: the stage must stop without committing, not dead-letter the stream."""


class DeadLetterLimit:
    """Stops a stage whose input has turned invalid wholesale — a bad deploy of a producer or a schema, a
    database refusing every row — instead of moving the whole stream to the dead-letter topic and committing
    past it (arroyo's `DlqLimit`). One bad message among good ones is still dead-lettered and passed.

    Two rules, each off when 0: more than `max_consecutive` invalid records in a row (counted per batch: a
    batch with any valid record ends the run), or an invalid share above `max_ratio` over the last `window`
    records (judged once that many were seen). A record is whatever the stage counts as one, the same for
    valid and invalid (the sink counts messages). `check()` raises `DeadLetterLimitExceeded` before the batch
    is dead-lettered; the caller exits without committing it, so its records are read again by the next run.
    `add()` counts a batch once it is committed (a retried or redelivered batch counts once). The counts live
    in the process: each restart starts from zero."""

    @classmethod
    def from_settings(cls, settings: Settings) -> DeadLetterLimit:
        return cls(
            settings.dead_letter_max_consecutive, settings.dead_letter_max_ratio, settings.dead_letter_ratio_window
        )

    def __init__(self, max_consecutive: int, max_ratio: float, window: int) -> None:
        self.max_consecutive = max_consecutive
        self.max_ratio = max_ratio
        self.window = window
        self.consecutive = 0
        self._batches: deque[tuple[int, int]] = deque()  # (valid, invalid) per batch, oldest first
        self._valid = self._invalid = 0

    def check(self, valid: int, invalid: int) -> None:
        """Raises `DeadLetterLimitExceeded` if a batch of `valid` and `invalid` records would pass a limit; counts
        nothing (call `add` once the batch is committed, so a batch retried or redelivered counts once)."""
        consecutive = self._consecutive_after(valid, invalid)
        if self.max_consecutive and consecutive > self.max_consecutive:
            raise DeadLetterLimitExceeded(f"{consecutive} invalid records in a row (limit {self.max_consecutive})")
        _, total_valid, total_invalid = self._window_after(valid, invalid)
        seen = total_valid + total_invalid
        if self.max_ratio and self.window and seen >= self.window and total_invalid / seen > self.max_ratio:
            raise DeadLetterLimitExceeded(
                f"{total_invalid} of the last {seen} records invalid ({total_invalid / seen:.0%}, limit "
                f"{self.max_ratio:.0%})"
            )

    def add(self, valid: int, invalid: int) -> None:
        """Counts a committed batch."""
        self.consecutive = self._consecutive_after(valid, invalid)
        dropped, self._valid, self._invalid = self._window_after(valid, invalid)
        self._batches.append((valid, invalid))
        for _ in range(dropped):
            self._batches.popleft()

    def _consecutive_after(self, valid: int, invalid: int) -> int:
        return self.consecutive + invalid if valid == 0 else 0

    def _window_after(self, valid: int, invalid: int) -> tuple[int, int, int]:
        """With this batch added: how many of the oldest batches leave the window, and its valid/invalid totals
        (the window keeps the fewest newest batches holding at least `window` records)."""
        total_valid, total_invalid = self._valid + valid, self._invalid + invalid
        dropped = 0
        for old_valid, old_invalid in self._batches:  # oldest first; the new batch always stays
            if total_valid + total_invalid - old_valid - old_invalid < self.window:
                break
            total_valid, total_invalid, dropped = total_valid - old_valid, total_invalid - old_invalid, dropped + 1
        return dropped, total_valid, total_invalid


# Errors about the record itself: retrying the same bytes can never succeed.
UNWRITABLE = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,  # bigger than the producer's message.max.bytes or the topic's limit
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,  # the broker's validation of the record (e.g. a compacted topic without a key)
    }
)
# Room left in a message for the record framing and the dead-letter headers.
_OVERHEAD_BYTES = 4096


def dead_letter_headers(stage: str, reason: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [
        ("x-reason", reason.encode()),
        ("x-stage", stage.encode()),
        ("x-source-topic", topic.encode()),
        ("x-source-partition", str(partition).encode()),
        ("x-source-offset", str(offset).encode()),
    ]


def is_unwritable(err: KafkaError | None) -> bool:
    """Whether a produce error is about the record itself (dead-letter it) rather than the cluster (retry)."""
    return err is not None and err.code() in UNWRITABLE


def fit_dead_letter(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]], max_message_bytes: int
) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """The value to dead-letter: the original, or, when it cannot fit in a message itself, none at all and an
    `x-dropped-bytes` header (the source topic/partition/offset headers still point at the original)."""
    size = len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers)
    if value is None or size + _OVERHEAD_BYTES <= max_message_bytes:
        return value, headers
    return without_payload(value, headers)


def without_payload(
    value: bytes | None, headers: list[tuple[str, bytes]] | None
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A dead letter that cannot be written with its payload (too big, refused by the broker): the same headers
    (reason, source) plus `x-dropped-bytes` with the payload's size, and an empty value."""
    return b"", [*(headers or []), ("x-dropped-bytes", str(len(value or b"")).encode())]
