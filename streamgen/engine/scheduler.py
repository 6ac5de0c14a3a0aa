"""Which session the engine's busy loop serves next. Pure bookkeeping: no torch, no threads.

Each session has *credits*: how many more chunks it may produce now. It starts with ``max_ahead``
(chunks made before anyone asks: prefetch); each chunk its consumer asks for adds one, each chunk
made spends one, and it never holds more than ``max_ahead + 1``. A session is ready when it has
credits and is neither paused nor finished. Among ready sessions the one served longest ago goes
first (round robin), so a fast consumer cannot starve a slow one and a slow consumer costs no GPU
time beyond its ``max_ahead`` chunks. ``max_ahead=0`` (the server's default) makes a chunk only
when it is asked for, so a prompt change applies to the very next chunk the viewer will see.

The scheduler runs on the busy loop's thread only; the event loop talks to it through the
engine's command queue.
"""

from __future__ import annotations

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


class Scheduler:
    """Round-robin choice of the next session to run (admission is the caller's: every session
    given is scheduled)."""

    def __init__(self, max_ahead: int = 0):
        if max_ahead < 0:
            raise ValueError(f"max_ahead must be >= 0, got {max_ahead}")
        self.max_ahead = max_ahead
        self.slots: dict[int, SessionSlot] = {}
        self._tick = 0

    def admit(self, sid: int, limit: int | None = None) -> SessionSlot:
        if sid in self.slots:
            raise ValueError(f"session {sid} is already scheduled")
        slot = SessionSlot(sid, credits=self.max_ahead, limit=limit)
        self.slots[sid] = slot
        return slot

    def remove(self, sid: int) -> None:
        self.slots.pop(sid, None)

    def requested(self, sid: int) -> None:
        """The consumer asks for one chunk: one more may be made."""
        slot = self.slots.get(sid)
        if slot is not None:
            slot.credits = min(slot.credits + 1, self.max_ahead + 1)

    def set_paused(self, sid: int, paused: bool) -> None:
        slot = self.slots.get(sid)
        if slot is not None:
            slot.paused = paused

    def ready(self) -> list[SessionSlot]:
        return [s for s in self.slots.values() if s.credits > 0 and not s.paused and not s.done]

    def next(self) -> SessionSlot | None:
        """The ready session served longest ago (ties: lowest id), or None when nothing is ready."""
        ready = self.ready()
        if not ready:
            return None
        return min(ready, key=lambda s: (s.last_served, s.sid))

    def served(self, sid: int) -> None:
        """Record that ``sid`` produced one chunk."""
        slot = self.slots[sid]
        self._tick += 1
        slot.last_served = self._tick
        slot.credits -= 1
        slot.produced += 1
        if slot.limit is not None and slot.produced >= slot.limit:
            slot.done = True
