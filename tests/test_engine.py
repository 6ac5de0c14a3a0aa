"""The engine: scheduler bookkeeping (no torch), and the busy loop on the tiny model (CPU) checked
against the same computation done directly with SessionState + Interpolator."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
import torch

from rife_data import WEIGHTS as RIFE
from streamgen.engine.core import Engine, EngineError, EngineSettings, GenRequest, Pipeline
from streamgen.engine.scheduler import Scheduler



# -- scheduler -------------------------------------------------------------------------------------

def test_scheduler_round_robin_credits_pause_and_limit():
    s = Scheduler(max_ahead=2)
    for sid, limit in ((1, None), (2, None), (3, 3)):
        s.admit(sid, limit=limit)
    with pytest.raises(ValueError, match="already scheduled"):
        s.admit(3)
    order = []
    for _ in range(6):
        slot = s.next()
        order.append(slot.sid)
        s.served(slot.sid)
    assert order == [1, 2, 3, 1, 2, 3]  # round robin until credits (max_ahead=2) run out
    assert s.next() is None  # every consumer is 2 chunks behind: nothing more is made
    s.requested(2)
    assert s.next().sid == 2
    s.set_paused(2, True)
    assert s.next() is None
    s.set_paused(2, False)
    s.requested(3)
    s.served(3)  # third chunk of a 3-chunk stream
    assert s.slots[3].done
    s.requested(3)
    assert s.next().sid == 2  # a finished session is never picked again
    s.remove(3)
    assert 3 not in s.slots


def test_scheduler_credit_never_exceeds_max_ahead():
    s = Scheduler(max_ahead=1)
    s.admit(7)
    for _ in range(5):
        s.requested(7)
    s.served(7)
    s.served(7)
    assert s.next() is None  # one asked for + one ahead, however often it was asked


def test_scheduler_on_demand_makes_only_what_is_asked():
    s = Scheduler(max_ahead=0)
    s.admit(1)
    assert s.next() is None  # nothing before the first request
    s.requested(1)
    assert s.next().sid == 1
    s.served(1)
    assert s.next() is None


# -- engine on the tiny model ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from streamgen.pipeline import build

    p = build("tiny", decoder="taehv")
    model, text, dec = p.model, p.text_encoder, p.decoder
    rife = None
    if RIFE.is_file():
        from streamgen.models.rife import load_rife

        rife = load_rife(RIFE)
    return model, text, dec, rife


def _reference(tiny, req: GenRequest, n_chunks: int, settings: EngineSettings, switch_at: dict[int, str] = {}):
    """The same stream computed directly: SessionState -> [0,1] -> Interpolator -> uint8."""
    from streamgen.media.interpolate import Interpolator
    from streamgen.sampling.stream import StreamConfig, SessionState

    model, text, dec, rife = tiny
    cfg = StreamConfig(local_frames=settings.local_frames, sink_frames=settings.sink_frames, seed=req.seed)
    sess = SessionState(model, req.prompt, height=req.height, width=req.width, config=cfg, text_encoder=text,
                         decoder=dec)
    interp = Interpolator(rife if req.interpolate > 1 else None, req.interpolate, settings.scene_threshold)
    state = interp.new_state()
    out = []
    for i in range(n_chunks):
        if i in switch_at:
            sess.set_prompt(switch_at[i])
        c = sess.next_chunk()
        if c.switched:
            state.cut()
        f = interp.process(c.frames[0].transpose(0, 1).add(1).mul(0.5).clamp(0, 1), state)
        out.append(f.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return out


def _engine(tiny, **kw) -> Engine:
    model, text, dec, rife = tiny
    settings = EngineSettings(**{"local_frames": 6, "sink_frames": 0, **kw})
    return Engine(Pipeline(model=model, text_encoder=text, decoder=dec, rife=rife), settings).start()


@pytest.mark.parametrize("warmup", [False, True, "switch"])
async def test_two_interleaved_sessions_equal_their_direct_computation(tiny, warmup, caplog):
    """Also with warm-up streams run first, one per frame size (serve --warmup-sizes), with a
    prompt switch once the window is full (the default on CUDA): they must leave no trace (RNG,
    caches, stats)."""
    sizes = ((64, 64), (96, 64))
    caplog.set_level(logging.INFO, logger="streamgen.engine.core")
    eng = _engine(tiny, warmup=tuple(GenRequest("warm-up", w, h, seed=9) for w, h in sizes) if warmup else None,
                  warmup_switch=warmup == "switch")
    try:
        a_req = GenRequest("a fox in the snow", 64, 64, seed=3)
        b_req = GenRequest("a city at night", 96, 64, seed=4)
        a, b = await eng.open(a_req), await eng.open(b_req)
        got_a, got_b = [], []
        for _ in range(4):  # 4 chunks with a 6-frame window: the ring wraps
            got_a.append(await a.get())
            got_b.append(await b.get())
        a.cancel()
        b.cancel()
    finally:
        eng.close()
    for got, req in ((got_a, a_req), (got_b, b_req)):
        ref = _reference(tiny, req, 4, eng.settings)
        assert [g.shape for g in got] == [r.shape for r in ref]
        assert got[0].shape == (9, req.height, req.width, 3) and got[1].shape[0] == 12
        for g, r in zip(got, ref):
            np.testing.assert_array_equal(g, r)
    assert eng.stats["chunks"] >= 8 and eng.stats["errors"] == 0
    warmed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine warm-up:")]
    assert len(warmed) == (2 if warmup else 0), warmed
    assert all(f"at {w}x{h} " in m for (w, h), m in zip(sizes, warmed)), warmed
    assert all(("and a prompt switch" in m) == (warmup == "switch") for m in warmed), warmed


async def test_prompt_switch_and_interpolation_match_direct(tiny):
    eng = _engine(tiny)
    try:
        req = GenRequest("a red fox", 64, 64, seed=5, interpolate=2)
        h = await eng.open(req)
        assert h.fps == 32
        got = [await h.get()]
        h.set_prompt("a blue whale")
        switched_at = None
        for i in range(1, 4):
            got.append(await h.get())
            if h.last_switched:
                switched_at = i
        h.cancel()
    finally:
        eng.close()
    assert switched_at in (1, 2)  # the next chunk not yet started when the command arrived
    ref = _reference(tiny, req, 4, eng.settings, {switched_at: "a blue whale"})
    assert got[0].shape[0] == 18  # 9 decoded frames, doubled
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)


class _FailingDecoder:
    """Wraps the tiny decoder; fails for one frame width, to show one session's failure stays its own."""

    def __init__(self, inner, bad_width_latent: int):
        self.inner, self.bad = inner, bad_width_latent

    def new_state(self):
        return self.inner.new_state()

    def decode_chunk(self, latents, state):
        if latents.shape[-1] == self.bad:
            raise RuntimeError("decoder exploded")
        return self.inner.decode_chunk(latents, state)


async def test_failure_stays_in_its_session_and_cancel_frees_the_cache(tiny):
    model, text, dec, rife = tiny
    eng = Engine(Pipeline(model=model, text_encoder=text, decoder=_FailingDecoder(dec, 96 // 8)),
                 EngineSettings(local_frames=6, sink_frames=0)).start()
    try:
        good = await eng.open(GenRequest("ok", 64, 64))
        bad = await eng.open(GenRequest("boom", 96, 64))
        with pytest.raises(EngineError, match="decoder exploded"):
            await bad.get()
        for _ in range(3):
            assert (await good.get()).shape[1:] == (64, 64, 3)
        assert set(eng._sessions) == {good.sid}  # the failed session's cache is gone already
        bad.cancel()
        third = await eng.open(GenRequest("third", 64, 64))
        assert (await third.get()).shape == (9, 64, 64, 3)
        good.cancel()
        third.cancel()
        for _ in range(50):  # the busy loop drops cancelled sessions (and their caches)
            if not eng._sessions:
                break
            await asyncio.sleep(0.02)
        assert not eng._sessions and not eng.scheduler.slots
    finally:
        eng.close()


@pytest.mark.parametrize("field,req", [
    ("width", GenRequest("p", 72, 64)),
    ("interpolate", GenRequest("p", 64, 64, interpolate=3)),
    ("chunks", GenRequest("p", 64, 64, chunks=0)),
    ("width", GenRequest("p", 1024, 1024)),  # over max_pixels
    ("prompts", GenRequest("p", 64, 64, chunks=2, prompts={2: "late"})),
])
def test_bad_requests_name_the_field(tiny, field, req):
    model, text, dec, _ = tiny
    eng = Engine(Pipeline(model=model, text_encoder=text, decoder=dec))
    with pytest.raises(EngineError) as e:
        eng.validate(req)
    assert e.value.field == field and field in str(e.value)


def test_image_start_needs_the_wan_vae(tiny):
    model, text, dec, _ = tiny
    eng = Engine(Pipeline(model=model, text_encoder=text, decoder=dec))
    with pytest.raises(EngineError, match="VAE") as e:
        eng.validate(GenRequest("p", 64, 64, image=np.zeros((64, 64, 3), np.uint8)))
    assert e.value.code == "unsupported"


async def test_server_streams_from_the_engine(tiny, tmp_path):
    """streamgen serve's app with the engine source: fragments arrive, decode, switch works."""
    import av
    from aiohttp.test_utils import TestServer

    from streamgen.client import StreamClient
    from streamgen.server.sources import EngineFactory
    from streamgen.server.app import ServerConfig, build_app

    model, text, dec, rife = tiny
    engine = Engine(Pipeline(model=model, text_encoder=text, decoder=dec, rife=rife),
                    EngineSettings(local_frames=6, sink_frames=0))
    factory = EngineFactory("tiny", engine, width=64, height=64)
    server = TestServer(build_app(ServerConfig(model="tiny", max_lead_s=None), factory))
    await server.start_server()
    try:
        url = f"ws://127.0.0.1:{server.port}/v1/stream"
        frags = []
        async with StreamClient(url) as c:
            async for frag in c.start(prompt="a fox", chunks=3, width=64, height=64):
                frags.append(frag)
                if len(frags) == 1:
                    await c.set_prompt("a whale, via the server")
            init = c.init_segment
        assert len(frags) == 3
        assert "a whale, via the server" in text  # the switch reached the engine's text encoder
        path = tmp_path / "s.mp4"
        path.write_bytes(init + b"".join(f.data for f in frags))
        with av.open(str(path)) as f:
            frames = list(f.decode(video=0))
        assert len(frames) == 9 + 12 + 12 and frames[0].width == 64
        async with StreamClient(url) as c:  # bad input names the field, server stays up
            with pytest.raises(Exception, match="fps"):
                async for _ in c.start(prompt="x", fps=24, chunks=1):
                    pass
    finally:
        await server.close()


class _FailingText:
    """Wraps the tiny prompt cache; rejects one prompt, to show a failing command stays in its session."""

    def __init__(self, inner, bad: str):
        self.inner, self.bad = inner, bad

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, prompts):
        if self.bad in prompts:
            raise ValueError(f"cannot encode {self.bad!r}")
        return self.inner.encode(prompts)


async def test_failing_prompt_switch_fails_only_its_session(tiny):
    model, text, dec, _ = tiny
    eng = Engine(Pipeline(model=model, text_encoder=_FailingText(text, "explode"), decoder=dec),
                 EngineSettings(local_frames=6, sink_frames=0)).start()
    try:
        good, bad = await eng.open(GenRequest("ok", 64, 64)), await eng.open(GenRequest("soon bad", 64, 64))
        await bad.get()
        bad.set_prompt("explode")  # encoded on the busy thread: must not take the loop down
        with pytest.raises(EngineError, match="explode"):
            for _ in range(3):
                await asyncio.wait_for(bad.get(), 30)
        assert [(await asyncio.wait_for(good.get(), 30)).shape[0] for _ in range(2)] == [9, 12]
        assert eng._thread.is_alive()
        good.cancel()
        bad.cancel()
    finally:
        eng.close()


async def test_close_ends_waiting_handles_and_refuses_new_streams(tiny):
    eng = _engine(tiny)
    h = await eng.open(GenRequest("x", 64, 64))
    await h.get()
    await asyncio.get_running_loop().run_in_executor(None, eng.close)
    assert not eng._sessions and eng._thread is None
    with pytest.raises(EngineError, match="stopped"):
        for _ in range(3):  # a chunk made before close may still be queued; then the error, never a hang
            await asyncio.wait_for(h.get(), 10)
    with pytest.raises(EngineError, match="not running") as e:
        await eng.open(GenRequest("y", 64, 64))
    assert e.value.code == "busy"


class _Ws:
    """websockets + the protocol's ClientConnection, reading until a message type."""

    def __init__(self, ws):
        from streamgen import protocol as P

        self.ws, self.conn = ws, P.ClientConnection()

    @classmethod
    async def open(cls, url):
        import websockets

        return cls(await websockets.connect(url, max_size=2**26, close_timeout=0.5))

    async def send(self, msg):
        await self.ws.send(self.conn.send(msg))

    async def until(self, cls, timeout=30.0):
        while True:
            m = self.conn.receive(await asyncio.wait_for(self.ws.recv(), timeout))
            if isinstance(m, cls):
                return m


async def _until(cond, what: str, timeout: float = 10.0):
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_server_pause_busy_disconnect_and_shutdown_reach_the_engine(tiny):
    """Through the server: pause/resume reach the scheduler, a full engine answers busy, a client
    that disconnects frees its engine slot after the grace period, and stopping the server with a
    session in flight ends it with `shutdown` and stops the busy loop."""
    from aiohttp.test_utils import TestServer

    from streamgen import protocol as P
    from streamgen.server.sources import EngineFactory
    from streamgen.server import app as app_module
    from streamgen.server.app import ServerConfig, build_app

    model, text, dec, _ = tiny
    engine = Engine(Pipeline(model=model, text_encoder=text, decoder=dec),
                    EngineSettings(local_frames=6, sink_frames=0))
    factory = EngineFactory("tiny", engine, width=64, height=64)
    server = TestServer(build_app(ServerConfig(model="tiny", max_lead_s=None, grace_s=0.3, max_sessions=1,
                                               max_sessions_per_client=1), factory))
    await server.start_server()
    url = f"ws://127.0.0.1:{server.port}/v1/stream"
    a = await _Ws.open(url)
    await a.send(P.Start(prompt="paused soon"))
    await a.until(P.Fragment)
    # 1. pause / resume reach the engine's scheduler (not only the server's pacing)
    await a.send(P.Pause())
    await _until(lambda: [s.paused for s in engine.scheduler.slots.values()] == [True], "the engine to pause")
    await a.send(P.Resume())
    await _until(lambda: [s.paused for s in engine.scheduler.slots.values()] == [False], "the engine to resume")
    await a.until(P.Fragment)
    # 2. the server's only session is taken: a second start is refused with busy (no field)
    b = await _Ws.open(url)
    await b.send(P.Start(prompt="second"))
    err = await b.until(P.Error)
    assert (err.code, err.field, err.ref) == ("busy", None, "start") and "limit of 1 sessions" in err.message
    assert len(engine.scheduler.slots) == 1  # the refused start never reached the engine
    # 3. an abrupt disconnect: after the grace period the session and its engine cache are freed
    a.ws.transport.abort()
    reg = server.app[app_module.STATE].registry
    await _until(lambda: not engine._sessions and not engine.scheduler.slots and not reg.sessions,
                 "the session and its engine cache to be freed", 15)
    # 4. the slot is usable again; stopping the server with that session in flight ends it cleanly
    await b.send(P.Start(prompt="second, again"))
    await b.until(P.Fragment)
    closing = asyncio.ensure_future(server.close())
    assert (await b.until(P.End)).reason == "shutdown"
    await asyncio.wait_for(closing, 30)
    assert engine._thread is None and not engine._sessions and engine._stop.is_set()


async def test_generation_failure_through_the_server_is_reported_then_ends(tiny):
    from aiohttp.test_utils import TestServer

    from streamgen import protocol as P
    from streamgen.server.sources import EngineFactory
    from streamgen.server.app import ServerConfig, build_app

    model, text, dec, _ = tiny
    engine = Engine(Pipeline(model=model, text_encoder=text, decoder=_FailingDecoder(dec, 96 // 8)),
                    EngineSettings(local_frames=6, sink_frames=0))
    server = TestServer(build_app(ServerConfig(model="tiny", max_lead_s=None),
                                  EngineFactory("tiny", engine, width=64, height=64)))
    await server.start_server()
    try:
        c = await _Ws.open(f"ws://127.0.0.1:{server.port}/v1/stream")
        await c.send(P.Start(prompt="boom", width=96))
        err = await c.until(P.Error)
        assert (err.code, err.fatal, err.field) == ("generation_failed", False, None)
        assert "decoder exploded" in err.message
        assert (await c.until(P.End)).reason == "error"
        await c.send(P.Start(prompt="fine"))  # the failed session gave its only engine slot back
        assert (await c.until(P.Fragment)).frames == 9
    finally:
        await server.close()
