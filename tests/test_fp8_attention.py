"""streamgen.ops.fp8_attention: the fp8 attention kernel, run by Triton's interpreter on the CPU
(TRITON_INTERPRET=1; the same kernel source the GPU compiles), against exact attention and against the same
quantization in torch ops. The kernel runs in a child process (tests/triton_interp.py): the interpreter must be on
before anything imports Triton."""

import pytest
import torch
from triton_run import interpreted

from streamgen.ops import fp8_attention as fp8


@pytest.fixture(scope="module")
def run():
    return interpreted("fp8")


def test_the_kernel_is_within_fp8_rounding_of_exact_attention(run):
    assert run["shape_ok"]
    assert run["err"] < 2e-2, run
    # the same quantization without P's rounding: the kernel adds only P's e4m3 rounding to it
    assert run["ref_err"] < 1.5e-2 and run["err"] < 2 * run["ref_err"] + 2e-3, run
    # bf16 attention is ~10x closer: fp8 is a trade, not free
    assert run["bf16_sdpa_err"] < run["err"]
    # the check can fail: keys and values swapped are far off
    assert run["swapped_err"] > 0.3, run


def test_keys_with_a_large_channel_offset_keep_their_precision_through_smoothing(run):
    assert run["offset_err"] < 2e-2 and run["offset_err"] < run["offset_unsmoothed_err"] / 2, run


def test_one_key_whole_tiles_and_fp16(run):
    assert run["tiny_err"] < 3e-2, run  # one key (only a partial tile): the output is that value
    assert run["whole_tiles_err"] < 2e-2, run  # no partial tile
    assert run["fp16_ok"] and run["fp16_err"] < 2e-2, run


def test_the_triton_quantization_matches_the_torch_reference(run):
    assert len(run["quant"]) == 4, run
    for c in run["quant"]:  # Q; K minus its mean; K without; V (channel-major)
        assert c["scales"] and c["one_step"] and c["frac"] < 0.01 and c.get("means", True), run["quant"]


@pytest.fixture(scope="module")
def model_run():
    return interpreted("model")


def test_a_streaming_model_on_the_fp8_kernel_stays_close_to_sdpa_alone_and_batched(model_run):
    """The cache's own views (window slots, sink, the chunk's rows) through the kernel, in forward_chunk and
    forward_rows: the fp8 model is within 1e-2 of the SDPA model and is not it."""
    for key in ("chunk", "rows"):
        r = model_run[key]
        assert r["fp8_calls"] > 0 and 96 in r["keys_seen"], r  # the window's self-attention went to the kernel
        assert r["rel"] < 1e-2 and not r["equal"], r
    assert model_run["chunk"]["fp8_calls"] == model_run["rows"]["fp8_calls"]  # batched rows attend per cache


def test_block_quantization_round_trips_within_e4m3_steps():
    x = torch.randn(2, 37, 3, 16) * torch.linspace(0.1, 10, 37)[None, :, None, None]
    x[:, 16:32] = 0  # an all-zero block keeps a usable scale
    q, scale = fp8.quantize_blocks(x, 16)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and scale.shape == (2, 3, 3)
    assert torch.equal(scale[:, 1], torch.ones(2, 3))
    s = scale.repeat_interleave(16, dim=1)[:, :37, :, None]
    back = q.float() * s
    # e4m3 has 3 mantissa bits: the error is at most half a step, 1/16 of the value's binade
    assert ((back - x).abs() <= x.abs() / 16 + s * 2.0**-9).all()


def test_v_is_stored_channel_major_with_its_mean_taken_out():
    v = torch.randn(2, 9, 3, 16) + 5
    q, scale, mean = fp8.quantize_v(v)
    assert q.shape == (2, 3, 16, 9) and q.is_contiguous() and scale.shape == mean.shape == (2, 3, 16)
    assert torch.allclose(mean, v.mean(1))
    back = q.float().permute(0, 3, 1, 2) * scale[:, None] + mean[:, None]
    assert ((back - v).abs() <= (v - mean[:, None]).abs() / 16 + scale[:, None] * 2.0**-9 + 1e-6).all()


def test_shapes_and_head_dims_are_checked():
    q = torch.zeros(1, 4, 2, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="k, v"):
        fp8.fp8_attention(q, q[:, :3], q)
    q = torch.zeros(1, 4, 2, 24, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head dim must be a power of two from 16 to 256, got 24"):
        fp8.fp8_attention(q, q, q)


def test_without_the_interpreter_the_cpu_is_not_a_device_for_it(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fp8.why_unavailable.cache_clear()
    try:
        assert "GPU kernel" in fp8.why_unavailable("cpu")
        assert "compute capability >= 8.9" in fp8.why_unavailable("cuda", (8, 0))
        assert fp8.why_unavailable("cuda", (9, 0)) is None
    finally:
        fp8.why_unavailable.cache_clear()


cuda = pytest.mark.skipif(not torch.cuda.is_available() or not fp8.available("cuda"),
                          reason="the compiled kernel needs a GPU with fp8 tensor cores")


def wan_window(seed=0):
    """The 1.3B window call at 832x480: 3 frames of queries over 12 frames of keys, 12 heads of 128."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, 4680, 12, 128, device="cuda", generator=g)
    k = torch.randn(1, 18720, 12, 128, device="cuda", generator=g) + 3 * torch.randn(1, 1, 12, 128, device="cuda",
                                                                                      generator=g)
    v = torch.randn(1, 18720, 12, 128, device="cuda", generator=g)
    return tuple(t.to(torch.bfloat16) for t in (q, k, v))


@cuda
def test_on_cuda_the_kernel_matches_attention_at_the_wan_window_shape():
    q, k, v = wan_window()
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)))
    out = fp8.fp8_attention(q, k, v).float().transpose(1, 2)
    assert ((out - ref).norm() / ref.norm()).item() < 3e-2
    assert ((fp8.reference(q, k, v).float().transpose(1, 2) - ref).norm() / ref.norm()).item() < 3e-2


@cuda
def test_on_cuda_a_captured_graph_replays_the_eager_result():
    q, k, v = wan_window(1)
    eager = fp8.fp8_attention(q, k, v)
    sq, sk, sv = (torch.zeros_like(t) for t in (q, k, v))
    fp8.fp8_attention(sq, sk, sv)  # compiled before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8.fp8_attention(sq, sk, sv)
    for s, t in zip((sq, sk, sv), (q, k, v)):
        s.copy_(t)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
