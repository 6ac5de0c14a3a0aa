"""Token-chunked FFN (streamgen/ops/chunked.py): chunked == whole on the CPU in float32, bit for bit,
for the FFN alone and for a streaming chunk of the model (with offload and a quantized model too)."""

from __future__ import annotations

import copy

import pytest
import torch

from streamgen.models.wan import WanConfig, WanModel
from streamgen.ops.chunked import TokenChunkedFFN, chunk_ffn
from streamgen.ops.offload import offload
from streamgen.ops.quant import quantize


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return WanModel(WanConfig.preset("tiny")).eval()


@pytest.mark.parametrize("tokens", [1, 7, 8, 16, 48, 95, 96, 1000])
def test_chunked_ffn_equals_whole(model, tokens):
    """Slices of a multiple of 8 tokens: bit for bit (the CPU GEMM takes rows in groups); other
    slices: within float32 rounding (measured <= 6e-7 of max|out|, asserted <= 2e-6)."""
    ffn = model.blocks[0].ffn
    x = torch.randn(2, 96, model.cfg.dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = ffn(x)
        chunked = TokenChunkedFFN(ffn, tokens)
        assert [k for k, _ in chunked.state_dict().items()] == [k for k, _ in ffn.state_dict().items()]
        got = chunked(x)
    assert got.shape == whole.shape
    if tokens % 8 == 0:
        assert torch.equal(got, whole)
    else:
        assert (got - whole).abs().max() <= 2e-6 * whole.abs().max()


@pytest.mark.parametrize("variant", ["plain", "offload", "int8"])
def test_chunked_model_chunk_equals_whole(model, variant):
    m = copy.deepcopy(model)
    ref_m = copy.deepcopy(model)
    if variant == "int8":
        quantize(m, "int8-weight")
        quantize(ref_m, "int8-weight")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 3, 8, 8, generator=g)
    ctx = torch.randn(1, 5, model.cfg.text_dim, generator=g)

    def chunk(mm):
        c = mm.new_cache(1, (8, 8), local_frames=6, sink_frames=1)
        mm.set_prompt(c, ctx)
        with torch.no_grad():
            outs = [mm.forward_chunk(x * (i + 1), torch.full((1,), 500.0), c, update_cache=True) for i in range(3)]
        return outs

    ref = chunk(ref_m)
    handle = chunk_ffn(m, tokens=16)  # 48 tokens a chunk: slices of 16
    if variant == "offload":
        off = offload(m, device="cpu", prefetch=1)
    assert all(isinstance(b.ffn, TokenChunkedFFN) for b in m.blocks)
    assert m.state_dict().keys() == ref_m.state_dict().keys()
    for a, b in zip(chunk(m), ref, strict=True):
        assert torch.equal(a, b)
    if variant == "offload":
        off.remove()
    handle.remove()
    assert not any(isinstance(b.ffn, TokenChunkedFFN) for b in m.blocks)


def test_bad_arguments(model):
    m = copy.deepcopy(model)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="tokens"):
            chunk_ffn(m, bad)
    with pytest.raises(ValueError, match="blocks_attr"):
        chunk_ffn(m, 8, blocks_attr="head")
    h = chunk_ffn(m, 8)
    with pytest.raises(ValueError, match="already"):
        chunk_ffn(m, 8)
    h.remove()
    with pytest.raises(RuntimeError, match="already removed"):
        h.remove()
