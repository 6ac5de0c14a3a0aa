"""One stream over two ranks (gloo, CPU, float32) with block-pipeline parallelism
(streamgen.parallel.pipeline): the single-rank stream bit for bit, through the chunk loop with a rolling window
that wraps, a prompt switch (KV re-cache in one forward with ``blocks=``) and a per-frame t; two sessions batched
by the engine's ``run_programs`` (micro-batches through the stages) equal one rank's batched run bit for bit; each
rank's cache holds its own blocks' layers only; the two stages compute micro-batches at the same time."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from streamgen.models.wan import WanConfig, WanModel
from streamgen.parallel.pipeline import PipelineParallelWan, _sessions, stage_layers
from streamgen.parallel.sequence import _stream

from test_parallel import join_gloo, per_frame_chunk, run_ranks  # noqa: E402
from test_recache import _Counter  # noqa: E402

CHUNKS, SWITCH_AT, SIZE = 5, 3, 64  # 64x64 px: 8x8 latent, 16 tokens a frame, 48 a chunk
ROW_CHUNKS, ROW_SWITCH = 4, 2  # two sessions batched, session 0 switches its prompt before chunk 2
LAYERS = 3  # the tiny preset: stage 0 owns block 0, stage 1 blocks 1-2 (an uneven split)
DELAY = 0.25  # seconds each stage sleeps per micro-batch in the overlap check


def _tiny() -> WanModel:
    torch.manual_seed(0)
    return WanModel(WanConfig.preset("tiny")).eval()  # 3 blocks, 2 heads x 64



def _rows_inputs():
    g = torch.Generator().manual_seed(9)
    ctxs = [torch.randn(1, 5, 32, generator=g) for _ in range(2)]
    return ctxs, torch.randn(2, 16, 3, 8, 8, generator=g), torch.tensor([500.0, 250.0])


def _overlap(rank: int) -> dict:
    """One forward_rows of two caches (two micro-batches) whose stage sleeps DELAY per micro-batch: the
    monotonic times each stage starts and ends each micro-batch (the clock is the host's, shared by the ranks)."""
    model = _tiny()
    pp = PipelineParallelWan(model)
    times: list[tuple[str, float]] = []
    first, last = model.blocks[pp.layers[0]], model.blocks[pp.layers[-1]]

    def start(mod, args):
        times.append(("start", time.monotonic()))
        time.sleep(DELAY)

    first.register_forward_pre_hook(start)
    last.register_forward_hook(lambda mod, args, out: times.append(("end", time.monotonic())))
    ctxs, x, t = _rows_inputs()
    caches = [pp.new_cache(1, (8, 8), local_frames=7, sink_frames=1) for _ in ctxs]
    for c, ctx in zip(caches, ctxs):
        pp.set_prompt(c, ctx)
    t0 = time.monotonic()
    pp.forward_rows(x, t, caches, start_frames=[0, 0], update_cache=[False, False])
    return {"times": times, "wall": time.monotonic() - t0}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    join_gloo(rank, world, port)
    try:
        model = _tiny()
        pp = PipelineParallelWan(model)
        counter = _Counter(pp)
        res = {"stream": _stream(pp, CHUNKS, SWITCH_AT, SIZE), "calls": list(counter.calls),
               "layers": (pp.layers.start, pp.layers.stop)}
        del pp.forward_chunk
        # the rank's cache: the K/V of its blocks only
        c = pp.new_cache(1, (8, 8), local_frames=7, sink_frames=1)
        res["cache_k"], res["cache_cross"], res["cache_bytes"] = tuple(c.k.shape), tuple(c.cross_k.shape), c.nbytes
        res["numel"] = pp.cache_numel(1, (8, 8), 7)
        # what the engine reserves in its pool for a session on the split model: this rank's shard
        from streamgen.engine.core import Engine, EngineSettings, GenRequest, Pipeline

        engine = Engine(Pipeline(model=pp, text_encoder=None, decoder=None), EngineSettings(local_frames=7))
        res["reserved"] = engine.cache_bytes(GenRequest("x", 64, 64))
        res["per_frame"] = per_frame_chunk(pp, 3, c)[0]
        res["kv"] = (c.k.clone(), c.v.clone(), c.cross_k.clone(), c.cross_v.clone())
        # two sessions batched (forward_rows: one micro-batch each)
        inner, n_caches = pp.forward_rows, []

        def rows(x, t, caches, **kw):
            n_caches.append(len(caches))
            return inner(x, t, caches, **kw)

        pp.forward_rows = rows
        res["rows"], res["rows_calls"] = _sessions(pp, 2, ROW_CHUNKS, ROW_SWITCH, SIZE), n_caches
        del pp.forward_rows
        try:
            pp.forward_chunk(torch.randn(1, 16, 3, 8, 8), torch.tensor([[500.0, 250.0, 125.0]]),
                             model.new_cache(1, (8, 8), local_frames=7, sink_frames=1))
        except ValueError as e:
            res["full_cache_error"] = str(e)
        try:
            PipelineParallelWan(WanModel(WanConfig.preset("tiny", num_layers=1)))
        except ValueError as e:
            res["layers_error"] = str(e)
        res["overlap"] = _overlap(rank)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_worker)


@pytest.fixture(scope="module")
def alone():
    torch.set_num_threads(1)
    try:
        model = _tiny()
        res = {"stream": _stream(model, CHUNKS, SWITCH_AT, SIZE),
               "rows": _sessions(model, 2, ROW_CHUNKS, ROW_SWITCH, SIZE)}
        c = model.new_cache(1, (8, 8), local_frames=7, sink_frames=1)
        res["per_frame"] = per_frame_chunk(model, 3, c)[0]
        res["kv"] = (c.k, c.v, c.cross_k, c.cross_v)
        res["cache_k"], res["cache_bytes"] = tuple(c.k.shape), c.nbytes
        return res
    finally:
        torch.set_num_threads(2)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_pipeline_stream_equals_one_rank_bitwise(ranks, alone):
    """5 chunks of 3 frames, window 7 with 1 sink (the ring wraps from the third chunk), a prompt switch
    before chunk 3 whose re-cache is one forward with blocks (1, 3, 3): every chunk on both ranks equals
    one rank's bit for bit."""
    assert len(alone["stream"]) == CHUNKS
    assert not torch.equal(alone["stream"][0], alone["stream"][1])  # not trivially constant
    worst = 0.0
    for r in ranks:
        for i, (a, b) in enumerate(zip(r["stream"], alone["stream"], strict=True)):
            worst = max(worst, _max_diff(a, b))
            assert torch.equal(a, b), f"chunk {i}: max diff {_max_diff(a, b):.3g}"
        assert (7, (1, 3, 3)) in r["calls"]  # the switch's re-cache went through blocks= in one forward
        assert torch.equal(r["per_frame"], alone["per_frame"])  # a per-frame t
    print(f"pipeline vs one rank: max |diff| {worst:.3g}")


def test_batched_sessions_micro_batched_equal_one_rank_bitwise(ranks, alone):
    """Two sessions run together by run_programs: their denoising steps and cache passes go through
    forward_rows as two micro-batches, session 0's prompt switch alone; both equal one rank's batched run."""
    for r in ranks:
        assert r["rows_calls"] and set(r["rows_calls"]) == {2}
        for k in range(2):
            for i, (a, b) in enumerate(zip(r["rows"][k], alone["rows"][k], strict=True)):
                assert torch.equal(a, b), f"session {k} chunk {i}: max diff {_max_diff(a, b):.3g}"
    assert not torch.equal(alone["rows"][0][0], alone["rows"][1][0])


def test_each_rank_caches_its_own_blocks_only(ranks, alone):
    cap, t, heads, d = 7, 16, 2, 64
    text_len = WanConfig.preset("tiny").text_len
    assert alone["cache_k"] == (LAYERS, 1, cap * t, heads, d)
    owned = [len(stage_layers(LAYERS, 2, r)) for r in range(2)]
    assert owned == [1, 2]
    for rank, r in enumerate(ranks):
        lo, hi = r["layers"]
        assert range(lo, hi) == stage_layers(LAYERS, 2, rank)
        assert r["cache_k"] == (owned[rank], 1, cap * t, heads, d)
        assert r["cache_cross"] == (owned[rank], 1, text_len, heads, d)
        assert r["numel"] * 4 == r["cache_bytes"]
        assert r["reserved"] == r["cache_bytes"]  # the engine's pool reserves the shard, not the full cache
        # its layers hold what one rank's cache holds in those layers, after a committed per-frame chunk
        for got, ref in zip(r["kv"], alone["kv"]):
            assert torch.equal(got, ref[lo:hi])
    assert sum(r["cache_bytes"] for r in ranks) == alone["cache_bytes"]


def test_two_stages_compute_at_the_same_time(ranks):
    """GPipe over two micro-batches: stage 1 starts micro-batch 0 while stage 0 still computes micro-batch 1
    (each stage sleeps DELAY a micro-batch; without the overlap stage 1 would start at stage 0's end)."""
    def when(rank: int, what: str) -> list[float]:
        return [t for w, t in ranks[rank]["overlap"]["times"] if w == what]

    (s0, _), (e0, e1), (s1, _) = when(0, "start"), when(0, "end"), when(1, "start")
    assert len(when(1, "end")) == 2
    assert s1 >= e0  # stage 1's micro-batch 0 needs stage 0's output
    assert s1 < e1 - DELAY / 2, (f"stage 1 started micro-batch 0 at {s1 - s0:.3f} s, "
                                 f"stage 0 ended micro-batch 1 at {e1 - s0:.3f} s")
    print(f"overlap: forward of 2 micro-batches over 2 stages, {DELAY} s a stage: {ranks[0]['overlap']['wall']:.3f} s "
          f"(sequential stages: {4 * DELAY:.2f} s)")


def test_bad_setup_is_one_clear_error(ranks):
    for r in ranks:
        assert "make it with this wrapper's new_cache" in r["full_cache_error"]
        assert "num_layers=1 blocks cannot give each of the 2 ranks one" in r["layers_error"]


def test_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        PipelineParallelWan(_tiny())
