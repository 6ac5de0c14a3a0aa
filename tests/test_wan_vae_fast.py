"""The fast (channels-last, concatenation-free) Wan VAE decode equals the reference decode (CPU, fp32).

On the CPU the fused Triton norm is not there, so these tests hold the layout and cache handling;
the fused kernel is checked on the GPU against the torch ops on first use (and by
``bench/decoders.py --check`` against an fp32 stream).
"""

import logging

import pytest
import torch

from streamgen.models import wan_vae
from streamgen.models.wan_vae import WanVAE, WanVAEConfig

CFG = WanVAEConfig.preset("tiny")


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    m = WanVAE(CFG).eval()
    with torch.no_grad():  # move norms/biases off their init values so every weight matters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def decode(vae, z, split, impl, **kw):
    vae.decode_impl = impl
    try:
        state, outs, start = vae.new_state(), [], 0
        for f in split:
            outs.append(vae.decode_chunk(z[:, :, start : start + f], state, **kw))
            start += f
        return torch.cat(outs, dim=2), state
    finally:
        vae.decode_impl = "auto"


@pytest.mark.parametrize("batch", [1, 2])
def test_fast_equals_reference_chunked_and_whole(vae, batch):
    torch.manual_seed(1)
    z = torch.randn(batch, CFG.z_dim, 7, 4, 6)
    want, _ = decode(vae, z, [7], "reference")
    assert want.shape == (batch, 3, 25, 32, 48)
    for split in ([7], [3, 3, 1], [1, 3, 3], [1] * 7, [2, 5]):
        got, _ = decode(vae, z, split, "fast")
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    got, _ = decode(vae, z, [3, 4], "fast", frames_per_pass=1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_conv2d_sum_option_equals_reference(batch):
    torch.manual_seed(4)
    m = WanVAE(CFG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    z = torch.randn(batch, CFG.z_dim, 5, 4, 6)
    want, _ = decode(m, z, [5], "reference")
    assert m.use_conv2d_sum(CFG.base_dim) == 6  # the last stage's 3 blocks, 2 convs each
    got, _ = decode(m, z, [1, 3, 1], "fast")
    torch.testing.assert_close(got, want, rtol=0, atol=3e-5)
    assert m.use_conv2d_sum(10**6) == 2 * len([b for b in m.decoder.modules() if b.__class__.__name__ == "ResidualBlock"])
    got, _ = decode(m, z, [2, 3], "fast")
    torch.testing.assert_close(got, want, rtol=0, atol=3e-5)
    assert m.use_conv2d_sum(0) == 0
    torch.testing.assert_close(decode(m, z, [5], "fast")[0], want, rtol=0, atol=3e-5)


def test_fast_and_reference_share_the_stream_state(vae):
    """A stream may switch paths between chunks: both read and write the same causal cache."""
    torch.manual_seed(2)
    z = torch.randn(1, CFG.z_dim, 6, 4, 4)
    want, ref_state = decode(vae, z, [3, 3], "reference")
    state = vae.new_state()
    vae.decode_impl = "fast"
    a = vae.decode_chunk(z[:, :, :3], state)
    vae.decode_impl = "reference"
    b = vae.decode_chunk(z[:, :, 3:], state)
    vae.decode_impl = "auto"
    torch.testing.assert_close(torch.cat([a, b], dim=2), want, rtol=0, atol=1e-5)
    assert state.buffers.keys() == ref_state.buffers.keys()
    for k, buf in state.buffers.items():
        torch.testing.assert_close(buf, ref_state.buffers[k], rtol=1e-5, atol=1e-5)  # activations, not frames

    state.reset()  # reset() serves the fast path too
    again, _ = decode(vae, z, [6], "fast")
    vae.decode_impl = "fast"
    again2 = torch.cat([vae.decode_chunk(z[:, :, :3], state), vae.decode_chunk(z[:, :, 3:], state)], dim=2)
    vae.decode_impl = "auto"
    torch.testing.assert_close(again2, again, rtol=0, atol=0)


def test_auto_is_reference_on_cpu_and_bad_impl_is_named(vae, caplog, monkeypatch):
    torch.manual_seed(3)
    z = torch.randn(1, CFG.z_dim, 2, 4, 4)
    with caplog.at_level(logging.INFO, logger="streamgen.models.wan_vae"):
        assert vae.decode_impl == "auto"
        torch.testing.assert_close(vae.decode(z), decode(vae, z, [2], "reference")[0], rtol=0, atol=0)
    assert not [r for r in caplog.records if "fast decode" in r.getMessage()]  # auto on the CPU: the reference
    monkeypatch.setattr(wan_vae, "_FUSED_NORM", {})  # as in a fresh process
    with caplog.at_level(logging.INFO, logger="streamgen.models.wan_vae"):
        decode(vae, z, [2], "fast")
        decode(vae, z, [2], "fast")
    lines = [r.getMessage() for r in caplog.records if "fast decode" in r.getMessage()]
    assert len(lines) == 1 and "no fused RMSNorm+SiLU on cpu" in lines[0]  # the fallback, logged once
    vae.decode_impl = "fastest"
    try:
        with pytest.raises(ValueError, match="decode_impl='fastest'; allowed: auto, fast, reference"):
            vae.decode(z)
    finally:
        vae.decode_impl = "auto"


def test_to_uint8_layout_and_rounding_on_cpu():
    """The torch path (the fused CUDA kernel is probed against it for the same bytes on first use)."""
    from streamgen.media.frames import to_uint8, uint8_fused_available, unit_frames

    assert uint8_fused_available("cpu") is False
    x = torch.tensor([0.0, 0.5 / 255, 1.5 / 255, 2.5 / 255, 0.999, 1.0, -0.2, 1.3]).view(1, 1, 1, 8).repeat(2, 3, 1, 1)
    x[:, 1] *= 0.5
    u = to_uint8(x)
    assert u.shape == (2, 1, 8, 3) and u.dtype == torch.uint8 and u.is_contiguous()
    assert u[0, 0, :, 0].tolist() == [0, 0, 2, 2, 255, 255, 0, 255]  # half to even, clamped
    assert torch.equal(u[..., 1], (x[:, 1] * 255).round().clamp(0, 255).to(torch.uint8))
    # a channels-last decoder output gives the same frames as a contiguous one
    dec = torch.rand(1, 3, 5, 4, 6) * 2 - 1
    a = to_uint8(unit_frames(dec))
    b = to_uint8(unit_frames(dec.contiguous(memory_format=torch.channels_last_3d)))
    assert torch.equal(a, b) and a.shape == (5, 4, 6, 3)


def test_auto_takes_the_reference_path_under_forward_hooks(vae, monkeypatch, caplog):
    """The fast path calls no module's forward: with a hook on a decoder module, auto must not take it."""
    seen = []
    h = vae.decoder.head[2].register_forward_pre_hook(lambda m, args: seen.append(m))
    try:
        vae._hook_warned = False
        with caplog.at_level(logging.WARNING, logger="streamgen.models.wan_vae"):
            assert not vae._fast_path(on_cuda=True) and not vae._fast_path(on_cuda=True)
            vae.decode(torch.randn(1, CFG.z_dim, 1, 4, 4))  # the reference path: the hook runs
        assert len([r for r in caplog.records if "forward hooks" in r.getMessage()]) == 1  # said once
        vae.decode_impl = "fast"  # asked for explicitly: taken (and the hook skipped)
        assert vae._fast_path(on_cuda=True) and vae._fast_path(on_cuda=False)
    finally:
        vae.decode_impl = "auto"
        h.remove()
    assert seen and vae._fast_path(on_cuda=True) and not vae._fast_path(on_cuda=False)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fast_equals_reference_on_cuda(dtype, monkeypatch):
    """On the GPU (fused Triton norm where available): fast == reference within the dtype's rounding."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 means fp32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(5)
    m = WanVAE(CFG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    m = m.to("cuda", dtype)
    z = torch.randn(1, CFG.z_dim, 7, 8, 12, device="cuda")
    m32 = WanVAE(CFG).eval().to("cuda")
    m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    want, _ = decode(m32, z, [7], "reference")
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for impl in ("reference", "fast"):
        got, _ = decode(m, z, [1, 3, 3], impl)
        err = float((got.float() - want).norm() / want.norm())
        assert err < tol, (impl, err)


@cuda
def test_to_uint8_fused_gives_the_torch_bytes_on_cuda():
    from streamgen.media import frames

    x = torch.rand(5, 3, 33, 47, device="cuda") * 1.2 - 0.1
    for t in (x, x.half(), x.bfloat16(), x.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(frames.to_uint8(t), frames._to_uint8_torch(t))
