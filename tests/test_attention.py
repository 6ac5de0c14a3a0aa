"""streamgen.ops.attention: the (B, L, H, D) attention against a float64 softmax reference, and which calls
go to flash-attn (``auto``: CUDA, fp16/bf16, no mask, at least FLASH_MIN_KEYS keys)."""

import pytest
import torch

from streamgen.ops import attention as attn_ops
from streamgen.ops.attention import FLASH_MIN_KEYS, attention, wants_flash


def reference(q, k, v, mask=None):
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def qkv(lq=7, lk=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, lq, 3, 16, generator=g), torch.randn(2, lk, 3, 16, generator=g),
            torch.randn(2, lk, 3, 16, generator=g))


def test_attention_matches_the_softmax_reference_with_and_without_a_mask():
    q, k, v = qkv()
    assert torch.allclose(attention(q, k, v).double(), reference(q, k, v), atol=1e-5)
    mask = torch.rand(1, 1, 7, 11, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True  # every query sees a key
    assert torch.allclose(attention(q, k, v, attn_mask=mask).double(), reference(q, k, v, mask), atol=1e-5)


@pytest.mark.parametrize("backend, cuda, dtype, keys, masked, expected", [
    ("auto", True, torch.bfloat16, 18720, False, True),          # the window self-attention
    ("auto", True, torch.float16, FLASH_MIN_KEYS, False, True),
    ("auto", True, torch.bfloat16, 512, False, False),           # the cross-attention: cuDNN is faster
    ("auto", True, torch.bfloat16, 4680, False, False),          # first chunk: level, SDPA kept
    ("flash", True, torch.bfloat16, 512, False, True),           # asked for: any length
    ("flash", True, torch.bfloat16, 18720, True, False),         # a mask needs SDPA
    ("auto", True, torch.float32, 18720, False, False),          # flash-attn has no fp32
    ("auto", False, torch.bfloat16, 18720, False, False),        # CPU
    ("sdpa", True, torch.bfloat16, 32760, False, False),
])
def test_which_calls_take_flash_attn(backend, cuda, dtype, keys, masked, expected):
    assert wants_flash(backend, cuda, dtype, keys, masked) is expected


def test_a_chosen_flash_call_runs_the_flash_function_and_unwraps_a_tuple(monkeypatch):
    q, k, v = qkv()
    calls = []

    def fake(q, k, v):
        calls.append(k.shape[1])
        return reference(q, k, v).float(), None  # flash-attn 2/3 return (out, lse)

    monkeypatch.setattr(attn_ops, "_flash_fn", lambda: (fake, "fake.flash_attn_func", "0"))
    monkeypatch.setattr(attn_ops, "wants_flash", lambda *a: True)
    out = attention(q, k, v)
    assert calls == [11] and out.shape == (2, 7, 3, 16)
    monkeypatch.setattr(attn_ops, "wants_flash", lambda *a: False)
    attention(q, k, v)
    assert calls == [11]


def test_a_bad_backend_names_the_allowed_ones():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"attention backend must be one of \('auto', 'sdpa', 'flash', 'fp8'\), got 'fa5'"):
        attention(q, k, v, backend="fa5")


@pytest.mark.parametrize("backend, cuda, dtype, keys, masked, expected", [
    ("fp8", True, torch.bfloat16, 18720, False, True),
    ("fp8", True, torch.bfloat16, 512, False, False),    # cross-attention: bf16 (auto)
    ("fp8", True, torch.bfloat16, 18720, True, False),   # masked: SDPA
    ("fp8", False, torch.bfloat16, 18720, False, False),
    ("fp8", True, torch.float32, 18720, False, False),
    ("auto", True, torch.bfloat16, 18720, False, False),
])
def test_which_calls_take_the_fp8_kernel(backend, cuda, dtype, keys, masked, expected):
    assert attn_ops.wants_fp8(backend, cuda, dtype, keys, masked) is expected


def test_fp8_backend_off_cuda_falls_back_to_auto_with_one_log_line(caplog):
    import logging

    from streamgen.models.wan import WanConfig, WanModel

    model = WanModel(WanConfig.preset("tiny"))
    with caplog.at_level(logging.INFO, logger="streamgen.ops.attention"):
        attn_ops.use_backend(model, "fp8")
    msgs = [r.getMessage() for r in caplog.records if "fp8" in r.getMessage()]
    assert msgs == ["the fp8 attention kernel runs on CUDA (device cpu); attention runs as --attention auto"]
    assert model.attention.keywords == {"backend": "auto"}


def test_the_pipeline_builder_takes_the_attention_option_and_falls_back_on_the_cpu(caplog):
    import logging

    from streamgen.pipeline import build

    with caplog.at_level(logging.INFO, logger="streamgen.ops.attention"):
        pipe = build("tiny", attention="fp8")
    assert pipe.model.attention.keywords == {"backend": "auto"}
    assert any("attention runs as --attention auto" in r.getMessage() for r in caplog.records)
    assert build("tiny", attention="sdpa").model.attention.keywords == {"backend": "sdpa"}
