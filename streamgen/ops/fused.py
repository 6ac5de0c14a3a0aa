"""Fused kernels applied to a built model from outside (the model files stay plain PyTorch).

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
