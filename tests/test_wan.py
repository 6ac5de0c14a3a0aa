"""Wan DiT: equal to diffusers, block-causal streaming with the cache equal to the full reference."""

import pytest
import torch

from streamgen.models.checkpoints import diffusers_to_native, native_to_diffusers
from streamgen.models.wan import WanConfig, WanModel, rope_cos_sin, rope_split

B, H, W = 2, 4, 6  # latent h, w (3x2 patches)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = WanModel(WanConfig.preset("tiny")).eval()
    with torch.no_grad():  # make every parameter matter (default init leaves norms at 1/0)
        for b in m.blocks:
            b.norm3.weight.normal_(1.0, 0.3)
            b.norm3.bias.normal_(0.0, 0.3)
            b.self_attn.norm_q.weight.normal_(1.0, 0.3)
            b.cross_attn.norm_k.weight.normal_(1.0, 0.3)
    return m


def _inputs(frames, seed=1, text_len=None):
    g = torch.Generator().manual_seed(seed)
    cfg = WanConfig.preset("tiny")
    x = torch.randn(B, 16, frames, H, W, generator=g)
    t = torch.rand(B, frames, generator=g) * 1000
    ctx = torch.randn(B, text_len or cfg.text_len, cfg.text_dim, generator=g)
    return x, t, ctx


def test_presets_and_rope_split():
    c13 = WanConfig.preset("wan2.1-t2v-1.3b")
    c14 = WanConfig.preset("wan2.1-t2v-14b")
    assert (c13.dim, c13.ffn_dim, c13.num_heads, c13.num_layers) == (1536, 8960, 12, 30)
    assert (c14.dim, c14.ffn_dim, c14.num_heads, c14.num_layers) == (5120, 13824, 40, 40)
    for c in (c13, c14):
        assert (c.patch_size, c.in_dim, c.out_dim, c.text_dim, c.freq_dim, c.text_len) == ((1, 2, 2), 16, 16, 4096, 256, 512)
        assert c.qk_norm and c.cross_attn_norm and c.eps == 1e-6
    assert rope_split(128) == (44, 42, 42)
    tiny = WanConfig.preset("tiny")
    assert sum(rope_split(tiny.head_dim)) == tiny.head_dim
    n = sum(p.numel() for p in WanModel(tiny).parameters())
    assert 1e5 < n < 5e6
    with pytest.raises(ValueError, match="unknown Wan preset"):
        WanConfig.preset("wan3")
    with pytest.raises(ValueError, match="divisible"):
        WanConfig(dim=100, num_heads=3)


def test_native_keys_are_original_wan_names(model):
    keys = set(model.state_dict())
    for k in (
        "patch_embedding.weight",
        "text_embedding.0.weight",
        "text_embedding.2.bias",
        "time_embedding.0.weight",
        "time_embedding.2.weight",
        "time_projection.1.weight",
        "blocks.0.self_attn.q.weight",
        "blocks.0.self_attn.norm_q.weight",
        "blocks.0.cross_attn.o.bias",
        "blocks.0.norm3.weight",
        "blocks.0.ffn.0.weight",
        "blocks.0.ffn.2.weight",
        "blocks.0.modulation",
        "head.head.weight",
        "head.modulation",
    ):
        assert k in keys, k
    assert not any("norm1" in k or "norm2" in k or k.startswith("head.norm") for k in keys)


def _diffusers_model(cfg):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
    ).eval()


def test_equal_to_diffusers(model):
    ref = _diffusers_model(model.cfg)
    sd = native_to_diffusers(model.state_dict())
    assert set(sd) == set(ref.state_dict())
    ref.load_state_dict(sd, strict=True)
    x, _, ctx = _inputs(5)
    t = torch.tensor([999.0, 137.5])
    with torch.no_grad():
        ours = model(x, t, ctx)
        theirs = ref(x, t, ctx, return_dict=False)[0]
    assert ours.shape == x.shape
    assert rel(ours, theirs) < 1e-5
    # and back: diffusers weights -> native keys load into our model and give the same output
    back = WanModel(model.cfg).eval()
    back.load_state_dict(diffusers_to_native(ref.state_dict()), strict=True)
    with torch.no_grad():
        assert rel(back(x, t, ctx), theirs) < 1e-5


def test_key_map_round_trip(model):
    sd = model.state_dict()
    assert list(diffusers_to_native(native_to_diffusers(sd))) == list(sd)
    dsd = _diffusers_model(model.cfg).state_dict()
    assert list(native_to_diffusers(diffusers_to_native(dsd))) == list(dsd)
    assert native_to_diffusers({"blocks.3.norm3.weight": 0}) == {"blocks.3.norm2.weight": 0}
    assert native_to_diffusers({"head.modulation": 0}) == {"scale_shift_table": 0}


def test_per_frame_t_equals_scalar_t(model):
    x, _, ctx = _inputs(4)
    t = torch.tensor([640.0, 10.0])
    with torch.no_grad():
        a = model(x, t, ctx)
        b = model(x, t[:, None].expand(B, 4), ctx)
        c = model(x, t[:, None].expand(B, 4), ctx, frames_per_block=2)
        d = model(x, t, ctx, frames_per_block=2)
        # different per-frame t really changes the frames it belongs to
        t2 = t[:, None].expand(B, 4).clone()
        t2[:, 3] = 900.0
        e = model(x, t2, ctx, frames_per_block=2)
    assert rel(a, b) < 1e-6 and rel(c, d) < 1e-6
    assert rel(e[:, :, :2], d[:, :, :2]) < 1e-6  # earlier block unaffected (causal)
    assert rel(e[:, :, 3], d[:, :, 3]) > 1e-3


def test_short_context_is_zero_padded(model):
    x, t, ctx = _inputs(2, text_len=7)
    padded = torch.cat([ctx, ctx.new_zeros(B, model.cfg.text_len - 7, ctx.shape[2])], 1)
    with torch.no_grad():
        assert rel(model(x, t, ctx), model(x, t, padded)) < 1e-6
    with pytest.raises(ValueError, match="text_len"):
        model(x, t, torch.zeros(B, model.cfg.text_len + 1, model.cfg.text_dim))


def test_block_causal_differs_from_full_and_ignores_future(model):
    x, t, ctx = _inputs(6)
    x2 = x.clone()
    x2[:, :, 4:] += 1.0  # change the last block only
    with torch.no_grad():
        full = model(x, t, ctx)
        causal = model(x, t, ctx, frames_per_block=2)
        causal2 = model(x2, t, ctx, frames_per_block=2)
    assert rel(full, causal) > 1e-3
    assert rel(causal2[:, :, :4], causal[:, :, :4]) < 1e-6


def _stream(model, x, t, ctx, k, *, local=None, sink=0, noisy_steps=1, seed=7):
    """Chunk loop like the sampler's: noisy passes (update_cache=False), then a committing pass."""
    frames = x.shape[2]
    cache = model.new_cache(B, (H, W), max_frames=frames, local_frames=local, sink_frames=sink)
    model.set_prompt(cache, ctx)
    g = torch.Generator().manual_seed(seed)
    outs = []
    for s in range(0, frames, k):
        e = min(frames, s + k)
        for _ in range(noisy_steps):
            model.forward_chunk(torch.randn(B, 16, e - s, H, W, generator=g), t[:, s:e] * 0.3, cache, start_frame=s)
        outs.append(model.forward_chunk(x[:, :, s:e], t[:, s:e], cache, start_frame=s, update_cache=True))
        assert cache.frames_written == e
    return torch.cat(outs, dim=2), cache


@pytest.mark.parametrize("k", [2, 3])
def test_chunked_equals_full_block_causal(model, k):
    x, t, ctx = _inputs(8)
    with torch.no_grad():
        ref = model(x, t, ctx, frames_per_block=k)
    out, _ = _stream(model, x, t, ctx, k)
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("k,local,sink", [(2, 5, 1), (3, 6, 0), (3, 7, 1), (2, 4, 2)])
def test_rolling_window_equals_windowed_reference(model, k, local, sink):
    frames = 11
    x, t, ctx = _inputs(frames, seed=3)
    with torch.no_grad():
        ref = model(x, t, ctx, frames_per_block=k, local_frames=local, sink_frames=sink)
        unwindowed = model(x, t, ctx, frames_per_block=k)
    out, cache = _stream(model, x, t, ctx, k, local=local, sink=sink)
    assert cache.k.shape[2] == local * cache.tokens_per_frame  # the cache holds exactly the window
    assert rel(out, ref) < 1e-5
    assert rel(out[:, :, -k:], unwindowed[:, :, -k:]) > 1e-4  # the window really dropped frames


def test_set_prompt_switch_and_recache(model):
    frames, k = 6, 2
    x, t, ctx = _inputs(frames, seed=5)
    _, _, ctx2 = _inputs(frames, seed=6)
    out, cache = _stream(model, x, t, ctx, k)
    # prompt switch: new cross K/V, re-cache the frames so far under the new prompt, continue
    model.set_prompt(cache, ctx2)
    cache.reset_self_attn()
    for s in range(0, 4, k):
        model.forward_chunk(x[:, :, s : s + k], t[:, s : s + k], cache, start_frame=s, update_cache=True)
    last = model.forward_chunk(x[:, :, 4:6], t[:, 4:6], cache, start_frame=4, update_cache=True)
    with torch.no_grad():
        ref = model(x, t, ctx2, frames_per_block=k)
    assert rel(last, ref[:, :, 4:6]) < 1e-5
    assert rel(last, out[:, :, 4:6]) > 1e-3


def test_recache_from_later_origin(model):
    """reset_self_attn(start_frame=s0) keeps absolute RoPE positions; RoPE being relative, a stream
    re-cached from frame 4 equals a fresh stream of the same latents started at frame 0."""
    frames, k = 8, 2
    x, t, ctx = _inputs(frames, seed=8)
    cache = model.new_cache(B, (H, W), max_frames=frames, local_frames=4, sink_frames=1)
    model.set_prompt(cache, ctx)
    for s in range(0, 6, k):  # something to forget
        model.forward_chunk(torch.randn(B, 16, 2, H, W), t[:, :2], cache, update_cache=True)
    cache.reset_self_attn(start_frame=6)
    assert cache.frames_written == 6
    outs = [model.forward_chunk(x[:, :, s : s + k], t[:, s : s + k], cache, start_frame=6 + s, update_cache=True)
            for s in range(0, frames, k)]
    fresh, _ = _stream(model, x, t, ctx, k, local=4, sink=1)
    assert cache.frames_written == 6 + frames
    assert rel(torch.cat(outs, 2), fresh) < 1e-5


def test_rerun_committed_chunk_without_update(model):
    """update_cache=False on an already committed position must not corrupt the cache."""
    frames, k = 6, 2
    x, t, ctx = _inputs(frames, seed=9)
    with torch.no_grad():
        ref = model(x, t, ctx, frames_per_block=k)
    for local, sink in ((None, 0), (4, 0)):
        cache = model.new_cache(B, (H, W), max_frames=frames, local_frames=local, sink_frames=sink)
        model.set_prompt(cache, ctx)
        for s in range(0, 4, k):
            model.forward_chunk(x[:, :, s : s + k], t[:, s : s + k], cache, start_frame=s, update_cache=True)
        again = model.forward_chunk(x[:, :, 2:4], t[:, 2:4], cache, start_frame=2)
        noisy = model.forward_chunk(torch.randn(B, 16, 2, H, W), t[:, 2:4], cache, start_frame=2)
        assert rel(noisy, again) > 1e-3
        if local is None:
            assert rel(again, ref[:, :, 2:4]) < 1e-5
        last = model.forward_chunk(x[:, :, 4:6], t[:, 4:6], cache, start_frame=4, update_cache=True)
        windowed = model(x, t, ctx, frames_per_block=k, local_frames=local) if local else ref
        assert rel(last, windowed[:, :, 4:6]) < 1e-5


def test_cache_errors(model):
    x, t, ctx = _inputs(4)
    cache = model.new_cache(B, (H, W), max_frames=4)
    with pytest.raises(ValueError, match="set_prompt"):
        model.forward_chunk(x[:, :, :2], t[:, :2], cache)
    model.set_prompt(cache, ctx)
    with pytest.raises(ValueError, match="frames_written"):
        model.forward_chunk(x[:, :, :2], t[:, :2], cache, start_frame=2)
    model.forward_chunk(x[:, :, :2], t[:, :2], cache, update_cache=True)
    model.forward_chunk(x[:, :, 2:4], t[:, 2:4], cache, update_cache=True)
    with pytest.raises(ValueError, match="max_frames"):
        model.forward_chunk(x[:, :, :2], t[:, :2], cache, update_cache=True)
    with pytest.raises(ValueError, match="does not match the cache"):
        model.forward_chunk(torch.zeros(B, 16, 2, 8, 8), t[:, :2], cache, start_frame=2)
    with pytest.raises(ValueError, match="sink_frames"):
        model.new_cache(B, (H, W), local_frames=3, sink_frames=3)
    with pytest.raises(ValueError, match="divisible"):
        model.new_cache(B, (5, 6))
    ring = model.new_cache(B, (H, W), local_frames=4)
    model.set_prompt(ring, ctx)
    for s in range(0, 8, 2):
        model.forward_chunk(torch.randn(B, 16, 2, H, W), t[:, :2], ring, update_cache=True)
    with pytest.raises(ValueError, match="evicted"):  # frames 2..3 are gone from the window
        model.forward_chunk(torch.randn(B, 16, 2, H, W), t[:, :2], ring, start_frame=4)
    with pytest.raises(ValueError, match="does not fit"):
        model.forward_chunk(torch.randn(B, 16, 5, H, W), t[:, :1], ring)


def test_bf16_chunk_path_and_float_t(model):
    import copy

    m = copy.deepcopy(model).to(torch.bfloat16)
    x, t, ctx = _inputs(4, seed=11)
    tt = torch.full((B, 4), 500.0)
    with torch.no_grad():
        ref = m(x, tt, ctx, frames_per_block=2)
        ref32 = model(x, tt, ctx, frames_per_block=2)
    cache = m.new_cache(B, (H, W), max_frames=4)
    assert cache.k.dtype == torch.bfloat16
    m.set_prompt(cache, ctx)
    a = m.forward_chunk(x[:, :, :2], 500.0, cache, update_cache=True)  # python float t
    b = m.forward_chunk(x[:, :, 2:], tt[:, 2:], cache, update_cache=True)
    out = torch.cat([a, b], 2)
    assert out.dtype == torch.float32
    assert rel(out, ref) < 2e-2 and rel(ref, ref32) < 5e-2


def _window_recompute(model, x, t, ctx, frames, n_last, frames_per_block=None):
    """A fresh forward over just ``frames`` (absolute latent indices, in order), each frame at its
    absolute RoPE position: the last ``n_last`` frames' output. Nothing is cached or reused."""
    def rope(grid, start_frame, device):
        cs = [rope_cos_sin(model.cfg.head_dim, (1, grid[1], grid[2]), j, device) for j in frames]
        return torch.cat([c for c, _ in cs]), torch.cat([s for _, s in cs])  # (len(frames)*h*w, 1, D/2)

    model._rope = rope  # instance attribute shadows the method: only the positions change
    try:
        with torch.no_grad():
            return model(x[:, :, frames], t[:, frames], ctx, frames_per_block=frames_per_block)[:, :, -n_last:]
    finally:
        del model._rope


@pytest.mark.parametrize("k,local,sink", [(2, 5, 1), (3, 6, 0), (3, 7, 1), (2, 4, 2)])
def test_rolling_window_equals_recompute_over_window_one_layer(k, local, sink):
    """With one layer, the rolling cache gives exactly what recomputing from scratch over the sink
    frames + the last ``local - sink`` frames gives (every chunk, evictions included).

    With more layers this is not an identity: a cached frame's deeper-layer K/V were computed while
    it attended to frames the window has since evicted, and a recompute cannot see those frames
    (the multi-layer equality is with the windowed full-sequence reference above)."""
    frames = 11
    x, t, ctx = _inputs(frames, seed=3)
    torch.manual_seed(0)
    one = WanModel(WanConfig.preset("tiny", num_layers=1)).eval()
    out, _ = _stream(one, x, t, ctx, k, local=local, sink=sink)
    for s in range(0, frames, k):
        e = min(frames, s + k)
        window = list(range(min(sink, e))) + list(range(max(sink, e - (local - sink)), e))
        ref = _window_recompute(one, x, t, ctx, window, e - s)
        assert rel(out[:, :, s:e], ref) < 1e-5, (s, window)
    assert e > local  # frames were evicted along the way


def test_rolling_window_multi_layer_is_not_a_window_recompute(model):
    """The counterpart of the one-layer identity: 3 layers, window of two chunks (no sink), the
    block-causal recompute over the window differs once the window has evicted frames."""
    k, local, frames = 3, 6, 9
    x, t, ctx = _inputs(frames, seed=3)
    out, _ = _stream(model, x, t, ctx, k, local=local)
    first_two = _window_recompute(model, x, t, ctx, list(range(0, 6)), 3, frames_per_block=k)
    assert rel(out[:, :, 3:6], first_two) < 1e-5  # nothing evicted yet: the same
    last = _window_recompute(model, x, t, ctx, list(range(3, 9)), 3, frames_per_block=k)
    assert rel(out[:, :, 6:9], last) > 1e-4
