"""asyncio Python client for a streamgen server, and the ``streamgen watch`` command.

Imports no torch (and no av); built on ``streamgen.protocol`` and ``websockets`` (asyncio API).

    async with StreamClient("ws://127.0.0.1:8765", token=None) as c:
        async for frag in c.start(prompt="a red fox", chunks=20):   # Fragment objects
            out.write(frag.data)             # c.init_segment was written first
            if frag.seq == 5:
                await c.set_prompt("a blue whale")   # alias: c.prompt(...)
            if frag.seq == 10:
                c.stop()                     # may be awaited; remaining fragments, then the loop ends
        print(c.end_reason, c.status)

Contract:
- ``start(prompt, **fields)`` validates at once (ProtocolError) and returns an async iterator; the
  ``start`` message goes out on the first ``__anext__``. It yields each ``Fragment`` (with
  ``events=True``: every server message: Ready, Init, Fragment, Status, End, non-fatal Error) and
  ends after ``end``. After each fragment is handed over and the consumer asks for the next
  one, an ``ack {seq}`` is sent (``ack=False`` disables it).
- State kept on the client: ``ready``, ``session``, ``init_segment``, ``status`` (latest),
  ``last_seq``, ``end_reason``, ``errors`` (non-fatal Error messages), ``reconnects`` and timing
  (``time_to_first_fragment``, ``frames``, ``fragments``, ``stats()``).
- ``set_prompt``/``prompt``, ``pause``, ``resume``, ``stop``: send now (in call order); each
  returns an asyncio Task that can be awaited (or not: failures are logged and kept in ``errors``).
- A lost connection while a session runs is reopened and resumed with
  ``attach(session, last_seq + 1)`` (up to ``max_reconnects`` tries in a row with backoff); the
  repeated ``ready``/``init`` are not yielded again, so nothing is missed or duplicated.
- A refused start, a fatal error or an exhausted reconnect raises ``StreamError``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator
from urllib.parse import urlsplit, urlunsplit

from streamgen import protocol as P
from streamgen.pipeline import UsageError, check_output

log = logging.getLogger("streamgen.client")


class StreamError(Exception):
    """The stream cannot go on: a refused start, a fatal server error, a lost connection."""

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None):
        super().__init__(message)
        self.code = code
        self.field = field


def stream_url(url: str) -> str:
    """``http(s)://host:port`` or ``ws(s)://host:port[/path]`` -> the WebSocket URL of the stream
    endpoint (``/v1/stream`` when no path is given)."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} in {url!r} (use ws://, wss://, http:// or https://)")
    path = parts.path if parts.path not in ("", "/") else P.ENDPOINT
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


@dataclass
class Stats:
    time_to_first_fragment: float | None  # seconds from sending start to the first fragment
    fragments: int
    frames: int
    bytes: int
    wall_s: float  # from sending start to the last fragment
    receive_fps: float | None  # frames / wall_s
    steady_fps: float | None  # frames after the first fragment / time since the first fragment
    video_s: float  # seconds of video received
    stream_fps: int | None  # the frame rate the server announced
    reconnects: int
    dropped: int  # fragments the server dropped for us (status.dropped, or seq gaps)


class StreamClient:
    """One WebSocket to a streamgen server; one session at a time (see the module docstring)."""

    def __init__(self, url: str, token: str | None = None, *, limits: P.Limits = P.DEFAULT_LIMITS,
                 ack: bool = True, reconnect: bool = True, max_reconnects: int = 5,
                 reconnect_delay: float = 0.25, open_timeout: float = 10.0, origin: str | None = None):
        self.url = stream_url(url)
        self.token = token
        self.limits = limits
        self.ack = ack
        self.reconnect = reconnect
        self.max_reconnects = max_reconnects
        self.reconnect_delay = reconnect_delay
        self.open_timeout = open_timeout
        self.origin = origin
        self._ws = None
        self._conn = P.ClientConnection(limits)
        self._send_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()  # sends in flight (the loop keeps only weak references)
        self._connected = asyncio.Event()
        self._closing = False
        self._stop_requested = False
        self._reset_session()

    def _reset_session(self) -> None:
        self.ready: P.Ready | None = None
        self.session: str | None = None
        self.init_segment: bytes | None = None
        self.status: P.Status | None = None
        self.last_seq: int | None = None
        self.end_reason: str | None = None
        self.errors: list[P.Error] = []
        self.reconnects = 0
        self.fragments = 0
        self.frames = 0
        self.bytes = 0
        self.video_s = 0.0
        self.gaps = 0
        self._t_start: float | None = None
        self._t_first: float | None = None
        self._t_last: float | None = None
        self._stop_requested = False

    # ------------------------------------------------------------------ connection

    async def __aenter__(self) -> "StreamClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def connect(self) -> None:
        await self._open()
        self._connected.set()

    async def _open(self) -> None:
        """A new WebSocket and a fresh ClientConnection (``_connected`` is left to the caller)."""
        from websockets.asyncio.client import connect

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            ws = await connect(self.url, additional_headers=headers, origin=self.origin,
                               max_size=self.limits.max_server_message_bytes, compression=None,
                               open_timeout=self.open_timeout, proxy=None)
        except Exception as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            hint = {401: " (wrong or missing token: pass token=... / --token)",
                    403: " (origin or client refused by the server)"}.get(status, "")
            raise StreamError(f"cannot connect to {self.url}: {e}{hint}", code="connect") from e
        self._ws, self._conn = ws, P.ClientConnection(self.limits)

    async def close(self) -> None:
        self._closing = True
        self._connected.clear()
        if self._ws is not None:
            await self._ws.close()

    # ------------------------------------------------------------------ sending

    async def _send(self, msg: P.ClientMessage) -> None:
        """Send in call order. While a reconnect is under way, wait for it and send on the new
        connection (a lost frame is sent again there); ``stop`` is sent at most once per connection."""
        from websockets.exceptions import ConnectionClosed

        while True:
            await asyncio.wait_for(self._connected.wait(), timeout=self.open_timeout * (self.max_reconnects + 1))
            async with self._send_lock:
                if not self._connected.is_set():
                    continue
                if isinstance(msg, P.Stop) and self._conn.stopping:
                    return
                data = self._conn.send(msg)
                try:
                    await self._ws.send(data)
                    return
                except ConnectionClosed:
                    if self._closing or not self.reconnect or self.session is None:
                        raise
                    self._connected.clear()  # the receive loop reconnects; then we send again

    async def _send_ack(self, seq: int) -> None:
        if not self._connected.is_set() or self._conn.phase is not P.Phase.ACTIVE:
            return
        try:
            async with self._send_lock:
                await self._ws.send(self._conn.send(P.Ack(seq=seq)))
        except Exception as e:  # a lost connection is handled by the receive loop
            log.debug("ack %d not sent: %s", seq, e)

    def _task(self, msg: P.ClientMessage) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(self._send(msg))
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                e = t.exception()
                log.warning("sending %s failed: %s", msg.TYPE, e)
                self.errors.append(P.Error(code=getattr(e, "code", "send_failed"), message=str(e), ref=msg.TYPE))

        task.add_done_callback(done)
        return task

    def set_prompt(self, prompt: str) -> asyncio.Task:
        """Switch the prompt from the next chunk the server starts."""
        return self._task(P.Prompt(prompt=prompt))

    prompt = set_prompt

    def pause(self) -> asyncio.Task:
        return self._task(P.Pause())

    def resume(self) -> asyncio.Task:
        return self._task(P.Resume())

    def stop(self) -> asyncio.Task:
        """Ask the server to end the session; fragments already made still arrive, then ``end``."""
        self._stop_requested = True
        return self._task(P.Stop())

    # ------------------------------------------------------------------ receiving

    def start(self, prompt: str, *, events: bool = False, **fields: Any) -> AsyncIterator[Any]:
        """Validate a start now; return the async iterator of the session (see module docstring).
        ``fields``: model, width, height, fps, seed, chunks, interpolate, image (bytes)."""
        msg = P.Start(prompt=prompt, **fields)
        P.encode(msg, self.limits)  # raises ProtocolError naming the field and the limit
        return self._run(msg, events)

    async def attach(self, session: str, from_seq: int = 0, *, events: bool = False) -> AsyncIterator[Any]:
        """Join a running session (e.g. one started by another process)."""
        msg = P.Attach(session=session, from_seq=from_seq)
        P.encode(msg, self.limits)
        async for ev in self._run(msg, events):
            yield ev

    async def _run(self, first: P.Start | P.Attach, events: bool) -> AsyncIterator[Any]:
        if self._ws is None:
            raise StreamError("not connected: use `async with StreamClient(url) as c` or await c.connect()")
        self._reset_session()
        self._t_start = time.monotonic()
        await self._send(first)
        reattached = False
        while True:
            try:
                data = await self._ws.recv()
            except Exception as e:
                from websockets.exceptions import ConnectionClosed

                if self._closing:
                    return
                if not isinstance(e, ConnectionClosed):
                    raise
                await self._reattach(e)
                reattached = True
                continue
            try:
                msg = self._conn.receive(data)
            except P.ProtocolError as e:
                raise StreamError(f"the server broke the protocol: {e.message}", code=e.code, field=e.field) from e
            if msg is None:
                continue
            if isinstance(msg, P.Error):
                self._on_error(msg)
                if events:
                    yield msg
                continue
            if isinstance(msg, P.Ready):
                self.ready, self.session = msg, msg.session
                if reattached:
                    if self._stop_requested:
                        self._task(P.Stop())
                    reattached = False
                    continue
            elif isinstance(msg, P.Init):
                if self.init_segment is not None and msg.data == self.init_segment:
                    continue
                if self.init_segment is not None and msg.data != self.init_segment:
                    log.warning("the server sent a different init segment after a reconnect")
                self.init_segment = msg.data
            elif isinstance(msg, P.Status):
                self.status = msg
            elif isinstance(msg, P.End):
                self.end_reason = msg.reason
                if events:
                    yield msg
                return
            elif isinstance(msg, P.Fragment):
                self._on_fragment(msg)
                yield msg
                if self.ack:
                    await self._send_ack(msg.seq)
                continue
            if events:
                yield msg

    def _on_error(self, msg: P.Error) -> None:
        where = f" (field {msg.field})" if msg.field else ""
        if msg.fatal:
            raise StreamError(f"server error {msg.code}{where}: {msg.message}", code=msg.code, field=msg.field)
        if msg.ref in ("start", "attach") and msg.code != "out_of_order" and self._conn.phase is P.Phase.IDLE:
            raise StreamError(f"{msg.ref} refused: {msg.code}{where}: {msg.message}", code=msg.code, field=msg.field)
        log.warning("server error %s%s: %s", msg.code, where, msg.message)
        self.errors.append(msg)

    def _on_fragment(self, msg: P.Fragment) -> None:
        now = time.monotonic()
        if self._t_first is None:
            self._t_first = now
        if self.last_seq is not None and msg.seq > self.last_seq + 1:
            self.gaps += msg.seq - self.last_seq - 1
        self._t_last = now
        self.last_seq = msg.seq
        self.fragments += 1
        self.frames += msg.frames
        self.bytes += len(msg.data)
        self.video_s += msg.duration

    async def _reattach(self, cause: Exception) -> None:
        """Reopen the connection and resume the session where we are."""
        self._connected.clear()
        if not self.reconnect or self.session is None:
            why = "reconnect is off" if not self.reconnect else "no session id yet (the start was not answered)"
            raise StreamError(f"connection lost ({cause}); cannot resume: {why}", code="disconnected") from cause
        from_seq = 0 if self.last_seq is None else self.last_seq + 1
        delay = self.reconnect_delay
        for attempt in range(1, self.max_reconnects + 1):
            await asyncio.sleep(delay)
            try:
                await self._open()
                self.reconnects += 1
                await self._ws.send(self._conn.send(P.Attach(session=self.session, from_seq=from_seq)))
                self._connected.set()
                log.info("reconnected (attempt %d), resuming session %s from fragment %d", attempt,
                         self.session, from_seq)
                return
            except Exception as e:
                log.warning("reconnect attempt %d/%d failed: %s", attempt, self.max_reconnects, e)
                delay = min(delay * 2, 5.0)
        raise StreamError(f"connection lost ({cause}) and {self.max_reconnects} reconnects failed",
                          code="disconnected") from cause

    # ------------------------------------------------------------------ numbers

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    @property
    def time_to_first_fragment(self) -> float | None:
        return None if self._t_first is None else self._t_first - self._t_start

    def stats(self) -> Stats:
        wall = (self._t_last - self._t_start) if self._t_last is not None else 0.0
        steady = None
        if self._t_first is not None and self._t_last is not None and self._t_last > self._t_first:
            first_frames = self.frames - (self.frames // self.fragments if self.fragments else 0)
            steady = first_frames / (self._t_last - self._t_first)
        dropped = max(self.gaps, self.status.dropped or 0) if self.status is not None else self.gaps
        return Stats(time_to_first_fragment=self.time_to_first_fragment, fragments=self.fragments,
                     frames=self.frames, bytes=self.bytes, wall_s=wall,
                     receive_fps=self.frames / wall if wall > 0 else None, steady_fps=steady,
                     video_s=self.video_s, stream_fps=self.ready.fps if self.ready else None,
                     reconnects=self.reconnects, dropped=dropped)


# ---------------------------------------------------------------------- `streamgen watch`


def add_arguments(p: argparse.ArgumentParser) -> None:
    from streamgen.pipeline import positive

    p.add_argument("url", help="server, e.g. ws://127.0.0.1:8765 or http://host:8765 (path defaults to /v1/stream)")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--out", default="out.mp4", help="output fragmented MP4 ('-': stdout, e.g. | ffplay -)")
    p.add_argument("--chunks", type=positive, help="number of chunks (default: until --seconds, Ctrl-C or the server ends)")
    p.add_argument("--seconds", type=float, help="stop after this many seconds of video")
    p.add_argument("--token", help="access token (sent as Authorization: Bearer)")
    p.add_argument("--model", help="model name the server should use")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--fps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--interpolate", type=int, choices=(1, 2, 4), help="RIFE frame multiplier")
    p.add_argument("--image", help="first frame (PNG/JPEG file) for image-to-video")
    p.add_argument("--switch", action="append", default=[], metavar="N=PROMPT",
                   help="after fragment N, switch to PROMPT (repeatable)")
    p.add_argument("--no-reconnect", action="store_true", help="fail instead of resuming after a lost connection")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary")


def _parse_switches(items: list[str]) -> dict[int, str]:
    out = {}
    for item in items:
        n, sep, prompt = item.partition("=")
        if not sep or not n.strip().isdigit() or not prompt:
            raise UsageError(f"--switch {item}: expected N=PROMPT (N a fragment number, PROMPT non-empty)")
        out[int(n)] = prompt
    return out


def stop_on_ctrl_c(c: StreamClient, say) -> None:
    """First Ctrl-C: send stop and finish the file cleanly; a second one aborts."""
    import signal

    loop = asyncio.get_running_loop()

    def handler() -> None:
        say("stopping (Ctrl-C again to abort)")
        c.stop()
        loop.remove_signal_handler(signal.SIGINT)

    try:
        loop.add_signal_handler(signal.SIGINT, handler)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / not Unix
        pass


def _check_watch(args: argparse.Namespace) -> dict:
    """The start fields of `watch`'s options; what cannot work raises UsageError before connecting."""
    try:
        stream_url(args.url)
    except ValueError as e:
        raise UsageError(f"url {args.url}: {e}") from None
    if args.out != "-":
        check_output("--out", args.out, suffixes=())
    fields = {k: getattr(args, k) for k in ("model", "width", "height", "fps", "seed", "chunks", "interpolate")
              if getattr(args, k) is not None}
    if args.image:
        try:
            with open(args.image, "rb") as f:
                fields["image"] = f.read()
        except OSError as e:
            raise UsageError(f"--image {args.image}: {e.strerror or e}") from None
    try:  # what any server refuses is refused here, before connecting, naming the option
        P.encode(P.Start(prompt=args.prompt, **fields))
    except P.ProtocolError as e:
        option = {"prompt": "--prompt", "image": "--image"}.get(e.field, f"--{e.field}") if e.field else "start"
        raise UsageError(f"{option}: {e.message.split(': ', 1)[-1]}") from None
    return fields


async def watch(args: argparse.Namespace) -> int:
    fields = _check_watch(args)
    switches = _parse_switches(args.switch)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    out = sys.stdout.buffer if args.out == "-" else None  # the file is made on the first fragment
    switched: tuple[float, int] | None = None  # (time, last seq received) of the latest --switch
    prompt_latencies: list[float] = []  # --switch -> the first fragment made under the new prompt
    try:
        async with StreamClient(args.url, token=args.token, reconnect=not args.no_reconnect) as c:
            stop_on_ctrl_c(c, say)
            try:
                stream = c.start(args.prompt, **fields)
            except P.ProtocolError as e:
                print(f"streamgen watch: error: {e.message}", file=sys.stderr)
                return 2
            async for frag in stream:
                if c.fragments == 1:
                    out = out or open(args.out, "wb")
                    out.write(c.init_segment)
                    say(f"ready: session {c.session}, {c.ready.width}x{c.ready.height} @ {c.ready.fps} fps, "
                        f"{c.ready.mime}; first fragment after {c.time_to_first_fragment * 1000:.0f} ms")
                out.write(frag.data)
                out.flush()
                st = c.status
                say(f"fragment {frag.seq}: {frag.frames} frames, {len(frag.data)} B, pts {frag.pts:.2f} s"
                    + (f" | {st.state}, gen {st.gen_fps:.1f} fps, lead {st.lead_s:.2f} s" if st else ""))
                first_new = st.extra.get("prompt_seq") if st is not None else None
                if switched is not None and isinstance(first_new, int) and first_new > switched[1] \
                        and frag.seq >= first_new:  # the server named the first fragment of the new prompt
                    prompt_latencies.append(time.monotonic() - switched[0])
                    switched = None
                if frag.seq in switches:
                    say(f"prompt -> {switches[frag.seq]!r}")
                    c.set_prompt(switches[frag.seq])
                    switched = (time.monotonic(), frag.seq)
                if args.seconds is not None and c.video_s >= args.seconds and not c.stop_requested:
                    c.stop()
            s = c.stats()
            ttff = f"{s.time_to_first_fragment * 1000:.0f} ms" if s.time_to_first_fragment is not None else "n/a"
            rfps = f"{s.receive_fps:.1f}" if s.receive_fps else "n/a"
            sfps = f"{s.steady_fps:.1f}" if s.steady_fps else "n/a"
            if prompt_latencies:
                pl = sorted(prompt_latencies)[len(prompt_latencies) // 2]
                plat = f"{pl * 1000:.0f} ms (median of {len(prompt_latencies)})"
            else:
                plat = "n/a (no switch, or the server does not name the first fragment of a new prompt)"
            print(f"latency (time to first fragment): {ttff}\n"
                  f"prompt latency (switch -> first fragment of the new prompt): {plat}\n"
                  f"received {s.fragments} fragments, {s.frames} frames, {s.video_s:.2f} s of video, "
                  f"{s.bytes / 1e6:.2f} MB in {s.wall_s:.2f} s\n"
                  f"fps: {rfps} received overall, {sfps} after the first fragment (stream {s.stream_fps} fps)\n"
                  f"end: {c.end_reason}; dropped {s.dropped}; reconnects {s.reconnects}"
                  + ("" if args.out == "-" else f"; wrote {args.out}"),
                  file=sys.stderr if args.out == "-" else sys.stdout, flush=True)
            return 0 if s.fragments else 1
    except StreamError as e:
        print(f"streamgen watch: error: {e}", file=sys.stderr)
        return 1
    finally:
        if out is not None and out is not sys.stdout.buffer:
            out.close()


def run(args: argparse.Namespace) -> int:
    return asyncio.run(watch(args))
