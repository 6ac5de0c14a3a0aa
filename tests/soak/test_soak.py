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
import pytest
import websockets

from streamgen import protocol as P
from test_server import FPC, FPS, Raw, _free_port, _small_rcvbuf_socket, start_server

CHUNK_S = FPC / FPS  # 0.25 s of media per fragment


@pytest.fixture
async def server():
    servers = []

    async def make(**cfg):
        s = await start_server(**cfg)
        servers.append(s)
        return s

    yield make
    for s in servers:
        await s.runner.cleanup()


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
    """A healthy viewer: starts (or attaches) and reads every fragment, recording seqs, drops and
    the time of each fragment. ``ack``: None | "seq" | "edge" | "wall"."""

    def __init__(self, url: str, prompt: str = "healthy", ack: str | None = None, **start):
        self.url, self.prompt, self.ack, self.start_kw = url, prompt, ack, start
        self.seqs: list[int] = []
        self.times: list[float] = []
        self.dropped = 0
        self.end: str | None = None
        self.session: str | None = None
        self.t0: float | None = None  # monotonic time of the first fragment (wall-clock playhead)
        self.task: asyncio.Task | None = None

    async def _read(self, c: Raw, stop_after: int | None = None) -> None:
        while True:
            m = await c.recv(timeout=10)
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
                if stop_after is not None and len(self.seqs) >= stop_after:
                    return

    async def run(self, seconds: float) -> None:
        c = await Raw.open(self.url)
        await c.send(P.Start(prompt=self.prompt, **self.start_kw))
        try:
            await asyncio.wait_for(self._read(c), seconds)
        except asyncio.TimeoutError:
            pass
        await c.close()

    def spawn(self, seconds: float) -> "Viewer":
        self.task = asyncio.create_task(self.run(seconds))
        return self

    def check_contiguous(self) -> None:
        assert self.seqs, "the viewer got no fragments"
        assert self.seqs == list(range(len(self.seqs))), f"gaps or duplicates: {self.seqs}"
        assert self.dropped == 0

    def rate(self) -> float:
        """Fragments per second over the steady part (after the first fragment)."""
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
