"""torch.compile as a transform applied to a built model from outside (the model files stay eager).

``compile_blocks(model)`` wraps each repeated block's ``forward`` in ``torch.compile`` with static
shapes (one graph per chunk shape, reused by every block, step and session of that shape). The
self-attention over the KV cache (``WanCache._attend``) and the attention kernels stay eager behind
graph breaks, so the backend chosen by ``streamgen.ops.attention`` (cuDNN SDPA, flash-attn) is kept.
What compiling buys is the fused elementwise work around the matmuls (LayerNorm, modulation, RoPE,
gated residual adds): 1.5x on the 1.3B chunk path on an H100 (bench/BENCHMARKS.md).

Compilation is detected, not assumed: when ``torch.compile`` is missing or its first use fails,
``compile_blocks`` logs one line and leaves (or puts back) the eager forward.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def compile_blocks(model: nn.Module, *, blocks_attr: str = "blocks", mode: str | None = None,
                   backend="inductor") -> bool:
    """Compile every block of ``getattr(model, blocks_attr)`` in place. Returns False (after one log
    line) when torch.compile is unavailable; True when the blocks were wrapped."""
    blocks = getattr(model, blocks_attr, None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"compile_blocks: model.{blocks_attr} must be a non-empty nn.ModuleList")
    if not hasattr(torch, "compile"):
        log.info("torch.compile is not available in torch %s; running eager", torch.__version__)
        return False
    for block in blocks:
        if getattr(block, "_streamgen_eager_forward", None) is None:
            block._streamgen_eager_forward = block.forward
        block.forward = _with_fallback(block, torch.compile(block._streamgen_eager_forward, dynamic=False,
                                                            mode=mode, backend=backend))
    return True


def uncompile_blocks(model: nn.Module, *, blocks_attr: str = "blocks") -> None:
    """Put the eager forwards back."""
    for block in getattr(model, blocks_attr):
        eager = block.__dict__.pop("_streamgen_eager_forward", None)
        if eager is not None:
            block.__dict__.pop("forward", None)


def _with_fallback(block: nn.Module, compiled):
    """Call ``compiled``; if compiling fails (no C++ compiler, unsupported op), log once, restore the
    eager forward on this block and return the eager result, so a missing toolchain never crashes."""

    def forward(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - torch._dynamo / inductor raise many types
            if not _is_compile_error(e):
                raise
            log.warning("torch.compile failed for %s (%s: %s); running it eager", type(block).__name__,
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            eager = block._streamgen_eager_forward
            block.forward = eager
            return eager(*args, **kwargs)

    return forward


def _is_compile_error(e: Exception) -> bool:
    mod = type(e).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor", "torch.fx")) or "BackendCompilerFailed" in type(e).__name__
