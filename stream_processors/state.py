"""Per-visitor state of the stream processors: recent sessions and identity links, and the rules that
place one event into them. Pure functions over plain data; no Kafka, no faust (see `processor.py`).

A visitor is one (widget_id, visitor_id) pair, i.e. one Kafka key. Its state is a small JSON document kept
in a faust table (changelog-backed), read and written once per batch (one take_events() of the agent)::

    {"s": [[start, lo, hi], ...],      # recent sessions, oldest first, times in µs since the epoch
     "l": [[at, user_id], ...],        # identity links, oldest first
     "e": [[event_id, t, start], ...]} # recently placed events, oldest first (duplicates, below)

* ``start`` is the occurred_at of the event that opened the session and never changes: the session id is
  ``session_id_for(widget_id, visitor_id, start)``, so ids need no storage and are the same on every replay.
* ``lo``/``hi`` are the earliest/latest occurred_at seen in the session (``lo < start`` only after a late
  event extended it backwards). They decide where later and late events belong.

Sessions (gap G = ``session_gap_s``; "more than G of silence" starts a session, exactly G does not)
-----------------------------------------------------------------------------------------------------
Events are placed in the order they arrive on the partition (offset order), which the API keeps sorted by
occurred_at within a request. An event at time t:

1. inside a known session (``lo <= t <= hi``): joins it;
2. after a session and at most G past its ``hi``: joins it and extends ``hi`` (the in-order case);
3. otherwise, at most G before the ``lo`` of the next session: joins that one and extends its ``lo``
   backwards; the session keeps its id, no second session_start;
4. otherwise: opens a new session with ``start = lo = hi = t`` and a ``session_start`` is emitted.

When events of a visitor arrive in time order (the normal case), this is exactly the offline definition
"gap to the previous event > G starts a session". Late events (a request flushed late, a retry) never
create a duplicate session_start; where they would change history, sessions already started are kept:

* a late event that **bridges** two sessions (within G of both) joins the earlier one (rule 2); the later
  session stays a separate session with its own session_start. An offline recomputation over the whole history would merge them.
* a late event **before** a session by at most G joins that session (rule 3); the session keeps the id
  and the session_start of its original opener, whose occurred_at is then no longer the earliest event.
* a late event more than G away from every remembered session opens its own session (rule 4), which is
  what the offline computation does too, with a deterministic id from its own occurred_at.
* only the ``max_sessions`` most recent sessions are remembered; an event older than all of them by more
  than G opens a session of its own (rule 4). If it was the opener of a forgotten session, the id and
  the session_start event id are the same as before, so the sink's idempotent insert drops the copy.
* a visitor idle for longer than the late-event horizon (``processors_state_horizon_s``, `store.py`) has
  its sessions and event ids dropped (links kept): its next event is placed by the same rule 4.

The session_start of a session is emitted for every event whose occurred_at equals the session's
``start``: the opener itself, its re-sends (same event_id) and its reprocessing after a crash. All of them
carry the same deterministic event id, so downstream writes collapse them into one row, and a crash
between writing the table and delivering the output can never lose a session_start.

Duplicates (the same event_id again)
-------------------------------------
An event is identified by its event_id; a copy (a client retry, a re-send whose corrected time differs
because the device clock changed, a replay after a crash) is the same event. A copy never changes the state
and never derives anything new: it is placed where the first copy was (its session, its ``t``), links
nothing, and is emitted exactly as the first copy was — with that session's session_start again if the first
copy opened it (same deterministic ids, so the sink keeps one row). Emitting again rather than dropping keeps
a crash safe: the state (changelog) and the outputs are flushed together but may land apart, so a replay must
reproduce the outputs of events the recovered state already knows. The last ``max_events`` event ids of
each visitor are remembered (``processors_max_recent_events``); a copy older than that is placed as a new
event (the sink still keeps one row of it, but it can open a session of its own).

Identity links
--------------
An identify event (user_id U at time t) links the visitor to the contact ``customer_id_for(tenant, U)``
from t on. Every event gets the contact of the link in force at its occurred_at (the latest link with
``at <= t``); events before the first link get the first link's contact (retro-linking of late arrivals).
So a newly learned link (an identify arriving after later events) covers the events from its time up to
the visitor's next link, and, if it is the first link, every event before it. Rows already written when a
link is learned are re-linked by the sink by the same rule (sink/writer.py, ``_RETRO_LINK``). A shared computer (identify as A, later as B) keeps
earlier events on A and later ones on B. At most ``max_links`` links are remembered.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

Session = list[int]  # [start, lo, hi]


def _lo(session: Session) -> int:
    return session[1]


Link = list[Any]  # [at, user_id]


@dataclass
class Placement:
    """Where one event landed."""

    session_start_us: int  # the session's start (its id is derived from it)
    opens_session: bool  # this event's occurred_at is the session's start: emit a session_start ahead of it


@dataclass
class Seen:
    """The first copy of an event: where it was placed."""

    t: int  # its occurred_at (µs)
    session_start_us: int  # its session's start

    @property
    def placement(self) -> Placement:
        return Placement(self.session_start_us, self.t == self.session_start_us)


@dataclass
class VisitorState:
    sessions: list[Session] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    events: list[list[Any]] = field(default_factory=list)  # [[event_id, t, session start], ...], oldest first
    max_events: int | None = field(default=None, compare=False)  # set by remember(); to_doc() keeps that many
    _index: dict[str, list[Any]] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_doc(cls, doc: dict[str, Any] | None, copy: bool = True) -> VisitorState:
        """`copy=False` when the document is the caller's own (decoded from the store for this call): the
        state then changes its lists in place instead of copies."""
        if not doc:
            return cls()
        if not copy:
            return cls(sessions=doc.get("s", []), links=doc.get("l", []), events=doc.get("e", []))
        # The event entries are never changed in place, so the outer list is all that needs copying.
        return cls(
            sessions=[list(s) for s in doc.get("s", [])],
            links=[list(x) for x in doc.get("l", [])],
            events=list(doc.get("e", ())),
        )

    def to_doc(self) -> dict[str, Any]:
        if self.max_events is not None and len(self.events) > self.max_events:
            self.events = self.events[len(self.events) - self.max_events :]
            self._index = None
        return {"s": self.sessions, "l": self.links, "e": self.events}

    # --- duplicates -------------------------------------------------------------------------------

    def seen(self, event_id: str) -> Seen | None:
        """The first copy of this event, if it is among the remembered ones."""
        entry = self.index().get(event_id)
        if entry is None:
            return None
        return Seen(entry[1], entry[2])

    def index(self) -> dict[str, list[Any]]:
        """event_id -> its entry [event_id, t, session start] (the hot loop's `seen`, without an object)."""
        if self._index is None:
            self._index = {e[0]: e for e in self.events}
        return self._index

    def remember(self, event_id: str, t: int, session_start_us: int, max_events: int) -> None:
        """Records the first copy of an event (call after placing it); the last max_events are kept."""
        entry = [event_id, t, session_start_us]
        self.events.append(entry)
        self.max_events = max_events
        if self._index is not None:
            self._index[event_id] = entry

    # --- sessions ---------------------------------------------------------------------------------

    def place(self, t: int, gap: int, max_sessions: int) -> Placement:
        """Puts an event at time t (µs) into a session, creating one if needed (rules in the docstring)."""
        start = self.place_start(t, gap, max_sessions)
        return Placement(start, t == start)

    def place_start(self, t: int, gap: int, max_sessions: int) -> int:
        """`place` for the hot loop: the start of the session the event joined (it opened the session, and
        gets a session_start, when that equals t)."""
        sessions = self.sessions
        # index of the first session starting after t: sessions[i-1] is the one at or before t (an event in
        # time order, the usual case, comes after the last session's lo: no search)
        i = len(sessions) if sessions and sessions[-1][1] <= t else bisect.bisect_right(sessions, t, key=_lo)
        before = sessions[i - 1] if i > 0 else None
        after = sessions[i] if i < len(sessions) else None
        if before is not None and t <= before[2] + gap:  # rules 1 and 2
            if t > before[2]:
                before[2] = t
            return before[0]
        if after is not None and after[1] - t <= gap:  # rule 3
            after[1] = t
            return after[0]
        sessions.insert(i, [t, t, t])  # rule 4
        if len(sessions) > max_sessions:
            del sessions[: len(sessions) - max_sessions]
        return t

    # --- identity ---------------------------------------------------------------------------------

    def link(self, t: int, user_id: str, max_links: int) -> bool:
        """Records that the visitor identified as user_id at t. Returns whether this link is now the
        visitor's latest one (then it is published on the identity-links topic)."""
        if [t, user_id] not in self.links:
            bisect.insort(self.links, [t, user_id], key=lambda x: x[0])
            if len(self.links) > max_links:
                del self.links[: len(self.links) - max_links]
        return bool(self.links) and self.links[-1] == [t, user_id]

    def user_at(self, t: int) -> str | None:
        """The user the visitor was linked to at time t; before the first link, the first link's user."""
        if not self.links:
            return None
        last = self.links[-1]
        if t >= last[0]:  # the usual case: an event after the visitor's latest link
            return str(last[1])
        i = bisect.bisect_right(self.links, t, key=lambda x: x[0])
        return str(self.links[max(i - 1, 0)][1])
