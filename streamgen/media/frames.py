"""Decoded video -> display frames, once for every path (engine, `generate`, `interpolate`).

    x = unit_frames(decoded)          # decoder output (B, 3, T, H, W) in [-1, 1], item 0 -> (T, 3, H, W) in [0, 1]
    x = interp.process(x, state)      # optional RIFE (streamgen.media.interpolate), same layout
    u8 = to_uint8(x)                  # -> uint8 (T, H, W, 3) RGB on the same device, contiguous

On CUDA, ``to_uint8`` is one Triton kernel (scale, round, clamp, cast and the (T, H, W, 3) layout in
one pass) when Triton is importable and the kernel gives the torch ops' bytes on a first-use probe;
otherwise the torch ops (logged once). Both give the same bytes. The pinned host copy after it
(engine/core.py) needs no ring of its own: ``torch.empty(..., pin_memory=True)`` is served by
PyTorch's caching host allocator, which hands a freed block back once its copy's event has completed
(bench/BENCHMARKS.md counts ``cudaHostAlloc`` calls per chunk in a profiler trace).

``read_image`` turns a PNG/JPEG (bytes or a path) into uint8 (H, W, 3) RGB at a given size; it is
the one image decoder of the project (image start for `generate` and the server).
"""

from __future__ import annotations

import io
import logging
import os

import numpy as np
import torch

__all__ = ["unit_frames", "to_uint8", "from_uint8", "read_image", "ImageError", "uint8_fused_available"]

log = logging.getLogger(__name__)


class ImageError(ValueError):
    """The bytes or the file are not a decodable image."""


def unit_frames(decoded: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] (batch item 0) -> (T, 3, H, W) float in [0, 1]."""
    return decoded[0].transpose(0, 1).float().add(1.0).mul_(0.5).clamp_(0.0, 1.0)


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """(T, 3, H, W) in [0, 1] -> uint8 (T, H, W, 3), rounded to nearest (half to even), on the same device."""
    if frames.is_cuda and frames.dim() == 4 and frames.dtype in _U8_DTYPES and uint8_fused_available(frames.device):
        return _to_uint8_fused(frames)
    return _to_uint8_torch(frames)


def _to_uint8_torch(frames: torch.Tensor) -> torch.Tensor:
    """The reference: x * 255 in the input's dtype, round half to even, clamp, cast."""
    return frames.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


_U8_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_U8_FUSED: dict[str, bool] = {}  # device -> the kernel passed its probe
_U8_KERNEL = None


def _u8_kernel():
    global _U8_KERNEL
    if _U8_KERNEL is None:
        import triton
        import triton.language as tl
        from triton.language.extra import libdevice

        @triton.jit
        def to_u8(x_ptr, y_ptr, n, H, W, s0, s1, s2, s3, BLOCK: tl.constexpr, ROUND_IN: tl.constexpr):
            i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # index into (T, H, W, 3)
            mask = i < n
            c = i % 3
            w = (i // 3) % W
            h = (i // (3 * W)) % H
            t = i // (3 * W * H)
            x = tl.load(x_ptr + t * s0 + c * s1 + h * s2 + w * s3, mask=mask, other=0.0)
            y = x.to(tl.float32) * 255.0
            if ROUND_IN:  # the torch path multiplies in the input's dtype
                y = y.to(x.dtype).to(tl.float32)
            y = tl.minimum(tl.maximum(libdevice.rint(y), 0.0), 255.0)
            tl.store(y_ptr + i, y.to(tl.uint8), mask=mask)

        _U8_KERNEL = (triton, to_u8)
    return _U8_KERNEL


def _to_uint8_fused(frames: torch.Tensor) -> torch.Tensor:
    triton, kernel = _u8_kernel()
    t, _, h, w = frames.shape
    out = torch.empty((t, h, w, 3), dtype=torch.uint8, device=frames.device)
    n = out.numel()
    block = 1024
    s0, s1, s2, s3 = frames.stride()
    kernel[(triton.cdiv(n, block),)](frames, out, n, h, w, s0, s1, s2, s3, BLOCK=block,
                                     ROUND_IN=frames.dtype != torch.float32)  # fmt: skip
    return out


def uint8_fused_available(device: torch.device | str) -> bool:
    """Whether ``to_uint8`` runs as one kernel on ``device`` (probed once: same bytes as the torch ops)."""
    device = torch.device(device)
    key = str(device)
    ok = _U8_FUSED.get(key)
    if ok is None:
        why = None
        if device.type != "cuda":
            why = f"no CUDA device ({device})"
        else:
            try:
                g = torch.Generator(device=device).manual_seed(0)
                probe = torch.rand(3, 3, 17, 29, device=device, generator=g) * 1.2 - 0.1
                probe[0, 0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, 2.5 / 255, 254.5 / 255])  # ties
                for x in (probe, probe.half(), probe.bfloat16(), probe.contiguous(memory_format=torch.channels_last)):
                    if not torch.equal(_to_uint8_fused(x), _to_uint8_torch(x)):
                        why = f"its probe gave other bytes than the torch ops ({x.dtype})"
                        break
            except Exception as e:  # noqa: BLE001 - reported once, then the torch ops serve
                why = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        ok = _U8_FUSED[key] = why is None
        if ok:
            log.info("to_uint8: one fused Triton kernel on %s", device)
        elif device.type == "cuda":
            log.warning("to_uint8: no fused kernel on %s (%s); using the torch ops", device, why)
    return ok


def from_uint8(frames: np.ndarray | torch.Tensor, device=None) -> torch.Tensor:
    """uint8 (T, H, W, 3) RGB -> (T, 3, H, W) float in [0, 1] on ``device``."""
    x = torch.as_tensor(frames).to(device)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


MAX_IMAGE_PIXELS = 4096 * 4096  # of an image to decode, read from its header first (no decompression bombs)


def read_image(source: bytes | str | os.PathLike, width: int, height: int) -> np.ndarray:
    """PNG/JPEG bytes or file -> uint8 (height, width, 3) RGB, resized. Raises ImageError, also for
    an image whose header declares more than MAX_IMAGE_PIXELS (checked before anything is decoded)."""
    import av

    what = f"{len(source)} bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        f = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else os.fspath(source)
        with av.open(f) as c:
            if not c.streams.video:
                raise ImageError(f"{what} hold no image (no video stream)")
            cc = c.streams.video[0].codec_context
            if cc.width * cc.height > MAX_IMAGE_PIXELS or cc.width <= 0 or cc.height <= 0:
                raise ImageError(f"{what}: the image is {cc.width}x{cc.height}; at most {MAX_IMAGE_PIXELS} pixels "
                                 "(e.g. 4096x4096) are decoded")
            frame = next(c.decode(video=0))
            return frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
    except (av.FFmpegError, StopIteration, OSError) as e:
        raise ImageError(f"{what} could not be decoded as a PNG or JPEG image ({e})") from None
