"""Server end to end on loopback: sessions, prompt switch, slow clients, access control, bad input."""

from __future__ import annotations

import asyncio
import io
import socket
import subprocess
import sys

import aiohttp
import av
import msgpack
import numpy as np
import pytest
import websockets
from aiohttp import web

from streamgen import protocol as P
from streamgen.server.sources import TestPatternFactory, prompt_color, read_frame_index
from streamgen.server.app import ServerConfig, build_app

W, H, FPS, FPC = 128, 64, 16, 4  # small frames, 4 frames (0.25 s) per chunk


class Server:
    def __init__(self, runner: web.AppRunner, port: int):
        self.runner, self.port = runner, port
        from streamgen.server import app as app_module

        self.state = runner.app[app_module.STATE]
        self.url = f"ws://127.0.0.1:{port}/v1/stream"
        self.http = f"http://127.0.0.1:{port}"


async def start_server(**cfg) -> Server:
    factory_kw = {k: cfg.pop(k) for k in ("delay_s",) if k in cfg}
    cfg.setdefault("preset", "ultrafast")
    cfg.setdefault("encode_threads", 2)
    factory = TestPatternFactory("testpattern", width=W, height=H, fps=FPS, frames_per_chunk=FPC, **factory_kw)
    runner = web.AppRunner(build_app(ServerConfig(**cfg), factory))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return Server(runner, site._server.sockets[0].getsockname()[1])


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


class Raw:
    """Minimal client: websockets + the protocol's ClientConnection (or raw frames for bad input)."""

    def __init__(self, ws):
        self.ws = ws
        self.conn = P.ClientConnection()

    @classmethod
    async def open(cls, url: str, **kw) -> "Raw":
        kw.setdefault("close_timeout", 0.5)  # tests often close without reading what is in flight
        return cls(await websockets.connect(url, max_size=P.DEFAULT_LIMITS.max_server_message_bytes, **kw))

    async def send(self, msg) -> None:
        await self.ws.send(self.conn.send(msg))

    async def recv(self, timeout: float = 20.0):
        return self.conn.receive(await asyncio.wait_for(self.ws.recv(), timeout))

    async def recv_raw(self, timeout: float = 20.0):
        return P.decode(await asyncio.wait_for(self.ws.recv(), timeout), "server")

    async def until(self, cls, timeout: float = 20.0, collect: list | None = None):
        while True:
            m = await self.recv(timeout)
            if collect is not None:
                collect.append(m)
            if isinstance(m, cls):
                return m

    async def close(self):
        await self.ws.close()


def decode_frames(init: bytes, fragments: list[bytes]) -> list[np.ndarray]:
    with av.open(io.BytesIO(init + b"".join(fragments)), format="mp4") as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def bg_color(frame: np.ndarray) -> np.ndarray:
    """Median colour of the frame below the code band (the prompt colour dominates)."""
    return np.median(frame[H // 8:].reshape(-1, 3), axis=0)


# ---------------------------------------------------------------------------------------------


async def test_stream_prompt_switch_stop_with_client(server):
    from streamgen.client import StreamClient

    srv = await server(max_lead_s=None)
    init, frags, seqs = None, [], []
    async with StreamClient(srv.url) as c:
        n = 0
        async for frag in c.start(prompt="a red fox"):
            if init is None:
                init = c.init_segment
                assert c.ready.width == W and c.ready.height == H and c.ready.fps == FPS
                assert c.ready.mime.startswith('video/mp4; codecs="avc1.')
            frags.append(frag.data)
            seqs.append(frag.seq)
            assert frag.keyframe and frag.frames == FPC
            assert frag.pts == pytest.approx(frag.seq * FPC / FPS)
            n += 1
            if n == 3:
                await c.prompt("a blue whale")
            if n == 8:
                await c.stop()
        assert c.end_reason == "stopped"
    assert seqs == list(range(len(seqs))) and len(seqs) >= 8
    frames = decode_frames(init, frags)
    assert [read_frame_index(f) for f in frames] == list(range(len(frames)))
    # prompt switch is visible: first chunk shows prompt 1's colour, the last one prompt 2's
    assert np.abs(bg_color(frames[0]) - prompt_color("a red fox")).max() < 12
    assert np.abs(bg_color(frames[-1]) - prompt_color("a blue whale")).max() < 12
    # the session is gone once `end` was delivered
    for _ in range(100):
        if not srv.state.registry.sessions:
            break
        await asyncio.sleep(0.02)
    assert not srv.state.registry.sessions


async def metrics(srv) -> dict[str, float]:
    """/metrics as {series: value} (series with labels keep them: 'errors_total{code="busy"}')."""
    async with aiohttp.ClientSession() as http:
        text = await (await http.get(srv.http + "/metrics")).text()
    return {line.split()[0].removeprefix("streamgen_"): float(line.split()[1])
            for line in text.splitlines() if line and not line.startswith("#")}


async def test_chunks_limit_ends_with_done_and_metrics(server):
    srv = await server(max_lead_s=None, grace_s=0.2)
    # 1. while a session generates: sessions, generation fps, queue depths are live
    live = await Raw.open(srv.url)
    await live.send(P.Start(prompt="live"))
    for _ in range(2):
        await live.until(P.Fragment)
    m = await metrics(srv)
    assert m["sessions"] == 1 and m["connections"] == 1 and m["generation_fps"] > 0
    assert 0 <= m["send_queue_fragments_max"] <= m["send_queue_fragments"] <= 8
    await live.close()
    for _ in range(100):
        if (m0 := await metrics(srv))["connections"] == 0:
            break
        await asyncio.sleep(0.02)
    # 2. a session with a chunk limit; fragments and bytes sent are counted exactly
    c = await Raw.open(srv.url)
    await c.send(P.Start(prompt="x", chunks=3))
    got, frame_bytes = [], 0
    while True:
        raw = await asyncio.wait_for(c.ws.recv(), 20)
        msg = c.conn.receive(raw)
        got.append(msg)
        if isinstance(msg, P.Fragment):
            frame_bytes += len(raw)
        if isinstance(msg, P.End):
            break
    assert msg.reason == "done"
    assert [m.seq for m in got if isinstance(m, P.Fragment)] == [0, 1, 2]
    assert isinstance(got[0], (P.Ready, P.Status)) and any(isinstance(m, P.Init) for m in got)
    m1 = await metrics(srv)
    assert m1["fragments_sent_total"] - m0["fragments_sent_total"] == 3
    assert m1["bytes_sent_total"] - m0["bytes_sent_total"] == frame_bytes
    # the same connection can start again after end
    await c.send(P.Start(prompt="y", chunks=1))
    assert (await c.until(P.End)).reason == "done"
    await c.ws.send(msgpack.packb({"type": "start", "prompt": "z", "width": 100}))  # refused: counted by code
    assert (await c.recv_raw()).code == "bad_field"
    await c.close()
    async with aiohttp.ClientSession() as http:
        health = await (await http.get(srv.http + "/healthz")).json()
    assert health["status"] == "ok" and health["model"] == "testpattern"
    after = await metrics(srv)
    assert after["fragments_sent_total"] - m1["fragments_sent_total"] == 1
    assert after["errors_total{code=\"bad_field\"}"] == 1
    assert after["fragments_dropped_total"] == 0
    for _ in range(100):  # sessions go once their clients are gone (grace 0 after `end`)
        if (await metrics(srv))["sessions"] == 0:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("sessions gauge never went back to 0")


def _small_rcvbuf_socket(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.setblocking(False)
    return s


async def test_slow_client_is_bounded_and_does_not_slow_others(server):
    q, ring = 4, 12
    srv = await server(max_lead_s=None, queue_fragments=q, log_fragments=ring)
    # 1. a client that starts a stream and then never reads (tiny socket buffer, 1-message queue)
    slow = await Raw.open(srv.url, sock=_small_rcvbuf_socket(srv.port), max_queue=1)
    await slow.send(P.Start(prompt="slow"))
    # 2. a second client reads 30 fragments meanwhile: all of them, in order, nothing dropped
    fast = await Raw.open(srv.url)
    await fast.send(P.Start(prompt="fast", chunks=30))
    got = []
    assert (await fast.until(P.End, timeout=60, collect=got)).reason == "done"
    assert [m.seq for m in got if isinstance(m, P.Fragment)] == list(range(30))
    assert all(not m.dropped for m in got if isinstance(m, P.Status))
    # 3. the slow session keeps generating; its subscriber drops whole fragments, memory stays bounded
    reg = srv.state.registry
    (session,) = [s for s in reg.sessions.values() if s.ended is None]
    for _ in range(400):
        sub = session.subscribers[0]
        if session.log.next_seq - sub.cursor > 2 * ring:
            break
        await asyncio.sleep(0.05)
    sub = session.subscribers[0]
    assert sub.dropped > 0 or session.log.next_seq - sub.cursor > q  # skipped, or about to be
    assert len(session.log) <= ring
    frag_max = max(len(e.fragment.data) for e in (session.log.get(i) for i in range(session.log.first_seq,
                                                                                  session.log.next_seq)))
    assert session.log.bytes <= ring * frag_max
    for conn in srv.state.sockets:  # socket writes are flow-controlled: asyncio's buffer stays small
        assert conn.request.transport.get_write_buffer_size() <= conn.ws._writer_limit + 2 * frag_max
    # 4. when the slow client reads again it sees the gap and a status counting the drops
    seen, statuses = [], []
    while not (statuses and any(b - a > 1 for a, b in zip(seen, seen[1:]))) and len(seen) < 5000:
        m = await slow.recv_raw(timeout=20)
        if isinstance(m, P.Fragment):
            seen.append(m.seq)
        elif isinstance(m, P.Status) and m.dropped:
            statuses.append(m.dropped)
    assert statuses and seen == sorted(seen)
    assert any(b - a > 1 for a, b in zip(seen, seen[1:]))
    async with aiohttp.ClientSession() as http:
        text = await (await http.get(srv.http + "/metrics")).text()
    dropped = float(next(l.split()[-1] for l in text.splitlines() if l.startswith("streamgen_fragments_dropped_total")))
    assert dropped >= sub.dropped > 0
    slow.ws.transport.abort()
    await fast.close()


async def test_token_refusal(server):
    srv = await server(token="s3cret")
    for url, headers in ((srv.url, None), (srv.url + "?token=wrong", None),
                         (srv.url, {"Authorization": "Bearer nope"})):
        with pytest.raises(websockets.InvalidStatus) as e:
            await websockets.connect(url, additional_headers=headers)
        assert e.value.response.status_code == 401
    for url, headers in ((srv.url + "?token=s3cret", None), (srv.url, {"Authorization": "Bearer s3cret"})):
        c = Raw(await websockets.connect(url, additional_headers=headers))
        await c.send(P.Start(prompt="ok", chunks=1))
        assert (await c.until(P.End)).reason == "done"
        await c.close()
    async with aiohttp.ClientSession() as http:
        assert (await http.get(srv.http + "/metrics")).status == 401
        assert (await http.get(srv.http + "/metrics?token=s3cret")).status == 200
        assert (await http.get(srv.http + "/healthz")).status == 200


async def test_origin_refusal(server):
    srv = await server(allowed_origins=["http://good.example"])
    with pytest.raises(websockets.InvalidStatus) as e:
        await websockets.connect(srv.url, origin="http://evil.example")
    assert e.value.response.status_code == 403
    ws = await websockets.connect(srv.url, origin="http://good.example")
    await ws.close()
    srv2 = await server()  # default: same origin only
    with pytest.raises(websockets.InvalidStatus) as e:
        await websockets.connect(srv2.url, origin="http://evil.example")
    assert e.value.response.status_code == 403
    ws = await websockets.connect(srv2.url, origin=f"http://127.0.0.1:{srv2.port}")
    await ws.close()
    ws = await websockets.connect(srv2.url)  # no Origin: not a browser
    await ws.close()


async def test_bad_input_is_answered_and_harms_nothing(server):
    srv = await server(max_lead_s=None)
    # a healthy stream on another connection
    other = await Raw.open(srv.url)
    await other.send(P.Start(prompt="bystander", chunks=40))
    c = await Raw.open(srv.url)

    async def expect(frame, code, field):
        await c.ws.send(frame)
        m = await c.recv_raw()
        assert isinstance(m, P.Error) and (m.code, m.field) == (code, field), m
        assert not m.fatal
        return m

    await expect(b"\xc1garbage", "bad_message", None)
    await expect("a text frame", "bad_message", None)
    await expect(msgpack.packb([1, 2]), "bad_message", None)
    await expect(msgpack.packb({"type": "launch"}), "unknown_type", "type")
    await expect(msgpack.packb({"type": "prompt", "prompt": "x"}), "out_of_order", "type")
    await expect(msgpack.packb({"type": "start"}), "bad_field", "prompt")
    await expect(msgpack.packb({"type": "start", "prompt": "x", "width": 17}), "bad_field", "width")
    await expect(msgpack.packb({"type": "start", "prompt": "x", "fps": "fast"}), "bad_field", "fps")
    e = await expect(msgpack.packb({"type": "start", "prompt": "x" * 5000}), "too_large", "prompt")
    assert "4096" in e.message
    e = await expect(msgpack.packb({"type": "start", "prompt": "x", "model": "wan-99b"}), "bad_field", "model")
    assert "testpattern" in e.message
    await expect(msgpack.packb({"type": "start", "prompt": "x", "image": b"not an image"}), "bad_field", "image")
    await expect(msgpack.packb({"type": "attach", "session": "nope", "from_seq": 0}), "unknown_session", "session")
    # still usable: a valid start on the same connection streams
    c.conn = P.ClientConnection()
    await c.send(P.Start(prompt="finally", chunks=2))
    await c.until(P.Fragment)
    await c.ws.send(msgpack.packb({"type": "ack", "seq": 99}))  # never sent -> bad_field seq
    while True:
        m = await c.recv_raw()
        if isinstance(m, P.Error):
            assert (m.code, m.field) == ("bad_field", "seq")
            break
    # the bystander got everything
    got = []
    assert (await other.until(P.End, timeout=60, collect=got)).reason == "done"
    assert [m.seq for m in got if isinstance(m, P.Fragment)] == list(range(40))
    async with aiohttp.ClientSession() as http:
        text = await (await http.get(srv.http + "/metrics")).text()
    assert 'streamgen_errors_total{code="bad_field"}' in text
    await c.close()
    await other.close()


async def test_session_limits(server):
    srv = await server(max_sessions=2, max_sessions_per_client=1)
    a = await Raw.open(srv.url)
    await a.send(P.Start(prompt="a"))
    await a.until(P.Ready)
    b = await Raw.open(srv.url)
    await b.send(P.Start(prompt="b"))
    m = await b.until(P.Error)
    assert m.code == "busy" and m.ref == "start" and "per client" in m.message
    srv.state.registry.max_sessions_per_client = 5
    await b.send(P.Start(prompt="b"))
    await b.until(P.Ready)
    c = await Raw.open(srv.url)
    await c.send(P.Start(prompt="c"))
    m = await c.until(P.Error)
    assert m.code == "busy" and "2 sessions" in m.message
    for x in (a, b, c):
        await x.close()


async def test_attach_after_disconnect_misses_nothing(server):
    srv = await server(max_lead_s=None, grace_s=5.0, log_fragments=1000)
    c = await Raw.open(srv.url)
    await c.send(P.Start(prompt="resume me", chunks=12))
    ready = await c.until(P.Ready)
    init = (await c.until(P.Init)).data
    frags = {}
    while len(frags) < 3:
        m = await c.until(P.Fragment)
        frags[m.seq] = m.data
    c.ws.transport.abort()  # an abrupt disconnect, no close handshake
    d = await Raw.open(srv.url)
    await d.send(P.Attach(session=ready.session, from_seq=max(frags) + 1))
    r2 = await d.until(P.Ready)
    assert r2.session == ready.session
    assert (await d.until(P.Init)).data == init
    got = []
    assert (await d.until(P.End, collect=got)).reason == "done"
    for m in got:
        if isinstance(m, P.Fragment):
            frags[m.seq] = m.data
    assert sorted(frags) == list(range(12))
    frames = decode_frames(init, [frags[i] for i in range(12)])
    assert [read_frame_index(f) for f in frames] == list(range(12 * FPC))
    await d.close()


async def test_disconnect_cancels_session_after_grace(server):
    srv = await server(grace_s=0.3)
    c = await Raw.open(srv.url)
    await c.send(P.Start(prompt="bye"))
    await c.until(P.Fragment)
    (session,) = srv.state.registry.sessions.values()
    await c.close()
    await asyncio.sleep(0.1)
    assert session.id in srv.state.registry.sessions  # still attachable within the grace period
    for _ in range(100):
        if not srv.state.registry.sessions:
            break
        await asyncio.sleep(0.05)
    assert not srv.state.registry.sessions and session.closed
    assert session.producer.done()


async def test_pacing_by_acks(server):
    """The viewer position is the acked playhead moved on at real time, clamped to what was sent and
    to real time since the first fragment; pause stops generation, resume goes on."""
    srv = await server(max_lead_s=0.5)  # chunks are 0.25 s
    c = await Raw.open(srv.url)
    await c.send(P.Start(prompt="paced"))
    first = await c.until(P.Fragment)
    await c.send(P.Ack(seq=first.seq, playhead=0.0))
    await asyncio.sleep(0.8)
    (session,) = srv.state.registry.sessions.values()
    n = session.log.next_seq
    assert 4 <= n <= 8  # ~ (0.8 s played + 0.5 s lead) / 0.25 s: paced, and not frozen at the old ack
    # 1. a far-future playhead buys nothing: at most real time since the first fragment
    await c.send(P.Ack(seq=first.seq, playhead=1e6))
    await asyncio.sleep(0.5)
    n2 = session.log.next_seq
    assert n2 <= n + 5, (n, n2)  # unpaced, the test pattern would make hundreds
    assert session.lead_s() >= 0
    # 2. paused: nothing more is made; resumed: it goes on
    await c.send(P.Pause())
    await asyncio.sleep(0.1)
    n3 = session.log.next_seq
    await asyncio.sleep(0.4)
    assert session.log.next_seq <= n3 + 1 and session.state == "paused"
    await c.send(P.Resume())
    for _ in range(200):
        if session.log.next_seq > n3 + 3:
            break
        await asyncio.sleep(0.02)
    assert session.log.next_seq > n3 + 3
    await c.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_serve_cli_serves_player_and_health():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamgen", "serve", "--model", "testpattern", "--port", str(port), "--token", "t0k"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    r = await http.get(f"http://127.0.0.1:{port}/healthz")
                    break
                except aiohttp.ClientConnectionError:
                    assert proc.poll() is None, proc.stdout.read().decode()
                    await asyncio.sleep(0.05)
            assert r.status == 200
            page = await http.get(f"http://127.0.0.1:{port}/")
            assert page.status == 200 and "<video" in await page.text()
            js = await http.get(f"http://127.0.0.1:{port}/player.js")
            assert js.status == 200 and js.content_type == "text/javascript"
        with pytest.raises(websockets.InvalidStatus):
            await websockets.connect(f"ws://127.0.0.1:{port}/v1/stream")
        c = Raw(await websockets.connect(f"ws://127.0.0.1:{port}/v1/stream?token=t0k"))
        await c.send(P.Start(prompt="cli", chunks=2))
        assert (await c.until(P.End)).reason == "done"
        await c.close()
    finally:
        proc.terminate()
        proc.wait(10)


async def test_a_new_prompt_is_made_at_once_past_the_lead(server):
    """A viewer that holds its playhead keeps the session at its lead; a prompt change gets exactly
    one chunk at once, past the lead (the player may skip to it), and then pacing holds again."""
    srv = await server(max_lead_s=0.5)  # chunks are 0.25 s
    c = await Raw.open(srv.url)
    await c.send(P.Start(prompt="held"))
    first = await c.until(P.Fragment)
    (session,) = srv.state.registry.sessions.values()

    async def hold(seconds: float) -> None:  # ack playhead 0 again and again: the viewer does not move
        t_end = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < t_end:
            await c.send(P.Ack(seq=first.seq, playhead=0.0))
            await asyncio.sleep(0.03)

    await hold(1.0)
    held = session.log.next_seq
    await hold(0.5)
    assert session.log.next_seq == held, "pacing did not hold the session at its lead"
    assert held * 0.25 <= 0.5 + 0.25 + 1e-6, held
    await c.send(P.Prompt(prompt="changed"))
    await hold(0.6)
    assert session.log.next_seq == held + 1, (held, session.log.next_seq)  # one chunk, at once
    assert session.prompt_seq == held  # ... made under the new prompt
    await hold(0.5)
    assert session.log.next_seq == held + 1  # and no more: one chunk past the lead at most
    await c.close()


async def test_the_pace_keeps_a_slow_chunks_time_plus_a_margin_ahead_of_the_viewer(server):
    """A chunk that takes 0.2 s to make against a 0.25 s lead: a real-time viewer paced at the lead
    alone would get each fragment as its buffer runs dry. The pace keeps the chunk's time plus
    ``pace_margin_s`` (0.25 s) ahead instead, so every fragment lands with that much still buffered."""
    srv = await server(max_lead_s=0.25, delay_s=0.2)  # chunks are 0.25 s of media, made in ~0.2 s
    c = await Raw.open(srv.url)
    await c.send(P.Start(prompt="slow"))
    first = await c.until(P.Fragment)
    loop = asyncio.get_running_loop()
    t0 = loop.time()  # the viewer plays from the first fragment's arrival at real time
    (session,) = srv.state.registry.sessions.values()
    ahead = []  # media the viewer still had when each fragment arrived
    end_s = first.pts + first.duration
    while len(ahead) < 12:
        frag = await c.until(P.Fragment)
        playhead = loop.time() - t0
        ahead.append(end_s - playhead)
        end_s = frag.pts + frag.duration
        await c.send(P.Ack(seq=frag.seq, playhead=playhead))
    steady = ahead[4:]  # after the first lead's burst
    assert min(steady) >= 0.12, [round(a, 3) for a in ahead]  # at the 0.25 s lead alone: ~0.05 s, or a stall
    assert session.pace_lead_s() > 0.25 + 0.15, session.pace_lead_s()  # ~ 0.2 s + 0.25 s margin
    await c.close()


async def test_a_player_that_jumps_to_the_new_prompt_is_paced_from_there(server):
    """A player skips the old prompt's buffered tail to the first fragment of a new prompt (its
    ``prompt_seq``): its playhead then runs ahead of real time since its first fragment by what it
    skipped. The server takes that playhead as the viewer's position (not clamped back to real
    time), so it goes on making chunks for it instead of waiting for a viewer it thinks is behind."""
    srv = await server(max_lead_s=1.0)  # chunks are 0.25 s: about 1 s of the old prompt is buffered
    c = await Raw.open(srv.url)
    await c.send(P.Start(prompt="old"))
    first = await c.until(P.Fragment)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    (session,) = srv.state.registry.sessions.values()
    while session.lead_s() < 0.9:  # real-time playback until the lead is full
        await c.send(P.Ack(seq=first.seq, playhead=loop.time() - t0))
        await asyncio.sleep(0.03)
    await c.send(P.Prompt(prompt="new"))
    new_seq, got = None, -1
    while new_seq is None or got < new_seq:  # until the new prompt's first fragment is here
        msg = await c.recv()
        if isinstance(msg, P.Status) and msg.extra.get("prompt_seq") is not None:
            new_seq = msg.extra["prompt_seq"]
        elif isinstance(msg, P.Fragment):
            got = msg.seq
    jump_to = session.log.get(new_seq).fragment.pts
    playhead = loop.time() - t0
    assert jump_to - playhead > 0.5, (jump_to, playhead)  # the old tail it skips
    await c.send(P.Ack(seq=got, playhead=jump_to))
    await asyncio.sleep(0.05)
    assert session.viewer_position() >= jump_to - 0.01, (session.viewer_position(), jump_to)
    # ... and it is paced from there: within ~ the lead, the server has made that much past the jump
    await asyncio.sleep(0.5)
    assert session.generated_s >= jump_to + 0.5 + 0.75, (session.generated_s, jump_to)
    await c.close()


async def test_a_client_that_jumps_at_every_prompt_is_held_to_twice_real_time(server):
    """Changing the prompt at every chunk and jumping to each new prompt's first fragment does not
    run a session unpaced: the viewer's position stays within twice real time since its first fragment
    (plus one jump's worth: the lead and a chunk)."""
    srv = await server(max_lead_s=0.5)  # chunks are 0.25 s
    c = await Raw.open(srv.url)
    await c.send(P.Start(prompt="p0"))
    first = await c.until(P.Fragment)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    (session,) = srv.state.registry.sessions.values()
    k, new_seq, got = 0, None, first.seq
    while loop.time() - t0 < 2.0:
        k += 1
        await c.send(P.Prompt(prompt=f"p{k}"))
        new_seq = None
        async with asyncio.timeout(5):  # (unpaced, the reader falls behind a flood of fragments)
            while new_seq is None or got < new_seq:  # the new prompt's first fragment, then jump to it
                msg = await c.recv()
                if isinstance(msg, P.Status) and msg.extra.get("prompt_seq", -1) > (got if new_seq is None else -1):
                    new_seq = msg.extra["prompt_seq"]
                elif isinstance(msg, P.Fragment):
                    got = msg.seq
        await c.send(P.Ack(seq=got, playhead=session.log.get(new_seq).fragment.pts))
    elapsed = loop.time() - t0
    assert k >= 4, k  # it did switch and jump, again and again
    jump = 0.5 + 0.25  # one jump's worth: the lead and a chunk
    assert session.viewer_position() <= 2 * elapsed + jump + 0.25 + 0.3, (session.viewer_position(), elapsed)
    assert session.generated_s <= 2 * elapsed + 2 * jump + 0.25 + 0.5, (session.generated_s, elapsed)
    await c.close()


async def test_a_fragment_is_serialised_once_for_all_its_viewers(server, monkeypatch):
    """Three viewers of one session get the same bytes for each fragment, encoded once (not per viewer)."""
    import streamgen.protocol as proto

    encoded = []
    real = proto.encode

    def counting(msg, limits=proto.DEFAULT_LIMITS):
        if isinstance(msg, P.Fragment):
            encoded.append(msg.seq)
        return real(msg, limits)

    monkeypatch.setattr(proto, "encode", counting)
    srv = await server(max_lead_s=None, log_fragments=64, queue_fragments=64)
    a = await Raw.open(srv.url)
    await a.send(P.Start(prompt="one to many", chunks=12))
    ready = await a.until(P.Ready)
    viewers = [a]
    for _ in range(2):
        v = await Raw.open(srv.url)
        await v.send(P.Attach(session=ready.session, from_seq=0))
        viewers.append(v)
    got = []
    for v in viewers:
        frames = {}
        while len(frames) < 12:
            raw = await asyncio.wait_for(v.ws.recv(), 20)
            msg = P.decode(raw, "server")
            if isinstance(msg, P.Fragment):
                frames[msg.seq] = raw
        got.append(frames)
        await v.close()
    assert got[0] == got[1] == got[2]  # byte for byte the same frames
    assert sorted(encoded) == list(range(12)), encoded  # each fragment encoded once
