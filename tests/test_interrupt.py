"""A prompt change abandons the old prompt's chunk still being denoised (issue 10: the new prompt's
first chunk starts at the next forward instead of after that chunk).

``batch.run_programs(interrupt=...)`` stops a program only where its next calls commit nothing,
and the engine's session is left exactly as it was before the abandoned chunk (position, chunk
count, every cache buffer): the next chunk delivered is the new prompt's, with no gap."""

from __future__ import annotations

import asyncio

import torch

from streamgen.engine.batch import Interrupted, run_programs
from streamgen.engine.core import GenRequest
from streamgen.sampling.stream import ModelCall

from test_batched import _cache, _Driver, tiny, wan  # noqa: F401 - fixtures


def _steps(model, cache, x, steps: int, log: list):
    try:
        out = []
        for i in range(steps):
            (y,) = yield [ModelCall(x, torch.full((1,), 500.0), cache, cache.frames_written, i == steps - 1)]
            out.append(y)
        return out
    finally:
        log.append("closed")


def test_run_programs_interrupts_only_before_a_commit(wan):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 16, 3, 16, 16, generator=g) for _ in range(2)]
    caches = [_cache(wan, i, 3) for i in range(2)]
    written = [c.frames_written for c in caches]
    logs: list[list] = [[], []]
    asked: list = []

    def interrupt(k) -> bool:
        asked.append(k)
        return k == 1 and len(asked) > 2  # program 1 from its second round on

    got = run_programs(wan, {k: _steps(wan, caches[k], xs[k], 3, logs[k]) for k in range(2)}, interrupt=interrupt)
    assert isinstance(got[1], Interrupted) and logs[1] == ["closed"]
    assert caches[1].frames_written == written[1]  # its commit never ran
    assert len(got[0]) == 3 and caches[0].frames_written == written[0] + 3
    assert 0 in asked  # asked for program 0 too, which said no
    # a program whose next call commits is never asked: the third (committing) round of program 0
    # ran although an interrupt that says yes to everything was given from the start
    logs = [[]]
    got = run_programs(wan, {0: _steps(wan, caches[0], xs[0], 1, logs[0])}, interrupt=lambda k: True)
    assert len(got[0]) == 1 and logs[0] == ["closed"]  # a finished program, not Interrupted


def _two_sessions(tiny, **kw):
    d = _Driver(tiny, **kw)
    a = d.open(GenRequest("a fox in the snow", 64, 64, seed=3))
    b = d.open(GenRequest("a city at night", 64, 64, seed=4))
    for _ in range(2):
        assert d.step(a, b) == [a, b]
    return d, a, b


def _drain(d) -> None:  # the busy loop applies its queued commands between steps
    while not d.eng._cmds.empty():
        d.eng._handle_command(*d.eng._cmds.get_nowait())


async def _chunks(d, sid) -> list:
    await asyncio.sleep(0)  # deliveries go through call_soon_threadsafe
    q = d.eng._handles[sid]._queue
    return [q.get_nowait() for _ in range(q.qsize())]


async def test_a_prompt_change_abandons_the_chunk_being_denoised(tiny, monkeypatch):
    d, a, b = _two_sessions(tiny)
    st = d.eng._sessions[b].state
    before = (st.next_frame, st.chunk_index, st.cache.frames_written, st.cache.cross_k.clone())
    model = tiny[0]
    calls = {"n": 0}
    real = model.forward_rows

    def forward_rows(*args, **kw):  # the viewer types while the second denoising step runs
        calls["n"] += 1
        if calls["n"] == 2:
            d.eng._handles[b].set_prompt("rain")
        return real(*args, **kw)

    monkeypatch.setattr(model, "forward_rows", forward_rows)
    n0 = dict(d.eng.stats)
    assert d.step(a, b) == [a, b]
    monkeypatch.undo()
    assert d.eng.stats["interrupted"] - n0["interrupted"] == 1
    assert d.eng.stats["chunks"] - n0["chunks"] == 1  # a's chunk only
    assert (st.next_frame, st.chunk_index, st.cache.frames_written) == before[:3]  # b did not move on
    assert torch.equal(st.cache.cross_k, before[3])  # nor change prompt yet

    _drain(d)
    assert not d.eng._new_prompt
    assert [s.sid for s in d.eng.scheduler.next_batch()] == [b]  # still due, without a new request
    d.eng._step([b])
    got = await _chunks(d, b)
    assert [c.switched for c in got] == [False, False, True]  # no gap: its third chunk is the new prompt's
    assert st.prompt == "rain" and st.chunk_index == before[1] + 1

    # the abandoned chunk left nothing behind but its noise draws: a session that never started it,
    # with its generator advanced by the same three draws (x, then one per step before the third),
    # makes the same chunk
    r, ra, rb = _two_sessions(tiny)
    rst = r.eng._sessions[rb].state
    for _ in range(3):
        rst._randn(rst._noise)
    r.eng._handles[rb].set_prompt("rain")
    _drain(r)
    r.eng._step([rb])
    ref = await _chunks(r, rb)
    assert ref[-1].switched
    assert torch.equal(ref[-1].frames, got[-1].frames)


def _prompt_during_second_chunk(tiny, monkeypatch, prompt: str, *, abandon: bool = True, **settings):
    """One session ("a city at night"): a chunk, then ``prompt`` sent while the second is made."""
    d = _Driver(tiny, **settings)
    b = d.open(GenRequest("a city at night", 64, 64, seed=4))
    d.step(b)
    model = tiny[0]
    real = model.forward_chunk

    def forward_chunk(*args, **kw):
        d.eng._handles[b].set_prompt(prompt, abandon=abandon)
        return real(*args, **kw)

    monkeypatch.setattr(model, "forward_chunk", forward_chunk)
    d.step(b)
    monkeypatch.undo()
    return d, b


async def test_no_interrupt_when_turned_off(tiny, monkeypatch):
    d, _ = _prompt_during_second_chunk(tiny, monkeypatch, "rain", interrupt_on_prompt=False)
    assert d.eng.stats["interrupted"] == 0 and d.eng.stats["chunks"] == 2


async def test_the_same_prompt_again_does_not_interrupt(tiny, monkeypatch):
    d, _ = _prompt_during_second_chunk(tiny, monkeypatch, "a city at night")  # what it already streams
    assert d.eng.stats["interrupted"] == 0 and d.eng.stats["chunks"] == 2
    _drain(d)
    assert not d.eng._new_prompt



async def test_a_cancelled_session_abandons_its_chunk_at_once(tiny, monkeypatch):
    """Nobody will take a cancelled session's chunk: the step drops it at the next forward, so the
    sessions in its batch (and the next open) do not wait for it; its pool range is freed."""
    d, a, b = _two_sessions(tiny, interrupt_on_prompt=False)  # cancelling does not depend on it
    model = tiny[0]
    calls = {"n": 0}
    real = model.forward_rows

    def forward_rows(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            d.eng._handles[b].cancel()  # the viewer leaves during the second denoising step
        return real(*args, **kw)

    monkeypatch.setattr(model, "forward_rows", forward_rows)
    n0 = dict(d.eng.stats)
    held0 = d.eng.pool.sessions
    assert d.step(a, b) == [a, b]
    monkeypatch.undo()
    assert d.eng.stats["interrupted"] - n0["interrupted"] == 1 and d.eng.stats["chunks"] - n0["chunks"] == 1
    # b's remaining calls never ran: a ran its own 4 steps + cache pass, b stopped after its second
    assert d.eng.stats["rows"] - n0["rows"] == 5 + 2
    _drain(d)
    assert b not in d.eng._sessions and not d.eng._cancelling and d.eng.pool.sessions == held0 - 1
    assert [s.sid for s in d.eng.scheduler.next_batch()] == []  # a was served; nothing else is due


async def test_a_prompt_that_asks_to_keep_the_chunk_does_not_interrupt(tiny, monkeypatch):
    """``set_prompt(abandon=False)`` (the server's choice when its viewer's buffer would run dry
    first): the old prompt's chunk finishes, the new prompt starts at the next one."""
    d, b = _prompt_during_second_chunk(tiny, monkeypatch, "rain", abandon=False)
    assert d.eng.stats["interrupted"] == 0 and d.eng.stats["chunks"] == 2
    _drain(d)
    d.step(b)
    assert [c.switched for c in await _chunks(d, b)] == [False, False, True]


def test_the_server_abandons_the_old_chunk_only_when_the_viewer_can_wait():
    """Session.can_abandon: a prompt change drops the old prompt's chunk in progress only if what
    the viewer has ahead outlasts the expected wait for the new prompt's first fragment by the pace
    margin (else that chunk bridges the wait: no stall); unpaced or before any chunk, always."""
    from concurrent.futures import ThreadPoolExecutor

    from streamgen.media.encode import FMP4Encoder
    from streamgen.server.metrics import Metrics
    from streamgen.server.sessions import Session, SessionLimits
    from streamgen.server.sources import TestPatternSource

    with ThreadPoolExecutor(1) as pool:
        def session(lead):
            return Session(source=TestPatternSource(64, 48, 16, 4, "red", executor=pool),
                           encoder=FMP4Encoder(64, 48, 16), metrics=Metrics(), executor=pool, client="t",
                           limits=SessionLimits(), lead=lead)

        s = session(0.75)
        assert s.switch_estimate_s() is None and s.can_abandon()  # nothing made yet
        s._chunk_s = 0.3  # a chunk takes 0.3 s here: a switch is expected to take 0.6 s
        s.generated_s = 1.0  # 1.0 s ahead of a viewer at 0 (no acks yet, no first fragment)
        assert s.switch_estimate_s() == 0.6 and s.can_abandon()
        s.generated_s = 0.4  # the viewer would stall for 0.2 s: keep the old chunk
        assert not s.can_abandon()
        s.generated_s = 0.7  # just over the expected wait, within the margin (0.25 s): keep it too
        assert not s.can_abandon()
        s._switch_s = 0.35  # switches measured faster than the estimate: 0.7 s outlasts 0.35 + 0.25
        assert s.can_abandon()
        assert session(None).can_abandon()  # unpaced
