"""The project's Triton kernels in Triton's interpreter on the CPU: ``python tests/triton_interp.py fp8|norm_rope``,
with TRITON_INTERPRET=1, run by tests/test_fp8_attention.py and tests/test_fused.py in a fresh process (Triton
decides at import whether its own jit helpers are interpreted, so the interpreter has to be on before anything
imports triton). Prints one JSON object: the errors on the cases the tests assert on."""

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
# exponent, so 31.8 becomes 16, not 32, and its float32 -> bfloat16 truncates (the GPU rounds to nearest even).
# Convert as torch does.
_orig_convert = interpreter._convert_float


def _convert(data, input_dtype, output_dtype, rounding_mode):
    import numpy as np
    import triton.language as tl

    to = {tl.float8e4nv: (torch.float8_e4m3fn, torch.uint8), tl.bfloat16: (torch.bfloat16, torch.uint16),
          tl.float16: (torch.float16, torch.uint16)}.get(output_dtype)
    if input_dtype == tl.float32 and to is not None:  # the same holds for bf16: it truncates instead of rounding
        x = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy())
        return x.to(to[0]).view(to[1]).numpy()
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


def fp8_cases() -> dict:
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
    return r


def norm_rope_cases() -> dict:
    """streamgen.ops.fused's RMSNorm + RoPE kernel against models.wan.norm_rope, in bf16 and fp16, with one RoPE
    table for all rows and one per row (forward_rows), at a width whose pair count is not a power of two."""
    from streamgen.models.wan import WanRMSNorm, norm_rope, rope_cos_sin
    from streamgen.ops import fused

    r = {}
    g = torch.Generator().manual_seed(0)
    heads, head_dim, grid = 4, 24, (2, 3, 4)
    dim, n = heads * head_dim, 24
    for dtype in (torch.bfloat16, torch.float16):
        norm = WanRMSNorm(dim, 1e-6)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.1 * torch.randn(dim, generator=g))
        norm = norm.to(dtype)
        x = (3 * torch.randn(2, n, dim, generator=g)).to(dtype)
        shared = rope_cos_sin(head_dim, grid, 5, torch.device("cpu"))
        rows = [rope_cos_sin(head_dim, grid, s, torch.device("cpu")) for s in (0, 9)]
        per_row = (torch.stack([c for c, _ in rows]), torch.stack([s_ for _, s_ in rows]))
        for name, (cos, sin) in (("shared", shared), ("per_row", per_row)):
            ref = norm_rope(x, norm, heads, cos, sin)
            out = fused.rms_norm_rope(x, norm.weight, norm.eps, cos, sin, heads)
            diff = (out.float() - ref.float()).abs()
            key = f"{str(dtype).replace('torch.', '')}_{name}"
            r[key] = {"shape_ok": out.shape == ref.shape and out.dtype == dtype,
                      "frac_differ": (diff > 0).float().mean().item(),
                      "within_one_step": bool((diff <= ref.float().abs() * 2.0**-7 + 1e-3).all()),
                      "rel": rel(out, ref)}
        wrong = fused.rms_norm_rope(x, norm.weight, norm.eps, sin, cos, heads)  # cos and sin swapped
        r[f"{str(dtype).replace('torch.', '')}_swapped_rel"] = rel(wrong, norm_rope(x, norm, heads, *shared))
    return r


def model_cases() -> dict:
    """A tiny bf16 WanModel streaming through its window cache with ``attention(backend="fp8")``: the
    self-attention calls over 64-511 keys (here on the CPU, which ops.attention never sends there itself) take the
    fp8 kernel on the cache's own views and slices, alone (forward_chunk) and batched (forward_rows), against the
    same model on SDPA."""
    import functools

    from streamgen.models.wan import WanConfig, WanModel
    from streamgen.ops import attention as attn_ops

    attn_ops.wants_fp8 = lambda backend, is_cuda, dtype, n_keys, masked: (
        backend == "fp8" and not masked and dtype in (torch.float16, torch.bfloat16) and 64 <= n_keys < 512)
    calls = []
    kernel = fp8.fp8_attention

    def counted(q, k, v, **kw):
        calls.append(k.shape[1])
        return kernel(q, k, v, **kw)

    fp8.fp8_attention = counted
    torch.manual_seed(0)
    model = WanModel(WanConfig.preset("tiny")).to(torch.bfloat16).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(2, 7, model.cfg.text_dim, generator=g).to(torch.bfloat16)
    xs = [torch.randn(2, 16, 3, 8, 8, generator=g).to(torch.bfloat16) for _ in range(4)]

    def stream(backend: str, batched: bool) -> torch.Tensor:
        model.attention = functools.partial(attn_ops.attention, backend=backend)
        caches = [model.new_cache(1, (8, 8), local_frames=6, sink_frames=3) for _ in range(2)]
        for i, c in enumerate(caches):
            model.set_prompt(c, ctx[i : i + 1])
        outs = []
        with torch.no_grad():
            for n, x in enumerate(xs):
                start = 3 * n
                for t, commit in ((700.0, False), (0.0, True)):
                    tt = torch.full((2,), t)
                    if batched:
                        y = model.forward_rows(x, tt, caches, start_frames=[start] * 2, update_cache=[commit] * 2)
                    else:
                        y = torch.cat([model.forward_chunk(x[i : i + 1], tt[i : i + 1], c, start_frame=start,
                                                           update_cache=commit) for i, c in enumerate(caches)])
                    if not commit:
                        outs.append(y)
        return torch.cat(outs, dim=2)

    r = {}
    for batched in (False, True):
        ref = stream("sdpa", batched)
        before = len(calls)
        out = stream("fp8", batched)
        key = "rows" if batched else "chunk"
        r[key] = {"rel": rel(out, ref), "equal": torch.equal(out, ref), "fp8_calls": len(calls) - before,
                  "keys_seen": sorted(set(calls[before:]))}
    return r


if __name__ == "__main__":
    case = sys.argv[1] if len(sys.argv) > 1 else "fp8"
    json.dump({"fp8": fp8_cases, "norm_rope": norm_rope_cases, "model": model_cases}[case](), sys.stdout)
