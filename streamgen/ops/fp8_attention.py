"""FP8 attention: Q·Kᵀ and P·V on fp8 (e4m3) tensor cores, as one Triton kernel (online softmax in fp32).

On an H200 the bf16 attention is half of a 14B forward and of a 1.3B chunk (bench/BENCHMARKS.md), and fp8
tensor cores run twice the bf16 rate. PyTorch's SDPA has no fp8 path, flash-attn-4 does fp8 only on SM100, and
cuDNN's fp8 SDPA writes fp8 output on Hopper. So this module quantizes and runs its own kernel.

The quantization, after the ideas of SageAttention (Zhang et al., 2024-2025), written from the math:

* **Q**: one scale per block of ``BLOCK_M`` queries and head (amax / 448). The block is the kernel's tile, so the
  scale is one scalar per program.
* **K**: smoothed first. Its mean over the keys, per head and channel, is subtracted. ``q·(k - k̄) = q·k - q·k̄``,
  and ``q·k̄`` is the same for every key of a query, so the softmax is unchanged. DiT keys carry a large
  per-channel offset, and removing it gives the fp8 grid to what differs between keys. Then one scale per
  block of ``BLOCK_N`` keys and head.
* **V**: also smoothed: ``P(V - v̄) + v̄ = PV`` because each row of the normalised P sums to 1. Then one scale
  per head and channel (it factors out of the sum over keys). It is stored channel-major (B, H, D, Lk), so that
  the P·V product reads its K dimension contiguously, as Hopper's fp8 wgmma needs.
* **P** (the unnormalised ``exp2(s - m)`` in [0, 1]) is multiplied by 448 and rounded to e4m3 for the P·V dot.
  The row sums are accumulated from the fp32 P.

Q, K and V are quantized by three small Triton kernels (one pass each, after torch's reductions for the means
and V's extremes); the torch functions of the same names without ``triton_`` are the reference. Both dots
accumulate in fp32. ``fp8_attention(q, k, v)`` takes and returns (B, L, H, D) tensors in
bf16/fp16, as ``ops.attention`` does. ``available(device)`` says whether Triton can run it (a CUDA device of
compute capability >= 8.9, or Triton's interpreter: ``TRITON_INTERPRET=1``, which the CPU tests use).
``ops.attention.use_backend(model, "fp8")`` routes the long self-attention calls here, after a probe.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

try:  # optional: without Triton the kernels below are not defined and why_unavailable says so
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means "not available"
    triton = None

FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Tile sizes: (BLOCK_M, BLOCK_N, num_warps, num_stages). On CUDA, the default for head dim 128 (the Wan DiT's).
# bench/attn_kernels.py --backends fp8@BMxBNwWsS times others.
CUDA_CONFIG = (128, 128, 8, 3)
INTERPRET_CONFIG = (16, 16, 1, 1)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def why_unavailable(device_type: str, capability: tuple[int, int] | None = None) -> str | None:
    """None when the kernel can run on this device type; else why not (one line)."""
    if triton is None:
        return "fp8 attention needs Triton, which is not installed"
    if device_type == "cpu":
        return None if _interpreting() else "fp8 attention is a GPU kernel (on the CPU only under TRITON_INTERPRET=1)"
    if device_type != "cuda":
        return f"fp8 attention runs on CUDA (device {device_type})"
    if capability is not None and capability < (8, 9):
        return f"fp8 attention needs fp8 tensor cores (compute capability >= 8.9, this GPU has {capability[0]}.{capability[1]})"
    return None


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def available(device: torch.device | str) -> bool:
    device = torch.device(device)
    return why_unavailable(device.type, _capability(device)) is None


# ----------------------------------------------------------------------------- quantization
# Torch ops (the reference, and the CPU) and Triton kernels (what fp8_attention runs: one pass over Q, one over K
# after its mean, one over V after its mean and extremes) compute the same bytes: amax is exact, the means come
# from the same torch reduction, and both scale by one multiply with 448 / amax.


def _inv_scale(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(448 / amax, amax / 448), both 1 where amax is 0."""
    nz = amax > 0
    return (torch.where(nz, FP8_MAX / amax, torch.ones_like(amax)),
            torch.where(nz, amax / FP8_MAX, torch.ones_like(amax)))


def channel_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, L, H, D) -> float32 (B, H, D): the mean over the rows."""
    return x.mean(dim=1, dtype=torch.float32)


def quantize_blocks(x: torch.Tensor, block: int, mean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, H, D), minus ``mean`` (B, H, D) if given -> fp8 (B, L, H, D) and float32 scales (B, ceil(L / block),
    H): one scale per block of rows and head (amax / 448)."""
    b, n, h, d = x.shape
    xs = x.float() if mean is None else x.float() - mean[:, None]
    pad = -n % block
    xp = F.pad(xs, (0, 0, 0, 0, 0, pad)) if pad else xs
    nb = xp.shape[1] // block
    amax = xp.view(b, nb, block, h, d).abs().amax(dim=(2, 4))
    inv, scale = _inv_scale(amax)
    q = (xp.view(b, nb, block, h, d) * inv[:, :, None, :, None]).to(torch.float8_e4m3fn)
    return q.view(b, nb * block, h, d)[:, :n], scale


def _v_stats(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """V's mean, and the inverse scale and scale of V minus its mean, per (B, H, D). The amax of v - mean comes
    from V's extremes (the rounding of a subtraction is monotonic, so it is the same value)."""
    mean = channel_mean(v)
    lo, hi = torch.aminmax(v, dim=1)
    amax = torch.maximum(hi.float() - mean, mean - lo.float())
    inv, scale = _inv_scale(amax)
    return mean, inv, scale


def quantize_v(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, H, D) -> fp8 (B, H, D, L) channel-major, float32 scales (B, H, D) and means (B, H, D)."""
    mean, inv, scale = _v_stats(v)
    q = ((v.float() - mean[:, None]) * inv[:, None]).to(torch.float8_e4m3fn).permute(0, 2, 3, 1).contiguous()
    return q, scale, mean


if triton is not None:
    @triton.jit
    def _load_tile(X, sxb, sxl, sxh, H, L, D: tl.constexpr, BLOCK: tl.constexpr):
        """This program's (BLOCK, D) tile of rows of a (B, L, H, D) tensor (rows past L are 0), its indices and mask."""
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_n = pid * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        valid = offs_n[:, None] < L
        x = tl.load(X + b * sxb + h * sxh + offs_n[:, None] * sxl + offs_d[None, :], mask=valid, other=0.0)
        return x, pid, bh, b, h, offs_n, offs_d, valid

    @triton.jit
    def _quant_rows(X, M, Y, S, sxb, sxl, sxh, syb, syl, syh, H, L, nB,
                    D: tl.constexpr, BLOCK: tl.constexpr, HAS_MEAN: tl.constexpr):
        x, pid, bh, b, h, offs_n, offs_d, valid = _load_tile(X, sxb, sxl, sxh, H, L, D, BLOCK)
        x = x.to(tl.float32)
        if HAS_MEAN:
            x = tl.where(valid, x - tl.load(M + bh * D + offs_d)[None, :], 0.0)
        amax = tl.max(tl.max(tl.abs(x), 1), 0)
        inv = tl.where(amax > 0, 448.0 / amax, 1.0)
        tl.store(Y + b * syb + h * syh + offs_n[:, None] * syl + offs_d[None, :], (x * inv).to(tl.float8e4nv),
                 mask=valid)
        tl.store(S + (b * nB + pid) * H + h, tl.where(amax > 0, amax / 448.0, 1.0))

    @triton.jit
    def _quant_vt(X, M, INV, Y, sxb, sxl, sxh, syb, syh, syd, H, L,
                  D: tl.constexpr, BLOCK: tl.constexpr):
        x, pid, bh, b, h, offs_n, offs_d, valid = _load_tile(X, sxb, sxl, sxh, H, L, D, BLOCK)
        x = (x.to(tl.float32) - tl.load(M + bh * D + offs_d)[None, :]) * tl.load(INV + bh * D + offs_d)[None, :]
        tl.store(Y + b * syb + h * syh + offs_d[None, :] * syd + offs_n[:, None], x.to(tl.float8e4nv), mask=valid)


def triton_quantize_blocks(x: torch.Tensor, block: int, mean: torch.Tensor | None = None):
    """:func:`quantize_blocks` as one Triton kernel (one program per block of rows and head)."""
    b, n, h, d = x.shape
    nb = triton.cdiv(n, block)
    y = torch.empty((b, n, h, d), device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty((b, nb, h), device=x.device, dtype=torch.float32)
    m = mean if mean is not None else s  # unused without HAS_MEAN
    _quant_rows[(nb, b * h)](x, m, y, s, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
                      h, n, nb, D=d, BLOCK=block, HAS_MEAN=mean is not None)
    return y, s


def triton_quantize_v(v: torch.Tensor, block: int = 64):
    """:func:`quantize_v` with its write pass as one Triton kernel (the mean and extremes are torch reductions)."""
    b, n, h, d = v.shape
    mean, inv, scale = _v_stats(v)
    y = torch.empty((b, h, d, n), device=v.device, dtype=torch.float8_e4m3fn)
    _quant_vt[(triton.cdiv(n, block), b * h)](v, mean, inv, y, v.stride(0), v.stride(1), v.stride(2), y.stride(0), y.stride(1),
                                y.stride(2), h, n, D=d, BLOCK=block)
    return y, scale, mean


# ----------------------------------------------------------------------------- the kernel


if triton is not None:
    @triton.jit
    def _attn_block(acc, l_i, m_i, q, s_q, K, Vt, KS, kbase, vbase, skl, svd, start, Lk, ks_index,
                    D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
        """One key block of the online softmax: the updated (acc, l_i, m_i). MASKED: the block runs past Lk."""
        offs_n = start + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        if MASKED:
            valid = offs_n < Lk
            kt = tl.load(K + kbase + offs_n[None, :] * skl + offs_d[:, None], mask=valid[None, :], other=0.0)
            vt = tl.load(Vt + vbase + offs_d[:, None] * svd + offs_n[None, :], mask=valid[None, :], other=0.0)
        else:
            kt = tl.load(K + kbase + offs_n[None, :] * skl + offs_d[:, None])  # (D, BLOCK_N): Kᵀ, D contiguous
            vt = tl.load(Vt + vbase + offs_d[:, None] * svd + offs_n[None, :])  # (D, BLOCK_N), keys contiguous
        s = tl.dot(q, kt) * (s_q * tl.load(KS + ks_index))
        if MASKED:
            s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot((p * 448.0).to(tl.float8e4nv), tl.trans(vt), acc * alpha[:, None])
        return acc, l_i, m_new

    @triton.jit
    def _attn_fwd(Q, K, Vt, QS, KS, VS, VM, O,
                  sqb, sql, sqh, skb, skl, skh, svb, svh, svd, sob, sol, soh,
                  H, Lq, Lk, nM, nN, qk_scale,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        q, pid_m, bh, b, h, offs_m, offs_d, valid_m = _load_tile(Q, sqb, sql, sqh, H, Lq, D, BLOCK_M)
        s_q = tl.load(QS + (b * nM + pid_m) * H + h) * qk_scale
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        kbase = b * skb + h * skh
        vbase = b * svb + h * svh
        n_full = (Lk // BLOCK_N) * BLOCK_N
        for start in tl.range(0, n_full, BLOCK_N):  # whole blocks: no masks
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, s_q, K, Vt, KS, kbase, vbase, skl, svd, start, Lk,
                                        (b * nN + start // BLOCK_N) * H + h, D, BLOCK_N, False)
        if n_full < Lk:  # the last, partial block
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, s_q, K, Vt, KS, kbase, vbase, skl, svd, n_full, Lk,
                                        (b * nN + n_full // BLOCK_N) * H + h, D, BLOCK_N, True)
        v_s = tl.load(VS + bh * D + offs_d)
        v_m = tl.load(VM + bh * D + offs_d)
        o = acc * (1.0 / 448.0) / l_i[:, None] * v_s[None, :] + v_m[None, :]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], o.to(O.dtype.element_ty),
                 mask=valid_m)


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Softmax attention (scale 1/sqrt(D), no mask) of (B, Lq, H, D) queries over (B, Lk, H, D) keys and
    values with fp8 products; returns (B, Lq, H, D) in q's dtype."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"fp8_attention: q (B, Lq, H, D) and k, v (B, Lk, H, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if d % 16 or d > 256 or d & (d - 1):
        raise ValueError(f"fp8_attention: head dim must be a power of two from 16 to 256, got {d}")
    why = why_unavailable(q.device.type, _capability(q.device))
    if why is not None:
        raise RuntimeError(why)
    if config is None:
        config = INTERPRET_CONFIG if q.device.type == "cpu" else CUDA_CONFIG
    block_m, block_n, num_warps, num_stages = config
    q8, qs = triton_quantize_blocks(q, block_m)
    k8, ks = triton_quantize_blocks(k, block_n, channel_mean(k))
    vt8, vs, vm = triton_quantize_v(v, block_n)
    out = torch.empty_like(q)
    grid = (triton.cdiv(lq, block_m), b * h)
    _attn_fwd[grid](
        q8, k8, vt8, qs, ks, vs, vm, out,
        q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
        vt8.stride(0), vt8.stride(1), vt8.stride(2), out.stride(0), out.stride(1), out.stride(2),
        h, lq, lk, qs.shape[1], ks.shape[1], (1.0 / math.sqrt(d)) * math.log2(math.e),
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    return out


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same quantization of Q, K and V in torch ops and an exact softmax over the dequantized product (P is
    not rounded): what the kernel computes, up to P's rounding and the order of sums. (B, L, H, D) in and out."""
    b, lq, h, d = q.shape
    bm, bn = INTERPRET_CONFIG[:2] if q.device.type == "cpu" else CUDA_CONFIG[:2]
    q8, qs = quantize_blocks(q, bm)
    k8, ks = quantize_blocks(k, bn, channel_mean(k))
    vt8, vs, vm = quantize_v(v)
    qd = q8.float() * qs.repeat_interleave(bm, dim=1)[:, :lq, :, None]
    kd = k8.float() * ks.repeat_interleave(bn, dim=1)[:, : k.shape[1], :, None]
    vd = vt8.float().permute(0, 3, 1, 2) * vs[:, None] + vm[:, None]  # (B, Lk, H, D)
    p = torch.einsum("bqhd,bkhd->bhqk", qd, kd).mul(1.0 / math.sqrt(d)).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, vd).to(q.dtype)
