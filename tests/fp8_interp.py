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

# Its float32 -> e4m3 conversion rounds by adding the cut-off bit to the 3-bit mantissa without carrying into the
# exponent, so 31.8 becomes 16, not 32 (the GPU's cvt.rn.satfinite rounds to nearest even). Convert as torch does.
_orig_convert = interpreter._convert_float


def _convert(data, input_dtype, output_dtype, rounding_mode):
    import numpy as np
    import triton.language as tl

    if input_dtype == tl.float32 and output_dtype == tl.float8e4nv:
        x = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy())
        return x.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return _orig_convert(data, input_dtype, output_dtype, rounding_mode)


interpreter._convert_float = _convert


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
    k8, ks = fp8.quantize_blocks(k, bn)  # no mean taken out
    kd = k8.float() * ks.repeat_interleave(bn, dim=1)[:, : k.shape[1], :, None]
    r["offset_unsmoothed_err"] = rel(exact(q, kd, v), exact(q, k, v))
    # one query tile row, one key
    q, k, v = qkv(b=1, lq=3, lk=1, h=1, d=16, seed=2)
    r["tiny_err"] = rel(fp8.fp8_attention(q, k, v), exact(q, k, v))
    # keys a whole number of tiles (no partial block)
    q, k, v = qkv(lq=32, lk=64, seed=5)
    r["whole_tiles_err"] = rel(fp8.fp8_attention(q, k, v), exact(q, k, v))
    # fp16 in, fp16 out
    q, k, v = (t.to(torch.float16) for t in qkv(seed=3))
    out = fp8.fp8_attention(q, k, v)
    r["fp16_ok"] = out.dtype == torch.float16
    r["fp16_err"] = rel(out, exact(q, k, v))
    # the Triton quantization against the torch reference: the same scales; the same bytes but where a value sits
    # on a rounding tie and the two scalings differ in the last bit of float32 (then one e4m3 step apart)
    q, k, v = qkv(seed=4)
    quant = []

    def compare(a, b, sa, sb):
        a, b = a.float(), b.float()
        diff = (a - b).abs()
        return {"scales": torch.allclose(sa, sb, rtol=1e-6, atol=0), "frac": (diff > 0).float().mean().item(),
                "one_step": bool((diff <= a.abs() / 8 + 2.0**-9).all())}

    for x, block, mean in ((q, 16, None), (k, 16, fp8.channel_mean(k)), (k[:, :33], 32, None)):
        a, sa = fp8.quantize_blocks(x, block, mean)
        b, sb = fp8.triton_quantize_blocks(x, block, mean)
        quant.append(compare(a, b, sa, sb))
    va, vsa, vma = fp8.quantize_v(v)
    vb, vsb, vmb = fp8.triton_quantize_v(v, 16)
    quant.append({**compare(va, vb, vsa, vsb), "means": torch.equal(vma, vmb)})
    r["quant"] = quant
    json.dump(r, sys.stdout)


if __name__ == "__main__":
    main()
