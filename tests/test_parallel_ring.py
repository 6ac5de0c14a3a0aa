"""One stream over two ranks (gloo, CPU, float32) with ring attention
(``SequenceParallelWan(model, mode="ring")``): the single-rank stream within float rounding, through
the chunk loop with a rolling window that wraps and a prompt switch whose re-cache runs in one forward
(``blocks=``), the same scenario as tests/test_parallel.py; a head count that Ulysses refuses works;
each rank's self-attention cache holds its half of every frame's tokens.

Tolerance: the online softmax merges the two ranks' partial attentions (log-sum-exp), which reorders
the sums, so the chunks are not bit-equal: max |ring - one rank| <= REL * max |one rank| per chunk.
Measured on the 2-core CPU: 2.4e-7 relative at worst (printed by the test with -s)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from streamgen.models.wan import WanConfig, WanModel
from streamgen.parallel.sequence import SequenceParallelWan, _stream

from test_parallel import join_gloo, per_frame_chunk, run_ranks  # noqa: E402
from test_recache import _Counter  # noqa: E402

CHUNKS, SWITCH_AT, SIZE = 5, 3, 64  # 64x64 px: 8x8 latent, 16 tokens a frame (8 a rank), 48 a chunk
REL = 1e-5


def _tiny(heads: int = 4) -> WanModel:
    torch.manual_seed(0)
    return WanModel(WanConfig.preset("tiny", num_heads=heads, dim=32 * heads)).eval()  # heads x 32



def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    join_gloo(rank, world, port)
    try:
        sp = SequenceParallelWan(_tiny(4), mode="ring")
        counter = _Counter(sp)
        res = {"stream": _stream(sp, CHUNKS, SWITCH_AT, SIZE), "calls": list(counter.calls)}
        c = sp.new_cache(1, (8, 8), local_frames=7, sink_frames=1)
        res["cache_k"], res["cache_bytes"] = tuple(c.k.shape), c.nbytes
        res["numel"] = sp.cache_numel(1, (8, 8), 7)
        res["per_frame"] = per_frame_chunk(sp, 3, c)[0]
        # 3 heads: not divisible by 2 ranks; ring runs it, Ulysses refuses
        m3 = _tiny(3)
        res["stream3"] = _stream(SequenceParallelWan(m3, mode="ring"), CHUNKS, SWITCH_AT, SIZE)
        try:
            SequenceParallelWan(m3)
        except ValueError as e:
            res["ulysses_error"] = str(e)
        try:
            SequenceParallelWan(m3, mode="rings")
        except ValueError as e:
            res["mode_error"] = str(e)
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
        model = _tiny(4)
        res = {"stream": _stream(model, CHUNKS, SWITCH_AT, SIZE), "stream3": _stream(_tiny(3), CHUNKS, SWITCH_AT, SIZE)}
        c = model.new_cache(1, (8, 8), local_frames=7, sink_frames=1)
        res["per_frame"] = per_frame_chunk(model, 3, c)[0]
        res["cache_k"], res["cache_bytes"] = tuple(c.k.shape), c.nbytes
        return res
    finally:
        torch.set_num_threads(2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / b.abs().max().item()


def test_ring_stream_equals_one_rank(ranks, alone):
    """5 chunks of 3 frames, window 7 with 1 sink (the ring wraps from the third chunk), a prompt switch
    before chunk 3 whose re-cache is one forward with blocks (1, 3, 3): every chunk on both ranks is
    one rank's within REL; 4 heads and 3 heads (which Ulysses cannot split over 2 ranks)."""
    worst = 0.0
    for key in ("stream", "stream3"):
        assert len(alone[key]) == CHUNKS
        assert not torch.equal(alone[key][0], alone[key][1])
        for r in ranks:
            for i, (a, b) in enumerate(zip(r[key], alone[key], strict=True)):
                rel = _rel(a, b)
                worst = max(worst, rel)
                assert rel <= REL, f"{key} chunk {i}: relative error {rel:.3g}"
    for a, b in zip(ranks[0]["stream"], ranks[1]["stream"]):  # every rank returns the same flow
        assert torch.equal(a, b)
    print(f"ring vs one rank: max relative error {worst:.3g}")
    # the switch's re-cache went through blocks= in one forward
    assert (7, (1, 3, 3)) in ranks[0]["calls"]


def test_ring_cache_is_sharded_by_tokens_and_per_frame_t(ranks, alone):
    cap, t, layers, heads, d = 7, 16, 3, 4, 32
    assert alone["cache_k"] == (layers, 1, cap * t, heads, d)
    for r in ranks:
        assert r["cache_k"] == (layers, 1, cap * t // 2, heads, d)  # half of every frame's tokens, all heads
        # self K/V halved, the cross K/V (text_len x all heads) replicated
        cross = 2 * layers * WanConfig.preset("tiny").text_len * heads * d * 4
        assert r["cache_bytes"] == (alone["cache_bytes"] - cross) // 2 + cross
        assert r["numel"] * 4 == r["cache_bytes"]
        assert _rel(r["per_frame"], alone["per_frame"]) <= REL  # a per-frame t over 3 frames (ragged for Ulysses)


def test_ulysses_refusal_names_ring(ranks):
    for r in ranks:
        msg = r["ulysses_error"]
        assert "num_heads=3 is not divisible by the world size 2" in msg and "mode='ring'" in msg
        assert "\n" not in msg
        assert "ulysses, ring" in r["mode_error"]
