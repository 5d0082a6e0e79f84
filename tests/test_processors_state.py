"""The documented placement rules of stream_processors/state.py, one case each (pure logic, no services)."""

from __future__ import annotations

from stream_processors.state import VisitorState

MIN = 60_000_000  # µs
GAP = 30 * MIN


def place_all(state: VisitorState, *times: int) -> list[tuple[int, bool]]:
    return [(p.session_start_us, p.opens_session) for p in (state.place(t, GAP, 16) for t in times)]


def test_in_order_events_follow_the_batch_definition() -> None:
    s = VisitorState()
    assert place_all(s, 0, 10 * MIN, 40 * MIN, 70 * MIN + 1) == [(0, True), (0, False), (0, False), (70 * MIN + 1, True)]


def test_late_event_inside_or_just_after_a_session_joins_it() -> None:
    s = VisitorState()
    place_all(s, 0, 5 * MIN, 180 * MIN)
    assert place_all(s, 2 * MIN, 25 * MIN) == [(0, False), (0, False)]
    assert s.sessions == [[0, 0, 25 * MIN], [180 * MIN, 180 * MIN, 180 * MIN]]


def test_bridging_event_joins_the_earlier_session_and_keeps_the_later_one() -> None:
    s = VisitorState()
    place_all(s, 0, 50 * MIN)  # two sessions: silence of 50 min
    assert place_all(s, 25 * MIN) == [(0, False)]
    assert [x[0] for x in s.sessions] == [0, 50 * MIN]


def test_event_shortly_before_a_session_extends_it_backwards_without_a_new_start() -> None:
    s = VisitorState()
    place_all(s, 100 * MIN)
    assert place_all(s, 75 * MIN, 100 * MIN) == [(100 * MIN, False), (100 * MIN, True)]
    assert s.sessions == [[100 * MIN, 75 * MIN, 100 * MIN]]


def test_event_far_before_every_session_opens_its_own() -> None:
    s = VisitorState()
    place_all(s, 100 * MIN)
    assert place_all(s, 10 * MIN) == [(10 * MIN, True)]


def test_replaying_the_opener_emits_the_same_session_start_again() -> None:
    s = VisitorState()
    place_all(s, 0, 5 * MIN)
    assert place_all(s, 0) == [(0, True)]  # same session, same deterministic session_start id
    assert len(s.sessions) == 1


def test_history_is_bounded() -> None:
    s = VisitorState()
    for i in range(20):
        s.place(i * 60 * MIN, GAP, 4)
    assert [x[0] for x in s.sessions] == [16 * 60 * MIN, 17 * 60 * MIN, 18 * 60 * MIN, 19 * 60 * MIN]


def test_links_in_force_and_retro_link_for_earlier_events() -> None:
    s = VisitorState()
    assert s.user_at(5) is None
    assert s.link(10 * MIN, "a", 8) is True
    assert s.link(30 * MIN, "b", 8) is True
    assert s.link(20 * MIN, "c", 8) is False  # late identify: not the latest link, not published
    assert [s.user_at(t) for t in (0, 10 * MIN, 25 * MIN, 30 * MIN, 99 * MIN)] == ["a", "a", "c", "b", "b"]
    assert s.link(30 * MIN, "b", 8) is True and len(s.links) == 3  # a replay adds nothing
    assert VisitorState.from_doc(s.to_doc()) == s
