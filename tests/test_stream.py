"""The streaming chunk loop with caches == the same computation without streaming.

The reference recomputes everything for every denoising step with the full block-causal
forward (``WanModel.forward(frames_per_block=k)``) over [clean history, current noisy chunk],
with per-frame timesteps (0 for the history, t for the chunk), replaying the session's noise
draws from a generator with the same seed. After a prompt switch, the reference runs the new
prompt over the whole re-cached history (which is what the K/V re-cache rebuilds).
"""

import pytest
import torch

from streamgen.models.wan import WanConfig, WanModel
from streamgen.models.wan_vae import WanVAE, WanVAEConfig
from streamgen.sampling.samplers import make_sampler
from streamgen.sampling.schedules import FlowSchedule, self_forcing_timesteps
from streamgen.sampling.stream import Chunk, StreamConfig, SessionState, frames_for_chunks

H = W = 32  # pixels -> latent 4x4 -> 2x2 tokens per frame
LAT = (H // 8, W // 8)
ATOL = 2e-4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return WanModel(WanConfig.preset("tiny")).eval()


def _ctx(seed, n=7):
    return torch.randn(1, n, WanConfig.preset("tiny").text_dim, generator=torch.Generator().manual_seed(seed))


def reference_stream(model, prompts, n_chunks, f, cfg: StreamConfig, *, image=None, local_frames=None, sink_frames=0):
    """prompts: {chunk: context}; returns the list of clean chunk latents (image not included)."""
    ts = self_forcing_timesteps(cfg.num_steps, cfg.shift, steps=cfg.denoising_steps, warp=cfg.warp).float()
    sig = [float(t) / 1000 for t in ts] + [0.0]
    g = torch.Generator().manual_seed(cfg.seed)
    hist = [] if image is None else [image]
    origin = 0  # first history frame the model still sees (moves at a windowed prompt switch)
    ctx = prompts[0]
    out = []
    with torch.no_grad():
        for n in range(n_chunks):
            if n in prompts and n > 0:
                ctx = prompts[n]
                if local_frames is not None:
                    origin = max(0, sum(h.shape[2] for h in hist) - local_frames)
            past = torch.cat(hist, dim=2)[:, :, origin:] if hist else None
            n_past = 0 if past is None else past.shape[2]
            x = torch.randn((1, 16, f, *LAT), generator=g)
            for i, t in enumerate(ts):
                full = x if past is None else torch.cat([past, x], dim=2)
                tt = torch.cat([torch.zeros(1, n_past), torch.full((1, f), float(t))], dim=1)
                flow = model(full, tt, ctx, frames_per_block=f, local_frames=local_frames, sink_frames=sink_frames)
                x0 = x - sig[i] * flow[:, :, n_past:]
                if i + 1 < len(ts):
                    x = (1 - sig[i + 1]) * x0 + sig[i + 1] * torch.randn((1, 16, f, *LAT), generator=g)
            hist.append(x0)
            out.append(x0)
    return out


def _run(session, n_chunks, switches=None):
    chunks = []
    for n in range(n_chunks):
        if switches and n in switches and n > 0:
            session.set_prompt(switches[n])
        chunks.append(session.next_chunk())
    return chunks


def test_stream_equals_block_causal_recompute(model):
    cfg = StreamConfig(frames_per_chunk=3, seed=11)
    ctx = _ctx(1)
    s = SessionState(model, ctx, height=H, width=W, config=cfg, total_frames=12)
    chunks = _run(s, 4)
    ref = reference_stream(model, {0: ctx}, 4, 3, cfg)
    for c, r in zip(chunks, ref):
        assert c.latents.shape == (1, 16, 3, *LAT)
        torch.testing.assert_close(c.latents, r, atol=ATOL, rtol=0)
    assert [c.start_frame for c in chunks] == [0, 3, 6, 9]
    # a one-chunk stream is the first chunk of a longer one (same first noise draws)
    alone = reference_stream(model, {0: ctx}, 1, 3, cfg)[0]
    assert (chunks[0].latents - alone).abs().max() < ATOL


def test_prompt_switches_equal_recompute_under_new_prompt(model):
    cfg = StreamConfig(frames_per_chunk=2, seed=5)
    p = {0: _ctx(1), 2: _ctx(2), 4: _ctx(3)}
    s = SessionState(model, p[0], height=H, width=W, config=cfg, total_frames=12)
    chunks = _run(s, 6, p)
    ref = reference_stream(model, p, 6, 2, cfg)
    for c, r in zip(chunks, ref):
        torch.testing.assert_close(c.latents, r, atol=ATOL, rtol=0)
    assert [c.switched for c in chunks] == [False, False, True, False, True, False]
    # and it is not a no-op: keeping the old K/V (no re-cache) gives a different chunk
    no_recache = reference_stream(model, {0: p[0]}, 3, 2, cfg)[2]
    assert (chunks[2].latents - no_recache).abs().max() > 1e-2


def test_windowed_stream_and_switch(model):
    # window of 6 latent frames with 1 sink frame, chunks of 2; a switch at chunk 4 re-caches the
    # last 6 frames (2..8, frame 2 then being the sink) under the new prompt
    cfg = StreamConfig(frames_per_chunk=2, local_frames=6, sink_frames=1, seed=9)
    p = {0: _ctx(4), 4: _ctx(5)}
    s = SessionState(model, p[0], height=H, width=W, config=cfg)
    assert s.cache.capacity == 6
    chunks = _run(s, 7, p)
    ref = reference_stream(model, p, 7, 2, cfg, local_frames=6, sink_frames=1)
    for c, r in zip(chunks, ref):
        torch.testing.assert_close(c.latents, r, atol=ATOL, rtol=0)
    assert [start for start, _ in s.recache_chunks()] == [8, 10, 12]
    # a window that is not a whole number of chunks: the oldest re-cached chunk is trimmed
    cfg5 = StreamConfig(frames_per_chunk=2, local_frames=5, sink_frames=1, seed=9)
    s5 = SessionState(model, p[0], height=H, width=W, config=cfg5)
    chunks5 = _run(s5, 6, p)
    assert [(start, x.shape[2]) for start, x in s5.recache_chunks()] == [(7, 1), (8, 2), (10, 2)]
    torch.testing.assert_close(s5.recache_chunks()[0][1], chunks5[3].latents[:, :, 1:])
    assert all(torch.isfinite(c.latents).all() for c in chunks5)


def test_image_start(model):
    cfg = StreamConfig(frames_per_chunk=1, seed=2)
    ctx = _ctx(6)
    image = torch.randn(1, 16, 1, *LAT, generator=torch.Generator().manual_seed(7))
    s = SessionState(model, ctx, height=H, width=W, config=cfg, image=image, total_frames=4)
    chunks = _run(s, 3)
    assert chunks[0].latents.shape[2] == 2 and chunks[0].start_frame == 0
    torch.testing.assert_close(chunks[0].latents[:, :, :1], image)
    assert [c.start_frame for c in chunks[1:]] == [2, 3]
    ref = reference_stream(model, {0: ctx}, 3, 1, cfg, image=image)
    torch.testing.assert_close(chunks[0].latents[:, :, 1:], ref[0], atol=ATOL, rtol=0)
    for c, r in zip(chunks[1:], ref[1:]):
        torch.testing.assert_close(c.latents, r, atol=ATOL, rtol=0)


def test_deterministic_for_seed_and_decoder_frames(model):
    torch.manual_seed(3)
    vae = WanVAE(WanVAEConfig.preset("tiny")).eval()
    cfg = StreamConfig(frames_per_chunk=2, seed=4)

    def run(seed):
        cfg.seed = seed
        s = SessionState(model, _ctx(1), height=H, width=W, config=cfg, decoder=vae, total_frames=6)
        return _run(s, 3)

    a, b, c = run(4), run(4), run(5)
    for x, y in zip(a, b):
        assert torch.equal(x.latents, y.latents) and torch.equal(x.frames, y.frames)
    assert not torch.equal(a[1].latents, c[1].latents)
    assert [x.frames.shape[2] for x in a] == [5, 8, 8]
    assert sum(x.frames.shape[2] for x in a) == frames_for_chunks(3, 2)
    assert a[0].frames.shape[-2:] == (H, W) and a[0].frames.abs().max() <= 1
    # the decoder's causal cache is carried: chunked frames == decoding all latents at once
    whole = vae.decode(torch.cat([x.latents for x in a], dim=2))
    torch.testing.assert_close(torch.cat([x.frames for x in a], dim=2), whole, atol=1e-4, rtol=0)


def test_multistep_cfg_stream_equals_recompute(model):
    # non-distilled block-causal diffusion: UniPC over each chunk with CFG (two caches)
    cfg = StreamConfig(frames_per_chunk=2, sampler="unipc", num_steps=5, shift=3.0, guidance_scale=4.0, seed=1)
    cond, neg = _ctx(1), _ctx(8, n=3)
    s = SessionState(model, cond, height=H, width=W, config=cfg, negative_prompt=neg, total_frames=6)
    chunks = _run(s, 3)
    sched = FlowSchedule.unipc(5, 3.0)
    stepper = make_sampler("unipc", sched)
    g = torch.Generator().manual_seed(1)
    hist = []
    with torch.no_grad():
        for n in range(3):
            x = torch.randn((1, 16, 2, *LAT), generator=g)
            stepper.reset()
            for i, t in enumerate(sched.timesteps.float()):
                past = torch.cat(hist, dim=2) if hist else x[:, :, :0]
                full = torch.cat([past, x], dim=2)
                tt = torch.cat([torch.zeros(1, past.shape[2]), torch.full((1, 2), float(t))], dim=1)
                fc = model(full, tt, cond, frames_per_block=2)[:, :, -2:]
                fu = model(full, tt, neg, frames_per_block=2)[:, :, -2:]
                x = stepper.step(i, x, fu + 4.0 * (fc - fu))
            hist.append(x)
            torch.testing.assert_close(chunks[n].latents, x, atol=ATOL, rtol=0)


def test_session_errors(model):
    ctx = _ctx(1)
    with pytest.raises(ValueError, match="multiple of 16"):
        SessionState(model, ctx, height=40, width=W, total_frames=3)
    with pytest.raises(ValueError, match="total_frames"):
        SessionState(model, ctx, height=H, width=W)
    with pytest.raises(ValueError, match="sampler"):
        StreamConfig(sampler="ddim")
    with pytest.raises(ValueError, match="negative_prompt"):
        SessionState(model, ctx, height=H, width=W, total_frames=3, config=StreamConfig(sampler="euler", guidance_scale=3))
    with pytest.raises(ValueError, match="text_encoder"):
        SessionState(model, "a cat", height=H, width=W, total_frames=3)
    with pytest.raises(ValueError, match="local_frames - sink_frames"):
        SessionState(model, ctx, height=H, width=W, config=StreamConfig(frames_per_chunk=3, local_frames=3, sink_frames=1))
    s = SessionState(model, ctx, height=H, width=W, config=StreamConfig(frames_per_chunk=2), total_frames=2)
    assert isinstance(s.next_chunk(), Chunk)
    with pytest.raises(RuntimeError, match="stream full"):
        s.next_chunk()
    with pytest.raises(RuntimeError, match="before the first chunk"):
        s.set_image(torch.zeros(1, 16, 1, *LAT))
