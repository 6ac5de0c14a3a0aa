"""Error of a quantized self-attention KV cache (streamgen/ops/kvcache.py), on the CPU.

    PYTHONPATH=. python bench/kv_error.py            # ~2 minutes on one core

1. The built-in toy model's video (its native 128x128, 7 chunks: the 12-frame window rolls from
   chunk 4 on, the prompt switches at chunk 5 with a KV re-cache), PSNR (peak-to-peak 2 of frames
   in [-1, 1]) of every frame against the float32 model with a float32 cache: the whole model in
   bfloat16 (what bf16 costs), fp8/int8 caches under the float32 model, and fp8/int8 caches under
   the bf16 model (against the bf16 model with its bf16 cache).
2. One attention layer of the 14B config (head_dim 128; 8 of its 40 heads: heads are independent
   and identically drawn), queries = one chunk's first frame at 832x480 (1560 tokens), keys = 3
   or 12 frames: K RMS-normed per channel (~1, with per-channel gains 1..1.5), V ~ N(0, 16).
   Relative error ||out - ref|| / ||ref|| against float32 K/V, for K/V rounded to bf16 and stored
   fp8 / int8 with per-token, per-head scales.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamgen.models.wan import sdpa  # noqa: E402
from streamgen.ops.kvcache import dequantize_kv, kv_cache, quantize_kv  # noqa: E402
from streamgen.sampling.stream import SessionState, StreamConfig  # noqa: E402
from streamgen.weights import load_toy  # noqa: E402

PROMPTS = ("a red circle moving left", "a blue square moving right")


def video(model, text, dec, dtype, size=128, chunks=7, switch=5):
    s = SessionState(model, PROMPTS[0], height=size, width=size, config=StreamConfig(seed=3), text_encoder=text,
                     decoder=dec, dtype=dtype)
    out = []
    with torch.no_grad():
        for i in range(chunks):
            if i == switch:
                s.set_prompt(PROMPTS[1])
            out.append(s.next_chunk().frames.float())
    return torch.cat(out, dim=2)


def psnr(a, b) -> float:
    mse = (a - b).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def main() -> int:
    torch.set_num_threads(1)
    m32, t32, d32 = load_toy(dtype=torch.float32)
    m16, t16, d16 = load_toy(dtype=torch.bfloat16)
    ref = video(m32, t32, d32, torch.float32)
    ref16 = video(m16, t16, d16, torch.bfloat16)
    print("| toy video, 128x128, 7 chunks | vs | PSNR dB |")
    print("| --- | --- | ---: |")
    print(f"| bf16 model, bf16 cache | fp32 | {psnr(ref16, ref):.1f} |")
    for base, (m, t, d), dt, r in (("fp32", (m32, t32, d32), torch.float32, ref), ("bf16", (m16, t16, d16), torch.bfloat16, ref16)):
        for quant in ("fp8", "int8"):
            mm = copy.copy(m)
            h = kv_cache(mm, quant=quant)
            v = video(mm, t, d, dt)
            h.remove()
            print(f"| {base} model, {quant} cache | {base} model, {base} cache | {psnr(v, r):.1f} |", flush=True)

    print("\n| 14B-config attention (8 heads x 128, 1560 queries) | keys | rel err |")
    print("| --- | ---: | ---: |")
    g = torch.Generator().manual_seed(0)
    heads, d, t = 8, 128, 1560
    for frames in (3, 12):
        q = torch.randn(1, t, heads, d, generator=g)
        k = torch.randn(1, frames * t, heads, d, generator=g) * (1 + 0.5 * torch.rand(1, 1, heads, d, generator=g))
        v = torch.randn(1, frames * t, heads, d, generator=g) * 4
        out = sdpa(q, k, v)
        rows = {"bf16": (k.bfloat16().float(), v.bfloat16().float())}
        for quant in ("fp8", "int8"):
            rows[quant] = tuple(dequantize_kv(*quantize_kv(x, quant), torch.float32) for x in (k, v))
        for name, (kq, vq) in rows.items():
            rel = ((sdpa(q, kq, vq) - out).norm() / out.norm()).item()
            print(f"| K/V {name} | {frames * t} | {rel:.2e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
