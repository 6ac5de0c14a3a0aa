"""streamgen.ops.fused: the FFN's GELU in its first GEMM's epilogue.

On the CPU the fusion must not happen (the kernel is CUDA's): the blocks stay as they are, one log line
says why, and the Sequential subclass computes exactly what the plain one does. On CUDA (the lent GPU)
the fused model matches the unfused one within bf16 rounding, eager and compiled.
"""

import logging

import pytest
import torch
from torch import nn

from streamgen.models.wan import WanConfig, WanModel
from streamgen.ops import fused
from streamgen.ops.fused import GeluEpilogueFFN, fuse_ffn_gelu

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the GELU epilogue is a CUDA kernel")


def chunks(model, dev, dtype, n=3):
    """Two chunks of 3 latent frames through a fresh cache: every block's FFN runs."""
    g = torch.Generator().manual_seed(0)
    cache = model.new_cache(1, (4, 4), max_frames=9)
    model.set_prompt(cache, torch.randn(1, 7, model.cfg.text_dim, generator=g).to(dev, dtype))
    outs = []
    for c in range(2):
        x = torch.randn(1, 16, 3, 4, 4, generator=g).to(dev, dtype)
        outs.append(model.forward_chunk(x, torch.full((1,), 500.0, device=dev), cache, start_frame=3 * c))
        model.forward_chunk(x, torch.zeros(1, device=dev), cache, start_frame=3 * c, update_cache=True)
    return torch.cat(outs, dim=2).float()


def tiny(dev="cpu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return WanModel(WanConfig.preset("tiny")).to(dev, dtype).eval().requires_grad_(False)


def test_on_the_cpu_nothing_is_fused_and_the_log_says_why(caplog):
    model = tiny()
    ref = chunks(model, "cpu", torch.float32)
    with caplog.at_level(logging.INFO, logger="streamgen.ops.fused"):
        assert fuse_ffn_gelu(model) == 0
    assert [r.getMessage() for r in caplog.records] == [
        "the GELU GEMM epilogue is a CUDA kernel (device cpu); the FFN runs Linear + GELU"]
    assert all(type(b.ffn) is nn.Sequential for b in model.blocks)
    assert torch.equal(chunks(model, "cpu", torch.float32), ref)


def test_the_fused_sequential_keeps_children_and_keys_and_falls_back_exactly_off_cuda():
    model = tiny()
    keys = list(model.state_dict())
    ref = chunks(model, "cpu", torch.float32)
    for b in model.blocks:  # as fuse_ffn_gelu does where the probe passes
        b.ffn = GeluEpilogueFFN(*b.ffn)
    assert list(model.state_dict()) == keys
    assert torch.equal(chunks(model, "cpu", torch.float32), ref)


def test_a_quantized_first_linear_runs_unfused(monkeypatch):
    """fp8 / int8 swap the Linear inside the fused Sequential: the GELU must still be applied."""
    seq = GeluEpilogueFFN(nn.Linear(8, 16), nn.GELU(approximate="tanh"), nn.Linear(16, 8))

    class NotALinear(nn.Linear):  # a subclass, as QuantLinear is not, must not take the fused path either
        pass

    monkeypatch.setattr(fused, "_fusable", lambda lin, x: type(lin) is nn.Linear)  # as if on CUDA
    called = []
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: called.append(1) or torch.zeros(4, 16))
    x = torch.randn(4, 8)
    seq(x)
    assert called == [1]
    lin = NotALinear(8, 16)
    lin.load_state_dict(seq[0].state_dict())
    seq[0] = lin
    plain = nn.Sequential(lin, nn.GELU(approximate="tanh"), seq[2])
    assert torch.equal(seq(x), plain(x)) and called == [1]


def test_probe_refuses_what_it_cannot_fuse():
    assert "CUDA" in fused.probe("cpu", torch.bfloat16)
    if torch.cuda.is_available():
        assert "float16/bfloat16" in fused.probe("cuda", torch.float32)


def test_the_wrong_model_names_the_attribute():
    with pytest.raises(ValueError, match="model.blocks must be an nn.ModuleList"):
        fuse_ffn_gelu(nn.Linear(2, 2))


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_on_cuda_fused_equals_unfused_within_rounding(dtype):
    ref32 = chunks(tiny("cuda", torch.float32), "cuda", torch.float32)
    plain = chunks(tiny("cuda", dtype), "cuda", dtype)
    model = tiny("cuda", dtype)
    assert fuse_ffn_gelu(model) == len(model.blocks)
    out = chunks(model, "cuda", dtype)
    scale = ref32.abs().max()
    err_plain = ((plain - ref32).abs().max() / scale).item()
    err_fused = ((out - ref32).abs().max() / scale).item()
    assert err_fused <= max(2 * err_plain, 1e-3), (err_fused, err_plain)
    assert not torch.equal(out, plain)  # the fused kernel did run


@cuda
def test_on_cuda_compiled_fused_equals_eager_fused():
    from streamgen.ops.compile import compile_blocks

    model = tiny("cuda", torch.bfloat16)
    fuse_ffn_gelu(model)
    eager = chunks(model, "cuda", torch.bfloat16)
    assert compile_blocks(model)
    comp = chunks(model, "cuda", torch.bfloat16)
    assert ((comp - eager).abs().max() / eager.abs().max()).item() < 2e-2


# ----------------------------------------------------------------------------- q/k RMSNorm + RoPE in one kernel


@pytest.fixture(scope="module")
def norm_rope_run():
    from triton_run import interpreted

    return interpreted("norm_rope")


def test_the_norm_rope_kernel_equals_the_model_ops_in_the_interpreter(norm_rope_run):
    """Shared and per-row RoPE tables, bf16 and fp16, 48 channel pairs (not a power of two)."""
    for dtype in ("bfloat16", "float16"):
        for rope in ("shared", "per_row"):
            c = norm_rope_run[f"{dtype}_{rope}"]
            assert c["shape_ok"] and c["within_one_step"] and c["frac_differ"] < 0.01, (dtype, rope, c)
        assert norm_rope_run[f"{dtype}_swapped_rel"] > 0.5  # cos and sin swapped: far off, the check has teeth


def test_fuse_norm_rope_on_the_cpu_changes_nothing_and_says_why(caplog):
    model = tiny()
    ref = chunks(model, "cpu", torch.float32)
    with caplog.at_level(logging.INFO, logger="streamgen.ops.fused"):
        assert fused.fuse_norm_rope(model) == 0
    assert [r.getMessage() for r in caplog.records] == [
        "the fused RMSNorm + RoPE kernel runs on CUDA (device cpu); q/k RMSNorm and RoPE run as torch ops"]
    assert torch.equal(chunks(model, "cpu", torch.float32), ref)


def test_the_fused_norm_rope_falls_back_to_the_model_ops_off_cuda():
    from streamgen.models.wan import norm_rope

    model = tiny()
    ref = chunks(model, "cpu", torch.float32)
    for b in model.blocks:  # as fuse_norm_rope does where the probe passes
        b.norm_rope = fused.fused_norm_rope
    assert torch.equal(chunks(model, "cpu", torch.float32), ref)
    assert model.blocks[0].norm_rope is not norm_rope


@cuda
def test_on_cuda_fused_norm_rope_model_matches_within_rounding_eager_and_compiled():
    from streamgen.ops.compile import compile_blocks

    plain = chunks(tiny("cuda", torch.bfloat16), "cuda", torch.bfloat16)
    model = tiny("cuda", torch.bfloat16)
    assert fused.fuse_norm_rope(model) == len(model.blocks)
    out = chunks(model, "cuda", torch.bfloat16)
    assert ((out - plain).abs().max() / plain.abs().max()).item() < 2e-2
    assert compile_blocks(model)
    comp = chunks(model, "cuda", torch.bfloat16)
    assert ((comp - out).abs().max() / out.abs().max()).item() < 2e-2
