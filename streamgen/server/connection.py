"""One WebSocket connection of the v1 stream endpoint: protocol state machine + session control.

Every frame goes through :class:`streamgen.protocol.ServerConnection`, which validates it and
its order; a rejected frame is answered with an ``error`` naming the field (the connection
stays open unless the error is fatal). Application errors use these codes, all with
``ref`` = the message type they answer:

- ``busy`` (the server's or this client's session limit is reached),
- ``bad_field`` / ``unsupported`` with ``field`` from the frame source (e.g. a model that is
  not served, a size it cannot make),
- ``unknown_session`` (``attach`` to a session that does not exist or was already closed),
- ``internal`` (fatal: an unexpected failure handling a message; the socket is closed with 1011,
  the session, if any, waits for ``attach`` like after any disconnect; the server keeps running).

All writes to the socket go through :meth:`Connection.send` (one lock per connection), so the
session's sender task and replies to client messages never interleave frames.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time

from aiohttp import WSMsgType, web

from streamgen import protocol as P
from streamgen.server.sessions import Refused, Session, Subscriber
from streamgen.server.state import ServerState

log = logging.getLogger(__name__)
_ids = itertools.count(1)


class Connection:
    def __init__(self, state: ServerState, request: web.Request):
        self.state = state
        self.request = request
        self.id = f"c{next(_ids)}"
        self.client = request.remote or "unknown"
        self.limits = P.DEFAULT_LIMITS
        self.proto = P.ServerConnection(self.limits)
        # frames a bit over the protocol limit still reach the validator (-> too_large error);
        # far larger ones are cut off by aiohttp (close 1009) before they use memory
        self.ws = web.WebSocketResponse(max_msg_size=self.limits.max_message_bytes + (1 << 20),
                                        heartbeat=30.0, compress=False, timeout=2.0)
        self._lock = asyncio.Lock()
        self._bucket = _TokenBucket(state.cfg.messages_per_s, state.cfg.messages_burst)
        self.session: Session | None = None
        self.sub: Subscriber | None = None
        self._counter: _ByteCounter | None = None
        self._seen = 0  # bytes received when the last whole message came out of the WebSocket reader
        self._handling = False  # a message is being handled (the reader may hold queued ones meanwhile)

    # -- writing -----------------------------------------------------------------------------------

    async def send(self, msg: P.ServerMessage, entry=None) -> int:
        """Serialise ``msg`` through the protocol state machine and write it; returns bytes written.
        ``entry``: the fragment log's entry of ``msg``, whose bytes are encoded once for all viewers."""
        async with self._lock:
            data = self.proto.send(msg, None if entry is None else entry.wire(self.limits))
            if isinstance(msg, P.Error):
                self.state.metrics.inc("errors_total", code=msg.code)
            await self.ws.send_bytes(data)
            return len(data)

    async def _error(self, code: str, message: str, *, ref: str | None, field: str | None = None,
                     fatal: bool = False, retry_after: float | None = None) -> None:
        try:
            await self.send(P.Error(code=code, message=message[:1000], fatal=fatal, field=field, ref=ref,
                                    retry_after=retry_after))
        except (ConnectionError, RuntimeError, P.ProtocolError) as e:
            log.debug("%s: could not send error %s: %r", self.id, code, e)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def serve(self) -> web.WebSocketResponse:
        await self.ws.prepare(self.request)
        self._limit_kernel_buffering()
        self._count_bytes_in()
        self.state.sockets.add(self)
        watchdog = asyncio.create_task(self._incomplete_message_watchdog(), name=f"watchdog-{self.id}")
        try:
            async for m in self.ws:
                if self._counter is not None:
                    self._seen = self._counter.n
                if m.type in (WSMsgType.BINARY, WSMsgType.TEXT):
                    self._handling = True
                    try:
                        await self._on_frame(m.data)
                    finally:
                        self._handling = False
                    if self.proto.phase is P.Phase.CLOSED:
                        break
                elif m.type == WSMsgType.ERROR:
                    log.debug("%s: websocket error %r", self.id, self.ws.exception())
                    break
        except ConnectionError as e:
            log.debug("%s: connection lost: %r", self.id, e)
        finally:
            watchdog.cancel()
            self.state.sockets.discard(self)
            await self._detach()
            await self.close()
        return self.ws

    async def close(self, code: int = 1000, message: bytes = b"") -> None:
        """Close handshake, bounded: a client that does not read gets its transport aborted."""
        if not self.ws.closed:
            try:
                await asyncio.wait_for(self.ws.close(code=code, message=message), 2.0)
            except (asyncio.TimeoutError, ConnectionError):
                pass
        if self.request.transport is not None and not self.request.transport.is_closing():
            self.request.transport.abort()

    def _limit_kernel_buffering(self) -> None:
        """Keep at most ``cfg.unsent_bytes`` unsent in the kernel (TCP_NOTSENT_LOWAT, Linux/macOS):
        a client that stops reading then backs up into our flow control within a fragment or two,
        where whole fragments are dropped, instead of into seconds of kernel-buffered video."""
        limit = self.state.cfg.unsent_bytes
        sock = self.request.transport.get_extra_info("socket") if self.request.transport else None
        opt = getattr(socket, "TCP_NOTSENT_LOWAT", None)
        if limit and sock is not None and opt is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, opt, int(limit))
            except OSError as e:
                log.debug("TCP_NOTSENT_LOWAT not set: %r", e)

    def _count_bytes_in(self) -> None:
        """Count the bytes the WebSocket parser is fed (aiohttp keeps a message in progress in the
        parser, out of reach; the count against the last whole message shows it)."""
        proto = self.request.protocol
        parser = getattr(proto, "_payload_parser", None)
        if parser is not None and hasattr(parser, "feed_data"):
            proto._payload_parser = self._counter = _ByteCounter(parser)

    async def _incomplete_message_watchdog(self) -> None:
        """Close a connection whose message in progress (over _PARTIAL_BYTES received since the last
        whole one, none being handled) has not completed within ``cfg.message_timeout_s``: a client
        that stalls inside a 9 MiB message, answering pings, cannot hold that buffer indefinitely."""
        if self._counter is None:
            return
        timeout = self.state.cfg.message_timeout_s
        period = min(1.0, timeout / 4)
        since = None
        while not self.ws.closed:
            await asyncio.sleep(period)
            if self._handling or self._counter.n - self._seen <= _PARTIAL_BYTES:
                since = None
            elif since is None:
                since = time.monotonic()
            elif time.monotonic() - since >= timeout:
                log.info("%s: closed: a message of %d+ bytes was not completed within %g s", self.id,
                         self._counter.n - self._seen, timeout)
                self.state.metrics.inc("errors_total", code="message_timeout")
                await self.close(1008, b"message not completed in time")
                return

    async def _detach(self) -> None:
        sub, session = self.sub, self.session
        self.sub = self.session = None
        if sub is not None and session is not None:
            session.unsubscribe(sub)
            await sub.aclose()

    def _subscribe(self, session: Session, from_seq: int) -> None:
        self.session = session
        self.sub = sub = session.subscribe(self.send, from_seq=from_seq, conn_id=self.id)

        def done(_task: asyncio.Task) -> None:  # `end` sent (or the socket broke): leave the session
            if self.sub is sub:
                self.sub = self.session = None
                session.unsubscribe(sub)

        sub.task.add_done_callback(done)

    # -- reading -----------------------------------------------------------------------------------

    async def _on_frame(self, data: bytes | str) -> None:
        if not self._bucket.take():
            self.state.metrics.inc("bad_messages_total")
            await self._error("busy", f"too many messages: at most {self.state.cfg.messages_per_s:g} per second "
                              "on one connection; this one was dropped", ref=None)
            return
        try:
            msg = self.proto.receive(data)
        except P.ProtocolError as e:
            self.state.metrics.inc("bad_messages_total")
            await self._error(e.code, e.message, ref=e.ref, field=e.field, fatal=e.fatal)
            if e.fatal:
                await self.ws.close(code=1008, message=e.code.encode())
            return
        if msg is None:
            return
        try:
            await self._dispatch(msg)
        except Exception as e:  # never let one client's message take anything else down
            log.exception("%s: failed handling %s", self.id, msg.TYPE)
            await self._error("internal", f"{msg.TYPE} failed: {type(e).__name__}: {e}", ref=msg.TYPE, fatal=True)
            await self.ws.close(code=1011, message=b"internal")

    async def _dispatch(self, msg: P.ClientMessage) -> None:
        s = self.session
        if isinstance(msg, P.Start):
            await self._start(msg)
        elif isinstance(msg, P.Attach):
            await self._attach(msg)
        elif s is None:  # the session ended between the client's send and our receive
            return
        elif isinstance(msg, P.Prompt):
            s.set_prompt(msg.prompt)
        elif isinstance(msg, P.Pause):
            s.pause()
        elif isinstance(msg, P.Resume):
            s.resume()
        elif isinstance(msg, P.Stop):
            s.stop("stopped")
        elif isinstance(msg, P.Ack):
            if self.sub is not None:
                s.ack(self.sub, msg.seq, msg.playhead)

    async def _start(self, msg: P.Start) -> None:
        def queued(position: int) -> None:  # waiting for engine memory: where this start stands
            status = P.Status(state="queued", gen_fps=0.0, lead_s=0.0, extra={"position": position})
            asyncio.ensure_future(self._send_quietly(status))

        create = asyncio.ensure_future(self.state.registry.create(msg, self.client, on_queued=queued))
        try:
            while not create.done():  # a queued start of a client that went away gives its place up
                try:
                    await asyncio.wait([create], timeout=0.5)
                except asyncio.CancelledError:
                    create.cancel()
                    raise
                transport = self.request.transport
                if not create.done() and (transport is None or transport.is_closing()):
                    create.cancel()
                    await asyncio.wait([create])
                    return
            session = create.result()
        except asyncio.CancelledError:
            if create.cancelled() or not create.done():
                raise
            if create.exception() is None:
                await create.result().aclose()
            raise
        except Refused as e:
            await self._error(e.code, str(e), ref="start", field=e.field, retry_after=e.retry_after)
            return
        if self.ws.closed:
            await session.aclose()
            return
        session.start()
        self._subscribe(session, 0)

    async def _send_quietly(self, msg: P.ServerMessage) -> None:
        try:
            await self.send(msg)
        except (ConnectionError, RuntimeError, P.ProtocolError) as e:
            log.debug("%s: could not send %s: %r", self.id, msg.TYPE, e)

    async def _attach(self, msg: P.Attach) -> None:
        session = self.state.registry.get(msg.session)
        if session is None:
            await self._error(
                "unknown_session", f"attach.session: no live session {msg.session!r} (a session is kept "
                f"{self.state.cfg.grace_s:g} s after its last client disconnects)", ref="attach", field="session")
            return
        if msg.from_seq > session.log.next_seq:
            await self._error("bad_field", f"attach.from_seq: {msg.from_seq} is beyond the next fragment of this "
                              f"session ({session.log.next_seq})", ref="attach", field="from_seq")
            return
        if len(session.subscribers) >= self.state.cfg.max_viewers_per_session:
            await self._error("busy", f"session {session.id} already has {len(session.subscribers)} viewers (the "
                              f"limit is {self.state.cfg.max_viewers_per_session})", ref="attach")
            return
        log.info("%s: attached to session %s from seq %d", self.id, session.id, msg.from_seq)
        self._subscribe(session, msg.from_seq)


_PARTIAL_BYTES = 64 << 10  # more than control frames (pongs) add up to between two messages


class _ByteCounter:
    """Stands in for the connection's WebSocket parser: counts the bytes fed to it."""

    def __init__(self, inner):
        self.inner, self.n = inner, 0

    def feed_data(self, data):
        self.n += len(data)
        return self.inner.feed_data(data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _TokenBucket:
    """``rate`` messages per second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.t = burst, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
