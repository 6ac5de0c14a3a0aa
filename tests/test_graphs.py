"""ops.graphs.ChunkGraphs: on the CPU it falls back to eager with one log line; with the emulated graph
(the captured Python step rerun at replay) its whole path (layout keys, static noise/RoPE/timestep
buffers, dry-run bookkeeping, cache pool, capture-failure fallback) gives the same bytes as eager."""

import gc
import logging

import pytest
import torch

from streamgen.models.wan import WanConfig, WanModel
from streamgen.ops.graphs import ChunkGraphs, EmulatedGraph
from streamgen.sampling.stream import SessionState, StreamConfig

H = W = 32  # latent 4x4 -> 2x2 tokens a frame


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return WanModel(WanConfig.preset("tiny")).eval()


def _ctx(seed):
    return torch.randn(1, 7, WanConfig.preset("tiny").text_dim, generator=torch.Generator().manual_seed(seed))


def _session(model, *, window=True, seed=3, **kw):
    cfg = StreamConfig(frames_per_chunk=3, seed=seed, **kw)
    if window:
        cfg.local_frames, cfg.sink_frames = 9, 3  # ring of 6 frames: two slot layouts repeat
        return SessionState(model, _ctx(1), height=H, width=W, config=cfg)
    return SessionState(model, _ctx(1), height=H, width=W, config=cfg, total_frames=15)


def _latents(session, n, switch_at=None):
    out = []
    for i in range(n):
        if i == switch_at:
            session.set_prompt(_ctx(2))
        out.append(session.next_chunk().latents)
    return out


def _same_bytes(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)


def test_cpu_falls_back_to_eager_with_one_line(model, caplog):
    graphs = ChunkGraphs(model)  # the CUDA graph factory
    with caplog.at_level(logging.INFO, logger="streamgen.ops.graphs"):
        s1, s2 = _session(model), _session(model)
        assert not graphs.attach(s1)
        assert not graphs.attach(s2)
    lines = [r.getMessage() for r in caplog.records if r.name == "streamgen.ops.graphs"]
    assert len(lines) == 1 and "CUDA device" in lines[0] and "eager" in lines[0]
    assert "_chunk_step" not in s1.__dict__
    _same_bytes(_latents(s1, 4), _latents(_session(model), 4))


@pytest.mark.parametrize("window", [True, False])
def test_emulated_graphs_equal_eager(model, window):
    n = 9 if window else 5
    switch = 6 if window else 3
    ref = _latents(_session(model, window=window), n, switch_at=switch)
    graphs = ChunkGraphs(model, graph_factory=EmulatedGraph)
    s = _session(model, window=window)
    assert graphs.attach(s)
    _same_bytes(_latents(s, n, switch_at=switch), ref)
    st = graphs.stats
    assert st.eager + st.replays == n
    if window:
        # chunks 0-2 fill the window (3 layouts, each run eager once); from chunk 3 on the ring's two
        # layouts repeat: eager at their first sight, captured and replayed after that
        assert st.captures >= 2 and st.replays >= 3
    else:  # every chunk position is its own layout: all eager the first time
        assert st.captures == 0 and st.eager == n
    # a second session of the same geometry takes the pooled cache; every layout is warm now
    eager = st.eager
    del s
    gc.collect()
    s2 = _session(model, window=window)
    assert graphs.attach(s2)
    assert graphs.stats.pooled == 1
    _same_bytes(_latents(s2, n, switch_at=switch), ref)
    if not window:
        assert graphs.stats.eager == eager and graphs.stats.captures >= 1 and graphs.stats.replays == n


def test_capture_failure_falls_back_once(model, caplog):
    class Broken(EmulatedGraph):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    ref = _latents(_session(model), 7)
    graphs = ChunkGraphs(model, graph_factory=Broken)
    s = _session(model)
    assert graphs.attach(s)
    with caplog.at_level(logging.WARNING, logger="streamgen.ops.graphs"):
        got = _latents(s, 7)
    _same_bytes(got, ref)
    lines = [r.getMessage() for r in caplog.records if r.name == "streamgen.ops.graphs"]
    assert len(lines) == 1 and "capture failed" in lines[0]
    assert not graphs.enabled and graphs.stats.replays == 0
    assert not graphs.attach(_session(model))  # later sessions stay eager


def test_not_applicable_sessions_stay_eager(model, caplog):
    graphs = ChunkGraphs(model, graph_factory=EmulatedGraph)
    cfg = StreamConfig(frames_per_chunk=3, sampler="euler", num_steps=3, guidance_scale=2.0)
    s = SessionState(model, _ctx(1), height=H, width=W, config=cfg, total_frames=9, negative_prompt=_ctx(5))
    with caplog.at_level(logging.INFO, logger="streamgen.ops.graphs"):
        assert not graphs.attach(s)
    assert any("self-forcing" in r.getMessage() for r in caplog.records)
    other = WanModel(WanConfig.preset("tiny")).eval()
    with pytest.raises(ValueError, match="another model"):
        graphs.attach(SessionState(other, _ctx(1), height=H, width=W, config=StreamConfig(), total_frames=9))


def test_cuda_graphs_option_reaches_every_engine_session(tmp_path, caplog):
    """`generate --cuda-graphs` on the CPU: the transform is built, each engine session is offered to
    it, it falls back to eager with one log line, and the file is the same as without the option."""
    import logging

    import av

    from streamgen.cli import main

    out = {}
    for name, extra in (("eager", []), ("graphs", ["--cuda-graphs"])):
        path = tmp_path / f"{name}.mp4"
        with caplog.at_level(logging.INFO):
            assert main(["generate", "--model", "tiny", "--prompt", "a fox", "--chunks", "2", "--out", str(path)]
                        + extra) == 0
        with av.open(str(path)) as c:
            out[name] = [f.to_ndarray() for f in c.decode(video=0)]
    assert len(out["graphs"]) == len(out["eager"]) == 21
    assert all((a == b).all() for a, b in zip(out["graphs"], out["eager"]))
    assert any("graph" in r.getMessage().lower() and r.name == "streamgen.ops.graphs" for r in caplog.records)
