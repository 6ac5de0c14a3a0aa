"""Fused kernels applied to a built model from outside (the model files stay plain PyTorch).

``fuse_norm_rope(model)`` (opt-in until it is timed on a GPU) gives each block one Triton kernel for the q/k
RMSNorm + RoPE (``models.wan.norm_rope``): one read of the projection and one write of the rotated heads, where
the 14B profile shows Inductor's fused kernel for it moving ~1.1 TB/s (bench/BENCHMARKS.md). It is a torch
custom op (``streamgen::rms_norm_rope``), so compiled blocks and CUDA graphs call it as one kernel.

``fuse_ffn_gelu(model)`` puts the tanh GELU of each Wan block's feed-forward into the epilogue of
its first GEMM: ``torch._addmm_activation(bias, x, W.T, use_gelu=True)``, which cuBLASLt runs as one
kernel (bias + GELU applied to the float32 accumulator before the single rounding to bf16/fp16).
Unfused, the GEMM writes its (tokens x ffn_dim) output and a second kernel reads it back for the
bias and the GELU: about 8 ms of a 1.3B chunk and 20 ms of a 14B forward at 832x480 on an H200
(bench/BENCHMARKS.md). Under ``torch.compile`` the op stays one extern kernel (Inductor has no
decomposition for it), and CUDA graphs capture it like any GEMM.

Detected, not assumed: the fused op is used only on CUDA, in float16/bfloat16, for a plain
``nn.Linear`` first layer (a quantized one runs unfused), and only after a probe on the device has
matched the unfused result; otherwise one log line and the blocks are left as they are.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional: fuse_norm_rope needs it, fuse_ffn_gelu does not
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means "not available"
    triton = None

log = logging.getLogger(__name__)


class GeluEpilogueFFN(nn.Sequential):
    """``Sequential(Linear, GELU(tanh), Linear)`` (same children, same state-dict keys) whose first GEMM
    applies bias + GELU in its epilogue where the kernel exists; elsewhere exactly the plain Sequential."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin, act, out = self[0], self[1], self[2]
        if _fusable(lin, x):
            h = torch._addmm_activation(lin.bias, x.reshape(-1, x.shape[-1]), lin.weight.t(), use_gelu=True)
            return out(h.view(*x.shape[:-1], h.shape[-1]))
        return out(act(lin(x)))


def _fusable(lin: nn.Module, x: torch.Tensor) -> bool:
    return (type(lin) is nn.Linear and lin.bias is not None and x.is_cuda
            and x.dtype in (torch.float16, torch.bfloat16) and x.dtype == lin.weight.dtype)


def _is_tanh_gelu_ffn(ffn: nn.Module) -> bool:
    return (isinstance(ffn, nn.Sequential) and len(ffn) == 3 and isinstance(ffn[0], nn.Linear)
            and isinstance(ffn[1], nn.GELU) and ffn[1].approximate == "tanh" and isinstance(ffn[2], nn.Linear))


@functools.lru_cache(maxsize=None)
def probe(device: str, dtype: torch.dtype) -> str | None:
    """None when the fused op runs on ``device`` in ``dtype`` and matches Linear + GELU(tanh) within
    the dtype's rounding; else the reason it is not used."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return f"the GELU GEMM epilogue is a CUDA kernel (device {dev.type})"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"the GELU GEMM epilogue is used in float16/bfloat16 only (dtype {str(dtype).replace('torch.', '')})"
    if not hasattr(torch, "_addmm_activation"):
        return f"torch {torch.__version__} has no _addmm_activation"
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(96, 256, device=dev, generator=g)
    w = torch.randn(384, 256, device=dev, generator=g) / 16
    b = torch.randn(384, device=dev, generator=g) / 10
    try:
        fused = torch._addmm_activation(b.to(dtype), x.to(dtype), w.to(dtype).t(), use_gelu=True).float()
    except Exception as e:  # noqa: BLE001 - any failure means "not available"
        return f"_addmm_activation failed ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    ref = F.gelu(F.linear(x.to(dtype).float(), w.to(dtype).float(), b.to(dtype).float()), approximate="tanh")
    err = ((fused - ref).abs().max() / ref.abs().max()).item()
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    if not err <= tol:
        return f"the GELU GEMM epilogue is {err:.2e} from Linear + GELU(tanh) (allowed {tol:.0e})"
    return None


def fuse_ffn_gelu(model: nn.Module, *, blocks_attr: str = "blocks") -> int:
    """Give every block's ``ffn`` (Linear, GELU(tanh), Linear) the GELU epilogue, in place, where the
    probe passes on the model's device and dtype. Returns the number of blocks changed (0 after one
    log line saying why not)."""
    blocks = getattr(model, blocks_attr, None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"fuse_ffn_gelu: model.{blocks_attr} must be an nn.ModuleList")
    ffns = [b.ffn for b in blocks if _is_tanh_gelu_ffn(getattr(b, "ffn", None))]
    if not ffns:
        return 0
    w = ffns[0][0].weight
    why = probe(str(w.device), w.dtype)
    if why is not None:
        log.info("%s; the FFN runs Linear + GELU", why)
        return 0
    n = 0
    for block in blocks:
        ffn = getattr(block, "ffn", None)
        if _is_tanh_gelu_ffn(ffn) and type(ffn) is not GeluEpilogueFFN:
            block.ffn = GeluEpilogueFFN(*ffn)
            n += 1
    log.info("the FFN's GELU runs in its first GEMM's epilogue (%d blocks)", n)
    return n


# ----------------------------------------------------------------------------- q/k RMSNorm + RoPE in one kernel

if triton is not None:
    @triton.jit
    def _rms_norm_rope_kernel(X, W, C, S, Y, sxr, syr, scb, scl, L, inv_dim, eps,
                              N_PAIRS: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
        """One token row: x (dim) -> RMSNorm over the row, rounded twice in the model's dtype as WanRMSNorm does
        ((x * r).to(dtype) * w), then each head's channel pairs (2i, 2i + 1) rotated by the row's cos / sin."""
        row = tl.program_id(0)
        b = row // L
        t = row % L
        i = tl.arange(0, BLOCK)
        m = i < N_PAIRS
        two = tl.arange(0, 2)
        offs = 2 * i[:, None] + two[None, :]  # (BLOCK, 2): the row's values, read contiguously
        x = tl.load(X + row * sxr + offs, mask=m[:, None], other=0.0).to(tl.float32)
        r = tl.math.rsqrt(tl.sum(tl.sum(x * x, 1), 0) * inv_dim + eps)
        w = tl.load(W + offs, mask=m[:, None], other=0.0).to(tl.float32)
        dt = Y.dtype.element_ty
        y = ((x * r).to(dt).to(tl.float32) * w).to(dt).to(tl.float32)
        ye, yo = tl.split(y)
        j = i % HALF
        c = tl.load(C + b * scb + t * scl + j, mask=m, other=0.0)
        s = tl.load(S + b * scb + t * scl + j, mask=m, other=0.0)
        out = tl.join(ye * c - yo * s, ye * s + yo * c)  # (BLOCK, 2)
        tl.store(Y + row * syr + offs, out.to(dt), mask=m[:, None])


def _rope_strides(cos: torch.Tensor) -> tuple[int, int]:
    """(batch stride, token stride) of a cos/sin table (L, 1, D/2) shared by all rows or (B, L, 1, D/2) per row."""
    if cos.dim() == 3:
        return 0, cos.stride(0)
    return cos.stride(0), cos.stride(1)


@torch.library.custom_op("streamgen::rms_norm_rope", mutates_args=())
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                  heads: int) -> torch.Tensor:
    """``models.wan.norm_rope(x, WanRMSNorm(weight, eps), heads, cos, sin)`` as one Triton kernel: x (B, L, dim)
    fp16/bf16 -> (B, L, heads, dim / heads). On the CPU only under TRITON_INTERPRET=1 (the tests)."""
    b, n, dim = x.shape
    x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty((b, n, heads, dim // heads), device=x.device, dtype=x.dtype)
    scb, scl = _rope_strides(cos)
    n_pairs = dim // 2
    block = triton.next_power_of_2(n_pairs)
    _rms_norm_rope_kernel[(b * n,)](x, weight.to(x.dtype).contiguous(), cos, sin, y, dim, dim, scb, scl, n,
                                    1.0 / dim, eps, N_PAIRS=n_pairs, HALF=dim // heads // 2, BLOCK=block,
                                    num_warps=4 if block <= 1024 else 8)
    return y


@rms_norm_rope.register_fake
def _(x, weight, eps, cos, sin, heads):
    return x.new_empty((*x.shape[:-1], heads, x.shape[-1] // heads))


def fused_norm_rope(x: torch.Tensor, norm: nn.Module, heads: int, cos: torch.Tensor, sin: torch.Tensor):
    """``WanBlock.norm_rope`` after :func:`fuse_norm_rope`: the kernel for a WanRMSNorm on CUDA in fp16/bf16, the
    model's own ``norm_rope`` otherwise."""
    from streamgen.models.wan import WanRMSNorm, norm_rope

    if type(norm) is WanRMSNorm and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.dim() == 3:
        return torch.ops.streamgen.rms_norm_rope(x, norm.weight, norm.eps, cos, sin, heads)
    return norm_rope(x, norm, heads, cos, sin)


@functools.lru_cache(maxsize=None)
def probe_norm_rope(device: str, dtype: torch.dtype) -> str | None:
    """None when the RMSNorm + RoPE kernel runs on ``device`` in ``dtype`` within one rounding step of the model's
    ops; else why it is not used."""
    from streamgen.models.wan import WanRMSNorm, norm_rope, rope_cos_sin

    dev = torch.device(device)
    if triton is None:
        return "the fused RMSNorm + RoPE kernel needs Triton, which is not installed"
    if dev.type != "cuda":
        return f"the fused RMSNorm + RoPE kernel runs on CUDA (device {dev.type})"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"the fused RMSNorm + RoPE kernel is for float16/bfloat16 (dtype {str(dtype).replace('torch.', '')})"
    g = torch.Generator(device=dev).manual_seed(0)
    norm = WanRMSNorm(256, 1e-6).to(dev, dtype)
    x = torch.randn(2, 60, 256, device=dev, generator=g).to(dtype)
    cos, sin = rope_cos_sin(64, (3, 4, 5), 7, dev)
    try:
        out = rms_norm_rope(x, norm.weight, norm.eps, cos, sin, 4).float()
    except Exception as e:  # noqa: BLE001 - a kernel that cannot compile or run is "not available"
        return f"the fused RMSNorm + RoPE kernel failed ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    ref = norm_rope(x, norm, 4, cos, sin).float()
    if not bool(((out - ref).abs() <= ref.abs() * 2.0**-7 + 1e-3).all()):
        return "the fused RMSNorm + RoPE kernel differs from the model's ops by more than one rounding step"
    return None


def fuse_norm_rope(model: nn.Module, *, blocks_attr: str = "blocks") -> int:
    """Give every block with q/k RMSNorm the one-kernel ``norm_rope``, in place, where the probe passes on the
    model's device and dtype. Returns the number of blocks changed (0 after one log line saying why not)."""
    from streamgen.models.wan import WanRMSNorm

    blocks = getattr(model, blocks_attr, None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"fuse_norm_rope: model.{blocks_attr} must be an nn.ModuleList")
    todo = [b for b in blocks if hasattr(b, "norm_rope") and type(getattr(b.self_attn, "norm_q", None)) is WanRMSNorm]
    if not todo:
        return 0
    w = todo[0].self_attn.norm_q.weight
    why = probe_norm_rope(str(w.device), w.dtype)
    if why is not None:
        log.info("%s; q/k RMSNorm and RoPE run as torch ops", why)
        return 0
    for b in todo:
        b.norm_rope = fused_norm_rope
    log.info("q/k RMSNorm + RoPE: one kernel (%d blocks)", len(todo))
    return len(todo)
