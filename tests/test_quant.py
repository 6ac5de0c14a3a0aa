"""fp8 / int8 quantization of the Wan DiT blocks (streamgen/ops/quant.py), on the CPU.

The fp8 fast path (torch._scaled_mm, fp8 tensor cores) only runs on CUDA >= 8.9; here the modules
compute their reference path, and the fast path's numerics are checked through its float32
emulation and, where this torch has a CPU ``torch._scaled_mm``, through the real call."""

import copy
import logging

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from streamgen.models.checkpoints import load_wan_model
from streamgen.models.wan import WanConfig, WanModel
from streamgen.ops import quant
from streamgen.ops.offload import offload
from streamgen.ops.quant import (
    Fp8Linear,
    Int8WeightLinear,
    count_quantized,
    fp8_rowwise_reference,
    fp8_scaled_mm_linear,
    fp8_support,
    from_lightx2v,
    quantize,
    quantize_rows_fp8,
    quantize_weight,
)

CFG = WanConfig.preset("tiny")
B, F, H, W = 1, 4, 4, 6
LINEARS_PER_BLOCK = 10  # self q/k/v/o, cross q/k/v/o, ffn.0, ffn.2


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return WanModel(CFG).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, CFG.in_dim, F, H, W, generator=g)
    ctx = torch.randn(B, 12, CFG.text_dim, generator=g)
    return x, torch.tensor([700.0]), ctx


def emulate_fp8(model):
    """Make every Fp8Linear compute exactly what the CUDA fast path computes (per-token e4m3
    activations x e4m3 weights), in float32, so its error can be measured on the CPU."""
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            m.forward = lambda x, m=m: fp8_rowwise_reference(x, m.weight, m.weight_scale, m.bias).to(x.dtype)
    return model


def chunks(model, inputs):
    """forward_chunk over a stream of 2-frame chunks (2 denoising calls + a cache pass each)."""
    x, t, ctx = inputs
    cache = model.new_cache(B, (H, W), max_frames=F)
    model.set_prompt(cache, ctx)
    outs = []
    with torch.no_grad():
        for s in range(0, F, 2):
            xi = x[:, :, s : s + 2]
            outs.append(model.forward_chunk(xi, t, cache, start_frame=s))
            outs.append(model.forward_chunk(xi * 0.5, t * 0.3, cache, start_frame=s))
            model.forward_chunk(xi, 0.0, cache, start_frame=s, update_cache=True)
    return torch.cat(outs, dim=2)


def test_quantize_replaces_only_block_linears(ref):
    for mode, cls, qdtype in (("fp8", Fp8Linear, torch.float8_e4m3fn), ("int8-weight", Int8WeightLinear, torch.int8)):
        model = quantize(copy.deepcopy(ref), mode)
        assert count_quantized(model) == {cls.__name__: LINEARS_PER_BLOCK * CFG.num_layers}
        blk = model.blocks[1]
        for m in (blk.self_attn.q, blk.self_attn.o, blk.cross_attn.k, blk.ffn[0], blk.ffn[2]):
            assert isinstance(m, cls)
            assert m.weight.dtype == qdtype and m.weight_scale.dtype == torch.float32
            assert m.weight_scale.shape == (m.out_features, 1)
            assert m.weight.element_size() == 1
        # embeddings, time MLPs and the head stay plain float Linear layers
        for m in (model.text_embedding[0], model.time_embedding[0], model.time_projection[1], model.head.head):
            assert type(m) is nn.Linear and m.weight.dtype == torch.float32
        # the stored weight dequantizes to the original one (per-channel max error: half a step)
        w0 = ref.blocks[1].ffn[0].weight
        assert rel(blk.ffn[0].dequantized_weight(), w0) < (4e-2 if mode == "fp8" else 1e-2)
        sd = model.state_dict()
        assert sd["blocks.0.self_attn.q.weight"].dtype == qdtype and "blocks.0.self_attn.q.weight_scale" in sd


@pytest.mark.parametrize("mode,bound", [("fp8", 2e-2), ("int8-weight", 5e-3)])
def test_forward_and_forward_chunk_close_to_reference(ref, inputs, mode, bound):
    qmodel = quantize(copy.deepcopy(ref), mode)
    with torch.no_grad():
        want = ref(*inputs)
        got = qmodel(*inputs)
        want_blockwise = ref(*inputs, frames_per_block=2)
    assert rel(got, want) < bound
    want_c, got_c = chunks(ref, inputs), chunks(qmodel, inputs)
    assert rel(got_c, want_c) < bound
    # the streaming path is still the block-causal model
    assert rel(chunks(ref, inputs)[:, :, 0:2], want_blockwise[:, :, 0:2]) < 1e-5
    if mode == "fp8":  # what the GPU computes: activations quantized per token as well
        emu = emulate_fp8(copy.deepcopy(qmodel))
        with torch.no_grad():
            assert rel(emu(*inputs), want) < bound
        assert rel(chunks(emu, inputs), want_c) < bound


def test_bf16_model(ref, inputs):
    """Quantizing a bf16 model: the layers take bf16 activations, outputs stay near fp32."""
    with torch.no_grad():
        want = ref(*inputs)
        model16 = copy.deepcopy(ref).to(torch.bfloat16)
        base = rel(model16(*inputs), want)
        for mode, bound in (("fp8", 5e-2), ("int8-weight", 2e-2)):
            q = quantize(copy.deepcopy(model16), mode)
            assert rel(q(*inputs), want) < max(bound, 2 * base)
        emu = emulate_fp8(quantize(copy.deepcopy(model16), "fp8"))
        assert rel(emu(*inputs), want) < 5e-2


def test_cast_after_quantize_keeps_quantized_dtypes(ref, inputs):
    model = quantize(copy.deepcopy(ref), "fp8")
    layer = model.blocks[0].ffn[0]
    w = layer.weight.detach().clone()
    model.to(torch.bfloat16)
    assert layer.weight.dtype == torch.float8_e4m3fn and torch.equal(layer.weight.float(), w.float())
    assert layer.weight_scale.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    model.half().float()
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32


def test_skip_patterns(ref):
    model = quantize(copy.deepcopy(ref), "int8-weight", skip=("*.cross_attn.*", "blocks.2.*"))
    assert count_quantized(model) == {"Int8WeightLinear": 6 * (CFG.num_layers - 1)}
    assert type(model.blocks[0].cross_attn.q) is nn.Linear and type(model.blocks[2].ffn[0]) is nn.Linear
    assert isinstance(model.blocks[1].ffn[2], Int8WeightLinear)
    with pytest.raises(ValueError, match=r"skip=.*'blocks\.9\.\*'.*match no linear layer"):
        quantize(copy.deepcopy(ref), "fp8", skip="blocks.9.*")


def test_bad_arguments_name_the_argument(ref):
    with pytest.raises(ValueError, match=r"mode='int4'.*'fp8', 'int8-weight'"):
        quantize(copy.deepcopy(ref), "int4")
    with pytest.raises(ValueError, match="blocks_attr='layers'"):
        quantize(copy.deepcopy(ref), "fp8", blocks_attr="layers")


def test_activation_and_weight_quantizers():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(37, 64, generator=g) * torch.logspace(-3, 3, 37).unsqueeze(1)
    x[5] = 0.0
    a, s = quantize_rows_fp8(x.to(torch.bfloat16))
    assert a.dtype == torch.float8_e4m3fn and s.shape == (37, 1) and s.dtype == torch.float32
    assert a.float().abs().amax(dim=1)[torch.arange(37) != 5].eq(448).all()  # each row's max hits e4m3's max
    assert torch.equal(a[5].float(), torch.zeros(64))
    assert rel(a.float() * s, x) < 4e-2
    w = torch.randn(48, 64, generator=g)
    q, sw = quantize_weight(w, torch.int8)
    assert q.dtype == torch.int8 and q.abs().amax(dim=1).eq(127).all()
    assert ((q.float() * sw - w).abs() <= sw / 2 + 1e-6).all()
    with pytest.raises(ValueError, match="qdtype"):
        quantize_weight(w, torch.float16)


def test_scaled_mm_call_matches_its_emulation():
    """The fast path's own call (torch._scaled_mm with row-wise scales) where this CPU torch has it."""
    fused, why = quant._probe_scaled_mm(torch.device("cpu"))
    if fused is None:
        pytest.skip(f"no CPU torch._scaled_mm here: {why}")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 50, 128, generator=g).to(torch.bfloat16)
    w, sw = quantize_weight(torch.randn(96, 128, generator=g) / 11, torch.float8_e4m3fn)
    bias = torch.randn(96, generator=g).to(torch.bfloat16)
    emu = fp8_rowwise_reference(x, w, sw, bias)
    for fuse in (True, False):
        y = fp8_scaled_mm_linear(x, w, sw, bias, fuse_bias=fuse)
        assert y.shape == (2, 50, 96) and y.dtype == torch.bfloat16
        assert rel(y, emu) < 1e-2
    exact = x.float() @ (w.float() * sw).t() + bias.float()
    assert rel(emu, exact) < 5e-2


def test_fallback_is_logged_once_and_never_raises(monkeypatch, caplog, ref, inputs):
    monkeypatch.setattr(quant, "_support", {})
    with caplog.at_level(logging.WARNING, logger="streamgen.ops.quant"):
        sup = fp8_support("cpu")
        fp8_support("cpu")
    assert not sup.ok and "cpu" in sup.reason
    assert len([r for r in caplog.records if "fp8 fast path unavailable" in r.getMessage()]) == 1

    def broken(*args, **kwargs):
        raise RuntimeError("not implemented for this device")

    monkeypatch.setattr(torch, "_scaled_mm", broken)
    fused, why = quant._probe_scaled_mm(torch.device("cpu"))
    assert fused is None and "not implemented for this device" in why
    with torch.no_grad():  # the module still computes (reference path)
        assert torch.isfinite(quantize(copy.deepcopy(ref), "fp8")(*inputs)).all()


def test_offload_after_quantize_and_the_wrong_order(ref, inputs):
    model = quantize(copy.deepcopy(ref), "fp8")
    with torch.no_grad():
        want = model(*inputs)
    want_c = chunks(model, inputs)
    handle = offload(model, device="cpu", prefetch=1)
    with torch.no_grad():
        assert torch.equal(model(*inputs), want)
    assert torch.equal(chunks(model, inputs), want_c)
    assert model.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match=r"quantize\(\) must be applied before offload\(\).*handle.remove\(\)"):
        quantize(model, "int8-weight")
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(*inputs), want)


def _lightx2v_file(ref, qdtype):
    """A LightX2V-style state dict: block linear weights quantized + [out, 1] scales, rest bf16."""
    out = {}
    for k, v in ref.state_dict().items():
        if k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2:
            out[k], out[k + "_scale"] = quantize_weight(v, qdtype)
        else:
            out[k] = v.to(torch.bfloat16)
    return out


@pytest.mark.parametrize("qdtype,cls", [(torch.int8, Int8WeightLinear), (torch.float8_e4m3fn, Fp8Linear)])
def test_lightx2v_loads_quantized(tmp_path, ref, inputs, qdtype, cls):
    sd = _lightx2v_file(ref, qdtype)
    path = tmp_path / "wan_quant.safetensors"
    save_file(sd, path)
    for dtype in (torch.float32, torch.bfloat16):
        model = from_lightx2v(path, dtype=dtype)
        assert count_quantized(model) == {cls.__name__: LINEARS_PER_BLOCK * CFG.num_layers}
        k = "blocks.1.cross_attn.v"
        layer = model.get_submodule(k)
        assert layer.weight.dtype == qdtype and torch.equal(layer.weight, sd[k + ".weight"])
        assert torch.equal(layer.weight_scale, sd[k + ".weight_scale"])
        assert model.patch_embedding.weight.dtype == dtype
        dequant = load_wan_model(path, dtype=dtype)  # the dequantize-on-load path
        with torch.no_grad():
            got, want = model(*inputs), dequant(*inputs)
        assert rel(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)
        assert rel(chunks(model, inputs), chunks(dequant, inputs)) < (1e-5 if dtype == torch.float32 else 1e-2)
    # a state dict works too, and a quantized model's state_dict is the same layout (round trip)
    model = from_lightx2v(sd, dtype=torch.float32)
    again = from_lightx2v(model.state_dict(), dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(again(*inputs), model(*inputs))
    mode = "int8-weight" if qdtype == torch.int8 else "fp8"
    mine = quantize(copy.deepcopy(ref), mode)
    assert torch.equal(mine.state_dict()["blocks.0.ffn.2.weight"], sd["blocks.0.ffn.2.weight"])


def test_lightx2v_errors_and_unquantized_layers(ref, inputs):
    sd = _lightx2v_file(ref, torch.int8)
    # quantized weights outside the blocks are dequantized; a block layer left in float stays nn.Linear
    w = sd["text_embedding.0.weight"]
    sd["text_embedding.0.weight"], sd["text_embedding.0.weight_scale"] = quantize_weight(w.float(), torch.int8)
    sd["blocks.0.ffn.0.weight"] = ref.blocks[0].ffn[0].weight.detach().to(torch.bfloat16)
    del sd["blocks.0.ffn.0.weight_scale"]
    model = from_lightx2v(sd, dtype=torch.float32)
    assert type(model.blocks[0].ffn[0]) is nn.Linear and type(model.text_embedding[0]) is nn.Linear
    assert count_quantized(model) == {"Int8WeightLinear": LINEARS_PER_BLOCK * CFG.num_layers - 1}
    with torch.no_grad():
        assert rel(model(*inputs), ref(*inputs)) < 1e-2
    bad = dict(sd)
    del bad["blocks.1.ffn.2.weight_scale"]
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.2\.weight is torch\.int8 without a blocks\.1\.ffn\.2\.weight_scale"):
        from_lightx2v(bad)
    bad = dict(sd)
    bad["blocks.1.ffn.2.weight_scale"] = torch.ones(3, 1)
    with pytest.raises(ValueError, match=r"weight_scale has shape \(3, 1\)"):
        from_lightx2v(bad)
    bad = dict(sd)
    del bad["head.modulation"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): head\.modulation"):
        from_lightx2v(bad)
