"""The dead-letter contract shared by every stage: the original key and value, and why, in headers; and the one
policy for produce errors: which ones mean "this record can never be written" (dead-letter it, move on) rather
than "not now" (retry, or exit without committing so a restart redoes it)."""

from __future__ import annotations

from confluent_kafka import KafkaError

# Errors about the record itself: retrying the same bytes can never succeed.
UNWRITABLE = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE,  # bigger than the producer's message.max.bytes or the topic's limit
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_RECORD,  # the broker's validation of the record (e.g. a compacted topic without a key)
})
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


def fit_dead_letter(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]],
                    max_message_bytes: int) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """The value to dead-letter: the original, or, when it cannot fit in a message itself, none at all and an
    `x-dropped-bytes` header (the source topic/partition/offset headers still point at the original)."""
    size = len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers)
    if value is None or size + _OVERHEAD_BYTES <= max_message_bytes:
        return value, headers
    return without_payload(value, headers)


def without_payload(value: bytes | None, headers: list[tuple[str, bytes]] | None) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A dead letter that cannot be written with its payload (too big, refused by the broker): the same headers
    (reason, source) plus `x-dropped-bytes` with the payload's size, and an empty value."""
    return b"", [*(headers or []), ("x-dropped-bytes", str(len(value or b"")).encode())]
