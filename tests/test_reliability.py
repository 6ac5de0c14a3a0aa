"""Hostile and unlucky clients against the real server over loopback (test pattern source), and the
interactive pacing defaults: each defect of the reliability probe has a test here."""

from __future__ import annotations

import asyncio
import io
import logging
import time
import wave

import aiohttp
import numpy as np
import pytest

from streamgen import protocol as P
from streamgen.server.sources import prompt_color
from test_server import FPC, FPS, Raw, server  # noqa: F401 - the server fixture


async def _until(cond, what, timeout=10.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_reconnect_at_the_live_edge_resumes(server):
    """Defect 1: a paced player that had everything up to the live edge reconnects with attach; it
    has nothing replayed to ack, yet new fragments keep coming (pacing moves on at real time)."""
    srv = await server(max_lead_s=0.5)
    c = await Raw.open(srv.url)
    await c.send(P.Start(prompt="reconnect"))
    ready = await c.until(P.Ready)
    t0, last = time.monotonic(), None
    while last is None or last.seq < 7:
        last = await c.until(P.Fragment)
        await c.send(P.Ack(seq=last.seq, playhead=time.monotonic() - t0))
    c.ws.transport.abort()
    c2 = await Raw.open(srv.url)
    await c2.send(P.Attach(session=ready.session, from_seq=last.seq + 1))
    got = []
    while len(got) < 4:
        m = await c2.recv(timeout=5)
        if isinstance(m, P.Fragment):
            got.append(m.seq)
            await c2.send(P.Ack(seq=m.seq, playhead=time.monotonic() - t0))
    assert got == list(range(last.seq + 1, last.seq + 5))  # each within recv's 5 s: not stalled
    await c2.close()


async def test_prompt_flood_is_limited_and_does_not_stall_others(server):
    """Defect 2: a connection flooding prompts gets `busy` answers; another session keeps its pace."""
    srv = await server(max_lead_s=None, messages_per_s=50, messages_burst=100)
    calm = await Raw.open(srv.url)
    await calm.send(P.Start(prompt="calm"))
    await calm.until(P.Fragment)
    flood = await Raw.open(srv.url)
    await flood.send(P.Start(prompt="flood"))
    await flood.until(P.Fragment)
    for i in range(2000):
        await flood.ws.send(P.encode(P.Prompt(prompt=f"prompt {i} " + "x" * 1000)))
    gaps, t = [], time.monotonic()
    for _ in range(10):
        await calm.until(P.Fragment)
        gaps.append(time.monotonic() - t)
        t = time.monotonic()
    # not stalled behind the flood: the unpaced test pattern makes a chunk in milliseconds, so
    # seconds between two fragments would be the flood holding the loop (not a speed check)
    assert max(gaps) < 5.0, gaps
    busy = 0
    for _ in range(400):
        m = await flood.recv_raw(timeout=5)
        if isinstance(m, P.Error):
            assert m.code == "busy" and "per second" in m.message
            busy += 1
        if busy >= 100:
            break
    assert busy >= 100  # ~1900 of the 2000 prompts were over the limit
    await calm.close()
    await flood.close()


async def test_engine_coalesces_queued_prompts():
    """Defect 2, in the engine: a flood of `prompt` commands costs one text encoding per chunk."""
    from streamgen.engine.core import Engine, EngineSettings, GenRequest
    from streamgen.pipeline import build

    pipe = build("tiny")

    class Counting:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def encode(self, prompts):
            self.calls += 1
            return self.inner.encode(prompts)

    text = Counting(pipe.text_encoder)
    pipe.text_encoder = text
    engine = Engine(pipe, EngineSettings(local_frames=6, sink_frames=0)).start()
    try:
        h = await engine.open(GenRequest("first", 32, 32, chunks=3))
        await h.get()
        for i in range(500):
            h.set_prompt(f"prompt {i}")
        await h.get()
        await h.get()
        assert text.calls <= 3, text.calls  # the first prompt, then at most one per chunk
    finally:
        h.cancel()
        engine.close()


def _png(w: int, h: int) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(b, format="PNG")
    return b.getvalue()


async def test_image_bomb_and_non_images_are_bad_field_image(server):
    """Defect 3: a huge image is refused from its header (fast, no big allocation); a WAV file is
    `bad_field image`, not a fatal internal error."""
    srv = await server()
    c = await Raw.open(srv.url)
    await c.send(P.Start(prompt="bomb", image=_png(6000, 6000)))
    err = await c.until(P.Error)
    assert (err.code, err.field, err.fatal) == ("bad_field", "image", False) and "6000x6000" in err.message
    assert "pixels" in err.message and "are decoded" in err.message  # refused from the header (read_image's check)
    w = io.BytesIO()
    with wave.open(w, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(8000)
        f.writeframes(b"\0" * 1600)
    await c.send(P.Start(prompt="wav", image=w.getvalue()))
    err = await c.until(P.Error)
    assert (err.code, err.field, err.fatal) == ("bad_field", "image", False)
    await c.send(P.Start(prompt="fine", image=_png(64, 48), chunks=1))  # the connection is still usable
    assert (await c.until(P.End)).reason == "done"
    await c.close()


async def test_unreachable_and_ended_sessions_free_their_slot_at_once(server):
    """Defect 4: start then close before reading, and stop then close, do not hold a session for the
    grace period; a live session after a plain disconnect does (it can be attached to)."""
    srv = await server(grace_s=10.0, max_sessions=2, max_sessions_per_client=2)
    reg = srv.state.registry
    for _ in range(4):  # start + close at once: the id was never delivered
        c = await Raw.open(srv.url)
        await c.send(P.Start(prompt="gone"))
        c.ws.transport.abort()
        await asyncio.sleep(0.05)
    await _until(lambda: not reg.sessions, "unreachable sessions to go", 3)
    c = await Raw.open(srv.url)
    await c.send(P.Start(prompt="stopped"))
    await c.until(P.Fragment)
    await c.send(P.Stop())
    await c.until(P.End)
    await c.close()
    await _until(lambda: not reg.sessions, "the stopped session to go", 3)
    c = await Raw.open(srv.url)
    await c.send(P.Start(prompt="live"))
    await c.until(P.Fragment)
    c.ws.transport.abort()
    await asyncio.sleep(0.5)
    assert len(reg.sessions) == 1  # kept for attach


async def test_dns_rebinding_host_is_refused_without_a_token(server):
    """Defect 5: Host and Origin both naming another site (DNS rebinding) do not upgrade."""
    srv = await server()
    port = srv.port
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await http.ws_connect(srv.url, headers={"Host": f"evil.example:{port}",
                                                    "Origin": f"http://evil.example:{port}"})
        assert e.value.status == 403
        ws = await http.ws_connect(srv.url, headers={"Origin": f"http://127.0.0.1:{port}"})  # own page: fine
        await ws.close()
        ws = await http.ws_connect(srv.url, headers={"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"})
        await ws.close()
    tok = await server(token="t0k")  # with a token any Host may be used (the token is the guard)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(tok.url + "?token=t0k", headers={"Host": f"evil.example:{tok.port}"})
        await ws.close()


async def test_allowed_origin_keeps_the_own_page_and_headers_say_little(server):
    """Small items: --allowed-origin X does not refuse the server's own page; the Server header names
    no versions; /healthz keeps its details behind the token."""
    srv = await server(allowed_origins=["https://app.example"], token="t0k")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(srv.url + "?token=t0k", headers={"Origin": f"http://127.0.0.1:{srv.port}"})
        await ws.close()
        r = await http.get(srv.http + "/healthz")
        assert r.headers["Server"] == "streamgen" and await r.json() == {"status": "ok"}
        r = await http.get(srv.http + "/healthz?token=t0k")
        assert (await r.json())["model"] == "testpattern"


async def test_connection_and_viewer_caps(server):
    """Defect 6 and small items: a connection cap answered with 503; a viewer cap per session."""
    srv = await server(max_connections=2, max_viewers_per_session=1)
    a = await Raw.open(srv.url)
    b = await Raw.open(srv.url)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await http.ws_connect(srv.url)
        assert e.value.status == 503
    await a.send(P.Start(prompt="one viewer"))
    ready = await a.until(P.Ready)
    await b.send(P.Attach(session=ready.session, from_seq=0))
    err = await b.until(P.Error)
    assert (err.code, err.ref) == ("busy", "attach") and "viewers" in err.message
    await a.close()
    await b.close()


async def test_attach_replays_every_retained_fragment(server):
    """Defect 7: attach replays everything still held from from_seq on, not only the send window;
    a from_seq beyond the next fragment is `bad_field from_seq`."""
    srv = await server(max_lead_s=None, queue_fragments=8, log_fragments=64)
    c = await Raw.open(srv.url)
    await c.send(P.Start(prompt="replay", chunks=40))
    ready = await c.until(P.Ready)
    for _ in range(4):
        await c.until(P.Fragment)
    c.ws.transport.abort()
    (session,) = srv.state.registry.sessions.values()
    await _until(lambda: session.log.next_seq >= 40, "the session to finish")
    c2 = await Raw.open(srv.url)
    await c2.send(P.Attach(session=ready.session, from_seq=500))
    err = await c2.until(P.Error)
    assert (err.code, err.field) == ("bad_field", "from_seq")
    await c2.send(P.Attach(session=ready.session, from_seq=4))
    got = []
    assert (await c2.until(P.End, collect=got)).reason == "done"
    assert [m.seq for m in got if isinstance(m, P.Fragment)] == list(range(4, 40))
    assert not any(isinstance(m, P.Status) and m.dropped for m in got)
    await c2.close()


async def test_far_future_playhead_and_a_stuck_viewer(server):
    """Defect 8: an ack of playhead 1e12 followed by no reading keeps the session paced (not unpaced
    for nobody), and the stuck viewer shows in /metrics."""
    srv = await server(max_lead_s=0.5, unsent_bytes=4096)
    c = await Raw.open(srv.url, max_queue=1)
    await c.send(P.Start(prompt="liar " + "y" * 10))
    first = await c.until(P.Fragment)
    await c.send(P.Ack(seq=first.seq, playhead=1e12))
    (session,) = srv.state.registry.sessions.values()
    t0 = time.monotonic()
    await asyncio.sleep(1.5)
    made_s = session.generated_s
    assert made_s <= (time.monotonic() - t0) + 0.5 + 1.0, made_s  # about real time + lead, not unpaced
    await c.close()


async def test_default_lead_is_about_one_chunk_and_start_lead_overrides(server):
    """Interactive pacing: by default the server runs about one chunk ahead of a viewer that never acks
    (wall clock); a start asking for lead 2.0 gets more ahead. The lead is a sawtooth (a chunk's worth
    up at each fragment, down at real time): its peak over 1 s is compared, not one instant."""
    chunk_s = FPC / FPS  # 0.25 s

    async def ahead(**start):
        srv = await server()  # the default ServerConfig lead
        c = await Raw.open(srv.url)
        await c.send(P.Start(prompt="lead", **start))
        await c.until(P.Fragment)
        await asyncio.sleep(1.0)
        (session,) = srv.state.registry.sessions.values()
        peak = 0.0
        for _ in range(20):
            peak = max(peak, session.lead_s())
            await asyncio.sleep(0.05)
        await c.close()
        return peak

    default, asked = await ahead(), await ahead(lead=2.0)
    assert default <= 0.75 + chunk_s + 0.1, default
    assert asked >= 1.5, asked
    assert asked > default + 1.0


async def test_status_names_the_first_fragment_of_a_new_prompt(server):
    """status.prompt_seq: the first fragment made under the latest prompt (a player measures its
    prompt latency with it); that fragment shows the new prompt's colour."""
    import av

    srv = await server(max_lead_s=None)
    c = await Raw.open(srv.url)
    await c.send(P.Start(prompt="before", chunks=12))
    init = await c.until(P.Init)
    await c.until(P.Fragment)
    await c.send(P.Prompt(prompt="after"))
    got = []
    assert (await c.until(P.End, collect=got)).reason == "done"
    seqs = [m.extra.get("prompt_seq") for m in got if isinstance(m, P.Status) and "prompt_seq" in m.extra]
    assert seqs, "no status carried prompt_seq"
    k = seqs[-1]
    frag = next(m for m in got if isinstance(m, P.Fragment) and m.seq == k)
    with av.open(io.BytesIO(init.data + frag.data)) as cont:
        img = next(cont.decode(video=0)).to_ndarray(format="rgb24").astype(np.int16)

    def share(colour) -> float:  # of the frame's pixels near a background colour
        return float((np.abs(img - np.array(colour)).max(-1) < 24).mean())

    # the background (most of the frame; moving bars and a square cross it) is the new prompt's
    assert share(prompt_color("after")) > 0.4 and share(prompt_color("before")) < 0.02, \
        (share(prompt_color("after")), share(prompt_color("before")))
    await c.close()


def test_start_log_line_holds_no_token(capsys, caplog):
    """Small item: the start-up log line does not print the token."""
    from streamgen.server import serve

    class Stop(Exception):
        pass

    def no_run(*a, **k):
        raise Stop

    import aiohttp.web

    orig = aiohttp.web.run_app
    aiohttp.web.run_app = no_run
    try:
        with caplog.at_level(logging.INFO), pytest.raises(Stop):
            from streamgen.cli import main

            main(["serve", "--model", "testpattern", "--token", "s3cret-token"])
    finally:
        aiohttp.web.run_app = orig
    text = caplog.text + capsys.readouterr().err
    assert "serving model" in text and "s3cret-token" not in text
    del serve


async def test_watch_prints_the_prompt_latency(server, tmp_path):
    """`streamgen watch --switch` reports switch -> first fragment of the new prompt, from the
    server's status.prompt_seq (the Python client's figure of the interactive latency)."""
    import re
    import sys

    srv = await server()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamgen", "watch", srv.url, "--prompt", "before", "--chunks", "8",
        "--out", str(tmp_path / "w.mp4"), "--switch", "2=after", "-q",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    m = re.search(r"prompt latency \(switch -> first fragment of the new prompt\): (\d+) ms \(median of 1\)",
                  stdout.decode())
    assert m, stdout.decode()
    assert 0 < int(m.group(1)) < 5000


async def test_a_chunk_is_encoded_while_the_next_one_is_made():
    """The producer overlaps the encoder with the source: chunk k+1 is asked for before chunk k's
    encode has finished, and the fragments still reach the log in order, each decodable."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import av

    from types import SimpleNamespace as NS

    from streamgen.media.encode import FMP4Encoder
    from streamgen.server.app import _describe_metrics
    from streamgen.server.metrics import Metrics
    from streamgen.server.sessions import Session, SessionLimits
    from streamgen.server.sources import TestPatternSource

    events: list[tuple[str, int]] = []
    lock = threading.Lock()

    class Source(TestPatternSource):
        async def next_chunk(self):
            with lock:
                events.append(("ask", self._next // self.frames_per_chunk))
            return await super().next_chunk()

    class SlowEncoder(FMP4Encoder):  # the real encoder, 0.2 s slower (as x264 on noise at 832x480)
        def encode_chunk(self, frames):
            frag = super().encode_chunk(frames)
            time.sleep(0.2)
            with lock:
                events.append(("encoded", frag.seq))
            return frag

    with ThreadPoolExecutor(4) as pool:
        src = Source(64, 48, FPS, FPC, "red", executor=pool, delay_s=0.02)
        enc = SlowEncoder(64, 48, FPS)
        metrics = Metrics()  # the server's series
        _describe_metrics(metrics, NS(registry=NS(sessions={}), sockets=[], factory=NS(describe_metrics=lambda m: None)))
        s = Session(source=src, encoder=enc, metrics=metrics, executor=pool, client="test",
                    limits=SessionLimits(max_lead_s=None), chunks=4, lead=None)
        s.start()
        await s.producer
        assert s.ended == "done" and s.errors == 0
        frags = [s.log.get(k).fragment for k in range(4)]
        await s.aclose()
    assert [f.seq for f in frags] == [0, 1, 2, 3]
    for k in range(3):  # chunk k+1 asked for before chunk k was encoded
        assert events.index(("ask", k + 1)) < events.index(("encoded", k)), events
    with av.open(io.BytesIO(enc.init_segment + b"".join(f.data for f in frags))) as cont:
        assert sum(1 for _ in cont.decode(video=0)) == 4 * FPC
