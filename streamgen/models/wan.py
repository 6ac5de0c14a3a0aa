"""Wan2.1 text-to-video diffusion transformer: full-sequence and block-causal streaming forward.

API summary
-----------
``cfg = WanConfig.preset("wan2.1-t2v-1.3b" | "wan2.1-t2v-14b" | "tiny", **overrides)``

``model = WanModel(cfg)``; ``model.state_dict()`` keys are the original Wan2.1 names
(``patch_embedding.weight``, ``text_embedding.0.weight``, ``time_projection.1.weight``,
``blocks.N.self_attn.q.weight``, ``blocks.N.norm3.weight`` (the cross-attention norm),
``blocks.N.modulation``, ``head.head.weight``, ``head.modulation``, ...). No buffers.

``model(x, t, context, *, frames_per_block=None, local_frames=None, sink_frames=0) -> flow``
    x ``(B, 16, F, H, W)`` latents, t ``(B,)`` or per-frame ``(B, F)`` on 0..1000, context
    ``(B, L, text_dim)`` with ``L <= text_len`` (zero-padded to ``text_len`` *before* the text
    MLP, as original Wan does). Returns the flow prediction, same shape as x, in float32.
    ``frames_per_block=None``: full bidirectional attention (== original Wan / diffusers).
    ``frames_per_block=k``: block-causal reference (bidirectional inside each block of k latent
    frames, causal across blocks), optionally with the rolling window below.

Streaming (one cache per session; one model serves many caches):

``cache = model.new_cache(batch, (h, w), max_frames=21, local_frames=None, sink_frames=0,
dtype=None, device=None)``
    Preallocated, fixed shape: per layer self-attention K (after RoPE, at absolute frame
    positions) and V for ``capacity`` latent frames, and cross-attention K/V of ``text_len``
    tokens. ``(h, w)`` is the latent size (must be divisible by the patch).
    Window semantics (LongLive / Self-Forcing ``local_attn_size``): with ``local_frames=L``
    a chunk ending (exclusive) at frame ``e`` attends to the first ``sink_frames`` frames and to
    the frames ``[e - (L - sink_frames), e)``, so at most ``L`` frames in total including the
    chunk itself; the cache holds exactly ``L`` frames (sink slots + a ring buffer) and streams
    can run forever. Without ``local_frames`` every chunk attends to all earlier frames and the
    cache holds ``max_frames``.

``model.set_prompt(cache, context)``
    Cross-attention K/V of all layers computed once and stored in the cache; reused by every step
    and chunk until called again.

``model.forward_chunk(x, t, cache, *, start_frame=None, update_cache=False) -> flow``
    x ``(B, 16, f, h, w)``: latent frames ``start_frame .. start_frame+f`` (absolute; default
    ``cache.frames_written``). Attends to the cached frames before ``start_frame`` (window
    limited) and, bidirectionally, to itself. The chunk's K/V are written into their slots
    (a tentative write, replaced by the next call at the same position); ``update_cache=True``
    also commits them: ``cache.frames_written`` advances to ``start_frame + f``. The usual loop
    is: N denoising calls with ``update_cache=False`` then one pass on the clean latents
    (t=0) with ``update_cache=True``. ``start_frame`` may not exceed ``frames_written``; a call
    that needs frames the window already evicted raises ``ValueError``. No host syncs.

``model.forward_chunk(x, t, cache, *, start_frame, update_cache=True, blocks=(f1, f2, ...)) -> flow``
    The calls ``forward_chunk`` of each block of ``f1``, ``f2``, ... consecutive frames (sum = f),
    committed one after the other, as one forward (the prompt-switch re-cache: one forward instead of
    one per chunk): norms, projections, FFN and head run over all tokens at once, every block's K/V
    are written to the cache, then block j's queries attend to the cache up to the end of block j
    (one prefix attention call per block: a block-causal mask without a mask). Needs
    ``update_cache=True`` and blocks that each attend to a prefix of the cache that no later block
    overwrites (always true right after ``reset_self_attn`` for frames that fit the cache), else
    ``ValueError``; a KV store that reads back other values than were written (fp8/int8) has each
    block's K/V replaced by their read-back values before the next block attends, as the sequential
    calls would see them. ``WanModel.supports_blocks`` says a model (or wrapper) takes ``blocks``.

``model.forward_rows(x, t, caches, *, start_frames, update_cache) -> flow``
    ``forward_chunk`` of several caches as one batch (the engine's batched step): row group i of x
    is ``caches[i]``'s chunk at ``start_frames[i]``, committed when ``update_cache[i]``. Each row keeps
    its own RoPE position, valid cache length and prompt; attention runs per cache on its own
    buffers, so on the CPU in float32 a row's output is ``forward_chunk``'s for that cache, bit for bit.

``model.new_cache(..., storage=flat)`` carves the cache's buffers out of a 1-D tensor (a slot of a
preallocated pool) instead of allocating them; ``WanCache.numel_for(cfg, batch, (h, w), capacity)``
is its size. ``kv=`` a store factory keeps the self-attention K/V outside the cache (in host
memory, streamed in per layer, and/or fp8/int8: ``streamgen.ops.kvcache``, which passes it in).

``cache.reset_self_attn(start_frame=0)``
    Forget all self-attention K/V; the next committed frames start at ``start_frame`` and the
    sink becomes the first ``sink_frames`` frames from there (prompt-switch re-cache: reset, then
    re-run the last window of clean frames with ``update_cache=True`` under the new prompt).
``cache.frames_written`` (python int), ``cache.prompt_set`` (python bool).

Numerics: the residual stream, LayerNorms, modulation and time embedding run in float32 (as
original Wan; the time MLPs read their ``.weight``/``.bias`` upcast to float32); linear layers,
attention and the caches run in ``model.dtype`` (the patch embedding's dtype), so a transform that
swaps Linear layers (fp8/int8) must accept inputs of that dtype. ``t`` may be a python float.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


__all__ = ["WanConfig", "WanModel", "WanCache", "PRESETS", "rope_split", "sdpa"]

AttnFn = Callable[..., torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The model's default attention: PyTorch SDPA on ``(B, L, heads, head_dim)`` tensors, returns
    ``(B, Lq, heads, head_dim)``; ``attn_mask`` is bool (True = attend). ``WanModel.attention`` holds
    the function every attention call of the model goes through; ``streamgen.ops.attention.use_backend``
    swaps it for a detected kernel (flash-attn) from outside."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    return out.transpose(1, 2)


@dataclass(frozen=True)
class WanConfig:
    """Wan2.1 DiT hyper-parameters (field names as in Wan2.1's own config) + streaming defaults."""

    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    num_heads: int = 12
    num_layers: int = 30
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    # streaming defaults (used by the sampling loop, not by the weights)
    frames_per_chunk: int = 3
    local_frames: int | None = None
    sink_frames: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")
        d = self.head_dim
        if d % 2 or d < 6:
            raise ValueError(f"head_dim={d} must be even and >= 6 for Wan's 3D RoPE split")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim={self.freq_dim} must be even")
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries, got {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> "WanConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown Wan preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, WanConfig] = {
    "wan2.1-t2v-1.3b": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "tiny": WanConfig(dim=128, ffn_dim=384, num_heads=2, num_layers=3, text_dim=32),
}


# ----------------------------------------------------------------------------- helpers


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Real channels of each head given to the (frame, height, width) rotary axes, as in Wan."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _float_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def rope_cos_sin(
    head_dim: int, grid: tuple[int, int, int], start_frame: int, device: torch.device, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(f*h*w, 1, head_dim/2)`` float32 for tokens of a (f, h, w) grid whose first frame
    sits at absolute position ``start_frame``. Angles are computed in float64 (Wan does the same)."""
    f, h, w = grid
    fd = _float_dtype(device)
    angles = []
    for n, (lo, count) in zip(rope_split(head_dim), ((start_frame, f), (0, h), (0, w))):
        inv_freq = 1.0 / theta ** (torch.arange(0, n, 2, device=device, dtype=fd) / n)
        pos = torch.arange(lo, lo + count, device=device, dtype=fd)
        angles.append(torch.outer(pos, inv_freq))  # (count, n/2)
    af, ah, aw = angles
    ang = torch.cat(
        [
            af.view(f, 1, 1, -1).expand(f, h, w, -1),
            ah.view(1, h, 1, -1).expand(f, h, w, -1),
            aw.view(1, 1, w, -1).expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, head_dim // 2)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of ``x`` (B, L, H, D) as complex numbers; computed in float32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, H, D/2) each
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def norm_rope(x: torch.Tensor, norm: nn.Module, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """A q or k projection ``x`` (B, L, dim) normed (``WanRMSNorm`` over all heads, or Identity), split into
    ``heads`` and rotated (``apply_rope``): (B, L, heads, dim / heads). ``WanBlock.norm_rope`` is this function
    unless ``streamgen.ops.fused.fuse_norm_rope`` gave the block its one-kernel version."""
    return apply_rope(norm(x).unflatten(-1, (heads, -1)), cos, sin)


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding: [cos, sin] of t * 10000^(-i/half), computed in float64 -> float32."""
    half = dim // 2
    fd = _float_dtype(t.device)
    pos = t.to(fd)
    freqs = torch.pow(10000.0, -torch.arange(half, device=t.device, dtype=fd) / half)
    arg = torch.outer(pos, freqs)
    return torch.cat([arg.cos(), arg.sin()], dim=1).float()


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, L, C) float32; shift/scale (B, Fe, C) with L = Fe * tokens_per_frame."""
    b, n, c = x.shape
    fe = shift.shape[1]
    xv = x.view(b, fe, n // fe, c)  # (B, Fe, T, C)
    return (xv * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)).view(b, n, c)


def _gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    fe = gate.shape[1]
    return x + (y.float().view(b, fe, n // fe, c) * gate.unsqueeze(2)).view(b, n, c)


def _linear_f32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


# ----------------------------------------------------------------------------- modules


class WanRMSNorm(nn.Module):
    """RMSNorm over the full projection width (all heads together), affine weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight.to(x.dtype)


class WanLayerNorm(nn.Module):
    """LayerNorm computed in float32, optional affine (Wan's ``norm3`` when ``cross_attn_norm``)."""

    def __init__(self, dim: int, eps: float, affine: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), (x.shape[-1],), w, b, self.eps)


class WanAttention(nn.Module):
    """Projections of one attention layer (q, k, v, o + q/k RMSNorm); attention itself is done by
    the caller so that self-attention can be full, block-causal or cached."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))  # (B, L, H, D)

    def key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))  # (B, L, H, D)
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        return k, v

    def out(self, a: torch.Tensor) -> torch.Tensor:
        return self.o(a.flatten(2))


SelfAttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.eps = cfg.eps
        self.self_attn = WanAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = WanLayerNorm(dim, cfg.eps, affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.norm_rope = norm_rope  # the q/k RMSNorm + RoPE (ops.fused.fuse_norm_rope: one kernel on CUDA)

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        self_attn_fn: SelfAttnFn,
        ctx_kv: tuple[torch.Tensor, torch.Tensor],
        dt: torch.dtype,
        attn: AttnFn = sdpa,
    ) -> torch.Tensor:
        """x (B, L, dim) float32 residual; e0 (B, Fe, 6, dim) float32; rope cos/sin (L, 1, D/2) or
        per row (B, L, 1, D/2); ctx_kv: the text K/V (B, text_len, H, D) each, or a function q -> the
        cross-attention output; dt: compute dtype of the linear layers' inputs. Returns the new residual."""
        mod = self.modulation.float().unsqueeze(0) + e0  # (B, Fe, 6, dim)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(2)  # (B, Fe, dim) each

        # 1. self-attention
        y = _modulate(_layer_norm(x, self.eps), shift1, scale1).to(dt)
        sa = self.self_attn
        q = self.norm_rope(sa.q(y), sa.norm_q, sa.num_heads, *rope)
        k = self.norm_rope(sa.k(y), sa.norm_k, sa.num_heads, *rope)
        v = sa.v(y).unflatten(-1, (sa.num_heads, -1))
        x = _gated_add(x, self.self_attn.out(self_attn_fn(q, k, v)), gate1)

        # 2. cross-attention (text K/V given)
        q = self.cross_attn.query(self.norm3(x).to(dt))
        a = ctx_kv(q) if callable(ctx_kv) else attn(q, *ctx_kv)  # a callable: per-row text K/V (forward_rows)
        x = x + self.cross_attn.out(a).float()

        # 3. feed-forward
        y = _modulate(_layer_norm(x, self.eps), shift2, scale2).to(dt)
        return _gated_add(x, self.ffn(y), gate2)


class WanHead(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        """x (B, L, dim) float32, e (B, Fe, dim) float32 -> (B, L, prod(patch) * out_dim)."""
        mod = self.modulation.float().unsqueeze(0) + e.unsqueeze(2)  # (B, Fe, 2, dim)
        shift, scale = mod.unbind(2)
        y = _modulate(_layer_norm(x, self.eps), shift, scale)
        return self.head(y.to(dt))


# ----------------------------------------------------------------------------- cache


@dataclass
class _ChunkPlan:
    """Python-int bookkeeping for one forward_chunk call (computed before any kernel runs)."""

    rel_start: int
    rel_end: int
    write: list[tuple[int, int, int]]  # (slot token start, chunk token start, n tokens)
    n_prefix_keys: int | None  # attend to buffer[:, :n] (the fast path), or None
    key_slots: list[tuple[int, int]] = field(default_factory=list)  # valid slot ranges (masked path)
    concat_chunk: bool = False  # masked path: chunk K/V not written, appended to the buffer
    commit: bool = False
    # forward_chunk(blocks=...): per block (query token start, end, prefix keys, its writes (slot token start, n))
    blocks: list[tuple[int, int, int, list[tuple[int, int]]]] = field(default_factory=list)


class WanCache:
    """Per-session streaming state of a WanModel: self-attention K/V ring + cross-attention K/V.

    Buffers: ``k``/``v`` ``(num_layers, B, capacity * T, H, D)`` with ``T`` tokens per latent
    frame, ``cross_k``/``cross_v`` ``(num_layers, B, text_len, H, D)``. Slot of frame ``j``
    (relative to ``origin``): ``j`` for the sink frames, else ``sink + (j - sink) % ring``.
    Create with :meth:`WanModel.new_cache`.
    """

    def __init__(
        self,
        cfg: WanConfig,
        batch: int,
        latent_hw: tuple[int, int],
        *,
        max_frames: int,
        local_frames: int | None,
        sink_frames: int,
        dtype: torch.dtype,
        device: torch.device | str,
        storage: torch.Tensor | None = None,
        kv: Callable | None = None,
    ):
        pt, ph, pw = cfg.patch_size
        h, w = latent_hw
        if pt != 1:
            raise ValueError(f"streaming needs a temporal patch of 1, got patch_size={cfg.patch_size}")
        if h % ph or w % pw:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch {ph}x{pw}")
        if local_frames is None:
            if max_frames < 1:
                raise ValueError(f"max_frames must be >= 1, got {max_frames}")
            if sink_frames:
                raise ValueError("sink_frames only makes sense with a rolling window (local_frames)")
            capacity, sink = max_frames, 0
        else:
            if not 0 <= sink_frames < local_frames:
                raise ValueError(
                    f"need 0 <= sink_frames < local_frames, got sink_frames={sink_frames}, local_frames={local_frames}"
                )
            capacity, sink = local_frames, sink_frames
        self.cfg = cfg
        self.batch = batch
        self.latent_hw = (h, w)
        self.grid_hw = (h // ph, w // pw)
        self.tokens_per_frame = (h // ph) * (w // pw)
        self.local_frames = local_frames
        self.sink_frames = sink
        self.capacity = capacity
        self.ring = capacity - sink
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (cfg.num_layers, batch, capacity * self.tokens_per_frame, cfg.num_heads, cfg.head_dim)
        cshape = (cfg.num_layers, batch, cfg.text_len, cfg.num_heads, cfg.head_dim)
        # kv: a store that keeps the self-attention K/V elsewhere (streamgen.ops.kvcache: host memory,
        # fp8/int8); called (shape, dtype, device), it has .k/.v (its storage), load(layer) -> (kb, vb)
        # in ``dtype`` on ``device`` and store(layer, plan, kb, vb) after the chunk's writes into kb/vb;
        # a lossy one also reread(layer, kb, vb, [(token start, n)]): those stored ranges back into kb/vb
        self._kv = None if kv is None else kv(shape, dtype, self.device)
        if self._kv is not None:
            self.k, self.v = self._kv.k, self._kv.v
        if storage is None:
            if self._kv is None:
                self.k, self.v = (torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(2))
            self.cross_k, self.cross_v = (torch.zeros(cshape, dtype=dtype, device=self.device) for _ in range(2))
        else:  # views into a slot of a preallocated pool (streamgen.engine.pool): no allocation here
            n, nc = (0 if self._kv is not None else math.prod(shape)), math.prod(cshape)
            if storage.dim() != 1 or storage.dtype != dtype or storage.numel() < 2 * (n + nc):
                raise ValueError(f"cache storage must be a 1-D {dtype} tensor of >= {2 * (n + nc)} elements, got "
                                 f"{tuple(storage.shape)} {storage.dtype}")
            flat = storage[: 2 * (n + nc)]
            flat.zero_()  # a reused slot holds the last session's K/V; masked keys must be finite
            if self._kv is None:
                self.k, self.v = flat[:n].view(shape), flat[n : 2 * n].view(shape)
            self.cross_k, self.cross_v = flat[2 * n : 2 * n + nc].view(cshape), flat[2 * n + nc :].view(cshape)
        self.prompt_set = False
        self.origin = 0
        self.frames_written = 0
        self._ring_end = 0  # relative end of the newest frame ever written since the last reset

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.cross_k, self.cross_v))

    @staticmethod
    def numel_for(cfg: WanConfig, batch: int, latent_hw: tuple[int, int], capacity: int) -> int:
        """Elements of the ``storage`` a cache of this geometry takes (K, V, cross K, cross V), so
        that memory can be reserved before the cache exists; bytes = this * dtype size."""
        _, ph, pw = cfg.patch_size
        tokens = (latent_hw[0] // ph) * (latent_hw[1] // pw)
        per = cfg.num_layers * batch * cfg.num_heads * cfg.head_dim
        return 2 * per * (capacity * tokens + cfg.text_len)

    def reset_self_attn(self, start_frame: int = 0) -> None:
        """Drop all self-attention K/V; the next frame committed is ``start_frame`` (absolute)."""
        self.origin = int(start_frame)
        self.frames_written = int(start_frame)
        self._ring_end = 0

    def _slot(self, j: int) -> int:
        s = self.sink_frames
        return j if j < s else s + (j - s) % self.ring

    def _slot_runs(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """Relative frames [lo, hi) -> contiguous runs (slot start, frame start, n frames)."""
        runs: list[tuple[int, int, int]] = []
        j = lo
        while j < hi:
            slot = self._slot(j)
            end_slot = self.sink_frames if j < self.sink_frames else self.capacity
            n = min(hi - j, end_slot - slot)
            runs.append((slot, j, n))
            j += n
        return runs

    def _plan(self, start_frame: int, f: int, update_cache: bool) -> _ChunkPlan:
        T, S, R = self.tokens_per_frame, self.sink_frames, self.ring
        rs = start_frame - self.origin
        re = rs + f
        fw = self.frames_written - self.origin
        if rs < 0:
            raise ValueError(f"start_frame={start_frame} is before the cache origin {self.origin}")
        if rs > fw:
            raise ValueError(
                f"start_frame={start_frame} is past cache.frames_written={self.frames_written}: "
                "commit the frames before it first (update_cache=True)"
            )
        if self.local_frames is None and re > self.capacity:
            raise ValueError(
                f"chunk ends at frame {start_frame + f} but the cache holds max_frames={self.capacity}; "
                "create the cache with a larger max_frames or a rolling window (local_frames)"
            )
        if f > R:
            raise ValueError(f"a chunk of {f} frames does not fit the window of {R} non-sink frames")
        # past frames this chunk needs: sink [0, min(S, rs)) and recent [lo, rs)
        lo = max(S, re - R)
        if lo < rs and lo < self._ring_end - R:
            raise ValueError(
                f"chunk at frames {start_frame}..{start_frame + f} needs frame {lo + self.origin}, "
                "which the rolling window already evicted"
            )
        plan = _ChunkPlan(rel_start=rs, rel_end=re, write=[], n_prefix_keys=None, commit=update_cache)
        sink_hi = min(S, re)
        if update_cache or rs >= fw:
            plan.write = [(slot * T, (j - rs) * T, n * T) for slot, j, n in self._slot_runs(rs, re)]
            if re >= self._ring_end:
                # the buffer then holds exactly the key set, as its first min(re, capacity) slots
                plan.n_prefix_keys = min(re, self.capacity) * T
            else:
                plan.key_slots = self._frame_ranges_to_slots([(0, sink_hi), (max(lo, sink_hi), re)])
                if len(plan.key_slots) == 1 and plan.key_slots[0][0] == 0:
                    plan.n_prefix_keys = plan.key_slots[0][1]
        else:
            plan.concat_chunk = True
            plan.key_slots = self._frame_ranges_to_slots([(0, min(S, rs)), (max(lo, min(S, rs)), rs)])
        return plan

    def _plan_call(self, start_frame: int, f: int, update_cache: bool, blocks) -> _ChunkPlan:
        """The plan of ``forward_chunk(x of f frames, start_frame, update_cache, blocks)``."""
        if blocks is not None:
            blocks = tuple(int(n) for n in blocks)
            if sum(blocks) != f or any(n < 1 for n in blocks):
                raise ValueError(f"blocks={blocks} must be positive frame counts summing to the chunk's {f} frames")
            if len(blocks) > 1:
                return self._plan_blocks(start_frame, blocks, update_cache)
        return self._plan(start_frame, f, update_cache)

    def _plan_blocks(self, start_frame: int, blocks: tuple[int, ...], update_cache: bool) -> _ChunkPlan:
        """One plan for ``forward_chunk(blocks=...)``: the plans of the committing calls of each block in
        turn (the cache's bookkeeping left as it was), merged: all blocks' writes, the last block's
        commit, and per block its queries' token range and prefix of keys. Raises ``ValueError`` where
        one forward cannot equal the sequential calls (a block on the masked path, or a later block
        writing into an earlier block's keys: a wrapped ring)."""
        if not update_cache:
            raise ValueError("forward_chunk(blocks=...) commits every block: it needs update_cache=True")
        T = self.tokens_per_frame
        saved = (self.frames_written, self._ring_end)
        plans, s = [], int(start_frame)
        try:
            for n in blocks:
                p = self._plan(s, n, True)
                self._commit(p)
                plans.append((s, p))
                s += n
        finally:
            self.frames_written, self._ring_end = saved
        for j, (_, p) in enumerate(plans):
            if p.n_prefix_keys is None or any(dst < p.n_prefix_keys for _, q in plans[j + 1 :] for dst, _, _ in q.write):
                raise ValueError(f"blocks {tuple(blocks)} at frame {start_frame}: block {j} cannot attend to a prefix "
                                 "of the cache in one forward (masked path or a wrapped ring); run them one by one")
        plan = _ChunkPlan(rel_start=plans[0][1].rel_start, rel_end=plans[-1][1].rel_end, write=[],
                          n_prefix_keys=plans[-1][1].n_prefix_keys, commit=True)
        for s, p in plans:
            off = (s - int(start_frame)) * T  # the block's first token within the call's tokens
            plan.write += [(dst, src + off, n) for dst, src, n in p.write]
            plan.blocks.append((off, off + (p.rel_end - p.rel_start) * T, p.n_prefix_keys,
                                [(dst, n) for dst, _, n in p.write]))
        return plan

    def _frame_ranges_to_slots(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        T = self.tokens_per_frame
        runs = sorted((slot, slot + n) for a, b in ranges for slot, _, n in self._slot_runs(a, b))
        merged: list[list[int]] = []
        for a, b in runs:
            if merged and merged[-1][1] == a:
                merged[-1][1] = b
            else:
                merged.append([a, b])
        return [(a * T, b * T) for a, b in merged]

    def _key_mask(self, plan: _ChunkPlan, n_chunk: int) -> torch.Tensor:
        """Bool key-validity mask (1, 1, 1, Lk) for the (rare) masked path, built on device."""
        n_buf = self.capacity * self.tokens_per_frame
        idx = torch.arange(n_buf, device=self.device)
        mask = torch.zeros(n_buf, dtype=torch.bool, device=self.device)
        for a, b in plan.key_slots:
            mask |= (idx >= a) & (idx < b)
        if plan.concat_chunk:
            mask = torch.cat([mask, torch.ones(n_chunk, dtype=torch.bool, device=self.device)])
        return mask.view(1, 1, 1, -1)

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: _ChunkPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """This call's K/V written into the layer's buffers (and its store); returns the buffers."""
        kb, vb = (self.k[layer], self.v[layer]) if self._kv is None else self._kv.load(layer)  # (B, capacity*T, H, D)
        for dst, src, n in plan.write:
            kb[:, dst : dst + n] = k[:, src : src + n]
            vb[:, dst : dst + n] = v[:, src : src + n]
        if self._kv is not None:
            self._kv.store(layer, plan, kb, vb)
        return kb, vb

    @torch.compiler.disable  # cache writes + the attention kernel stay eager under a compiled block
    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _ChunkPlan, mask,
                attn: AttnFn = sdpa):
        kb, vb = self._write(layer, k, v, plan)
        if plan.blocks:
            reread = getattr(self._kv, "reread", None)  # a lossy store: later blocks see what it keeps
            outs = []
            for a, b, n, writes in plan.blocks:
                outs.append(attn(q[:, a:b], kb[:, :n], vb[:, :n]))
                if reread is not None:
                    reread(layer, kb, vb, writes)
            return torch.cat(outs, dim=1)
        if plan.n_prefix_keys is not None:
            n = plan.n_prefix_keys
            return attn(q, kb[:, :n], vb[:, :n])
        if plan.concat_chunk:
            kb, vb = torch.cat([kb, k.to(kb.dtype)], dim=1), torch.cat([vb, v.to(vb.dtype)], dim=1)
        return attn(q, kb, vb, attn_mask=mask)

    def _commit(self, plan: _ChunkPlan) -> None:
        if plan.write:
            self._ring_end = max(self._ring_end, plan.rel_end)
        if plan.commit:
            self.frames_written = max(self.frames_written, plan.rel_end + self.origin)


# ----------------------------------------------------------------------------- model


class WanModel(nn.Module):
    """Wan2.1 T2V DiT (same function as Wan2.1 ``WanModel`` and diffusers ``WanTransformer3DModel``)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = WanHead(cfg)
        self.attention: AttnFn = sdpa  # every attention call; swapped by streamgen.ops.attention.use_backend

    supports_blocks = True  # forward_chunk(..., blocks=...): several committed blocks in one forward

    # -- pieces shared by the full and the chunk forward

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (of linear-layer inputs, attention and caches): the patch embedding's."""
        return self.patch_embedding.weight.dtype

    def _patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        pt, ph, pw = self.cfg.patch_size
        b, c, f, h, w = x.shape
        if c != self.cfg.in_dim:
            raise ValueError(f"latents have {c} channels, the model expects in_dim={self.cfg.in_dim}")
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent shape (F, H, W)=({f}, {h}, {w}) is not divisible by patch {self.cfg.patch_size}")
        y = self.patch_embedding(x.to(self.dtype))  # (B, dim, f, h, w)
        grid = tuple(y.shape[2:])
        return y.flatten(2).transpose(1, 2).float(), grid  # (B, f*h*w, dim)

    def _unpatchify(self, y: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        pt, ph, pw = self.cfg.patch_size
        f, h, w = grid
        b = y.shape[0]
        y = y.float().view(b, f, h, w, pt, ph, pw, self.cfg.out_dim)
        y = y.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, f, pt, h, ph, w, pw)
        return y.reshape(b, self.cfg.out_dim, f * pt, h * ph, w * pw)

    def _time(self, t: torch.Tensor, batch: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B,) / scalar / (B, frames) -> e (B, Fe, dim), e0 (B, Fe, 6, dim), float32; Fe in {1, frames}."""
        device = self.patch_embedding.weight.device
        if not isinstance(t, torch.Tensor):
            t = torch.full((batch,), float(t), device=device)
        t = t.to(device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim == 1:
            if t.shape[0] != batch:
                raise ValueError(f"t has shape {tuple(t.shape)}, expected ({batch},) or ({batch}, {frames})")
            t = t[:, None]
        elif t.shape != (batch, frames):
            raise ValueError(f"t has shape {tuple(t.shape)}, expected ({batch},) or ({batch}, {frames})")
        fe = t.shape[1]
        s = sinusoidal_embedding(self.cfg.freq_dim, t.reshape(-1))  # (B*Fe, freq_dim)
        e = _linear_f32(self.time_embedding[2], F.silu(_linear_f32(self.time_embedding[0], s)))
        e0 = _linear_f32(self.time_projection[1], F.silu(e))  # (B*Fe, 6*dim)
        return e.view(batch, fe, -1), e0.view(batch, fe, 6, -1)

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """(B, L<=text_len, text_dim) -> (B, text_len, dim); zero-padded to text_len before the MLP."""
        b, n, c = context.shape
        if c != self.cfg.text_dim:
            raise ValueError(f"context has width {c}, the model expects text_dim={self.cfg.text_dim}")
        if n > self.cfg.text_len:
            raise ValueError(f"context has {n} tokens, more than text_len={self.cfg.text_len}")
        context = context.to(self.dtype)
        if n < self.cfg.text_len:
            context = F.pad(context, (0, 0, 0, self.cfg.text_len - n))
        return self.text_embedding(context)

    def _rope(self, grid: tuple[int, int, int], start_frame: int, device: torch.device):
        return rope_cos_sin(self.cfg.head_dim, grid, start_frame, device)

    # -- full-sequence forward

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        *,
        frames_per_block: int | None = None,
        local_frames: int | None = None,
        sink_frames: int = 0,
    ) -> torch.Tensor:
        b = x.shape[0]
        tokens, grid = self._patchify(x)
        e, e0 = self._time(t, b, grid[0])
        ctx = self.embed_text(context)
        rope = self._rope(grid, 0, x.device)
        if frames_per_block is None:
            if local_frames is not None:
                raise ValueError("local_frames needs frames_per_block (the window is block-causal)")
            self_attn: SelfAttnFn = self.attention
        else:
            tpf = grid[1] * grid[2]
            self_attn = lambda q, k, v: _block_causal_attention(  # noqa: E731
                q, k, v, tpf, grid[0], frames_per_block, local_frames, sink_frames, self.attention
            )
        for block in self.blocks:
            ctx_kv = block.cross_attn.key_value(ctx)
            tokens = block(tokens, e0, rope, self_attn, ctx_kv, self.dtype, self.attention)
        return self._unpatchify(self.head(tokens, e, self.dtype), grid)

    # -- streaming

    def new_cache(
        self,
        batch: int,
        latent_hw: tuple[int, int],
        *,
        max_frames: int = 21,
        local_frames: int | None = None,
        sink_frames: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        storage: torch.Tensor | None = None,
        kv: Callable | None = None,
    ) -> WanCache:
        return WanCache(
            self.cfg,
            batch,
            latent_hw,
            max_frames=max_frames,
            local_frames=local_frames,
            sink_frames=sink_frames,
            dtype=dtype or self.dtype,
            device=device if device is not None else self.patch_embedding.weight.device,
            storage=storage,
            kv=kv,
        )

    @torch.no_grad()
    def set_prompt(self, cache: WanCache, context: torch.Tensor) -> None:
        """Compute every layer's cross-attention K/V for ``context`` (B, L, text_dim) into the cache."""
        if context.shape[0] != cache.batch:
            raise ValueError(f"context batch {context.shape[0]} != cache batch {cache.batch}")
        ctx = self.embed_text(context.to(cache.device))
        for i, block in enumerate(self.blocks):
            k, v = block.cross_attn.key_value(ctx)
            cache.cross_k[i].copy_(k)
            cache.cross_v[i].copy_(v)
        cache.prompt_set = True

    @torch.no_grad()
    def forward_chunk(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cache: WanCache,
        *,
        start_frame: int | None = None,
        update_cache: bool = False,
        blocks: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """See the module docstring; ``blocks``: frame counts of consecutive committed blocks (sum = f)."""
        b, _, f, h, w = x.shape
        if (h, w) != cache.latent_hw or b != cache.batch:
            raise ValueError(
                f"chunk (B={b}, h={h}, w={w}) does not match the cache (B={cache.batch}, hw={cache.latent_hw})"
            )
        if not cache.prompt_set:
            raise ValueError("no prompt in this cache: call model.set_prompt(cache, context) first")
        if start_frame is None:
            start_frame = cache.frames_written
        plan = cache._plan_call(int(start_frame), f, update_cache, blocks)
        tokens, grid = self._patchify(x)
        e, e0 = self._time(t, b, f)
        rope = self._rope(grid, int(start_frame), x.device)
        mask = None if plan.n_prefix_keys is not None else cache._key_mask(plan, tokens.shape[1])
        for i, block in enumerate(self.blocks):
            self_attn = functools.partial(cache._attend, i, plan=plan, mask=mask, attn=self.attention)
            tokens = block(tokens, e0, rope, self_attn, (cache.cross_k[i], cache.cross_v[i]), self.dtype,
                           self.attention)
        cache._commit(plan)
        return self._unpatchify(self.head(tokens, e, self.dtype), grid)

    @torch.no_grad()
    def forward_rows(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        caches: list[WanCache],
        *,
        start_frames: list[int],
        update_cache: list[bool],
    ) -> torch.Tensor:
        """``forward_chunk`` of several caches in one batch: the rows of x (B, 16, f, h, w) are the
        caches' chunks in order (``caches[i].batch`` rows each, sum = B), t (B,) their timesteps.
        Every cache keeps its own absolute position (``start_frames[i]``: RoPE per row), valid cache
        length, window and prompt, and commits when ``update_cache[i]``. The linear layers, norms and
        FFN run once over all rows; attention runs per cache over its own buffers (``_Rows``). On the
        CPU in float32 each row's result equals ``forward_chunk`` of that cache alone, bit for bit
        (tests/test_batched.py); with one cache this *is* ``forward_chunk``."""
        if len(caches) == 1:
            return self.forward_chunk(x, t, caches[0], start_frame=start_frames[0], update_cache=update_cache[0])
        b, _, f, h, w = x.shape
        sizes = [c.batch for c in caches]
        if not len(caches) == len(start_frames) == len(update_cache):
            raise ValueError(f"{len(caches)} caches, {len(start_frames)} start_frames, {len(update_cache)} update_cache")
        if sum(sizes) != b:
            raise ValueError(f"x has {b} rows, the caches hold {sum(sizes)}")
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("a cache appears twice in one forward_rows call")
        for c in caches:
            if (h, w) != c.latent_hw:
                raise ValueError(f"chunk (h={h}, w={w}) does not match a cache (hw={c.latent_hw})")
            if not c.prompt_set:
                raise ValueError("no prompt in this cache: call model.set_prompt(cache, context) first")
        t = t.to(self.patch_embedding.weight.device).reshape(b)
        plans = [c._plan(int(s), f, u) for c, s, u in zip(caches, start_frames, update_cache)]
        # 1. per row where the kernel would see a different batch size than alone: the patch
        #    convolution and the time MLP (M = 1 rows takes another GEMM path than M = B)
        parts = [self._patchify(x[i : i + 1]) for i in range(b)]
        tokens, grid = torch.cat([p[0] for p in parts]), parts[0][1]  # (B, f*h*w, dim)
        times = [self._time(t[i : i + 1], 1, f) for i in range(b)]
        e, e0 = torch.cat([p[0] for p in times]), torch.cat([p[1] for p in times])
        # 2. RoPE at each row's own absolute frames: cos/sin (B, f*h*w, 1, D/2)
        ropes = {s: self._rope(grid, int(s), x.device) for s in set(start_frames)}
        rows = [ropes[s] for s, n in zip(start_frames, sizes) for _ in range(n)]
        rope = (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))
        n_tok = tokens.shape[1]
        masks = [None if p.n_prefix_keys is not None else c._key_mask(p, n_tok) for c, p in zip(caches, plans)]
        att = _Rows(caches, plans, masks, sizes, self.attention)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, e0, rope, functools.partial(att.self_attn, i), functools.partial(att.cross_attn, i),
                           self.dtype, self.attention)
        for c, p in zip(caches, plans):
            c._commit(p)
        return self._unpatchify(self.head(tokens, e, self.dtype), grid)


class _Rows:
    """Attention of a batch whose row groups belong to different caches (``WanModel.forward_rows``):
    row group i (``sizes[i]`` rows) attends over ``caches[i]`` only, with that cache's own plan (slots,
    valid length, mask). Each group runs the very call ``forward_chunk`` makes for that cache alone,
    on views of its own cache slot, so nothing is gathered and a row's result does not depend on the
    rows beside it."""

    def __init__(self, caches, plans, masks, sizes, attn: AttnFn):
        self.caches, self.plans, self.masks, self.attn = caches, plans, masks, attn
        self.bounds = list(itertools.accumulate(sizes, initial=0))

    def _rows(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x[self.bounds[i] : self.bounds[i + 1]]

    @torch.compiler.disable
    def self_attn(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([c._attend(layer, self._rows(q, i), self._rows(k, i), self._rows(v, i), p, m, self.attn)
                          for i, (c, p, m) in enumerate(zip(self.caches, self.plans, self.masks))])

    @torch.compiler.disable
    def cross_attn(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.attn(self._rows(q, i), c.cross_k[layer], c.cross_v[layer])
                          for i, c in enumerate(self.caches)])


def _block_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tokens_per_frame: int,
    frames: int,
    frames_per_block: int,
    local_frames: int | None,
    sink_frames: int,
    attn: AttnFn = sdpa,
) -> torch.Tensor:
    """Reference block-causal attention, one SDPA call per block (no dense mask).

    Block [s, e) attends to frames [0, e), or with a window to [0, sink) + [e - (local - sink), e)."""
    if frames_per_block < 1:
        raise ValueError(f"frames_per_block must be >= 1, got {frames_per_block}")
    if local_frames is not None and not 0 <= sink_frames < local_frames:
        raise ValueError(f"need 0 <= sink_frames < local_frames, got {sink_frames}, {local_frames}")
    T = tokens_per_frame
    outs = []
    for s in range(0, frames, frames_per_block):
        e = min(frames, s + frames_per_block)
        lo = 0 if local_frames is None else max(sink_frames, e - (local_frames - sink_frames))
        sink_hi = min(sink_frames, e) if local_frames is not None else 0
        if local_frames is not None and e - s > local_frames - sink_frames:
            raise ValueError(f"a block of {e - s} frames does not fit the window of {local_frames - sink_frames} frames")
        if lo <= sink_hi:
            kk, vv = k[:, : e * T], v[:, : e * T]
        else:
            kk = torch.cat([k[:, : sink_hi * T], k[:, lo * T : e * T]], dim=1)
            vv = torch.cat([v[:, : sink_hi * T], v[:, lo * T : e * T]], dim=1)
        outs.append(attn(q[:, s * T : e * T], kk, vv))
    return torch.cat(outs, dim=1)
