"""One stream over two ranks (gloo, CPU, float32): Ulysses sequence parallelism
(streamgen.parallel.sequence) gives the single-rank stream bit for bit, through the chunk loop with
a rolling window that wraps, a prompt switch (KV re-cache) and a per-frame t; each rank's cache
holds its heads only; bad geometry is one clear error."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from streamgen.models.wan import WanConfig, WanModel
from streamgen.parallel.sequence import SequenceParallelWan, _stream

CHUNKS, SWITCH_AT, SIZE = 5, 3, 64  # 64x64 px: 8x8 latent, 16 tokens a frame, 48 a chunk


def _tiny() -> WanModel:
    torch.manual_seed(0)
    return WanModel(WanConfig.preset("tiny", num_heads=4)).eval()  # 4 heads x 32


def join_gloo(rank: int, world: int, port: int) -> None:
    """A spawned rank (of ``run_ranks``) joins the gloo group on ``port``, one thread each."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def per_frame_chunk(model, frames: int, cache=None):
    """One committed chunk of ``frames`` latent frames, each at its own t (500, 250, 125), on a fresh
    7-frame cache with a 1-frame sink (or ``cache``), same inputs every call: (its flow, the cache)."""
    g = torch.Generator().manual_seed(7)
    ctx, x = torch.randn(1, 5, 32, generator=g), torch.randn(1, 16, frames, 8, 8, generator=g)
    c = model.new_cache(1, (8, 8), local_frames=7, sink_frames=1) if cache is None else cache
    model.set_prompt(c, ctx)
    t = torch.tensor([[500.0, 250.0, 125.0][:frames]])
    return model.forward_chunk(x, t, c, start_frame=0, update_cache=True), c


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    join_gloo(rank, world, port)
    try:
        model = _tiny()
        sp = SequenceParallelWan(model)
        res = {"stream": _stream(sp, CHUNKS, SWITCH_AT, SIZE)}
        # the rank's cache: its 2 of 4 heads, 1/2 of the single-rank cache
        c = sp.new_cache(1, (8, 8), local_frames=7, sink_frames=1)
        res["cache_heads"] = c.k.shape[3]
        res["cache_bytes"] = c.nbytes
        # a per-frame t (each rank 1.5 frames would be ragged: 3 frames of 16 tokens over 2 ranks
        # -> 24 tokens a rank, not whole frames) is refused; 2 frames (16 tokens a rank) run
        res["per_frame"] = per_frame_chunk(sp, 2, c)[0]
        try:
            sp.forward_chunk(torch.randn(1, 16, 3, 8, 8), torch.tensor([[1.0, 2.0, 3.0]]), c)
        except ValueError as e:
            res["ragged_error"] = str(e)
        try:
            SequenceParallelWan(WanModel(WanConfig.preset("tiny", num_heads=1)))
        except ValueError as e:
            res["heads_error"] = str(e)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, world: int = 2) -> list:
    """Spawn ``world`` gloo processes of ``worker(rank, world, port, out_dir)``; each saves its
    results to ``out_dir/rank{r}.pt``; returns them in rank order."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(world, _free_port(), d), nprocs=world, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world)]


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_worker)


@pytest.fixture(scope="module")
def alone():
    torch.set_num_threads(1)
    try:
        model = _tiny()
        stream = _stream(model, CHUNKS, SWITCH_AT, SIZE)
        per_frame, c = per_frame_chunk(model, 2)
        return {"stream": stream, "per_frame": per_frame, "cache_bytes": c.nbytes}
    finally:
        torch.set_num_threads(2)


def test_two_ranks_stream_equals_one_rank_bitwise(ranks, alone):
    """5 chunks of 3 frames, window 7 with 1 sink (the ring wraps from the third chunk), a prompt switch
    before chunk 3 (re-cache of the window): every chunk's latents on both ranks equal one rank's."""
    assert len(alone["stream"]) == CHUNKS
    for r in ranks:
        for i, (a, b) in enumerate(zip(r["stream"], alone["stream"])):
            assert torch.equal(a, b), f"chunk {i}: max diff {(a - b).abs().max().item():.3g}"
    # the stream is not trivially constant: chunks differ from each other
    assert not torch.equal(alone["stream"][0], alone["stream"][1])


def test_per_frame_t_and_sharded_cache(ranks, alone):
    for r in ranks:
        assert torch.equal(r["per_frame"], alone["per_frame"])
        assert r["cache_heads"] == 2
        assert r["cache_bytes"] * 2 == alone["cache_bytes"]


def test_bad_geometry_is_one_clear_error(ranks):
    for r in ranks:
        assert "num_heads=1 is not divisible by the world size 2" in r["heads_error"]
        assert "whole frames per rank" in r["ragged_error"]


def test_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        SequenceParallelWan(_tiny())
