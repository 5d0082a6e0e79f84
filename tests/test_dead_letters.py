"""The dead-letter limit (site_activity/dead_letters.py): when a stage stops instead of dead-lettering."""

from __future__ import annotations

import pytest

from site_activity.dead_letters import DeadLetterLimit, DeadLetterLimitExceeded, Reason, reason_text


def record(limit: DeadLetterLimit, valid: int, invalid: int) -> None:
    """A batch as a stage sees it: checked before it is dead-lettered, counted once committed."""
    limit.check(valid, invalid)
    limit.add(valid, invalid)


def test_a_run_of_invalid_batches_past_the_limit_stops() -> None:
    limit = DeadLetterLimit(max_consecutive=10, max_ratio=0, window=0)
    record(limit, valid=0, invalid=6)
    with pytest.raises(DeadLetterLimitExceeded, match="11 invalid records in a row"):
        record(limit, valid=0, invalid=5)


def test_a_valid_record_ends_the_run() -> None:
    limit = DeadLetterLimit(max_consecutive=10, max_ratio=0, window=0)
    for _ in range(100):  # one bad message among good ones, again and again, is never a reason to stop
        record(limit, valid=0, invalid=8)
        record(limit, valid=1, invalid=8)
    assert limit.consecutive == 0


def test_the_ratio_is_judged_over_a_full_window_only() -> None:
    limit = DeadLetterLimit(max_consecutive=0, max_ratio=0.5, window=100)
    record(limit, valid=10, invalid=60)  # 86 % invalid, but only 70 records seen: too early to judge
    with pytest.raises(DeadLetterLimitExceeded, match="of the last 100 records invalid"):
        record(limit, valid=30, invalid=0)  # 60 of 100


def test_the_window_slides() -> None:
    limit = DeadLetterLimit(max_consecutive=0, max_ratio=0.5, window=100)
    record(limit, valid=1, invalid=49)
    for _ in range(20):  # the early burst of bad records leaves the window as good ones come in
        record(limit, valid=50, invalid=0)
    for _ in range(10):
        record(limit, valid=30, invalid=20)  # 40 % invalid from here on: under the limit
    with pytest.raises(DeadLetterLimitExceeded, match="60 of the last 100"):
        record(limit, valid=10, invalid=40)  # 80 % invalid: with the batch before it, 60 of the last 100


def test_zero_turns_both_rules_off() -> None:
    limit = DeadLetterLimit(max_consecutive=0, max_ratio=0, window=0)
    for _ in range(1000):
        record(limit, valid=0, invalid=1000)


def test_every_reason_header_starts_with_its_reason() -> None:
    assert reason_text(Reason.DB_REJECTED, "23514 check violation") == "db_rejected: 23514 check violation"
    assert {r.value for r in Reason} == {"undecodable", "invalid_event", "db_rejected", "unwritable_output"}


def test_a_batch_checked_again_on_retry_counts_once() -> None:
    """The sink checks a batch before dead-lettering it and counts it only once committed: a batch retried
    after a dead-letter topic outage must not double its invalid records."""
    limit = DeadLetterLimit(max_consecutive=1000, max_ratio=0, window=0)
    for _ in range(5):  # five attempts at the same batch of 600 invalid messages
        limit.check(valid=0, invalid=600)
    limit.add(valid=0, invalid=600)
    assert limit.consecutive == 600
    with pytest.raises(DeadLetterLimitExceeded):
        limit.check(valid=0, invalid=401)
    assert limit.consecutive == 600  # a refused check counts nothing either
