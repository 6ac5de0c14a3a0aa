"""Which sessions the engine's busy loop runs together next. Pure bookkeeping: no torch, no threads.

Each session has *credits*: how many more chunks it may produce now. It starts with ``max_ahead``
(chunks made before anyone asks: prefetch); each chunk its consumer asks for adds one, each chunk
made spends one, and it never holds more than ``max_ahead + 1``. ``max_ahead=0`` (the server's
default) makes a chunk only when it is asked for, so a prompt change applies to the very next
chunk the viewer will see. A session is *ready* when it has credits, is neither paused nor
finished, and is not too far ahead of its viewer: with a viewer position (``set_viewer``, media
seconds) and a ``lead_s``, a session whose media end is ``lead_s`` or more past the viewer yields.

Every step the scheduler picks one *batch* (``next_batch``): the most urgent ready session, then
the other ready sessions with the same ``key`` (same frame size and chunk shape: they can share
one forward), most urgent first, up to ``max_batch``. Urgency, in order:

1. a session that has made no chunk yet (its first fragment is its viewer's start-up latency);
2. a session behind real time (``lag``: wall seconds since its first chunk, paused time excluded,
   minus media seconds made; > 0 is behind), the furthest behind first;
3. the others, the one served longest ago first (round robin).

Under overload every session falls behind and the furthest behind runs next, so lags even out
(fair shares); a session that is passed over only falls further behind until it leads, so none
starves, whatever its key. The scheduler runs on the busy loop's thread only; the event loop talks
to it through the engine's command queue. ``now`` arguments are clock readings (seconds), so tests
drive it with hand-made times.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass
class SessionSlot:
    sid: int
    credits: int
    paused: bool = False
    done: bool = False  # produced its last chunk, failed, or cancelled
    last_served: int = -1  # scheduler tick when it last ran; -1 = never
    produced: int = 0
    limit: int | None = None  # chunks to produce in all; None = until cancelled
    key: Hashable = None  # sessions with equal keys may share a forward
    media_s: float = 0.0  # media seconds made
    t_first: float | None = None  # clock when its first chunk was made (real time starts then)
    paused_at: float | None = None
    viewer_s: float | None = None  # the viewer's position (media seconds), when known
    lead_s: float | None = None  # yield while media_s - viewer_s >= lead_s

    def lag(self, now: float) -> float:
        """Seconds behind real time (> 0: behind): wall time since the first chunk was made minus the
        media made (the first chunk included); 0 before the first chunk."""
        if self.t_first is None:
            return 0.0
        end = self.paused_at if self.paused_at is not None else now
        return (end - self.t_first) - self.media_s

    def ahead_of_viewer(self) -> bool:
        return self.viewer_s is not None and self.lead_s is not None and self.media_s - self.viewer_s >= self.lead_s


class Scheduler:
    """Chooses the batch to run next (admission is the caller's: every session given is scheduled)."""

    def __init__(self, max_ahead: int = 0, max_batch: int = 8, clock: Callable[[], float] = time.monotonic):
        if max_ahead < 0:
            raise ValueError(f"max_ahead must be >= 0, got {max_ahead}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_ahead, self.max_batch, self.clock = max_ahead, max_batch, clock
        self.slots: dict[int, SessionSlot] = {}
        self._tick = 0

    def admit(self, sid: int, limit: int | None = None, key: Hashable = None, lead_s: float | None = None) -> SessionSlot:
        if sid in self.slots:
            raise ValueError(f"session {sid} is already scheduled")
        slot = SessionSlot(sid, credits=self.max_ahead, limit=limit, key=key, lead_s=lead_s)
        self.slots[sid] = slot
        return slot

    def remove(self, sid: int) -> None:
        self.slots.pop(sid, None)

    def requested(self, sid: int) -> None:
        """The consumer asks for one chunk: one more may be made."""
        slot = self.slots.get(sid)
        if slot is not None:
            slot.credits = min(slot.credits + 1, self.max_ahead + 1)

    def set_paused(self, sid: int, paused: bool, now: float | None = None) -> None:
        """Pause or resume; paused wall time does not count as lag."""
        slot = self.slots.get(sid)
        if slot is None or slot.paused == paused:
            return
        now = self.clock() if now is None else now
        slot.paused = paused
        if paused:
            slot.paused_at = now
        else:
            if slot.paused_at is not None and slot.t_first is not None:
                slot.t_first += now - slot.paused_at
            slot.paused_at = None

    def set_viewer(self, sid: int, position_s: float | None) -> None:
        """Where the session's viewer is (media seconds); None: unknown (no yielding by lead)."""
        slot = self.slots.get(sid)
        if slot is not None:
            slot.viewer_s = position_s

    def ready(self) -> list[SessionSlot]:
        return [s for s in self.slots.values()
                if s.credits > 0 and not s.paused and not s.done and not s.ahead_of_viewer()]

    def _urgency(self, s: SessionSlot, now: float) -> tuple:
        if s.last_served < 0:
            return (0, 0.0, s.sid, 0)
        lag = s.lag(now)
        if lag > 0:
            return (1, -lag, s.last_served, s.sid)
        return (2, 0.0, s.last_served, s.sid)

    def next_batch(self, now: float | None = None) -> list[SessionSlot]:
        """The sessions to run together now (see the module docstring); [] when nothing is ready."""
        now = self.clock() if now is None else now
        ready = sorted(self.ready(), key=lambda s: self._urgency(s, now))
        if not ready:
            return []
        lead = ready[0]
        return [s for s in ready if s.key == lead.key][: self.max_batch]

    def next(self, now: float | None = None) -> SessionSlot | None:
        """The most urgent ready session, or None."""
        batch = self.next_batch(now)
        return batch[0] if batch else None

    def served(self, sid: int, media_s: float = 0.0, now: float | None = None) -> None:
        """Record that ``sid`` produced one chunk of ``media_s`` seconds."""
        slot = self.slots[sid]
        now = self.clock() if now is None else now
        self._tick += 1
        slot.last_served = self._tick
        slot.credits -= 1
        slot.produced += 1
        if slot.t_first is None:
            slot.t_first = now  # real time starts when the first chunk is out
        slot.media_s += media_s
        if slot.limit is not None and slot.produced >= slot.limit:
            slot.done = True

    def lags(self, now: float | None = None) -> dict[int, float]:
        """Seconds behind real time of every session that has made a chunk."""
        now = self.clock() if now is None else now
        return {s.sid: s.lag(now) for s in self.slots.values() if s.t_first is not None}
