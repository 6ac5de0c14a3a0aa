"""streamgen-toy: shipped weights, prompt following through SessionState, the renderer's ground
truth, and one step of every training stage on tiny settings (CPU)."""

import math
import os
import random

import pytest
import torch

from streamgen.models.wan import WanModel
from streamgen.training import toy, toy_data as td
from streamgen.weights import TOY_SAMPLING, builtin_path, load_toy, save_toy, toy_metadata


@pytest.fixture(scope="module")
def shipped():
    torch.manual_seed(0)
    return load_toy("cpu", torch.float32)


# ------------------------------------------------------------------------------- shipped weights


def test_shipped_weights_load(shipped):
    path = builtin_path("toy")
    assert os.path.getsize(path) <= 30e6
    model, text, decoder = shipped
    assert isinstance(model, WanModel) and model.cfg.local_frames == 12 and model.cfg.sink_frames == 3
    meta = toy_metadata()
    assert meta["sampling"] == TOY_SAMPLING == toy.SAMPLING
    ctx = text.encode(["a red ball moving right on a black background", ""])
    assert ctx.shape == (2, model.cfg.text_len, model.cfg.text_dim) and ctx.dtype == torch.float32
    assert ctx[1, 1:].abs().sum() == 0 and ctx[0, :10].abs().sum(-1).min() > 0  # rows past the tokens are zero
    from streamgen.models.text import PromptCache

    assert torch.equal(PromptCache(text).encode(["a red ball moving right on a black background"]), ctx[:1])
    state = decoder.new_state()
    fr = decoder.decode_chunk(torch.randn(1, 16, 3, 16, 16), state)
    assert fr.shape == (1, 3, 9, 128, 128) and fr.min() >= -1 and fr.max() <= 1
    assert decoder.decode_chunk(torch.randn(1, 16, 3, 16, 16), state).shape[2] == 12


HELDOUT = [2, 3, 0, 14]  # indices into td.heldout_prompts(60): left, up, down, right


def test_heldout_streams_follow_colour_and_direction(shipped):
    model, text, decoder = shipped
    prompts = [td.heldout_prompts(60)[i] for i in HELDOUT]
    for _, c in prompts:
        assert td.is_heldout(td.COLOUR_NAMES.index(c[0]), td.SHAPE_NAMES.index(c[1]), td.MOTION_NAMES.index(c[2]),
                             td.BACKGROUND_NAMES.index(c[3]))
    frames, starts = toy.stream(model, text, decoder, [p for p, _ in prompts], chunks=5, seed=0)
    assert frames.shape[2] == 9 + 4 * 12
    for i, (p, (colour, _, motion, background)) in enumerate(prompts):
        got = td.analyse_clip(frames[i, :, starts[1]:])
        assert (got["colour"], got["motion"], got["background"]) == (colour, motion, background), (p, got)
        assert got["present"] > 0.9


def test_prompt_switch_changes_colour_within_two_chunks(shipped):
    model, text, decoder = shipped
    a = "a red ball moving right on a black background"
    b = "a blue ball moving right on a black background"
    frames, starts = toy.stream(model, text, decoder, [a], chunks=5, switch={3: [b]}, seed=0)
    bounds = starts + [frames.shape[2]]
    colour = [td.analyse_clip(frames[0, :, bounds[k] : bounds[k + 1]])["colour"] for k in range(5)]
    assert colour[1:3] == ["red", "red"], colour
    assert "blue" in colour[3:5] and colour[4] == "blue", colour
    # the motion continues through the switch: the centroid keeps moving right
    cx = [td.analyse_frame(frames[0, :, k])["centroid"][0] for k in (bounds[2], bounds[4])]
    assert 10 < (cx[1] - cx[0]) % 128 < 50, cx


# ------------------------------------------------------------------------------- renderer


def test_renderer_ground_truth_is_right():
    rng = random.Random(3)
    for i, (prompt, combo) in enumerate(td.heldout_prompts(24, seed=1)):
        s = td.make_scene(*combo, p0=(rng.random(), rng.random()), phase=rng.random() * 6)
        times = torch.arange(24).float()[None] + rng.randint(-10, 900)
        frames, cover = td.render(s, times)
        got = td.analyse_clip(frames[0])
        assert (got["colour"], got["shape"], got["motion"], got["background"]) == combo, (prompt, got)
        # the rendered object sits where positions() says
        pos = td.positions(s, times)[0, 0] * 128 - 0.5  # (T, 2) pixels
        for k in (0, 11, 23):
            cx, cy = td.torus_centroid(cover[0, k])
            dx = (cx - float(pos[k, 0]) + 64) % 128 - 64
            dy = (cy - float(pos[k, 1]) + 64) % 128 - 64
            assert math.hypot(dx, dy) < 0.6, (combo, k, dx, dy)
    # a switch blends colour smoothly at t_switch, the motion goes on
    s = td.make_scene("red", "circle", "right", "black", switch=("colour", "blue"), t_switch=20, dur=8)
    times = torch.tensor([[10.0, 20.0, 24.0, 28.0, 40.0]])
    frames, _ = td.render(s, times)
    cols = [td.analyse_frame(frames[0, :, k])["colour"] for k in range(5)]
    assert cols[0] == cols[1] == "red" and cols[3] == cols[4] == "blue"
    xs = td.positions(s, times)[0, 0, :, 0] * 128
    assert torch.allclose(xs[1:] - xs[:-1], torch.tensor([10.0, 4, 4, 12]) * 1.25, atol=1e-3)
    # latent k covers video frames 4k-3 .. 4k
    assert td.latent_times(torch.tensor([0, 2]), 2).tolist() == [[-3, -2, -1, 0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12]]
    # the held-out set is never sampled for training, and captions use the vocabulary only
    sc = td.sample_scenes(400, random.Random(0), two_prob=0.3, switch_prob=0.5, switch_at=[30.0] * 400)
    vocab = set(td.VOCABULARY)
    for i in range(400):
        for o in range(int(sc.n_obj[i])):
            for st in (0, 1):
                assert not td.is_heldout(int(sc.colour[i, o, st]), int(sc.shape[i, o, st]), int(sc.motion[i, o, st]),
                                         int(sc.background[i, st]))
        cap = td.caption(sc, i, state=1)
        assert set(td._words(cap)) <= vocab, cap
        kind = sc.switch_kind[i]
        if kind == "colour":
            assert set(td._words(cap)) & set(td.COLOURS[td.COLOUR_NAMES[int(sc.colour[i, 0, 1])]][1]), cap
    assert {k for k in sc.switch_kind} == {None, "colour", "shape", "motion", "background"}
    # switch_weights: the odds of the kinds of one-object switches (two objects switch the background)
    sc = td.sample_scenes(200, random.Random(1), two_prob=0.0, switch_prob=1.0, switch_at=[30.0] * 200,
                          switch_weights={"shape": 1.0})
    assert set(sc.switch_kind) == {"shape"}
    assert all(int(sc.shape[i, 0, 0]) != int(sc.shape[i, 0, 1]) for i in range(200))
    assert len(td.heldout_combinations()) > 100 and len(td.heldout_prompts(60)) == 60


# ------------------------------------------------------------------------------- training


def test_teacher_forcing_matches_the_streaming_cache():
    """The training sequence (clean context + noisy chunks, rolling-window mask) computes what the
    engine's forward_chunk computes with the cache filled by cache passes."""
    torch.manual_seed(0)
    cfg = toy.TINY_CONFIG
    model = WanModel(cfg).eval()
    b, f, h = 1, 3 * toy.SEQ_CHUNKS, 4
    clean, noisy = torch.randn(b, 16, f, h, h), torch.randn(b, 16, f, h, h)
    t = torch.tensor([[900.0] * 3 + [700.0] * 3 + [500.0] * 3 + [1000.0] * 3 + [625.0] * 3])
    ctx = torch.randn(b, 5, cfg.text_dim)
    mask = toy.teacher_forcing_mask(toy.SEQ_CHUNKS, 3, (h // 2) ** 2, cfg.local_frames, cfg.sink_frames)
    with torch.no_grad():
        ref = toy.tf_forward(model, clean, noisy, t, ctx, torch.arange(f)[None], mask)
    cache = model.new_cache(b, (h, h), local_frames=cfg.local_frames, sink_frames=cfg.sink_frames)
    model.set_prompt(cache, ctx)
    for c in range(toy.SEQ_CHUNKS):
        sl = slice(3 * c, 3 * c + 3)
        out = model.forward_chunk(noisy[:, :, sl], t[:, sl], cache, start_frame=3 * c)
        torch.testing.assert_close(out, ref[:, :, sl], atol=2e-4, rtol=1e-3)
        model.forward_chunk(clean[:, :, sl], torch.zeros(b, 3), cache, start_frame=3 * c, update_cache=True)


def _tiny_parts():
    return toy.new_parts(toy.TINY_CONFIG, decoder_channels=(8, 8, 8, 8), encoder_width=8, seed=0)


def test_one_training_step_of_each_stage(tmp_path):
    parts = _tiny_parts()
    rng = random.Random(0)
    # 1. autoencoder
    opt = toy._adamw([parts.encoder, parts.decoder], 1e-3)
    before = parts.decoder.decoder[1].weight.clone()
    loss = toy.ae_step(parts, opt, rng, batch=2, latents=2, size=64)
    assert torch.isfinite(loss) and not torch.equal(before, parts.decoder.decoder[1].weight)
    # 2. DiT + text, teacher forcing; 3. with self-generated context
    ema = toy.ema_copy(parts)
    opt = toy._adamw([parts.model, parts.text], 1e-3)
    mask = toy.make_mask(parts.model.cfg, 64, "cpu")
    gen = torch.Generator().manual_seed(0)
    e0, h0 = parts.text.embed.weight.clone(), parts.model.head.head.weight.clone()
    for self_frac in (0.0, 1.0):  # (the zero-initialised head passes no gradient back on the first step)
        w0 = parts.model.blocks[0].cross_attn.q.weight.clone()
        loss = toy.dit_step(parts, ema, opt, rng, gen, mask, batch=2, size=64, self_frac=self_frac)
        assert torch.isfinite(loss) and 0 < float(loss) < 10
        assert not torch.equal(w0, parts.model.blocks[0].cross_attn.q.weight)
    assert not torch.equal(e0, parts.text.embed.weight) and not torch.equal(h0, parts.model.head.head.weight)
    assert not torch.equal(ema.model.head.head.weight, h0)
    # resumable checkpoint and the shipped format round-trip
    toy.save_checkpoint(str(tmp_path / "ck"), parts, ema, {"runs": []}, shard_bytes=200_000)
    assert len(list((tmp_path / "ck").glob("ckpt-*.safetensors"))) > 1
    p2, ema2, info = toy.load_checkpoint(str(tmp_path / "ck"))
    assert info == {"runs": []}
    assert torch.equal(p2.model.blocks[1].ffn[2].weight, parts.model.blocks[1].ffn[2].weight)
    save_toy(str(tmp_path / "toy.safetensors"), ema.model, ema.text, parts.decoder)
    m, t, d = load_toy("cpu", torch.float32, path=str(tmp_path / "toy.safetensors"))
    assert float(d.latent_scale) == pytest.approx(float(parts.decoder.latent_scale))
    assert torch.allclose(t.encode(["a red ball"]), ema.text.encode(["a red ball"]), atol=1e-2)
