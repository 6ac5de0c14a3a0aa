"""Many sessions on one model: batched forwards == each session alone (CPU, float32, bit for bit),
the cache pool, the scheduler's choices (hand-made clocks), admission by memory in the engine and
through the real server on loopback."""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest
import torch

from streamgen.engine.batch import run_programs
from streamgen.engine.core import Engine, EngineError, EngineSettings, GenRequest, Pipeline, SessionHandle
from streamgen.engine.pool import CachePool
from streamgen.engine.scheduler import Scheduler
from streamgen.models.wan import WanConfig, WanModel
from streamgen.sampling.stream import ModelCall


# -- the model: forward_rows ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    return WanModel(WanConfig.preset("tiny")).eval()


def _cache(model, seed: int, frames: int, hw=(16, 16), window=(9, 3)):
    c = model.new_cache(1, hw, local_frames=window[0], sink_frames=window[1])
    g = torch.Generator().manual_seed(seed)
    model.set_prompt(c, torch.randn(1, 5 + seed, 32, generator=g))
    for s in range(0, frames, 3):
        model.forward_chunk(torch.randn(1, 16, 3, *hw, generator=g), torch.zeros(1), c, start_frame=s, update_cache=True)
    return c


def test_forward_rows_equals_forward_chunk_of_each_cache(wan):
    """Rows at different absolute positions (one before its window fills, one with a wrapped ring),
    with their own prompts, committing or not: each row == that cache alone, and so are the caches."""
    caches = [_cache(wan, 0, 0), _cache(wan, 1, 6), _cache(wan, 2, 15)]
    alone = [copy.deepcopy(c) for c in caches]
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(1, 16, 3, 16, 16, generator=g) for _ in caches]
    t = torch.tensor([750.0, 500.0, 0.0])
    update = [False, True, True]
    starts = [c.frames_written for c in caches]
    y = wan.forward_rows(torch.cat(xs), t, caches, start_frames=starts, update_cache=update)
    for i, c in enumerate(alone):
        ref = wan.forward_chunk(xs[i], t[i:i + 1], c, start_frame=starts[i], update_cache=update[i])
        assert torch.equal(y[i:i + 1], ref)
        assert torch.equal(caches[i].k, c.k) and torch.equal(caches[i].v, c.v)
        assert caches[i].frames_written == c.frames_written


def test_forward_rows_refuses_what_cannot_share_a_forward(wan):
    a, b = _cache(wan, 0, 3), _cache(wan, 1, 3, hw=(16, 32))
    x = torch.zeros(2, 16, 3, 16, 16)
    with pytest.raises(ValueError, match="twice"):
        wan.forward_rows(x, torch.zeros(2), [a, a], start_frames=[3, 3], update_cache=[False, False])
    with pytest.raises(ValueError, match="does not match"):
        wan.forward_rows(x, torch.zeros(2), [a, b], start_frames=[3, 3], update_cache=[False, False])
    with pytest.raises(ValueError, match="3 rows|rows"):
        wan.forward_rows(torch.zeros(3, 16, 3, 16, 16), torch.zeros(3), [a, _cache(wan, 2, 3)],
                         start_frames=[3, 3], update_cache=[False, False])


def test_cache_in_pool_storage_is_a_view_of_the_pool(wan):
    pool = CachePool(16 << 20)
    numel = wan.new_cache(1, (16, 16), local_frames=9, sink_frames=3).k.numel()
    from streamgen.models.wan import WanCache

    need = WanCache.numel_for(wan.cfg, 1, (16, 16), 9)
    res = pool.reserve(need * 4, "a")
    c = wan.new_cache(1, (16, 16), local_frames=9, sink_frames=3, storage=pool.storage(res, need, torch.float32))
    assert c.k.numel() == numel and c.k.untyped_storage().data_ptr() == pool._block.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="does not fit"):
        pool.storage(res, 1, torch.float32)  # the reservation is used up


def test_pool_first_fit_release_and_refusal():
    pool = CachePool(4096, align=256)
    a, b, c = (pool.reserve(1000, n) for n in "abc")  # 1024 bytes each after alignment
    assert (a.offset, b.offset, c.offset) == (0, 1024, 2048) and pool.used_bytes == 3072
    assert pool.reserve(2048, "d") is None  # 1024 left
    pool.release(b)
    pool.release(b)  # idempotent
    assert pool.sessions == 2 and pool.reserve(2048, "d") is None  # two gaps of 1024, neither fits
    d = pool.reserve(1024, "d")
    assert d.offset == 1024  # the gap b left
    pool.release(a)
    pool.release(d)
    assert pool.reserve(2048, "e").offset == 0  # freed neighbours merge
    assert not pool.fits_ever(4097) and pool.fits_ever(4096)
    assert CachePool(None).reserve(1 << 40, "huge") is not None  # unbounded


# -- programs run together ----------------------------------------------------------------------------

def _program(model, cache, x, steps: int, bad_at: int | None = None):
    out = []
    for i in range(steps):
        start = 99 if i == bad_at else cache.frames_written
        (y,) = yield [ModelCall(x, torch.full((1,), 500.0), cache, start, i == steps - 1)]
        out.append(y)
    return out


def test_run_programs_batches_same_shapes_and_isolates_a_failing_call(wan):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(1, 16, 3, 16, 16, generator=g) for _ in range(3)]
    caches = [_cache(wan, i, 3 * i) for i in range(3)]
    ref_caches = [copy.deepcopy(c) for c in caches]
    stats = {}
    got = run_programs(wan, {i: _program(wan, caches[i], xs[i], 3, bad_at=1 if i == 1 else None) for i in range(3)},
                       stats)
    assert isinstance(got[1], ValueError) and "past cache.frames_written" in str(got[1])
    for i in (0, 2):
        ref = run_programs(wan, {0: _program(wan, ref_caches[i], xs[i], 3)})[0]
        assert all(torch.equal(a, b) for a, b in zip(got[i], ref))
    assert stats["rows"] > stats["forwards"]  # some forward carried several sessions


# -- the engine, driven step by step (deterministic batches) ------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from streamgen.pipeline import build

    p = build("tiny", decoder="taehv")
    return p.model, p.text_encoder, p.decoder


def _reference(tiny, req: GenRequest, n: int, settings: EngineSettings, switch_at: dict[int, str]):
    """The stream computed directly, alone (test_engine's reference; no RIFE here)."""
    from test_engine import _reference as alone

    return alone((*tiny, None), req, n, settings, switch_at)


class _Driver:
    """Runs an engine's busy-thread steps on the test's thread: the batches are exactly the
    scheduler's choices, with no race against a second thread."""

    def __init__(self, tiny, **kw):
        model, text, dec = tiny
        self.eng = Engine(Pipeline(model=model, text_encoder=text, decoder=dec),
                          EngineSettings(**{"local_frames": 6, "sink_frames": 0, **kw}))
        self.got: dict[int, list[np.ndarray]] = {}
        self._n = 0

    def open(self, req: GenRequest) -> int:
        self._n += 1
        sid = self._n
        h = SessionHandle(self.eng, sid, req.width, req.height, 16)
        h.reservation = self.eng.pool.reserve(self.eng.cache_bytes(req), req.name)
        self.eng._handles[sid] = h
        self.eng._apply_command("open", sid, req)
        self.got[sid] = []
        return sid

    def step(self, *sids: int) -> list[int]:
        """Ask for one chunk of each of ``sids``, run one scheduler step; returns the batch."""
        for sid in sids:
            self.eng._apply_command("request", sid, None)
        batch = [s.sid for s in self.eng.scheduler.next_batch()]
        self.eng._step(batch)
        return batch

    async def collect(self):
        await asyncio.sleep(0)  # deliveries go through call_soon_threadsafe
        for sid, h in self.eng._handles.items():
            while not h._queue.empty():
                self.got[sid].append(h._queue.get_nowait().frames.numpy())


async def test_batched_engine_steps_equal_each_session_alone(tiny):
    """Three sessions of one size, started at different times (different positions and valid cache
    lengths: one ring wrapped, one fresh), one switching its prompt mid-stream: every chunk equals
    that session computed alone, and the step really was one batch."""
    d = _Driver(tiny)
    reqs = {d.open(GenRequest("a fox in the snow", 64, 64, seed=3)): (GenRequest("a fox in the snow", 64, 64, seed=3), {}),
            d.open(GenRequest("a city at night", 64, 64, seed=4)): (GenRequest("a city at night", 64, 64, seed=4), {3: "rain"})}
    a, b = list(reqs)
    assert d.step(a, b) == [a, b]  # two new sessions of one size: one batch
    assert d.step(a, b) == [a, b]
    c_req = GenRequest("a whale", 64, 64, seed=5)
    c = d.open(c_req)
    reqs[c] = (c_req, {})
    assert d.step(a, b, c) == [c, a, b]  # the new session first, the others join its batch
    d.eng._apply_command("prompt", b, "rain")  # b re-caches its window under the new prompt
    before = dict(d.eng.stats)
    assert sorted(d.step(a, b, c)) == [a, b, c]
    forwards, rows = d.eng.stats["forwards"] - before["forwards"], d.eng.stats["rows"] - before["rows"]
    # a and c: 4 denoise calls + the cache pass; b: its 6-frame window re-cached first in one forward of
    # its own (2 chunks as blocks), then the same, one call behind a and c
    assert (forwards, rows) == (7, 5 + 5 + 6)
    await d.collect()
    for sid, (req, switches) in reqs.items():
        ref = _reference(tiny, req, len(d.got[sid]), d.eng.settings, switches)
        assert len(d.got[sid]) == (2 if sid == c else 4)
        for g, r in zip(d.got[sid], ref):
            np.testing.assert_array_equal(g, r)


async def test_a_session_ahead_of_its_viewer_yields_to_the_others(tiny):
    d = _Driver(tiny, max_ahead=3)
    ahead = d.open(GenRequest("ahead", 64, 64, lead_s=1.0))
    other = d.open(GenRequest("other", 64, 64))
    d.eng._apply_command("viewer", ahead, 0.0)  # SessionHandle.set_viewer(0.0)
    assert d.step() == [ahead, other]  # both new
    assert d.step() == [ahead, other]  # 9 + 12 frames = 1.31 s made > 1 s lead: it yields from now on
    assert d.step() == [other]
    d.eng._apply_command("viewer", ahead, 0.75)  # its viewer moved on
    assert sorted(d.step(ahead, other)) == [ahead, other]


async def test_sessions_of_other_sizes_run_in_their_own_batch(tiny):
    d = _Driver(tiny)
    a = d.open(GenRequest("p", 64, 64))
    b = d.open(GenRequest("q", 96, 64))
    first = d.step(a, b)
    second = d.step()
    assert sorted([first, second]) == [[a], [b]]


# -- scheduler (no torch, hand-made clocks) -------------------------------------------------------------

def test_scheduler_batches_one_key_most_urgent_first_up_to_max_batch():
    s = Scheduler(max_ahead=0, max_batch=2)
    for sid, key in ((1, "small"), (2, "small"), (3, "big"), (4, "small")):
        s.admit(sid, key=key)
        s.requested(sid)
    assert [x.sid for x in s.next_batch(now=0.0)] == [1, 2]  # all new: by id; max_batch 2
    for sid in (1, 2):
        s.served(sid, 0.75, now=0.0)
    assert [x.sid for x in s.next_batch(now=0.0)] == [3]  # the new ones next, each with its own key
    s.served(3, 0.75, now=0.1)
    assert [x.sid for x in s.next_batch(now=0.1)] == [4]


def test_scheduler_behind_real_time_first_then_round_robin():
    s = Scheduler(max_ahead=0, max_batch=1)
    for sid in (1, 2, 3):
        s.admit(sid, key=sid)  # different keys: one per batch
        s.requested(sid)
        s.served(sid, 1.0, now=0.0)
        s.requested(sid)
    s.served(1, 1.0, now=0.0)  # 1 is a chunk further along
    s.requested(1)
    # at t=1.5: 1 made 2 s of media (ahead), 2 and 3 made 1 s (0.5 s behind); 3 served last: 2 first
    assert s.lags(now=1.5) == {1: -0.5, 2: 0.5, 3: 0.5}
    assert s.next(now=1.5).sid == 2
    s.served(2, 1.0, now=1.5)
    s.requested(2)
    assert s.next(now=1.5).sid == 3
    s.served(3, 1.0, now=1.6)
    s.requested(3)
    assert s.next(now=1.6).sid == 1  # nobody is behind: round robin, served longest ago


def test_scheduler_yields_when_ahead_of_the_viewer_and_pause_is_not_lag():
    s = Scheduler(max_ahead=4, max_batch=4)
    s.admit(1, lead_s=1.0)
    s.served(1, 0.75, now=0.0)
    s.set_viewer(1, 0.0)
    assert [x.sid for x in s.next_batch(now=0.0)] == [1]  # 0.75 s ahead < lead
    s.served(1, 0.75, now=0.1)
    assert s.next_batch(now=0.1) == []  # 1.5 s ahead of its viewer: yields despite credits
    s.set_viewer(1, 0.6)
    assert [x.sid for x in s.next_batch(now=0.6)] == [1]
    s.set_paused(1, True, now=1.0)
    assert s.next_batch(now=5.0) == []
    s.set_paused(1, False, now=9.0)
    assert s.slots[1].lag(9.0) == pytest.approx(1.0 - 1.5)  # 8 s paused do not count


@pytest.mark.parametrize("keys", [(0, 0, 0, 0, 0, 0), (0, 1, 2, 0, 1, 2)])
def test_scheduler_is_fair_under_overload_and_starves_no_one(keys):
    """Six always-asking sessions, 0.5 s chunks, a step of up to 2 sessions takes 0.4 s: the GPU makes
    2.5 s of media a second for 6 s wanted. Every session gets the same share (within a chunk)."""
    s = Scheduler(max_ahead=0, max_batch=2)
    for sid, key in enumerate(keys):
        s.admit(sid, key=key)
        s.requested(sid)
    now = 0.0
    for _ in range(600):
        batch = s.next_batch(now=now)
        assert batch
        now += 0.4
        for slot in batch:
            s.served(slot.sid, 0.5, now=now)
            s.requested(slot.sid)
    made = [slot.produced for slot in s.slots.values()]
    assert min(made) > 0 and max(made) - min(made) <= 2
    lags = s.lags(now=now).values()
    assert max(lags) - min(lags) <= 1.0 + 1e-9


# -- admission by memory in the engine ---------------------------------------------------------------------

async def test_engine_admits_by_memory_queues_and_refuses(tiny):
    model, text, dec = tiny
    probe = Engine(Pipeline(model=model, text_encoder=text, decoder=dec), EngineSettings(local_frames=6, sink_frames=0))
    one = probe.cache_bytes(GenRequest("p", 64, 64))
    assert probe.cache_bytes(GenRequest("p", 128, 64)) > one
    eng = Engine(Pipeline(model=model, text_encoder=text, decoder=dec),
                 EngineSettings(local_frames=6, sink_frames=0, cache_memory=2 * one + 512, queue_limit=2,
                                retry_after_s=3.0)).start()
    try:
        with pytest.raises(EngineError, match="needs .* MiB of KV cache") as e:
            await eng.open(GenRequest("too big", 256, 256))
        assert e.value.code == "bad_field" and e.value.field == "width"
        a = await eng.open(GenRequest("a", 64, 64))
        b = await eng.open(GenRequest("b", 64, 64))
        assert eng.pool.sessions == 2
        gone = asyncio.ensure_future(eng.open(GenRequest("gives up", 64, 64)))
        positions = []
        waiting = asyncio.ensure_future(eng.open(GenRequest("c", 64, 64), on_queued=positions.append))
        await asyncio.sleep(0)
        assert not waiting.done() and positions == [2] and eng.queue_length == 2
        gone.cancel()  # the head of the queue leaves: the next one moves up
        await asyncio.sleep(0)
        assert positions == [2, 1] and eng.queue_length == 1
        later = asyncio.ensure_future(eng.open(GenRequest("d", 64, 64)))
        await asyncio.sleep(0)
        assert eng.queue_length == 2
        with pytest.raises(EngineError, match="try again in 3 s") as e:
            await eng.open(GenRequest("e", 64, 64))
        assert e.value.code == "overloaded" and e.value.retry_after == 3.0
        assert (await a.get()).shape == (9, 64, 64, 3)
        assert eng._sessions[a.sid].state.cache.nbytes == one  # what was reserved is what the cache takes
        a.cancel()  # frees its range: the queued start gets it
        c = await asyncio.wait_for(waiting, 30)
        assert eng.pool.sessions == 2 and eng.queue_length == 1
        assert (await c.get()).shape == (9, 64, 64, 3)
        b.cancel()
        d = await asyncio.wait_for(later, 30)
        c.cancel()
        d.cancel()
        for _ in range(500):
            if eng.pool.sessions == 0:
                break
            await asyncio.sleep(0.01)
        assert eng.pool.sessions == 0 and eng.pool.used_bytes == 0
    finally:
        eng.close()


# -- the real server on loopback, real clients --------------------------------------------------------------

class _Loopback:
    """streamgen's app serving the tiny engine on 127.0.0.1 (aiohttp TestServer)."""

    def __init__(self, tiny, **engine_kw):
        from streamgen.server.sources import EngineFactory

        model, text, dec = tiny
        self.engine = Engine(Pipeline(model=model, text_encoder=text, decoder=dec),
                             EngineSettings(**{"local_frames": 6, "sink_frames": 0, **engine_kw}))
        self.factory = EngineFactory("tiny", self.engine, width=64, height=64)

    async def __aenter__(self):
        from aiohttp.test_utils import TestServer

        from streamgen.server.app import ServerConfig, build_app

        self.server = TestServer(build_app(ServerConfig(model="tiny", grace_s=0.0, preset="ultrafast", max_sessions_per_client=4,
                                                        encode_threads=2), self.factory))
        await self.server.start_server()
        self.url = f"ws://127.0.0.1:{self.server.port}/v1/stream"
        return self

    async def __aexit__(self, *exc):
        await self.server.close()

    async def metrics(self) -> dict[str, float]:
        """/metrics as {series (with labels): value}."""
        import aiohttp

        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{self.server.port}/metrics") as r:
                text = await r.text()
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                         if line and not line.startswith("#"))}

    async def raw(self):
        import websockets

        from streamgen import protocol as P

        ws = await websockets.connect(self.url, max_size=P.DEFAULT_LIMITS.max_server_message_bytes, close_timeout=0.5)
        return ws, P.ClientConnection()


async def _recv(ws, conn, timeout=30.0):
    while True:
        msg = conn.receive(await asyncio.wait_for(ws.recv(), timeout))
        if msg is not None:
            return msg


async def _until(pred, what: str, tries: int = 1500):
    for _ in range(tries):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


async def test_server_queues_by_memory_refuses_overload_and_a_disconnect_frees_the_slot(tiny):
    from streamgen import protocol as P

    probe = Engine(Pipeline(model=tiny[0], text_encoder=tiny[1], decoder=tiny[2]),
                   EngineSettings(local_frames=6, sink_frames=0))
    one = probe.cache_bytes(GenRequest("p", 64, 64))
    async with _Loopback(tiny, cache_memory=one + 512, queue_limit=1, retry_after_s=2.5) as srv:
        eng = srv.engine
        cancels, releases = [], []
        command, release = eng._command, eng.pool.release

        def spy_command(kind, sid, arg=None):
            if kind == "cancel":
                cancels.append(eng.stats["steps"])
            command(kind, sid, arg)

        def spy_release(res):
            releases.append(eng.stats["steps"])
            release(res)

        eng._command, eng.pool.release = spy_command, spy_release
        (ws1, c1), (ws2, c2), (ws3, c3) = [await srv.raw() for _ in range(3)]
        start = P.Start(prompt="first", width=64, height=64)
        await ws1.send(c1.send(start))
        ready = await _recv(ws1, c1)
        assert isinstance(ready, P.Ready)
        while not isinstance(await _recv(ws1, c1), P.Fragment):
            pass
        await ws2.send(c2.send(P.Start(prompt="second", width=64, height=64)))
        queued = await _recv(ws2, c2)
        assert isinstance(queued, P.Status) and queued.state == "queued" and queued.extra["position"] == 1
        await ws3.send(c3.send(P.Start(prompt="third", width=64, height=64)))
        refused = await _recv(ws3, c3)
        assert isinstance(refused, P.Error) and refused.code == "overloaded" and refused.ref == "start"
        assert refused.retry_after == 2.5 and "try again in 2.5 s" in refused.message
        m = await srv.metrics()
        assert m["streamgen_engine_pool_sessions"] == 1 and m["streamgen_engine_queue_length"] == 1
        assert m["streamgen_engine_pool_used_bytes"] > 0 and m["streamgen_engine_pool_capacity_bytes"] == one + 512
        assert f'streamgen_engine_session_lag_seconds{{session="{ready.session}"}}' in m  # lag by session id
        await ws1.close()  # the viewer goes: its slot is freed, the queued start gets it
        while not isinstance(msg := await _recv(ws2, c2), P.Ready):
            assert isinstance(msg, P.Status)
        await _until(lambda: releases, "the first session's range released")
        assert releases[0] - cancels[0] <= 1  # freed within one engine step of the cancel
        assert eng.pool.sessions == 1 and eng.queue_length == 0
        assert isinstance(await _recv(ws2, c2), P.Init)
        while not isinstance(msg := await _recv(ws2, c2), P.Fragment):
            assert isinstance(msg, P.Status)
        await ws2.close()
        await ws3.close()
        await _until(lambda: eng.pool.sessions == 0, "every range released")
        m = await srv.metrics()
        assert m["streamgen_engine_pool_sessions"] == 0 and m["streamgen_engine_pool_used_bytes"] == 0


async def test_server_a_paused_viewer_yields_and_the_others_keep_going(tiny):
    from streamgen import protocol as P
    from streamgen.client import StreamClient

    async with _Loopback(tiny) as srv:
        eng = srv.engine
        ws, conn = await srv.raw()
        await ws.send(conn.send(P.Start(prompt="paused one", width=64, height=64)))
        while not isinstance(await _recv(ws, conn), P.Fragment):
            pass
        await ws.send(conn.send(P.Pause()))
        await _until(lambda: any(s.paused for s in eng.scheduler.slots.values()), "the pause reached the engine")
        (paused,) = [s for s in eng.scheduler.slots.values() if s.paused]
        made = paused.produced
        n = 0
        async with StreamClient(srv.url) as c:
            async for _ in c.start(prompt="live one", width=64, height=64, chunks=5):
                n += 1
        assert n == 5  # the other session made all of its chunks...
        assert isinstance(c.status.extra["lag_s"], float)  # and its viewer was told its lag
        assert paused.produced == made and eng.scheduler.slots[paused.sid] is paused  # ...the paused one none
        await ws.send(conn.send(P.Resume()))
        await _until(lambda: paused.produced > made, "the resumed session generates again")
        await ws.close()
