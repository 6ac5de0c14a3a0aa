"""Soak and fuzz of the real server over loopback (issue 11, "must show"): fuzzed frames next to a
healthy viewer, connect/disconnect churn, slow and stuck consumers, reconnect with every ack style,
SIGTERM with sessions in flight. Each phase runs ``soak_s`` seconds (STREAMGEN_SOAK_S, see conftest)."""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import websockets

from streamgen import protocol as P
from test_server import FPC, FPS, Raw, _free_port, _small_rcvbuf_socket, server, start_server  # noqa: F401

CHUNK_S = FPC / FPS  # 0.25 s of media per fragment


async def _until(cond, what, timeout=10.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class Viewer:
    """A healthy viewer: starts (or, with ``attach=(session, from_seq)``, attaches) and reads every
    fragment, recording seqs, drops and the time of each fragment, until ``end``, ``seconds`` or
    ``stop()``. ``ack``: None | "seq" | "edge" | "wall"; ``pause_after``: send pause after that many
    fragments."""

    def __init__(self, url: str, prompt: str = "healthy", ack: str | None = None, *, attach=None,
                 pause_after: int | None = None, **start):
        self.url, self.prompt, self.ack, self.start_kw = url, prompt, ack, start
        self.attach, self.pause_after = attach, pause_after
        self.seqs: list[int] = []
        self.times: list[float] = []
        self.dropped = 0
        self.end: str | None = None
        self.session: str | None = None
        self.t0: float | None = None  # monotonic time of the first fragment (wall-clock playhead)
        self.task: asyncio.Task | None = None
        self._stop = asyncio.Event()

    async def _read(self, c: Raw) -> None:
        while True:
            m = await c.recv(timeout=30)
            if isinstance(m, P.Ready):
                self.session = m.session
            elif isinstance(m, P.Status) and m.dropped:
                self.dropped += m.dropped
            elif isinstance(m, P.End):
                self.end = m.reason
                return
            elif isinstance(m, P.Fragment):
                now = time.monotonic()
                self.t0 = self.t0 or now
                self.seqs.append(m.seq)
                self.times.append(now)
                if self.ack == "seq":
                    await c.send(P.Ack(seq=m.seq))
                elif self.ack == "edge":
                    await c.send(P.Ack(seq=m.seq, playhead=m.pts + m.duration))
                elif self.ack == "wall":
                    await c.send(P.Ack(seq=m.seq, playhead=now - self.t0))
                if self.pause_after is not None and len(self.seqs) == self.pause_after:
                    await c.send(P.Pause())

    async def run(self, seconds: float) -> None:
        c = await Raw.open(self.url)
        if self.attach:
            await c.send(P.Attach(session=self.attach[0], from_seq=self.attach[1]))
        else:
            await c.send(P.Start(prompt=self.prompt, **self.start_kw))
        reader = asyncio.create_task(self._read(c))
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait([reader, stop], timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not reader.done():
            reader.cancel()
        await asyncio.wait([reader])
        if not reader.cancelled() and reader.exception() is not None:
            raise reader.exception()
        await c.close()

    def spawn(self, seconds: float) -> "Viewer":
        self.task = asyncio.create_task(self.run(seconds))
        return self

    async def stop(self) -> None:
        self._stop.set()
        await self.task

    def check_contiguous(self, first: int = 0) -> None:
        assert self.seqs, "the viewer got no fragments"
        assert self.seqs == list(range(first, first + len(self.seqs))), f"gaps or duplicates: {self.seqs}"
        assert self.dropped == 0

    def rate(self) -> float:
        """Fragments per second from the first fragment to the last."""
        if len(self.times) < 2:
            return 0.0
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


# ------------------------------------------------------------------------------------------ fuzz

_CLIENT_FIELDS = {
    "start": ["prompt", "model", "width", "height", "fps", "seed", "chunks", "interpolate", "image", "lead", "v"],
    "attach": ["session", "from_seq"], "prompt": ["prompt"], "ack": ["seq", "playhead"],
    "pause": [], "resume": [], "stop": [],
}


def _rand_value(rng: random.Random, depth: int = 0):
    k = rng.randrange(16)
    if k == 0:
        return rng.choice([0, 1, -1, 2**31, 2**32, 2**63 - 1, -(2**63), 2**64 - 1, 15, 16, 64, 320, 4096])
    if k == 1:
        return rng.randrange(-(2**40), 2**40)
    if k == 2:
        return rng.choice([0.0, -0.0, 0.5, 1e12, -1e12, 1e308, math.inf, -math.inf, math.nan, 5e-324])
    if k == 3:
        return "".join(chr(rng.randrange(1, 0x2FF)) for _ in range(rng.randrange(0, 40)))
    if k == 4:
        return "x" * rng.choice([4095, 4096, 4097, 20000, 200_000])
    if k == 5:
        return rng.randbytes(rng.randrange(0, 64))
    if k == 6:
        return None
    if k == 7:
        return rng.choice([True, False])
    if k == 8 and depth < 3:
        return [_rand_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    if k == 9 and depth < 3:
        return {str(rng.randrange(9)): _rand_value(rng, depth + 1) for _ in range(rng.randrange(0, 3))}
    if k == 10:
        return msgpack.ExtType(rng.randrange(0, 127), rng.randbytes(rng.randrange(0, 9)))
    if k == 11:
        return "\udcff" if rng.random() < 0.5 else "ok"  # lone surrogate: not encodable as UTF-8
    if k == 12:
        return rng.choice(["default", "testpattern", "../../etc/passwd", "", "AAAAAAAAAAAAAAAA", "é" * 3000])
    return rng.randrange(0, 200)


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, unicode_errors="surrogatepass")


def fuzz_frame(rng: random.Random) -> bytes | str:
    """One hostile or broken client frame."""
    k = rng.randrange(14)
    if k == 0:
        return rng.randbytes(rng.randrange(0, 80))
    if k == 1:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(0, 60)))  # a text frame
    if k == 2:
        return _pack(_rand_value(rng))  # not a map, or a map without a type
    if k == 3:  # duplicate keys / non-string keys / truncated map
        return rng.choice([b"\x82\xa4type\xa4stop\xa4type\xa4stop", b"\x81\x01\x02", b"\x83\xa4type", b"\xde\xff\xff",
                           b"\xdf\xff\xff\xff\xff", b"\x91" * 5000 + b"\xc0"])
    if k == 4:  # a type nobody sends, or a server's type
        return _pack({"type": rng.choice(["launch", "READY", "ready", "init", "fragment", "end", "error", "", 7]),
                      "x": _rand_value(rng)})
    if k == 5:  # a huge frame (still under the socket's cut-off): too_large
        return _pack({"type": "prompt", "prompt": "y" * (P.DEFAULT_LIMITS.max_message_bytes + 10)}) \
            if rng.random() < 0.05 else _pack({"type": "start", "prompt": "z" * rng.choice([4097, 100_000])})
    if k == 6:  # unsupported version (fatal)
        return _pack({"type": "start", "prompt": "v", "v": rng.choice([0, 2, 99, 65535])}) \
            if rng.random() < 0.3 else _pack({"type": "start", "prompt": "v", "v": "one"})
    if k == 7:  # valid messages out of order (no session yet), or an attach to nobody
        return P.encode(rng.choice([P.Prompt(prompt="early"), P.Pause(), P.Resume(), P.Stop(), P.Ack(seq=0),
                                    P.Ack(seq=3, playhead=1e12),
                                    P.Attach(session="NoSuchSession123", from_seq=rng.randrange(100))]))
    # a client type with random fields of random types
    t = rng.choice(list(_CLIENT_FIELDS))
    obj = {"type": t}
    for name in rng.sample(_CLIENT_FIELDS[t], k=rng.randrange(0, len(_CLIENT_FIELDS[t]) + 1)):
        obj[name] = _rand_value(rng)
    if rng.random() < 0.3:
        obj[rng.choice(["extra", "prompt", "seq", "type2"])] = _rand_value(rng)
    try:
        return _pack(obj)
    except (TypeError, ValueError, OverflowError):
        return _pack({"type": t})


def predict(mirror: P.ServerConnection, frame) -> tuple | None:
    """What the server must answer to ``frame`` given its protocol state ``mirror`` (updated as the
    server's would be): ('error', code, field, ref, fatal), None (ignored), or 'accepted' (a message
    the server acts on)."""
    try:
        msg = mirror.receive(frame)
    except P.ProtocolError as e:
        return ("error", e.code, e.field, e.ref, e.fatal)
    if msg is None:
        return None
    if isinstance(msg, P.Attach):  # a made-up session: unknown_session, and the state machine is back in IDLE
        mirror._server_message(P.Error(code="unknown_session", message="", fatal=False, field="session", ref="attach"))
        return ("error", "unknown_session", "session", "attach", False)
    return ("accepted", msg)


def _error_key(m: P.Error) -> tuple:
    return ("error", m.code, m.field, m.ref, m.fatal)


async def _fuzz_idle(url: str, seed: int, seconds: float, stats: dict) -> None:
    """A connection that never has a session: every frame is answered by exactly one error (the
    predicted one, or `busy` from the rate limit), in order. Frames are pipelined in batches."""
    rng = random.Random(seed)
    c = await Raw.open(url)
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        batch = []
        while len(batch) < rng.randrange(1, 40):
            frame = fuzz_frame(rng)
            want = predict(P.ServerConnection(), frame)  # in IDLE no error changes the state
            if want is None or want[0] == "accepted":  # a start the server would serve: not here
                continue
            batch.append((frame, want))
            if want[4]:  # fatal: the server closes after it
                break
        for frame, _ in batch:
            await c.ws.send(frame)
        closes = False
        for frame, want in batch:
            m = await c.recv_raw(timeout=10)
            assert isinstance(m, P.Error), m
            stats["frames"] += 1
            stats["codes"][m.code] = stats["codes"].get(m.code, 0) + 1
            if m.code == "busy" and m.ref is None:
                stats["busy"] += 1  # the rate limit dropped it before the validator
                assert "per second" in m.message
                continue
            assert _error_key(m) == want, (frame[:200], m, want)
            assert m.message
            closes = want[4]
        if closes:
            with pytest.raises(websockets.ConnectionClosed):
                await c.recv_raw(timeout=5)
            assert c.ws.close_code == 1008
            stats["fatal"] += 1
            c = await Raw.open(url)
    # a frame past the socket's cut-off closes the connection (1009) and harms nothing
    with pytest.raises(websockets.ConnectionClosed):  # (the close may cut our send short)
        await c.ws.send(b"\x00" * (P.DEFAULT_LIMITS.max_message_bytes + (2 << 20)))
        while True:
            await c.recv_raw(timeout=5)
    rcvd = c.ws.protocol.close_rcvd
    assert rcvd is None or rcvd.code == 1009, rcvd
    stats["cut_off"] += 1


async def _fuzz_active(url: str, seed: int, seconds: float, stats: dict) -> None:
    """A connection with a live session sending broken and out-of-order frames at most 40/s (below
    the rate limit): every predicted error comes back, in order, and nothing else does."""
    rng = random.Random(seed)
    c = await Raw.open(url)
    st = {"mirror": P.ServerConnection()}  # the server's protocol state of this connection
    start = P.encode(P.Start(prompt="fuzzed session"))
    st["mirror"].receive(start)
    await c.ws.send(start)
    errors: list[P.Error] = []

    async def read():
        while True:
            m = P.decode(await c.ws.recv(), "server")
            if isinstance(m, P.Error):
                errors.append(m)
            else:
                st["mirror"].send(m)  # the server keeps the order it must (raises otherwise)

    reader = asyncio.create_task(read())
    try:
        await _until(lambda: st["mirror"].init_done or reader.done(), "ready + init", 10)
        expected: list[tuple] = []
        t_end, sent, t0 = time.monotonic() + seconds, 0, time.monotonic()
        while time.monotonic() < t_end:
            frame = fuzz_frame(rng)
            last = st["mirror"].last_seq or 0
            trial = copy.deepcopy(st["mirror"])
            want = predict(trial, frame)
            if want is not None and want[0] == "accepted":
                msg = want[1]
                if isinstance(msg, P.Stop) or (isinstance(msg, P.Ack) and msg.seq > last):
                    continue  # would end the session / races the server's sends
                want = None  # acted on, not answered
            elif want is not None:
                if want[4]:
                    continue  # fatal errors are covered by the idle fuzzers
                if want[1:4] == ("bad_field", "seq", "ack"):
                    try:
                        seq = msgpack.unpackb(frame).get("seq")
                    except Exception:
                        seq = None
                    if isinstance(seq, int) and seq < last + 10_000:
                        continue  # beyond what this side has seen, maybe not beyond what the server sent
                expected.append(want)
            st["mirror"] = trial  # no await since the copy: nothing the reader applied is lost
            await c.ws.send(frame)
            sent += 1
            await asyncio.sleep(max(0.0, t0 + sent / 40 - time.monotonic()))
        expected.append(("error", "bad_message", None, None, False))
        await c.ws.send(b"\xc1")  # a sentinel: its error is the last one
        await _until(lambda: len(errors) >= len(expected) or reader.done(), "the fuzz errors", 10)
        await asyncio.sleep(0.2)  # anything unexpected after it would show too
        assert not reader.done(), reader.exception()
    finally:
        reader.cancel()
    got = [_error_key(m) for m in errors]
    assert got == expected, [(g, w) for g, w in zip(got, expected) if g != w][:5] or (len(got), len(expected))
    stats["frames"] += sent
    for m in errors:
        stats["codes"][m.code] = stats["codes"].get(m.code, 0) + 1
    await c.close()


async def test_fuzzed_frames_next_to_a_healthy_viewer(server, soak_s, caplog):
    """Several connections send random msgpack maps, wrong types, huge strings, random bytes and
    out-of-order messages while a healthy viewer streams: the viewer sees every seq once at real
    time, every fuzz frame gets the protocol's error (or busy from the rate limit), no ERROR is
    logged, the server stays up and serves a new stream afterwards."""
    caplog.set_level(logging.WARNING)
    srv = await server(max_sessions=8, max_sessions_per_client=8)
    viewer = Viewer(srv.url).spawn(soak_s + 2.0)
    await asyncio.sleep(0.5)
    stats = {"frames": 0, "busy": 0, "fatal": 0, "cut_off": 0, "codes": {}}
    seed = int(os.environ.get("STREAMGEN_SOAK_SEED") or time.time_ns() % 100000)
    fuzzers = [_fuzz_idle(srv.url, seed + i, soak_s, stats) for i in range(4)]
    fuzzers += [_fuzz_active(srv.url, seed + 100 + i, soak_s, stats) for i in range(2)]
    await asyncio.gather(*fuzzers)
    await viewer.task
    print(f"fuzz seed {seed}: {stats}; viewer {len(viewer.seqs)} fragments at {viewer.rate():.2f}/s")
    viewer.check_contiguous()
    assert viewer.rate() >= 0.8 / CHUNK_S, viewer.rate()  # real time is 4 fragments/s
    assert max(b - a for a, b in zip(viewer.times, viewer.times[1:])) < 1.0
    assert stats["frames"] > 200 and stats["cut_off"] == 4 and stats["fatal"] >= 1
    assert "internal" not in stats["codes"]
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]
    after = Viewer(srv.url, chunks=2).spawn(10)
    await after.task
    assert after.end == "done" and after.seqs == [0, 1]


# ------------------------------------------------------------------------------------------ churn


async def _start_in_a_slot(c: Raw, prompt: str, until) -> None:
    """Start, retrying on `busy`: slots held by sessions in grace (or by a start of the last round
    still in flight) must come back within 2 s."""
    for _ in range(40):
        await c.send(P.Start(prompt=prompt))
        m = await c.until((until, P.Error))
        if not isinstance(m, P.Error):
            return
        assert m.code == "busy", m
        await asyncio.sleep(0.05)
    raise AssertionError("no slot came back within 2 s")


async def _churn_round(srv, owner: Viewer, k: int) -> None:
    url = srv.url
    kind = k % 8
    c = await Raw.open(url)
    if kind == 0:  # start, then abort before reading anything
        await c.send(P.Start(prompt=f"churn {k}"))
        c.ws.transport.abort()
    elif kind == 1:  # start, read ready, abort (a session someone could attach to: grace)
        await _start_in_a_slot(c, f"churn {k}", P.Ready)
        c.ws.transport.abort()
    elif kind == 2:  # start, a fragment, stop, end, clean close
        await _start_in_a_slot(c, f"churn {k}", P.Fragment)
        await c.send(P.Stop())
        assert (await c.until(P.End)).reason == "stopped"
        await c.close()
    elif kind == 3:  # attach to the owner's session, then abort
        await c.send(P.Attach(session=owner.session, from_seq=owner.seqs[-1] + 1))
        await c.until(P.Ready)
        c.ws.transport.abort()
    elif kind == 4:  # attach, read a fragment, clean close
        await c.send(P.Attach(session=owner.session, from_seq=owner.seqs[-1]))
        await c.until(P.Fragment)
        await c.close()
    elif kind == 5:  # plain open / close
        await c.close()
    elif kind == 6:  # plain open / abort
        c.ws.transport.abort()
    else:  # start and close cleanly before ready arrives
        await c.send(P.Start(prompt=f"churn {k}"))
        await c.close()


async def test_connect_disconnect_churn_returns_to_baseline(server, soak_s, caplog):
    """Start+abort, start+ready+abort, stop+close, attach+abort, attach+close, open/close, open/abort,
    start+close for ``soak_s``: afterwards sessions, slots, sockets and this process's fds are back
    to their baseline, every slot can be used, and the owner's stream had no gap."""
    caplog.set_level(logging.WARNING)
    srv = await server(grace_s=0.3, max_sessions=6, max_sessions_per_client=6)
    st, reg = srv.state, srv.state.registry
    owner = Viewer(srv.url, "owner").spawn(soak_s + 30)
    await _until(lambda: owner.seqs, "the owner's first fragment")
    (owned,) = reg.sessions.values()

    def settled() -> bool:
        return (list(reg.sessions.values()) == [owned] and len(owned.subscribers) == 1 and len(st.sockets) == 1
                and not reg._reserved)

    for k in range(8):  # warm-up: one of each, so lazily opened files count in the baseline
        await _churn_round(srv, owner, k)
    await _until(settled, "the warm-up to settle", 5)
    await asyncio.sleep(0.3)
    fd0 = _fds()
    rounds, t_end = 0, time.monotonic() + soak_s
    peak = 0
    while time.monotonic() < t_end or rounds < 40:
        # a live session whose `ready` reached the socket waits grace_s for attach (the server cannot
        # tell whether the client read it): those come back within grace, the rest at once
        peak = max(peak, len(reg.sessions))
        await _until(lambda: len(reg.sessions) < reg.max_sessions, "a free slot within the grace period", 2.0)
        await _churn_round(srv, owner, rounds)
        rounds += 1
    await _until(settled, f"sessions/sockets back to baseline after {rounds} rounds "
                          f"({len(reg.sessions)} sessions, {len(st.sockets)} sockets)", 5)
    await _until(lambda: _fds() <= fd0, f"fds back to {fd0} (now {_fds()})", 5)
    assert _fds() == fd0
    # every other slot is free now
    others = [await Raw.open(srv.url) for _ in range(reg.max_sessions - 1)]
    for c in others:
        await c.send(P.Start(prompt="after churn"))
    for c in others:
        await c.until(P.Ready)
    for c in others:
        await c.close()
    await owner.stop()
    print(f"churn: {rounds} rounds, fds {fd0}, peak sessions {peak}")
    owner.check_contiguous()
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


# ------------------------------------------------------------------------------------------ stuck readers


async def test_slow_and_stuck_consumers_keep_memory_bounded_and_others_at_rate(server, soak_s):
    """Stuck readers (tiny receive buffer, never reading) with their own sessions, stuck viewers of
    the normal viewer's session, a liar (acks playhead 1e12, then never reads) and a slow reader, for
    ``soak_s``: RSS stops growing, every buffer stays within its bound, and the normal viewer gets
    every fragment at real time."""
    srv = await server(max_sessions=16, max_sessions_per_client=16)
    size = dict(width=320, height=192)
    normal = Viewer(srv.url, "normal", ack="wall", **size).spawn(soak_s + 30)
    await _until(lambda: normal.seqs, "the normal viewer's first fragment")
    stuck = []
    for i in range(6):
        c = await Raw.open(srv.url, sock=_small_rcvbuf_socket(srv.port), max_queue=1)
        await c.send(P.Start(prompt=f"stuck {i} " + "q" * i, **size))
        stuck.append(c)
    for _ in range(2):
        c = await Raw.open(srv.url, sock=_small_rcvbuf_socket(srv.port), max_queue=1)
        await c.send(P.Attach(session=normal.session, from_seq=normal.seqs[-1]))
        stuck.append(c)
    liar = await Raw.open(srv.url, sock=_small_rcvbuf_socket(srv.port), max_queue=1)
    await liar.send(P.Start(prompt="liar", **size))
    first = await liar.until(P.Fragment)
    await liar.send(P.Ack(seq=first.seq, playhead=1e12))
    slow = await Raw.open(srv.url, sock=_small_rcvbuf_socket(srv.port), max_queue=1)
    await slow.send(P.Start(prompt="slow", **size))

    async def read_slowly():
        while True:
            await slow.recv_raw()
            await asyncio.sleep(0.5)

    slow_task = asyncio.create_task(read_slowly())
    try:
        await asyncio.sleep(1.0)
        rss0, n0, t0 = _rss_mib(), len(normal.seqs), time.monotonic()
        await asyncio.sleep(soak_s / 3)
        rss1 = _rss_mib()
        await asyncio.sleep(2 * soak_s / 3)
        rss2, n2, t2 = _rss_mib(), len(normal.seqs), time.monotonic()
        reg = srv.state.registry
        frag_max = max(len(e.fragment.data) for s in reg.sessions.values()
                       for e in (s.log.get(i) for i in range(s.log.first_seq, s.log.next_seq)))
        for s in reg.sessions.values():
            assert len(s.log) <= 64 and s.generated_s <= (time.monotonic() - t0) + 10, s.generated_s
            for sub in s.subscribers:
                assert len(sub._control) <= 64 and sub.depth <= 8
        for conn in srv.state.sockets:
            assert conn.request.transport.get_write_buffer_size() <= conn.ws._writer_limit + 2 * frag_max
        log_mib = sum(s.log.bytes for s in reg.sessions.values()) / 2**20
    finally:
        slow_task.cancel()
        for c in stuck + [liar, slow]:
            c.ws.transport.abort()
    await normal.stop()
    rate = (n2 - n0) / (t2 - t0)
    print(f"stuck: RSS {rss0:.1f} -> {rss1:.1f} -> {rss2:.1f} MiB, logs {log_mib:.1f} MiB, "
          f"fragment <= {frag_max} B, normal viewer {rate:.2f} fragments/s")
    normal.check_contiguous()
    assert rate >= 0.85 / CHUNK_S, rate  # real time: 4 fragments/s
    assert rss2 - rss1 < 24, (rss0, rss1, rss2)  # no growth with time
    assert rss2 - rss0 < 48 + log_mib, (rss0, rss1, rss2)


# ------------------------------------------------------------------------------------------ reconnect


async def _reconnecting_viewer(url: str, ack: str | None, total: int, rng: random.Random, abort: bool) -> dict:
    """Starts a ``total``-chunk session, drops the connection 3 times at random points (abort or
    clean close), re-attaches from the last seq + 1 after a random pause, and acks in style ``ack``
    throughout. Returns every fragment seq received, per connection."""
    # cuts stay clear of the stream's end: once `end` was written the session is gone at once (a
    # client dropping while its last fragments and `end` are in flight loses them; see ARCHITECTURE.md)
    cuts = sorted(rng.sample(range(2, total - 6), 3))
    per_conn: list[list[int]] = [[]]
    gaps: list[float] = []
    t0 = None
    c = await Raw.open(url)
    await c.send(P.Start(prompt=f"reconnect {ack}", chunks=total))
    session, dropped, end = None, 0, None
    while end is None:
        t = time.monotonic()
        try:
            m = await c.recv(timeout=10)
        except asyncio.TimeoutError:
            raise AssertionError(f"stalled: ack={ack} abort={abort} per_conn={per_conn} dropped={dropped} "
                                 f"phase={c.conn.phase} last={c.conn.last_seq}") from None
        if isinstance(m, P.Ready):
            session = m.session
        elif isinstance(m, P.Status) and m.dropped:
            dropped += m.dropped
        elif isinstance(m, P.End):
            end = m.reason
        elif isinstance(m, P.Fragment):
            gaps.append(time.monotonic() - t)
            now = time.monotonic()
            t0 = t0 or now
            per_conn[-1].append(m.seq)
            if ack == "seq":
                await c.send(P.Ack(seq=m.seq))
            elif ack == "edge":
                await c.send(P.Ack(seq=m.seq, playhead=m.pts + m.duration))
            elif ack == "wall":
                await c.send(P.Ack(seq=m.seq, playhead=now - t0))
            if cuts and m.seq >= cuts[0]:
                cuts.pop(0)
                if abort:
                    c.ws.transport.abort()
                else:
                    await c.close()
                await asyncio.sleep(rng.uniform(0.0, 0.6))
                c = await Raw.open(url)
                await c.send(P.Attach(session=session, from_seq=m.seq + 1))
                per_conn.append([])
    await c.close()
    return {"per_conn": per_conn, "dropped": dropped, "end": end, "max_wait": max(gaps)}


async def test_reconnect_with_every_ack_style_gets_every_fragment_once(server, soak_s):
    """No acks, ack seq only, ack the live edge, ack a wall-clock playhead; each drops its connection
    three times (abort or clean close) and attaches from last seq + 1: every fragment arrives exactly
    once, in order, none is dropped, and the stream never stalls after a reconnect."""
    srv = await server(max_sessions=16, max_sessions_per_client=16, grace_s=5.0)
    total = max(20, int(soak_s / CHUNK_S))
    seed = int(os.environ.get("STREAMGEN_SOAK_SEED") or time.time_ns() % 100000)
    runs = [(ack, abort) for ack in (None, "seq", "edge", "wall") for abort in (True, False)]
    results = await asyncio.gather(*(_reconnecting_viewer(srv.url, ack, total, random.Random(seed + i), abort)
                                     for i, (ack, abort) in enumerate(runs)))
    for (ack, abort), r in zip(runs, results):
        what = f"ack={ack} abort={abort} seed={seed}: {r}"
        seqs = [s for conn in r["per_conn"] for s in conn]
        assert r["end"] == "done" and r["dropped"] == 0, what
        assert seqs == list(range(total)), what  # exactly once, in order, across 4 connections
        assert all(conn for conn in r["per_conn"]), what  # every re-attach got fragments
        assert r["max_wait"] < 2.0, what  # no stalled reconnect


# ------------------------------------------------------------------------------------------ SIGTERM


async def test_sigterm_with_sessions_in_flight(soak_s):
    """`python -m streamgen serve --model testpattern` with streaming, paused, second-viewer and
    wall-clock-acking sessions in flight (and a session waiting for attach): SIGTERM gives every
    viewer `end {reason: shutdown}` and the process exits 0 within a few seconds, logging no traceback."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamgen", "serve", "--model", "testpattern", "--port", str(port),
                             "--width", "128", "--height", "64", "--preset", "ultrafast", "--max-sessions", "8",
                             "--max-sessions-per-client", "8", "--grace", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"ws://127.0.0.1:{port}/v1/stream"
        for _ in range(400):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                await asyncio.sleep(0.05)
        viewers = [Viewer(url, "plain").spawn(60), Viewer(url, "wall", ack="wall").spawn(60),
                   Viewer(url, "paused", pause_after=2).spawn(60), Viewer(url, "edge", ack="edge").spawn(60)]
        await _until(lambda: all(len(v.seqs) >= 2 for v in viewers), "every viewer streaming", 20)
        viewers.append(Viewer(url, attach=(viewers[0].session, viewers[0].seqs[-1] + 1)).spawn(60))
        orphan = await Raw.open(url)
        await orphan.send(P.Start(prompt="orphan"))
        await orphan.until(P.Fragment)
        orphan.ws.transport.abort()  # a live session waiting for attach (grace 60 s)
        with socket.create_connection(("127.0.0.1", port)) as bad:  # a malformed HTTP request: one line, no traceback
            bad.sendall(b"GARBAGE \x01\x02 HTTP/9\r\n\r\n")
            bad.recv(1000)
        await _until(lambda: len(viewers[-1].seqs) >= 1, "the second viewer streaming", 10)
        await asyncio.sleep(min(soak_s, 2.0))
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*(v.task for v in viewers)), 10)
        rc = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 10)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out = proc.stdout.read().decode(errors="replace")
    assert [v.end for v in viewers] == ["shutdown"] * len(viewers), (out[-3000:], [v.end for v in viewers])
    for v in viewers:
        v.check_contiguous(first=v.seqs[0])
    assert rc == 0, out[-3000:]
    assert took < 4.0, took
    assert "Traceback" not in out and " ERROR " not in out, out[-3000:]


# ------------------------------------------------------------------------------------------ defects the soak found


async def test_a_session_that_ended_while_its_viewer_was_away_can_still_be_attached(server):
    """Found by the reconnect soak: a session whose last chunk was made (end `done`) while its viewer
    was still behind freed itself as soon as that viewer's connection dropped, so the re-attach got
    `unknown_session` and the tail of the stream (and `end`) was lost. A viewer that had not received
    everything keeps the session for the grace period; one that asked to `stop` does not."""
    srv = await server(max_lead_s=None, grace_s=5.0)
    reg = srv.state.registry
    c = await Raw.open(srv.url, sock=_small_rcvbuf_socket(srv.port), max_queue=1)
    await c.send(P.Start(prompt="tail", chunks=24, width=320, height=192))  # more than the socket buffers hold
    ready = await c.until(P.Ready)
    for _ in range(2):
        await c.until(P.Fragment)
    (session,) = reg.sessions.values()
    await _until(lambda: session.ended == "done", "the last chunk")
    c.ws.transport.abort()
    await asyncio.sleep(0.3)
    c2 = await Raw.open(srv.url)
    await c2.send(P.Attach(session=ready.session, from_seq=2))
    got = []
    m = await c2.until((P.End, P.Error), collect=got)
    assert isinstance(m, P.End) and m.reason == "done", m
    assert [f.seq for f in got if isinstance(f, P.Fragment)] == list(range(2, 24))
    await c2.close()
    await _until(lambda: not reg.sessions, "the delivered session to go at once", 2)


async def test_a_message_that_never_completes_is_cut_off(server):
    """Found by the slow-consumer soak (issue 11, item 6): a client that sends the first 8 MiB of a
    fragmented message and then stalls, answering pings, held that buffer for as long as it liked
    (1,000 such connections: 8 GiB). A message not completed within ``message_timeout_s`` closes
    the connection (1008); a slow but steady viewer and a valid image upload are not affected."""
    srv = await server(message_timeout_s=1.0)
    viewer = Viewer(srv.url, "bystander").spawn(30)
    stalled = []
    forever = asyncio.Event()

    async def fragments():
        yield b"\x00" * (8 << 20)
        await forever.wait()

    for _ in range(3):
        c = await Raw.open(srv.url)
        c.sending = asyncio.create_task(c.ws.send(fragments()))
        stalled.append(c)
    t0 = time.monotonic()
    await _until(lambda: len(srv.state.sockets) == 4, "the connections", 5)
    try:
        await _until(lambda: len(srv.state.sockets) == 1, "stalled messages to be cut off", 6)
    finally:
        forever.set()
    took = time.monotonic() - t0
    for c in stalled:
        with pytest.raises(websockets.ConnectionClosed):
            await c.recv_raw(timeout=5)
        c.sending.cancel()
    assert took < 4.0, took
    # an upload that completes within the timeout (here ~1 MiB, at once) is served as usual
    import io

    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), np.uint8)).save(b, format="PNG")
    up = await Raw.open(srv.url)
    await up.send(P.Start(prompt="with image", image=b.getvalue(), chunks=1))
    assert (await up.until(P.End)).reason == "done"
    await up.close()
    await asyncio.sleep(1.5)  # a viewer that sends nothing for longer than the timeout stays
    await viewer.stop()
    viewer.check_contiguous()
    assert viewer.end is None and len(viewer.seqs) >= 8
