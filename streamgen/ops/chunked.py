"""The DiT blocks' feed-forward run over slices of the tokens, to bound the activation peak.

``handle = chunk_ffn(model, tokens=1170, blocks_attr="blocks")``
    Rewrites a built model in place (house style 4): each block's ``ffn`` (Linear, GELU, Linear)
    becomes a :class:`TokenChunkedFFN` holding the very same submodules (``state_dict`` keys,
    parameters, quantized or offloaded linears unchanged), which runs inputs ``(B, L, dim)`` with
    ``L > tokens`` as slices of at most ``tokens`` tokens written into one preallocated output. The
    hidden activation ``(B, L, ffn_dim)`` (twice: the first Linear's output and the GELU's) then
    peaks at ``tokens`` instead of ``L`` tokens: for Wan2.1-14B at 832x480 (4680 tokens a chunk,
    ffn_dim 13824, bf16) 259 MB -> 65 MB with ``tokens=1170``.

    Each token's output depends on that token only, so slicing changes no value in exact
    arithmetic; in floating point a GEMM of fewer rows may take another kernel. On the CPU in
    float32 (tests/test_chunked.py) slices of a multiple of 8 tokens give the whole FFN's result
    bit for bit; other slice sizes differ within float32 rounding (<= 6e-7 of max|out| measured).
    The planner (streamgen/plan.py) slices by whole latent frames (1560 tokens at 832x480). On
    CUDA, unmeasured. Apply before ``offload`` or after: the hooks sit on the
    linears, which do not change. ``handle.remove()`` puts the original modules back.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["chunk_ffn", "TokenChunkedFFN", "ChunkedFFNHandle"]


class TokenChunkedFFN(nn.Sequential):
    """``nn.Sequential`` over (B, L, C) whose forward takes at most ``tokens`` tokens at a time."""

    def __init__(self, ffn: nn.Sequential, tokens: int):
        super().__init__(*ffn)
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        if n <= self.tokens:
            return super().forward(x)
        first = super().forward(x[:, : self.tokens])
        out = torch.empty((*x.shape[:-1], first.shape[-1]), dtype=first.dtype, device=first.device)  # (B, L, C_out)
        out[:, : self.tokens] = first
        del first
        for a in range(self.tokens, n, self.tokens):
            out[:, a : a + self.tokens] = super().forward(x[:, a : a + self.tokens])
        return out

    def extra_repr(self) -> str:
        return f"tokens={self.tokens}"


class ChunkedFFNHandle:
    def __init__(self, blocks: list[nn.Module], originals: list[nn.Sequential]):
        self._blocks, self._originals = blocks, originals

    def remove(self) -> None:
        if self._blocks is None:
            raise RuntimeError("this chunk_ffn was already removed")
        for b, ffn in zip(self._blocks, self._originals):
            b.ffn = ffn
        self._blocks = self._originals = None


def chunk_ffn(model: nn.Module, tokens: int, *, blocks_attr: str = "blocks") -> ChunkedFFNHandle:
    """Run every block's ``ffn`` over at most ``tokens`` tokens at a time (see the module docstring)."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens={tokens!r} must be an int >= 1 (tokens per FFN slice)")
    blocks = getattr(model, blocks_attr, None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or not all(
        isinstance(getattr(b, "ffn", None), nn.Sequential) for b in blocks
    ):
        raise ValueError(f"blocks_attr={blocks_attr!r} must name the blocks, each with an nn.Sequential `ffn`")
    if any(isinstance(b.ffn, TokenChunkedFFN) for b in blocks):
        raise ValueError("the FFNs are already chunked: call the handle's remove() first")
    originals = [b.ffn for b in blocks]
    for b in blocks:
        b.ffn = TokenChunkedFFN(b.ffn, tokens)
    return ChunkedFFNHandle(list(blocks), originals)
