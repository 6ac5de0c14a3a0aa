"""Streaming sessions: producer task, seq-numbered fragment log, per-subscriber senders, pacing.

Contract
--------
The :class:`SessionRegistry` creates sessions (``await registry.create(start, client)``: admission
against the per-server and per-client limits, the frame source from the factory, the encoder in
the pool) and holds them until they close. A :class:`Session` owns one
:class:`~streamgen.server.sources.FrameSource` and one
:class:`~streamgen.media.encode.FMP4Encoder`. Its producer task pulls chunks from the source,
encodes them in the shared encoder pool (never on the event loop; chunk k's encode runs while
chunk k+1 is being made) and appends each fragment
(as a protocol ``Fragment`` message) to the session's :class:`FragmentLog`: a ring bounded
by fragment count and bytes, indexed by seq, so a reconnecting client can ``attach`` and be
replayed everything still held from ``from_seq`` on.

Every subscriber (a WebSocket) has its own sender task and a cursor into the log. Its send
queue is the window between its cursor and the log head, bounded by ``queue_fragments``: when
a subscriber falls further behind (it stops reading, its socket backs up), whole fragments are
skipped (the subscriber sees the gap in ``seq`` and a ``status`` whose ``dropped`` counts them)
and nothing else slows down or grows. Control
messages (ready/init/status/error/end) go through a small per-subscriber deque; status
messages are coalesced.

Pacing: the producer generates ahead of the viewer by at most ``lead`` seconds of video (the
start's ``lead``, else ``max_lead_s``: by default 0.75 s, about one chunk, so a prompt change
shows at the next chunk; None disables pacing). Where a chunk takes longer to make and encode than
that lead leaves the viewer (``lead`` minus ``pace_margin_s``, 0.25 s), the pace keeps the chunk's
time plus that margin instead (``pace_lead_s``): at the default lead a fragment would otherwise
land just as the viewer's buffer runs dry, a stall at the smallest hiccup. The viewer position is the furthest ``playhead``
acked (seconds of media time), moved on at real time since that ack (a viewer that stops acking,
e.g. after a reconnect at the live edge, is assumed to play on), and never beyond the end of what
was sent to a current viewer (an ack of a far-future playhead buys nothing). An acked playhead is
clamped to what that viewer was sent. Before any ack with a playhead: the end of the latest acked
fragment; before any ack at all: wall-clock time since the first fragment (real-time playback).

When the last subscriber leaves, the session waits ``grace_s`` for an ``attach`` and is then
closed (its source freed); it goes at once when no client can attach (its ``ready`` was never
delivered) or none needs to (that subscriber was sent ``end``, or the session was stopped). A
session that ends (stop, chunk limit, source error) keeps its log until its subscribers have
drained it and received ``end``, then closes. End reasons: ``done``, ``stopped``, ``error``
(after a non-fatal ``generation_failed`` error), ``shutdown``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from streamgen import protocol as P
from streamgen.media.encode import FMP4Encoder, Fragment
from streamgen.server.metrics import Metrics
from streamgen.server.sources import FrameSource, GenerationError, SourceError, SourceFactory

log = logging.getLogger(__name__)

__all__ = ["LogEntry", "FragmentLog", "Subscriber", "Session", "SessionLimits", "SessionRegistry", "Refused"]


@dataclass(frozen=True)
class LogEntry:
    seq: int
    fragment: Fragment
    message: P.Fragment  # the wire message
    new_prompt: bool = False  # the first fragment made under a new prompt (a player may jump to it)
    _wire: dict = field(default_factory=dict, compare=False, repr=False)

    def wire(self, limits: P.Limits) -> bytes:
        """``message`` encoded under ``limits``: made once, then the same bytes for every viewer."""
        data = self._wire.get(limits)
        if data is None:
            data = self._wire[limits] = P.encode(self.message, limits)
        return data

    @property
    def end_s(self) -> float:
        return self.fragment.pts + self.fragment.duration


async def _cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancel ``task`` and wait until it has finished (its result or error is not wanted; a
    cancellation of the caller still propagates)."""
    if task is not None and not task.done():
        task.cancel()
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as unhandled


class _Notifier:
    """Wake every waiter (level-triggered by the caller re-checking its condition)."""

    def __init__(self):
        self._fut: asyncio.Future | None = None

    def notify(self) -> None:
        if self._fut is not None and not self._fut.done():
            self._fut.set_result(None)
        self._fut = None

    async def wait(self, timeout: float | None = None) -> None:
        if self._fut is None:
            self._fut = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._fut), timeout)
        except asyncio.TimeoutError:
            pass


class FragmentLog:
    """Ring of the latest fragments, bounded by ``max_fragments`` and ``max_bytes`` (the newest is always kept)."""

    def __init__(self, max_fragments: int = 64, max_bytes: int = 64 << 20):
        if max_fragments < 1:
            raise ValueError("max_fragments must be >= 1")
        self.max_fragments, self.max_bytes = max_fragments, max_bytes
        self._ring: deque[LogEntry] = deque()
        self.bytes = 0
        self.next_seq = 0  # seq the next appended fragment gets

    @property
    def first_seq(self) -> int:
        return self._ring[0].seq if self._ring else self.next_seq

    def __len__(self) -> int:
        return len(self._ring)

    def append(self, entry: LogEntry) -> None:
        if entry.seq != self.next_seq:
            raise ValueError(f"fragment seq {entry.seq} appended, expected {self.next_seq}")
        self._ring.append(entry)
        self.bytes += len(entry.fragment.data)
        self.next_seq += 1
        while len(self._ring) > self.max_fragments or (self.bytes > self.max_bytes and len(self._ring) > 1):
            self.bytes -= len(self._ring.popleft().fragment.data)

    def get(self, seq: int) -> LogEntry | None:
        i = seq - self.first_seq
        return self._ring[i] if 0 <= i < len(self._ring) else None


class Subscriber:
    """One connection's view of a session: cursor into the log, control deque, sender task.

    ``send(msg)`` serialises one server message on the subscriber's connection and writes it
    (awaiting the socket's flow control); it returns the number of bytes written.
    """

    def __init__(self, session: "Session", send: Callable[..., Awaitable[int]], *,
                 from_seq: int = 0, queue_fragments: int = 8, conn_id: str = ""):
        self.session = session
        self._send = send
        self.cursor = from_seq
        self.queue_fragments = max(1, queue_fragments)
        self.conn_id = conn_id
        self._control: deque[P.ServerMessage] = deque()
        self._wake = _Notifier()
        self.dropped = 0
        self.sent_fragments = 0
        self.sent_bytes = 0
        self.acked_seq = -1
        self.playhead: float | None = None
        self.sent_end_s = 0.0  # media end of the last fragment sent to this subscriber
        self.t_ack = 0.0  # monotonic time of the ack that set ``playhead``
        self.first_sent: tuple[float, float] | None = None  # (monotonic time, pts) of its first fragment
        # (time, pts) its playhead may run at real time from: the first fragment, or a new prompt's first one
        self.real_time_from: tuple[float, float] | None = None
        self.replay_end = from_seq  # fragments below this were logged before it subscribed: never window-dropped
        self.blocked_since: float | None = None  # a send in progress since (monotonic), for "stuck" in /metrics
        self.finished = False  # `end` was sent
        self.task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Fragments waiting to be sent to this subscriber (bounded by queue_fragments)."""
        return max(0, min(self.session.log.next_seq - self.cursor, self.queue_fragments))

    def push_control(self, msg: P.ServerMessage) -> None:
        if isinstance(msg, P.Status):  # coalesce: only the latest status matters
            self._control = deque(m for m in self._control if not isinstance(m, P.Status))
        if len(self._control) >= 64:  # a client that never reads cannot grow this
            self._control.popleft()
        self._control.append(msg)
        self._wake.notify()

    def wake(self) -> None:
        self._wake.notify()

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"sender-{self.session.id}-{self.conn_id}")

    async def _run(self) -> None:
        s, lg, m = self.session, self.session.log, self.session.metrics
        try:
            while True:
                # 1. control messages first (ready, init, status, errors)
                if self._control:
                    msg = self._control.popleft()
                    await self._send(msg)
                    if isinstance(msg, P.Ready):
                        s.ready_delivered = True
                    continue
                # 2. fragments in seq order; skip whole fragments beyond the send window
                head = lg.next_seq
                if self.cursor < head:
                    window = lg.first_seq if self.cursor < self.replay_end else head - self.queue_fragments
                    oldest_allowed = max(lg.first_seq, window)
                    if self.cursor < oldest_allowed:
                        n = oldest_allowed - self.cursor
                        self.cursor = oldest_allowed
                        self.dropped += n
                        m.inc("fragments_dropped_total", n)
                        await self._send(s.status_message(dropped=self.dropped, queue=self.depth))
                        continue
                    entry = lg.get(self.cursor)  # held: first_seq <= cursor < head
                    self.blocked_since = time.monotonic()
                    n = await self._send(entry.message, entry)
                    self.blocked_since = None
                    now = time.monotonic()
                    if self.first_sent is None:
                        self.first_sent = self.real_time_from = (now, entry.fragment.pts)
                    elif entry.new_prompt and entry.fragment.pts > self.real_time_from[1] + (now - self.real_time_from[0]):
                        # the player skips the old prompt's tail to this fragment: from here its playhead
                        # may run that far ahead of real time since its first fragment (ack's clamp)
                        self.real_time_from = (now, entry.fragment.pts)
                    self.sent_end_s = entry.end_s
                    self.cursor += 1
                    self.sent_fragments += 1
                    self.sent_bytes += n
                    m.inc("fragments_sent_total")
                    m.inc("bytes_sent_total", n)
                    continue
                # 3. after the last fragment of an ended session: `end`
                if s.ended is not None:
                    await self._send(P.End(reason=s.ended))
                    self.finished = True
                    return
                await self._wake.wait(timeout=1.0)
        except (ConnectionError, RuntimeError) as e:  # the socket broke or closed: the connection handles it
            log.debug("sender %s/%s stopped: %r", s.id, self.conn_id, e)
        except Exception:  # a bug (or a message the protocol refuses): never silent, never the session's end
            log.exception("session %s: sender for %s failed", s.id, self.conn_id)

    async def aclose(self) -> None:
        await _cancel_and_wait(self.task)


@dataclass
class SessionLimits:
    queue_fragments: int = 8  # per-subscriber send window
    log_fragments: int = 64  # replay ring
    log_bytes: int = 64 << 20
    max_lead_s: float | None = 0.75  # default lead (about one chunk); None = generate as fast as possible
    lead_cap_s: float = 10.0  # the largest lead a start may ask for
    # the pace never lets the viewer's buffer at a chunk's request fall below what that chunk takes to
    # arrive (the recent generate + encode time) plus this much: else every fragment lands at the last moment
    pace_margin_s: float = 0.25
    grace_s: float = 10.0  # how long a session waits for `attach` after its last subscriber left
    status_interval_s: float = 1.0


class Session:
    """One stream: source -> encoder (thread pool) -> log -> subscribers."""

    def __init__(self, *, source: FrameSource, encoder: FMP4Encoder, metrics: Metrics,
                 executor: Executor | None, client: str, limits: SessionLimits, chunks: int | None = None,
                 on_closed: Callable[["Session"], None] | None = None, session_id: str | None = None,
                 lead: float | None = None, started_at: float | None = None):
        self.id = session_id or new_session_id()
        self.source, self.encoder, self.metrics = source, encoder, metrics
        self.executor = executor
        self.client = client
        self.limits = limits
        self.chunks = chunks
        self.log = FragmentLog(limits.log_fragments, limits.log_bytes)
        self.subscribers: list[Subscriber] = []
        self.state = "generating"  # generating | paused | stopping | ended
        self.ended: str | None = None  # end reason once the producer is done
        self.generated_frames = 0
        self.generated_s = 0.0  # media seconds produced
        self._unpublished_s = 0.0  # media seconds made but still being encoded (they count for the pace)
        self._chunk_s: float | None = None  # recent wall seconds a chunk took (asked -> in the log), EMA
        self._switch_s: float | None = None  # recent prompt change -> its first fragment in the log, EMA
        self._encoding: asyncio.Future | None = None  # the encode in the encoder pool (aclose waits for it)
        self.gen_time = 0.0  # wall seconds spent in source + encoder
        self.gen_fps = 0.0  # recent generation speed (frames per wall second, EMA)
        self.errors = 0
        self._resume = asyncio.Event()
        self._resume.set()
        self._pace = _Notifier()
        self._t_first: float | None = None
        self._t_start = time.monotonic() if started_at is None else started_at  # the start arrived (monotonic)
        self._t_prompt = 0.0  # the latest prompt arrived (monotonic)
        self._acked_end_s: float | None = None
        self._playhead: float | None = None
        self._t_ack = 0.0  # monotonic time of the ack that set _playhead
        self.lead = lead if lead is not None else limits.max_lead_s
        if self.lead is not None:
            self.lead = min(self.lead, limits.lead_cap_s)
        self.ready_delivered = False  # some client got `ready` (knows the id, so it could attach)
        self._prompt_pending = False
        self.prompt_seq: int | None = None  # first fragment made under the latest prompt
        self._grace: asyncio.TimerHandle | None = None
        self._on_closed = on_closed
        self._closed = False
        self._last_status = 0.0
        self._paused_at: float | None = None
        self._closer: asyncio.Future | None = None
        self.producer: asyncio.Task | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self.producer = asyncio.create_task(self._produce(), name=f"producer-{self.id}")

    def set_prompt(self, prompt: str) -> None:
        self.source.set_prompt(prompt, abandon=self.can_abandon())
        self._prompt_pending = True
        self._t_prompt = time.monotonic()
        self._pace.notify()  # the chunk under the new prompt is not held to the pace (_wait_for_pace)

    def pause(self) -> None:
        if self.ended is None:
            self.state = "paused"
            self._resume.clear()
            self.source.pause()
            if self._paused_at is None:
                self._paused_at = time.monotonic()
            self._broadcast_status()

    def resume(self) -> None:
        if self.ended is None:
            self.state = "generating"
            self._resume.set()
            self.source.resume()
            if self._paused_at is not None:  # the wall-clock viewer did not move while paused
                paused = time.monotonic() - self._paused_at
                if self._t_first is not None:
                    self._t_first += paused
                self._t_ack += paused
                for sub in self.subscribers:
                    sub.t_ack += paused
                self._paused_at = None
            self._broadcast_status()

    def stop(self, reason: str = "stopped") -> None:
        """End the stream: no new chunks; subscribers get what is logged, then `end`."""
        if self.producer is not None and not self.producer.done():
            self.producer.cancel()
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        if self.ended is None:
            self.ended = reason
            self.state = "stopping"
            for sub in self.subscribers:
                sub.wake()
            if not self.subscribers:
                self._arm_grace()

    async def aclose(self) -> None:
        """Cancel everything and free the source. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._grace is not None:
            self._grace.cancel()
        if self.ended is None:
            self.ended = "closed"
        self.state = "ended"
        await _cancel_and_wait(self.producer)
        for sub in list(self.subscribers):
            await sub.aclose()
        self.subscribers.clear()
        try:
            await self.source.aclose()
        finally:
            try:
                if self._encoding is not None:  # never close the encoder under a running encode
                    await asyncio.gather(self._encoding, return_exceptions=True)
                await asyncio.get_running_loop().run_in_executor(self.executor, self.encoder.close)
            finally:
                if self._on_closed is not None:
                    self._on_closed(self)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- subscribers -----------------------------------------------------------------------------

    def ready_message(self) -> P.Ready:
        return P.Ready(session=self.id, mime=self.encoder.mime, width=self.encoder.width,
                       height=self.encoder.height, fps=max(1, round(float(self.encoder.fps))))

    def subscribe(self, send: Callable[..., Awaitable[int]], *, from_seq: int = 0,
                  conn_id: str = "") -> Subscriber:
        """Add a subscriber: it is sent ready, init, then fragments from ``from_seq`` on. Fragments
        no longer held are skipped and counted in a status ``dropped`` field."""
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        sub = Subscriber(self, send, from_seq=from_seq, queue_fragments=self.limits.queue_fragments, conn_id=conn_id)
        sub.replay_end = self.log.next_seq
        before = self.log.get(from_seq - 1) or self.log.get(self.log.first_seq)
        if before is not None and from_seq > 0:  # the client has what came before from_seq
            sub.sent_end_s = before.end_s if before.seq == from_seq - 1 else before.fragment.pts
        sub.push_control(self.ready_message())
        sub.push_control(P.Init(data=self.encoder.init_segment))
        if from_seq < self.log.first_seq:
            sub.dropped = self.log.first_seq - from_seq
            sub.cursor = self.log.first_seq
            self.metrics.inc("fragments_dropped_total", sub.dropped)
            sub.push_control(self.status_message(dropped=sub.dropped, queue=sub.depth))
        self.subscribers.append(sub)
        sub.start()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        """Remove a subscriber (its connection closed or its session ended for it). The last one
        leaving starts the grace period (none if it received `end`)."""
        if sub in self.subscribers:
            self.subscribers.remove(sub)
        if not self.subscribers and not self._closed:
            # only a session whose id some client has seen can be attached to, and only while that client
            # may still miss something: a session that ended (but not by `stop`) while its viewer had not
            # been sent `end` keeps its tail for the grace period; the others go at once
            reachable = self.ready_delivered and not sub.finished and self.ended in (None, "done", "error")
            self._arm_grace(self.limits.grace_s if reachable else 0.0)

    def _arm_grace(self, delay: float | None = None) -> None:
        if self._grace is None and not self._closed:
            delay = self.limits.grace_s if delay is None else delay
            self._grace = asyncio.get_running_loop().call_later(delay, self._close_soon)

    def _close_soon(self) -> None:
        self._closer = asyncio.ensure_future(self.aclose())  # keep a reference until it is done

    def ack(self, sub: Subscriber, seq: int, playhead: float | None) -> None:
        sub.acked_seq = max(sub.acked_seq, seq)
        entry = self.log.get(seq)
        if entry is not None:
            self._acked_end_s = max(self._acked_end_s or 0.0, entry.end_s)
        if playhead is not None:
            # a viewer cannot play what it was not sent, nor faster than real time since its first fragment
            # or since the first fragment of a new prompt (a player jumps to it); and however often the
            # prompt changes, not more than twice real time since its first fragment plus one jump (the
            # lead and a chunk): a client that switched prompts to jump ahead again and again would
            # otherwise run its session unpaced
            playhead = min(playhead, sub.sent_end_s)
            if sub.first_sent is not None:
                now = time.monotonic()
                (t0, pts0), (t1, pts1) = sub.first_sent, sub.real_time_from
                jump = (self.pace_lead_s() or 0.0) + (entry.fragment.duration if entry is not None else 0.0)
                playhead = min(playhead, pts1 + now - t1 + 0.25, pts0 + 2 * (now - t0) + jump + 0.25)
            sub.playhead, sub.t_ack = playhead, time.monotonic()
            self._playhead, self._t_ack = playhead, sub.t_ack  # the latest ack, for a viewer that reconnects
        self._pace.notify()

    # -- pacing and status -----------------------------------------------------------------------

    def viewer_position(self) -> float:
        now = self._paused_at if self._paused_at is not None else time.monotonic()  # paused: no time passes
        acked = [min(sub.playhead + now - sub.t_ack, sub.sent_end_s) for sub in self.subscribers
                 if sub.playhead is not None]
        if acked:
            return max(acked)  # the furthest current viewer
        if self._playhead is not None:  # acked on an earlier connection: assume it plays on
            pos = self._playhead + now - self._t_ack
            return min(pos, max(sub.sent_end_s for sub in self.subscribers)) if self.subscribers else pos
        if self._acked_end_s is not None:
            return self._acked_end_s
        if self._t_first is None:
            return 0.0
        return time.monotonic() - self._t_first

    def switch_estimate_s(self) -> float | None:
        """How long a prompt change takes to its first fragment here: the mean of this session's
        last ones, else twice a chunk (the re-cache costs about a chunk); None before any chunk."""
        if self._switch_s is not None:
            return self._switch_s
        return None if self._chunk_s is None else 2 * self._chunk_s

    def can_abandon(self) -> bool:
        """Whether a prompt change may drop the old prompt's chunk in progress (the new prompt's
        first chunk then comes sooner): only if what the viewer has ahead (``lead_s``: sent,
        in flight, being encoded) outlasts the wait for the new one by ``pace_margin_s``, so that
        skipping the old chunk costs no stall (without the margin, a buffer just as long as the
        expected wait runs dry at the smallest delay). Unpaced, or before any chunk: always."""
        est = self.switch_estimate_s()
        return self.lead is None or est is None or self.lead_s() >= est + self.limits.pace_margin_s

    def lead_s(self) -> float:
        return self.generated_s + self._unpublished_s - self.viewer_position()

    def status_message(self, **fields: Any) -> P.Status:
        """Status now; ``fields`` adds the per-subscriber ``queue`` / ``dropped`` counts."""
        extra = {"frames": self.generated_frames}
        if self.prompt_seq is not None:
            extra["prompt_seq"] = self.prompt_seq
        lag = getattr(self.source, "lag_s", None)  # the engine's: behind real time when it cannot keep up
        if lag is not None:
            extra["lag_s"] = round(lag, 3)
        return P.Status(state=self.state, gen_fps=round(self.gen_fps, 2), lead_s=round(self.lead_s(), 3),
                        chunk=self.log.next_seq, extra=extra, **fields)

    def _broadcast_status(self) -> None:
        for sub in self.subscribers:
            sub.push_control(self.status_message(queue=sub.depth, dropped=sub.dropped))
        self._last_status = time.monotonic()

    def pace_lead_s(self) -> float | None:
        """The lead the producer keeps: the session's ``lead``, raised where a chunk takes longer
        to make and encode than that lead minus ``pace_margin_s`` (a slow model, a busy machine),
        so that the next fragment arrives before the viewer's buffer runs dry. None: unpaced."""
        if self.lead is None:
            return None
        if self._chunk_s is None:
            return self.lead
        return max(self.lead, self._chunk_s + self.limits.pace_margin_s)

    async def _wait_for_pace(self) -> None:
        while True:
            await self._resume.wait()
            lead = self.pace_lead_s()
            if lead is None or self.lead_s() < lead:
                return
            # a new prompt's first chunk is made at once, up to one chunk past the lead: the viewer
            # waits for it, and the player may skip the old prompt's buffered tail to show it
            last = self.log.get(self.log.next_seq - 1)  # the newest fragment is always kept
            if self._prompt_pending and self.lead_s() < lead + (last.fragment.duration if last else 0.0):
                return
            # wake on ack, or when wall clock would move the viewer enough
            await self._pace.wait(timeout=max(0.01, min(0.25, self.lead_s() - lead)))

    # -- producer ----------------------------------------------------------------------------------

    async def _produce(self) -> None:
        """Chunks from the source, each encoded while the next one is being made (the encoder and
        the engine overlap; fragments still go to the log in order)."""
        publishing: asyncio.Task | None = None  # the previous chunk's encode + publish
        try:
            seq = 0
            try:
                while self.chunks is None or seq < self.chunks:
                    await self._wait_for_pace()
                    t0 = time.perf_counter()
                    frames = await self.source.next_chunk()
                    t1 = time.perf_counter()
                    # read at once: a later prompt sets _prompt_pending again for *its* chunk
                    switched = self._prompt_pending and self.source.switched
                    if switched:
                        self._prompt_pending = False
                    media_s = frames.shape[0] / float(self.encoder.fps)
                    self._unpublished_s += media_s  # counts for the pace from now (lead_s)
                    if publishing is not None:  # in order; raises its encode's error
                        prev, publishing = publishing, None
                        await prev
                    publishing = asyncio.ensure_future(self._publish(frames, switched, media_s, t0, t1))
                    del frames
                    seq += 1
            except EOFError:  # the source made its last chunk
                pass
            if publishing is not None:
                prev, publishing = publishing, None
                await prev
            self._finish("done")
        except Exception as e:
            if not isinstance(e, GenerationError):  # those the engine logged (once, with this session's id)
                log.error("session %s: generation failed", self.id, exc_info=e)
            self.errors += 1
            self.metrics.inc("errors_total", code="generation_failed")
            msg = P.Error(code="generation_failed", fatal=False,
                          message=f"generation failed: {type(e).__name__}: {e}"[:1000])
            for sub in self.subscribers:
                sub.push_control(msg)
            self._finish("error")
        finally:
            if publishing is not None and not publishing.done():
                publishing.cancel()  # aclose waits for an encode already in its thread (_encoding)
            elif publishing is not None and not publishing.cancelled() and publishing.exception() is not None:
                # (never awaited) it failed while the producer was being stopped: the stream ends
                # (stopped / closed) and the encode's error is logged, not left unretrieved
                log.warning("session %s: the last fragment's encode failed: %s", self.id, publishing.exception())

    async def _publish(self, frames: Any, switched: bool, media_s: float, t0: float, t1: float) -> None:
        """Encode one chunk (in the encoder pool) and append its fragment to the log."""
        m = self.metrics
        t_enc = time.perf_counter()
        job = self._encoding = asyncio.get_running_loop().run_in_executor(self.executor, self.encoder.encode_chunk,
                                                                          frames)
        try:
            frag = await asyncio.shield(job)
        finally:
            self._unpublished_s -= media_s
        t2 = time.perf_counter()
        del frames
        self.log.append(LogEntry(frag.seq, frag, P.Fragment(
            seq=frag.seq, data=frag.data, pts=frag.pts, duration=frag.duration, frames=frag.frames,
            keyframe=frag.keyframe), new_prompt=switched))
        now = time.monotonic()
        if switched:
            self.prompt_seq = frag.seq
            m.observe("prompt_switch_seconds", now - self._t_prompt)
            took = now - self._t_prompt
            self._switch_s = took if self._switch_s is None else 0.5 * self._switch_s + 0.5 * took
        self._chunk_s = t2 - t0 if self._chunk_s is None else 0.7 * self._chunk_s + 0.3 * (t2 - t0)
        for sub in self.subscribers:
            sub.wake()
        if self._t_first is None:
            self._t_first = now
            m.observe("time_to_first_fragment_seconds", now - self._t_start)
        self.generated_frames += frag.frames
        self.generated_s = frag.pts + frag.duration
        # generation and encode overlap (this chunk's encode runs during the next one's generation),
        # so the stream's pace is set by the slower of the two stages
        busy = max(t1 - t0, t2 - t_enc)
        self.gen_time += busy
        inst = frag.frames / max(busy, 1e-6)
        self.gen_fps = inst if self.gen_fps == 0 else 0.7 * self.gen_fps + 0.3 * inst
        m.inc("fragments_generated_total")
        m.inc("frames_generated_total", frag.frames)
        m.inc("generate_seconds_total", t1 - t0)
        m.inc("encode_seconds_total", t2 - t_enc)
        m.observe("chunk_seconds", t2 - t0)  # asked for -> its fragment in the log
        m.inc("fragment_bytes_total", len(frag.data))
        if switched or time.monotonic() - self._last_status >= self.limits.status_interval_s or frag.seq == 0:
            self._broadcast_status()


def new_session_id() -> str:
    return secrets.token_urlsafe(12)


class Refused(Exception):
    """A ``start`` that gets no session: ``code`` / ``field`` / ``retry_after`` / message as the
    client's error."""

    def __init__(self, code: str, message: str, field: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.code, self.field, self.retry_after = code, field, retry_after


class SessionRegistry:
    """All live sessions: creates them (the one admission count: per server and per client) and
    finds them for ``attach``."""

    def __init__(self, factory: SourceFactory, *, executor: Executor | None, metrics: Metrics,
                 limits: SessionLimits, preset: str = "veryfast", max_sessions: int = 4,
                 max_sessions_per_client: int = 2):
        self.factory, self.executor, self.metrics, self.limits = factory, executor, metrics, limits
        self.preset = preset
        self.max_sessions = max_sessions
        self.max_sessions_per_client = max_sessions_per_client
        self.sessions: dict[str, Session] = {}
        self._reserved: dict[str, int] = {}  # client -> sessions being created

    def _check_capacity(self, client: str) -> None:
        live = [s for s in self.sessions.values() if s.ended is None]  # ended ones are only draining
        total = len(live) + sum(self._reserved.values())
        if total >= self.max_sessions:
            raise Refused("busy", f"server is at its limit of {self.max_sessions} sessions; try again later")
        mine = sum(1 for s in live if s.client == client) + self._reserved.get(client, 0)
        if mine >= self.max_sessions_per_client:
            raise Refused("busy", f"this client already has {mine} session(s); the limit per client is "
                                  f"{self.max_sessions_per_client}")

    async def create(self, start: P.Start, client: str, on_queued=None) -> Session:
        """A new, registered (not yet started) session for ``start``; raises Refused. While the
        engine has no memory for it, ``on_queued(position)`` reports its place in the queue (the
        start still counts against the limits meanwhile)."""
        t_start = time.monotonic()
        self._check_capacity(client)
        self._reserved[client] = self._reserved.get(client, 0) + 1
        sid = new_session_id()
        try:
            try:
                source = await self.factory.create(start, name=sid, on_queued=on_queued)
            except SourceError as e:
                raise Refused(e.code, f"start.{e.field}: {e}" if e.field else str(e), e.field,
                              getattr(e, "retry_after", None)) from None
            try:
                encoder = await asyncio.get_running_loop().run_in_executor(
                    self.executor, lambda: FMP4Encoder(source.width, source.height, source.fps, preset=self.preset))
            except BaseException:
                await source.aclose()
                raise
            session = Session(source=source, encoder=encoder, metrics=self.metrics, executor=self.executor,
                              client=client, limits=self.limits, chunks=start.chunks, on_closed=self.remove,
                              session_id=sid, lead=start.lead, started_at=t_start)
            self.sessions[sid] = session
        finally:
            n = self._reserved[client] - 1
            if n > 0:
                self._reserved[client] = n
            else:
                del self._reserved[client]
        self.metrics.inc("sessions_started_total")
        log.info("session %s started for %s (%dx%d @ %s fps, prompt %r)", sid, client, encoder.width, encoder.height,
                 encoder.fps, start.prompt[:80])
        return session

    def remove(self, s: Session) -> None:
        self.sessions.pop(s.id, None)

    def get(self, sid: str) -> Session | None:
        s = self.sessions.get(sid)
        return None if s is None or s.closed else s

    async def aclose(self) -> None:
        for s in list(self.sessions.values()):
            await s.aclose()
