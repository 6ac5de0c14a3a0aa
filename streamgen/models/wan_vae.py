"""Wan2.1 causal 3D VAE with a per-session causal-conv cache for chunked streaming decode.

Contract (CONTRACTS.md, "Decoders + text"):

    cfg = WanVAEConfig.preset("wan2.1")          # or "tiny" (same code path, small widths)
    vae = load_wan_vae(path, cfg, device=..., dtype=...)   # or WanVAE(cfg) + load_state_dict
    state = vae.new_state()                      # one per stream/session; the model is shared
    frames = vae.decode_chunk(latents, state)    # latents (B,16,f,h,w), normalized (DiT) space
                                                 # -> (B,3,T,8h,8w) in [-1,1] (clamped)
                                                 # T = 1+4(f-1) on the first chunk, 4f afterwards
    vae.decode_impl = "auto"                     # | "fast" | "reference"; auto = fast on CUDA
    z = vae.encode(video)                        # (B,3,1+4k,H,W) in [-1,1] -> (B,16,1+k,H/8,W/8), normalized

"Normalized" latents are ``(z - latents_mean) / latents_std`` with the 16 published
per-channel Wan2.1 statistics; ``decode_chunk`` undoes it, ``encode`` applies it (and
returns the posterior mean, as Wan and diffusers' ``latent_dist.mode()`` do).

Streaming equals decoding the whole latent video in one call, which equals the reference
(Wan2.1 / diffusers ``AutoencoderKLWan``: one latent frame per decoder call with the
``feat_cache`` list). The cache semantics, restated from those implementations:

* every temporal-kernel-3 causal conv keeps the last 2 frames of its input; a fresh cache is
  zeros, which is exactly the causal zero padding of the whole-video conv;
* the decoder's temporal upsamplers (``upsample3d``) pass the very first frame of the stream
  through without their time conv (1 latent -> 1 frame); later frames go through the time
  conv whose history starts (as zeros) at the second frame -> 2 frames each;
* the encoder's temporal downsamplers (``downsample3d``, kernel 3, stride 2) pass the first
  frame through and then see ``(previous last frame, new frames)``.

Cache buffers live in ``WanVAEState`` (fixed shape per conv, allocated on first use and then
written in place with ``copy_``); ``state.reset()`` zeros them for reuse by a new stream of
the same shape.

Checkpoints: native parameter names are the original ``Wan2.1_VAE.pth`` names
(``encoder.conv1``, ``encoder.downsamples.N.residual.2``, ``decoder.upsamples.N.time_conv``,
top-level ``conv1``/``conv2``). ``convert_wan_vae_state_dict`` reads that layout and the
diffusers ``AutoencoderKLWan`` layout (``conv_in``, ``down_blocks``, ``up_blocks.i.resnets.j``,
``quant_conv``...); ``to_diffusers_state_dict`` goes the other way. Both use one key table
derived from the config, and fail with the missing / unexpected / mis-shaped keys.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from streamgen.models.checkpoints import check_keys, read_state_dict, strip_prefixes

log = logging.getLogger(__name__)

# Published per-channel statistics of Wan2.1 VAE latents (Wan2.1 vae.py / diffusers AutoencoderKLWan).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class WanVAEConfig:
    z_dim: int = 16
    base_dim: int = 96
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    PRESETS = ("wan2.1", "tiny")

    @classmethod
    def preset(cls, name: str, **overrides) -> "WanVAEConfig":
        if name == "wan2.1":
            cfg = cls()
        elif name == "tiny":
            cfg = cls(base_dim=8)
        else:
            raise ValueError(f"unknown Wan VAE preset {name!r}; allowed: {', '.join(cls.PRESETS)}")
        return replace(cfg, **overrides)

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs {len(self.dim_mult) - 1} entries (one per downsampling stage), "
                f"got {self.temporal_downsample}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/latents_std need z_dim={self.z_dim} values each")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)


class DecoderState:
    """Per-stream state of a streaming decoder (this VAE, TAEHV): one fixed-shape buffer per slot,
    created (zeros) the first time it is asked for, then overwritten in place. ``started`` is False
    until the first chunk has been decoded. ``reset()`` zeros the buffers for a new stream of the
    same shape; a stream of another batch, size, dtype or device needs a new state."""

    name = "decoder"

    def __init__(self):
        self.buffers: dict[int, torch.Tensor] = {}
        self.started = False

    def buffer(
        self, slot: int, shape: tuple[int, ...], like: torch.Tensor, memory_format: torch.memory_format | None = None
    ) -> torch.Tensor:
        """The buffer of ``slot``: ``shape``, with ``like``'s dtype and device (and ``memory_format`` when it
        is created; either layout serves either decode path)."""
        buf = self.buffers.get(slot)
        if buf is None:
            if memory_format is None:
                buf = self.buffers[slot] = like.new_zeros(shape)
            else:
                buf = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)
                buf = self.buffers[slot] = buf.zero_()
        elif buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            raise ValueError(
                f"{self.name} stream state was built for {tuple(buf.shape)} {buf.dtype} on {buf.device}, "
                f"got {tuple(shape)} {like.dtype} on {like.device}: a state serves one stream of fixed "
                "batch, size, dtype and device; use .new_state() for a new stream"
            )
        return buf

    def reset(self) -> None:
        for b in self.buffers.values():
            b.zero_()
        self.started = False


class WanVAEState(DecoderState):
    """Decode (or encode) cache of the Wan VAE: one buffer per causal temporal conv. The first
    chunk's first latent frame is the stream's first frame, decoded to a single video frame."""

    name = "VAE"

    def __init__(self):
        super().__init__()
        self.frames_in = 0  # latent frames consumed so far

    def reset(self) -> None:
        super().reset()
        self.frames_in = 0


class CausalConv3d(nn.Conv3d):
    """Conv3d, causal in time: ``padding=(pt, ph, pw)`` pads 2*pt frames in front and none behind.

    With a state, the 2*pt frames in front are the previous call's last input frames (zeros
    at stream start), so chunked calls equal one call over the concatenated input.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=0)
        pt, ph, pw = padding if isinstance(padding, tuple) else (padding,) * 3
        self.time_pad = 2 * pt
        self.space_pad = (ph, pw)
        self.slot = -1  # cache slot, assigned by WanVAE

    def forward(self, x: torch.Tensor, state: WanVAEState | None = None) -> torch.Tensor:
        if self.time_pad:
            if state is None:
                x = F.pad(x, (0, 0, 0, 0, self.time_pad, 0))
            else:
                b, c, _, h, w = x.shape
                cache = state.buffer(self.slot, (b, c, self.time_pad, h, w), x)
                x = torch.cat([cache, x], dim=2)
                cache.copy_(x[:, :, -self.time_pad :])
        return F.conv3d(x, self.weight, self.bias, self.stride, (0, *self.space_pad))


class RMSNorm(nn.Module):
    """L2-normalize over channels (dim 1), times sqrt(dim) and a per-channel gain."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=1).to(x.dtype) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # indices follow Wan2.1_VAE.pth: residual.{0,3} norms, residual.{2,6} convs
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )  # fmt: skip
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, state: WanVAEState | None) -> torch.Tensor:
        r = self.residual
        h = self.shortcut(x)
        x = r[2](F.silu(r[0](x)), state)
        x = r[6](F.silu(r[3](x)), state)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no temporal mixing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        identity = x
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # frames as images
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, 1, 3 * c, h * w).transpose(-1, -2)  # (bt, 1, hw, 3c)
        q, k, v = qkv.chunk(3, dim=-1)
        x = F.scaled_dot_product_attention(q, k, v)  # (bt, 1, hw, c)
        x = x.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)  # (bt, c, h, w)
        x = self.proj(x)
        return x.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4) + identity  # (b, c, t, h, w)


class _Upsample(nn.Upsample):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class Resample(nn.Module):
    """Spatial 2x up/down (per frame), plus 2x in time for the "3d" modes."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(_Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))  # fmt: skip
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        self.slot = -1  # downsample3d's last-frame cache slot, assigned by WanVAE

    def _spatial(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        x = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))  # (bt, c', h', w')
        return x.reshape(b, t, *x.shape[1:]).transpose(1, 2)  # (b, c', t, h', w')

    def forward(self, x: torch.Tensor, state: WanVAEState, first: bool) -> torch.Tensor:
        if self.mode == "upsample3d":
            head, rest = (x[:, :, :1], x[:, :, 1:]) if first else (x[:, :, :0], x)
            if rest.shape[2]:
                b, c, t, h, w = rest.shape
                y = self.time_conv(rest, state)  # (b, 2c, t, h, w): channel halves are frames 2i, 2i+1
                y = y.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
                x = torch.cat([head, y], dim=2)
            else:
                x = head
        x = self._spatial(x)
        if self.mode == "downsample3d":
            b, c, t, h, w = x.shape
            last = state.buffer(self.slot, (b, c, 1, h, w), x)
            if first:
                y = self.time_conv(x) if t >= 3 else x[:, :, :0]
                out = torch.cat([x[:, :, :1], y], dim=2)
            else:
                if t % 2:
                    raise ValueError(f"downsample3d needs an even number of frames after the first, got {t}")
                out = self.time_conv(torch.cat([last, x], dim=2))
            last.copy_(x[:, :, -1:])
            x = out
        return x


def _run(layer: nn.Module, x: torch.Tensor, state: WanVAEState, first: bool) -> torch.Tensor:
    if isinstance(layer, ResidualBlock):
        return layer(x, state)
    if isinstance(layer, Resample):
        return layer(x, state, first)
    return layer(x)


class Encoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(d_in, d_out))
                d_in = d_out
            if i != len(cfg.dim_mult) - 1:
                layers.append(Resample(d_out, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        d = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(d, d), AttentionBlock(d), ResidualBlock(d, d))
        self.head = nn.Sequential(RMSNorm(d), nn.SiLU(), CausalConv3d(d, cfg.z_dim * 2, 3, padding=1))

    def forward(self, x: torch.Tensor, state: WanVAEState, first: bool) -> torch.Tensor:
        x = self.conv1(x, state)
        for layer in (*self.downsamples, *self.middle):
            x = _run(layer, x, state, first)
        return self.head[2](F.silu(self.head[0](x)), state)


class Decoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))  # fmt: skip
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                d_in //= 2  # the previous stage's upsampler halves the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(d_in, d_out))
                d_in = d_out
            if i != len(mult) - 1:
                layers.append(Resample(d_out, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor, state: WanVAEState, first: bool) -> torch.Tensor:
        x = self.conv1(x, state)
        for layer in (*self.middle, *self.upsamples):
            x = _run(layer, x, state, first)
        return self.head[2](F.silu(self.head[0](x)), state)


# ---------------------------------------------------------------------------------------------
# Fast chunk decode (``WanVAE.decode_impl = "fast"``; the default on CUDA)
#
# The same modules and weights as ``Decoder3d.forward``, the same cache semantics, another layout:
# activations are channels-last (B, C, T, H, W) tensors, whose memory is (B, T, H, W, C). Then
# * a causal conv builds its padded input once: the 2 cached frames are copied into the front of
#   a fresh (B, C, 2+T, H, W) buffer and the norm + SiLU of the block writes straight into the rest
#   (no ``torch.cat`` copy of the whole activation, no separate norm / SiLU / dtype passes);
# * per-frame ops (the spatial up-samplers, the attention) see a (B*T, C, H, W) channels-last view,
#   with no transpose copies;
# * RMSNorm (+ SiLU) is one pass over rows of C contiguous channels, computed in fp32: a Triton kernel
#   on CUDA when Triton is importable and passes a self-check on first use, else the reference torch
#   ops (logged once).
# The convs are plain F.conv3d / F.conv2d on channels-last tensors (cuDNN's NDHWC kernels). On an H200
# (bench/BENCHMARKS.md) the fused norm is most of the gain; NDHWC alone is worth ~6%, and for the
# 96-channel convs at full resolution cuDNN's NDHWC conv3d is slower than three summed conv2d
# (opt-in: ``WanVAE.use_conv2d_sum``; not yet timed in a whole decode).
# ``tests/test_wan_vae_fast.py`` holds it equal to the reference path (chunked and whole, fp32, CPU).

_CL3 = torch.channels_last_3d
_FUSED_NORM: dict[tuple[str, torch.dtype], bool] = {}  # (device, dtype) -> the Triton norm passed its check
_NORM_KERNEL = None


def _norm_kernel():
    """The Triton RMSNorm(+SiLU) kernel over rows of C contiguous values (built on first use)."""
    global _NORM_KERNEL
    if _NORM_KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def rms_silu(x_ptr, g_ptr, y_ptr, n_rows, x_bstride, y_bstride, scale,
                     C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, SILU: tl.constexpr):  # fmt: skip
            rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
            cols = tl.arange(0, BLOCK_C)
            mask = (rows < n_rows)[:, None] & (cols < C)[None, :]
            offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
            b = tl.program_id(1).to(tl.int64)
            x = tl.load(x_ptr + b * x_bstride + offs, mask=mask, other=0.0).to(tl.float32)
            inv = scale / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)  # F.normalize's eps
            g = tl.load(g_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
            y = x * inv[:, None] * g[None, :]
            if SILU:
                y = y * tl.sigmoid(y)
            tl.store(y_ptr + b * y_bstride + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

        _NORM_KERNEL = (triton, rms_silu)
    return _NORM_KERNEL


def _rows(x: torch.Tensor) -> bool:
    """x is (B, C, ...) with each batch item's memory (..., C) contiguous (channels-last)."""
    return x.permute(0, *range(2, x.dim()), 1)[0].is_contiguous()


def _launch_norm(norm: RMSNorm, x: torch.Tensor, out: torch.Tensor, silu: bool) -> None:
    triton, kernel = _norm_kernel()
    b, c = x.shape[:2]
    n_rows = x[0].numel() // c
    block_c = triton.next_power_of_2(c)
    block_r = max(1, 4096 // block_c)
    grid = (triton.cdiv(n_rows, block_r), b)
    kernel[grid](x, norm.gamma, out, n_rows, x.stride(0), out.stride(0), float(norm.scale),
                 C=c, BLOCK_C=block_c, BLOCK_R=block_r, SILU=silu, num_warps=4)  # fmt: skip


def _fused_norm_ok(x: torch.Tensor) -> bool:
    """Whether the Triton norm runs on x's device and dtype; checked once against the torch ops."""
    key = (str(x.device), x.dtype)
    ok = _FUSED_NORM.get(key)
    if ok is None:
        why = None
        if x.device.type != "cuda":
            why = f"no CUDA device ({x.device})"
        else:
            try:
                g = torch.Generator(device=x.device).manual_seed(0)
                probe = torch.randn(2, 96, 3, 5, 7, device=x.device, generator=g).to(x.dtype)
                probe = probe.contiguous(memory_format=_CL3)
                norm = RMSNorm(96).to(x.device, x.dtype)
                norm.gamma.data.uniform_(0.5, 1.5, generator=g)
                got = torch.empty_like(probe)
                _launch_norm(norm, probe, got, True)
                want = F.silu(RMSNorm.forward(norm, probe.float()))
                err = float((got.float() - want).norm() / want.norm())
                if not err < 1e-2:
                    why = f"its self-check failed (relative error {err:.2e} against the torch ops)"
            except Exception as e:  # noqa: BLE001 - reported once, then the torch ops serve
                why = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        ok = _FUSED_NORM[key] = why is None
        if ok:
            log.info("Wan VAE fast decode: fused RMSNorm+SiLU (Triton) on %s %s", x.device, x.dtype)
        else:
            log.warning("Wan VAE fast decode: no fused RMSNorm+SiLU on %s %s (%s); using separate torch ops",
                        x.device, x.dtype, why)
    return ok


def _norm_into(norm: RMSNorm, x: torch.Tensor, out: torch.Tensor, silu: bool) -> None:
    """out[...] = silu(norm(x)) (or norm(x)): x and out channels-last, same shape."""
    if _rows(x) and _rows(out) and _fused_norm_ok(x):
        _launch_norm(norm, x, out, silu)
        return
    y = norm(x)
    out.copy_(F.silu(y) if silu else y)


def _fast_conv(conv: CausalConv3d, x: torch.Tensor, state: WanVAEState, pre: RMSNorm | None = None) -> torch.Tensor:
    """conv(silu(pre(x))) (or conv(x)) with the causal frames from ``state``; x channels-last."""
    w = conv.weight.contiguous(memory_format=_CL3)
    if not conv.time_pad:
        return F.conv3d(x, w, conv.bias, conv.stride, (0, *conv.space_pad))
    b, c, t, h, wd = x.shape
    p = conv.time_pad
    cache = state.buffer(conv.slot, (b, c, p, h, wd), x, memory_format=_CL3)
    xp = torch.empty((b, c, p + t, h, wd), dtype=x.dtype, device=x.device, memory_format=_CL3)
    xp[:, :, :p].copy_(cache)
    if pre is None:
        xp[:, :, p:].copy_(x)
    else:
        _norm_into(pre, x, xp[:, :, p:], silu=True)
    cache.copy_(xp[:, :, -p:])
    if getattr(conv, "conv2d_sum", False):
        return _conv2d_sum(conv, xp, t)
    return F.conv3d(xp, w, conv.bias, conv.stride, (0, *conv.space_pad))


def _conv2d_sum(conv: CausalConv3d, xp: torch.Tensor, t: int) -> torch.Tensor:
    """A stride-1 (kt, kh, kw) conv over the padded input xp (b, c, kt-1+t, h, w) as kt channels-last conv2d
    over shifted frame windows, summed: out[i] = sum_k conv2d(xp[i + k], weight[:, :, k])."""
    kt = conv.weight.shape[2]
    ws = [conv.weight[:, :, k].contiguous(memory_format=torch.channels_last) for k in range(kt)]
    outs = []
    for item in xp:  # (c, T, h, w) -> frames (T, c, h, w), a channels-last view
        frames = item.transpose(0, 1)
        y = F.conv2d(frames[0:t], ws[0], conv.bias, padding=conv.space_pad)
        for k in range(1, kt):
            y += F.conv2d(frames[k : k + t], ws[k], padding=conv.space_pad)
        outs.append(y.transpose(0, 1))  # (c', t, h', w')
    return outs[0].unsqueeze(0) if len(outs) == 1 else torch.stack(outs).contiguous(memory_format=_CL3)


def _fast_residual(blk: ResidualBlock, x: torch.Tensor, state: WanVAEState) -> torch.Tensor:
    r = blk.residual
    h = x if isinstance(blk.shortcut, nn.Identity) else _fast_conv(blk.shortcut, x, state)
    y = _fast_conv(r[2], x, state, r[0])
    return _fast_conv(r[6], y, state, r[3]).add_(h)


def _fast_attention(blk: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x.shape
    rows = x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)  # (bt, hw, c): a view of channels-last x
    n = torch.empty_like(rows)
    as_images = lambda r: r.transpose(1, 2).unsqueeze(-1)  # noqa: E731 - (bt, c, hw, 1): gamma (c, 1, 1) broadcasts
    _norm_into(blk.norm, as_images(rows), as_images(n), silu=False)
    qkv = F.linear(n, blk.to_qkv.weight.view(3 * c, c), blk.to_qkv.bias).unsqueeze(1)  # (bt, 1, hw, 3c)
    q, k, v = qkv.chunk(3, dim=-1)
    o = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (bt, hw, c)
    o = F.linear(o, blk.proj.weight.view(c, c), blk.proj.bias).add_(rows)
    return o.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)  # (b, c, t, h, w), channels-last


def _fast_resample(rs: Resample, x: torch.Tensor, state: WanVAEState, first: bool) -> torch.Tensor:
    if rs.mode == "upsample3d":
        n_head = 1 if first else 0
        rest = x[:, :, n_head:]
        if rest.shape[2]:
            b, c, t, h, w = rest.shape
            y = _fast_conv(rs.time_conv, rest, state)  # (b, 2c, t, h, w): channel halves are frames 2i, 2i+1
            out = torch.empty((b, c, n_head + 2 * t, h, w), dtype=x.dtype, device=x.device, memory_format=_CL3)
            mem = out.permute(0, 2, 3, 4, 1)  # (b, T', h, w, c)
            mem[:, :n_head].copy_(x[:, :, :n_head].permute(0, 2, 3, 4, 1))
            pairs = y.permute(0, 2, 3, 4, 1).view(b, t, h, w, 2, c)  # memory of y: channel k*c + j -> (k, j)
            mem[:, n_head:].view(b, t, 2, h, w, c).copy_(pairs.permute(0, 1, 4, 2, 3, 5))  # frames 2i+k
            x = out
        else:
            x = x[:, :, :n_head]
    elif rs.mode != "upsample2d":
        raise ValueError(f"the fast decode has no {rs.mode!r} (an encoder layer)")
    b, c, t, h, w = x.shape
    up, conv = rs.resample
    x4 = x.transpose(1, 2).reshape(b * t, c, h, w).contiguous(memory_format=torch.channels_last)  # a view
    x4 = F.interpolate(x4, scale_factor=2.0, mode="nearest-exact")  # exact in any dtype (a copy of values)
    x4 = F.conv2d(x4, conv.weight.contiguous(memory_format=torch.channels_last), conv.bias, padding=1)
    return x4.unflatten(0, (b, t)).transpose(1, 2)  # (b, c', t, 2h, 2w), channels-last


def _fast_decoder(dec: Decoder3d, x: torch.Tensor, state: WanVAEState, first: bool) -> torch.Tensor:
    """``Decoder3d.forward`` in the channels-last layout; returns a channels-last tensor."""
    x = _fast_conv(dec.conv1, x.contiguous(memory_format=_CL3), state)
    for layer in (*dec.middle, *dec.upsamples):
        if isinstance(layer, ResidualBlock):
            x = _fast_residual(layer, x, state)
        elif isinstance(layer, AttentionBlock):
            x = _fast_attention(layer, x)
        else:
            x = _fast_resample(layer, x, state, first)
    return _fast_conv(dec.head[2], x, state, dec.head[0])


class WanVAE(nn.Module):
    DECODE_IMPLS = ("auto", "fast", "reference")

    def __init__(self, cfg: WanVAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or WanVAEConfig()
        # "fast": the channels-last decode above; "reference": Decoder3d.forward; "auto": fast on CUDA
        self.decode_impl = "auto"
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)  # quant conv -> (mu, logvar)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)  # post-quant conv
        self.decoder = Decoder3d(cfg)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        slot = 0
        for m in self.modules():
            if isinstance(m, CausalConv3d) and m.time_pad:
                m.slot, slot = slot, slot + 1
            elif isinstance(m, Resample) and m.mode == "downsample3d":
                m.slot, slot = slot, slot + 1

    def new_state(self) -> WanVAEState:
        return WanVAEState()

    def _fast_path(self, on_cuda: bool) -> bool:
        """Whether decode_chunk takes the fast path (``decode_impl``; "auto": on CUDA, without hooks)."""
        if self.decode_impl not in self.DECODE_IMPLS:
            raise ValueError(f"decode_impl={self.decode_impl!r}; allowed: {', '.join(self.DECODE_IMPLS)}")
        return self.decode_impl == "fast" or (self.decode_impl == "auto" and on_cuda and not self._hooked())

    def _hooked(self) -> bool:
        """Whether forward hooks sit on the decoder's modules (the fast path calls no module's forward,
        so it would skip them): then "auto" takes the reference path, and says so once."""
        import torch.nn.modules.module as mm

        hooked = bool(mm._global_forward_hooks or mm._global_forward_pre_hooks) or any(
            m._forward_hooks or m._forward_pre_hooks for m in self.decoder.modules()
        )
        if hooked and not getattr(self, "_hook_warned", False):
            self._hook_warned = True
            log.warning("Wan VAE: forward hooks on the decoder's modules; decode_impl='auto' takes the reference "
                        "path (the fast path would skip them)")
        return hooked

    def use_conv2d_sum(self, max_channels: int) -> int:
        """Fast path only, opt-in: the decoder's residual-block 3x3x3 convs of at most ``max_channels``
        input channels run as 3 summed conv2d (0 = none). Same result within rounding; faster where
        cuDNN's NDHWC conv3d is slow (bench/BENCHMARKS.md: C=96 at 832x480 in fp16). Returns how many
        convs it set."""
        n = 0
        for blk in self.decoder.modules():
            if isinstance(blk, ResidualBlock):
                for conv in (blk.residual[2], blk.residual[6]):
                    conv.conv2d_sum = conv.in_channels <= max_channels
                    n += conv.conv2d_sum
        return n

    def _param(self) -> torch.Tensor:
        return self.conv2.weight

    def latent_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (mean, std), shaped (1, z, 1, 1, 1), on ``device`` (kept fp32 whatever the model dtype)."""
        stats = self._stats.get(device)
        if stats is None:
            shape = (1, self.cfg.z_dim, 1, 1, 1)
            stats = self._stats[device] = tuple(
                torch.tensor(v, dtype=torch.float32).view(shape).to(device)
                for v in (self.cfg.latents_mean, self.cfg.latents_std)
            )
        return stats

    @torch.no_grad()
    def decode_chunk(
        self, latents: torch.Tensor, state: WanVAEState, *, frames_per_pass: int | None = None
    ) -> torch.Tensor:
        """Decode the next ``f`` latent frames of a stream; see the module docstring for shapes.

        ``frames_per_pass`` bounds activation memory: the chunk is run through the decoder that
        many latent frames at a time (same result; ``None`` = the whole chunk in one pass).
        ``self.decode_impl`` picks the decoder path (same result within rounding; the fast path
        returns a channels-last tensor).
        """
        cfg = self.cfg
        if latents.ndim != 5 or latents.shape[1] != cfg.z_dim or latents.shape[2] < 1:
            raise ValueError(f"latents must be (B, {cfg.z_dim}, f>=1, h, w), got {tuple(latents.shape)}")
        p = self._param()
        fast = self._fast_path(p.is_cuda)
        mean, std = self.latent_stats(p.device)
        z = latents.to(p.device, torch.float32) * std + mean
        x = self.conv2(z.to(p.dtype))
        outs = []
        for part in x.split(frames_per_pass or x.shape[2], dim=2):
            first = not state.started
            y = _fast_decoder(self.decoder, part, state, first) if fast else self.decoder(part, state, first=first)
            outs.append(y.clamp_(-1.0, 1.0))
            state.started = True
        state.frames_in += latents.shape[2]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Whole latent video (normalized) -> (B,3,1+4(f-1),H,W) in [-1,1]."""
        return self.decode_chunk(latents, self.new_state())

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B,3,1+4k,H,W) in [-1,1] -> posterior mean, normalized: (B,16,1+k,H/8,W/8)."""
        cfg = self.cfg
        tf, sf = cfg.temporal_factor, cfg.spatial_factor
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be (B, 3, T, H, W), got {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        if (t - 1) % tf or h % sf or w % sf:
            raise ValueError(f"video needs T = 1 + {tf}k frames and H, W multiples of {sf}; got T={t}, {h}x{w}")
        p = self._param()
        x = self.encoder(video.to(p.device, p.dtype), self.new_state(), first=True)
        mu = self.conv1(x)[:, : cfg.z_dim].float()
        mean, std = self.latent_stats(p.device)
        return (mu - mean) / std

    def output_frames(self, f: int, first: bool) -> int:
        """Video frames produced by a chunk of ``f`` latent frames."""
        tf = self.cfg.temporal_factor
        return 1 + tf * (f - 1) if first else tf * f


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts

_RES_TO_DIFFUSERS = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.",
                     "residual.6.": "conv2.", "shortcut.": "conv_shortcut."}  # fmt: skip


def _res_rename(rest: str) -> str:
    for a, b in _RES_TO_DIFFUSERS.items():
        if rest.startswith(a):
            return b + rest[len(a) :]
    return rest


def _native_to_diffusers_key(key: str, cfg: WanVAEConfig) -> str:
    if key.startswith("conv1."):
        return "quant_conv." + key[6:]
    if key.startswith("conv2."):
        return "post_quant_conv." + key[6:]
    part, rest = key.split(".", 1)  # encoder | decoder
    if rest.startswith("conv1."):
        return f"{part}.conv_in.{rest[6:]}"
    if rest.startswith("head.0."):
        return f"{part}.norm_out.{rest[7:]}"
    if rest.startswith("head.2."):
        return f"{part}.conv_out.{rest[7:]}"
    m = re.match(r"middle\.(\d+)\.(.*)", rest)
    if m:
        i, tail = int(m[1]), m[2]
        if i == 1:
            return f"{part}.mid_block.attentions.0.{tail}"
        return f"{part}.mid_block.resnets.{i // 2}.{_res_rename(tail)}"
    m = re.match(r"downsamples\.(\d+)\.(.*)", rest)
    if m:
        return f"{part}.down_blocks.{m[1]}.{_res_rename(m[2])}"
    m = re.match(r"upsamples\.(\d+)\.(.*)", rest)
    if m:
        n, tail = int(m[1]), m[2]
        per_stage = cfg.num_res_blocks + 2  # resnets + one upsampler
        stage, j = divmod(n, per_stage)
        if j == cfg.num_res_blocks + 1:
            return f"{part}.up_blocks.{stage}.upsamplers.0.{tail}"
        return f"{part}.up_blocks.{stage}.resnets.{j}.{_res_rename(tail)}"
    raise KeyError(f"no diffusers name for Wan VAE key {key!r}")


def _expected(cfg: WanVAEConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in WanVAE(cfg).state_dict().items()}


def key_table(cfg: WanVAEConfig) -> dict[str, str]:
    """native (Wan2.1_VAE.pth) key -> diffusers AutoencoderKLWan key, for every parameter."""
    return {k: _native_to_diffusers_key(k, cfg) for k in _expected(cfg)}


def convert_wan_vae_state_dict(sd: dict[str, torch.Tensor], cfg: WanVAEConfig | None = None) -> dict[str, torch.Tensor]:
    """Wan2.1_VAE.pth or diffusers AutoencoderKLWan state dict -> native keys, checked against ``cfg``."""
    cfg = cfg or WanVAEConfig()
    sd = strip_prefixes(sd, ("module.", "vae.", "model."))
    expected = _expected(cfg)
    if any(k.startswith(("decoder.up_blocks.", "encoder.down_blocks.", "quant_conv.", "post_quant_conv.")) for k in sd):
        inverse = {d: n for n, d in key_table(cfg).items()}
        layout = "diffusers AutoencoderKLWan"
        out, unexpected = {}, []
        for k, v in sd.items():
            (out.__setitem__(inverse[k], v) if k in inverse else unexpected.append(k))
    elif any(k.startswith(("decoder.upsamples.", "encoder.downsamples.", "decoder.conv1.")) for k in sd):
        layout = "Wan2.1_VAE.pth"
        out = {k: v for k, v in sd.items() if k in expected}
        unexpected = [k for k in sd if k not in expected]
    else:
        raise ValueError(
            "not a Wan2.1 VAE state dict: expected Wan2.1_VAE.pth keys (decoder.upsamples.*, encoder.downsamples.*) "
            f"or diffusers AutoencoderKLWan keys (decoder.up_blocks.*, quant_conv.*); got e.g. {sorted(sd)[:5]}"
        )
    check_keys(expected, out, unexpected=unexpected,
               what=f"Wan VAE checkpoint ({layout} layout) does not match config {cfg.base_dim=} {cfg.z_dim=} "
                    f"{cfg.dim_mult=} {cfg.num_res_blocks=}:",
               notes=["  (is this the Wan2.1 VAE, and the right preset? Wan2.2's 48-channel VAE is not supported)"])  # fmt: skip
    return out


def to_diffusers_state_dict(native: dict[str, torch.Tensor], cfg: WanVAEConfig | None = None) -> dict[str, torch.Tensor]:
    """Native (Wan2.1_VAE.pth) keys -> diffusers AutoencoderKLWan keys."""
    cfg = cfg or WanVAEConfig()
    native = convert_wan_vae_state_dict(native, cfg)
    table = key_table(cfg)
    return {table[k]: v for k, v in native.items()}


def load_wan_vae(
    path: str | os.PathLike,
    cfg: WanVAEConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WanVAE:
    """Build a WanVAE and load ``Wan2.1_VAE.pth`` or a diffusers ``AutoencoderKLWan`` checkpoint into it."""
    cfg = cfg or WanVAEConfig()
    # a Wan2.1 repo root holds Wan2.1_VAE.pth beside the DiT's diffusion_pytorch_model.*: the VAE file first
    sd = read_state_dict(path, what="Wan VAE", names=[f"{sub}{name}" for sub in ("vae/", "") for name in (
        "Wan2.1_VAE.pth", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")])
    sd = convert_wan_vae_state_dict(sd, cfg)
    with torch.device("meta"):
        vae = WanVAE(cfg)
    vae.load_state_dict(sd, strict=True, assign=True)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
