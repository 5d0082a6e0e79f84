"""The dead-letter contract shared by every stage: the original key and value, and why, in headers."""

from __future__ import annotations


def dead_letter_headers(stage: str, reason: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [
        ("x-reason", reason.encode()),
        ("x-stage", stage.encode()),
        ("x-source-topic", topic.encode()),
        ("x-source-partition", str(partition).encode()),
        ("x-source-offset", str(offset).encode()),
    ]
