"""Run by tests/test_fp8_attention.py in a fresh process with TRITON_INTERPRET=1 (Triton decides at import whether
its own jit helpers are interpreted, so the interpreter has to be on before anything imports triton). Prints one
JSON object: the errors of the fp8 kernel on the cases the tests assert on."""

import json
import math
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from streamgen.ops import fp8_attention as fp8  # noqa: E402

# Triton 3.6's interpreter turns a scalar argument into a 1-element array and converts it with int(), which numpy
# >= 2.3 refuses ("only 0-dimensional arrays can be converted"): convert its one element instead.
_orig = interpreter._patch_lang_tensor


def _patched(tensor, scope):
    _orig(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._patch_lang_tensor = _patched


def exact(q, k, v):
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    p = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    return (p @ v).transpose(1, 2)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def qkv(b=2, lq=40, lk=70, h=2, d=32, k_offset=2.0, v_offset=1.0, seed=0):
    """bf16 inputs whose K and V carry a per-channel offset, as a DiT's do (lengths not multiples of the tiles)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, h, d, generator=g)
    k = torch.randn(b, lk, h, d, generator=g) + k_offset * torch.randn(1, 1, h, d, generator=g)
    v = torch.randn(b, lk, h, d, generator=g) + v_offset * torch.randn(1, 1, h, d, generator=g)
    return tuple(t.to(torch.bfloat16) for t in (q, k, v))


def main() -> None:
    r = {}
    q, k, v = qkv()
    out = fp8.fp8_attention(q, k, v)
    r["shape_ok"] = out.shape == q.shape and out.dtype == q.dtype
    r["err"] = rel(out, exact(q, k, v))
    r["ref_err"] = rel(fp8.reference(q, k, v), exact(q, k, v))
    r["swapped_err"] = rel(fp8.fp8_attention(q, v, k), exact(q, k, v))
    r["bf16_sdpa_err"] = rel(torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2), exact(q, k, v))
    # a large key offset: smoothed (the kernel) against the same block grid without smoothing
    q, k, v = qkv(k_offset=20.0, seed=1)
    r["offset_err"] = rel(fp8.fp8_attention(q, k, v), exact(q, k, v))
    bn = fp8.INTERPRET_CONFIG[1]
    k8, ks = fp8.quantize_blocks(k, bn)
    kd = k8.float() * ks.repeat_interleave(bn, dim=1)[:, : k.shape[1], :, None]
    r["offset_unsmoothed_err"] = rel(exact(q, kd, v), exact(q, k, v))
    # one query tile row, one key
    q, k, v = qkv(b=1, lq=3, lk=1, h=1, d=16, seed=2)
    r["tiny_err"] = rel(fp8.fp8_attention(q, k, v), exact(q, k, v))
    # fp16 in, fp16 out
    q, k, v = (t.to(torch.float16) for t in qkv(seed=3))
    out = fp8.fp8_attention(q, k, v)
    r["fp16_ok"] = out.dtype == torch.float16
    r["fp16_err"] = rel(out, exact(q, k, v))
    json.dump(r, sys.stdout)


if __name__ == "__main__":
    main()
