"""The webhooks dispatcher's pipeline: fresh deliveries are handed over by the reader and sent at once, what does
not fit is claimed as slots free up, retries due now are claimed without waiting for the poll, and a slow
endpoint still holds only its own slots. The stage here polls only every 30 s, so anything that arrives sooner
did not wait for a poll. Real broker, Postgres, sink, `site-activity webhooks` and console processes, and a real
HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from dev_stack.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from site_activity.settings import Settings
from tests.conftest import make_settings
from tests.console_helpers import make_tenant
from tests.test_webhooks import Stack, deliveries, event, running_stack, verified
from tests.webhook_helpers import always, fail_first
from webhooks.dispatcher import Dispatcher
from webhooks.metrics import WebhookMetrics
from webhooks.queue import Outcome, _deciding

POLL_S = 30.0  # longer than any wait below: nothing here may depend on the poll
CONCURRENCY = 2
PREFETCH = 4


@pytest.fixture(scope="module")
def stack(
    kafka: EmbeddedBroker, postgres: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("webhooks-pipeline")
    s = make_settings(
        kafka,
        postgres,
        base / "data",
        console_port=free_port(),
        webhooks_http_port=free_port(),
        webhooks_group=f"whp-{uuid.uuid4().hex[:8]}",
        webhooks_allow_private_urls=True,
        webhooks_retry_schedule_s=[0, 0.5, 0.5],
        webhooks_timeout_s=3.0,
        webhooks_poll_interval_s=POLL_S,
        webhooks_endpoint_concurrency=CONCURRENCY,
        webhooks_endpoint_prefetch=PREFETCH,
    )
    yield from running_stack(s, base)


def metric(settings: Settings, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{settings.webhooks_http_port}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_a_fresh_delivery_is_sent_at_once_without_a_claim(stack: Stack, postgres: EmbeddedPostgres) -> None:
    """Also for an endpoint the stage has never sent to."""
    t = make_tenant(postgres.dsn, "Fresh")
    _, secret = stack.endpoint(t, "/fresh")
    handed_before = metric(stack.settings, "site_activity_webhooks_deliveries_handed_over_total")
    sent = event(t.widget)
    stack.produce([sent])
    [got] = stack.receiver.wait_for("/fresh", 1, timeout=POLL_S / 2)
    assert [b["data"]["event_id"] for b in verified(secret, [got])] == [sent["event_id"]]
    # Handed over by the reader's enqueue, leased in the same statement: no claim, no poll.
    assert metric(stack.settings, "site_activity_webhooks_deliveries_handed_over_total") >= handed_before + 1


def test_a_burst_beyond_the_prefetch_is_claimed_as_slots_free_up(stack: Stack, postgres: EmbeddedPostgres) -> None:
    """Ten times the prefetch in one message: what the endpoint's room holds is handed over, the rest is queued
    due and claimed while requests finish, never waiting for the poll; every event arrives exactly once."""
    t = make_tenant(postgres.dsn, "Burst")
    stack.receiver.on("/burst", always(200, delay=0.05))
    eid, secret = stack.endpoint(t, "/burst")
    sent = [event(t.widget, visitor=f"b{i}") for i in range(10 * PREFETCH)]
    started = time.monotonic()
    stack.produce(sent)
    got = stack.receiver.wait_for("/burst", len(sent), timeout=POLL_S / 2)
    assert time.monotonic() - started < POLL_S / 2
    assert sorted(b["data"]["event_id"] for b in verified(secret, got)) == sorted(e["event_id"] for e in sent)
    deadline = time.monotonic() + 20
    while len(deliveries(stack, t, eid, status="succeeded", limit=100)) < len(sent):
        assert time.monotonic() < deadline, "outcomes not recorded"
        time.sleep(0.2)


def test_a_retry_due_now_does_not_wait_for_the_poll(stack: Stack, postgres: EmbeddedPostgres) -> None:
    """A retry due before the next poll (0.5 s after the failure here) is claimed when it falls due."""
    t = make_tenant(postgres.dsn, "RetryNow")
    stack.receiver.on("/retry-now", fail_first(1))
    _, secret = stack.endpoint(t, "/retry-now")
    stack.produce([event(t.widget)])
    first, second = stack.receiver.wait_for("/retry-now", 2, timeout=POLL_S / 2)
    assert second.at - first.at < POLL_S / 3
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    verified(secret, [first, second])


def test_a_slow_endpoint_holds_only_its_own_slots(stack: Stack, postgres: EmbeddedPostgres) -> None:
    """A backlog at an endpoint that takes 2 s per request does not delay fresh events of another tenant, and
    the slow one never gets more than its concurrency of requests at once."""
    slow_t, fast_t = make_tenant(postgres.dsn, "SlowP"), make_tenant(postgres.dsn, "FastP")
    stack.receiver.on("/slow-p", always(200, delay=2.0))
    stack.endpoint(slow_t, "/slow-p")
    stack.endpoint(fast_t, "/fast-p")
    stack.produce([event(slow_t.widget, visitor=f"s{i}") for i in range(6 * PREFETCH)])
    stack.receiver.wait_for("/slow-p", 1)
    started = time.time()
    n = 3 * PREFETCH
    stack.produce([event(fast_t.widget, visitor=f"f{i}") for i in range(n)])
    fast = stack.receiver.wait_for("/fast-p", n, timeout=20)
    assert max(r.at for r in fast) - started < 5.0
    slow = sorted(r.at for r in stack.receiver.at("/slow-p"))
    # At most CONCURRENCY requests arrive within any 2 s (each is answered after 2 s).
    assert all(b - a >= 1.5 for a, b in zip(slow, slow[CONCURRENCY:], strict=False)), slow


# --- pure logic ------------------------------------------------------------------------------------------


def test_deliveries_held_per_endpoint_follow_its_attempt_durations() -> None:
    settings = Settings(webhooks_endpoint_concurrency=50, webhooks_endpoint_prefetch=200, webhooks_timeout_s=15)
    d = Dispatcher(settings, WebhookMetrics())
    fast, slow, dead, new = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    d._attempt_s.update({fast: 0.02, slow: 2.0, dead: 15.0})
    assert d._held_limit(fast) == 200  # the prefetch
    # lease 35 s - timeout 15 s - margin 2 s = 18 s: 9 rounds of 2 s, 50 each
    assert d._held_limit(slow) == 200
    assert d._held_limit(new) == 100  # not timed yet: two rounds
    d._attempt_s[slow] = 6.0
    assert d._held_limit(slow) == 150  # 3 rounds
    assert d._held_limit(dead) == 100  # never fewer than two rounds
    room, default, _ = d._room()
    assert default == 100 and new not in room and room[dead] == 100 and room[fast] == 200


def test_one_outcome_decides_each_delivery_in_a_batch() -> None:
    now = datetime.now(UTC)

    def outcome(delivery: int, ok: bool, seconds: float) -> Outcome:
        return Outcome(
            delivery,
            uuid.uuid4(),
            1,
            now + timedelta(seconds=seconds),
            ok,
            200 if ok else 500,
            1.0,
            None if ok else "HTTP 500",
            None if ok else now,
        )

    ok_then_fail = [outcome(1, True, 0), outcome(1, False, 1)]
    fail_then_fail = [outcome(2, False, 0), outcome(2, False, 1)]
    decided = _deciding(ok_then_fail + fail_then_fail)
    assert decided[1] is ok_then_fail[0]  # a success wins: the endpoint got it
    assert decided[2] is fail_then_fail[1]  # else the latest attempt
