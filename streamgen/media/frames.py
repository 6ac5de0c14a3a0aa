"""Decoded video -> display frames, once for every path (engine, `generate`, `interpolate`).

    x = unit_frames(decoded)          # decoder output (B, 3, T, H, W) in [-1, 1], item 0 -> (T, 3, H, W) in [0, 1]
    x = interp.process(x, state)      # optional RIFE (streamgen.media.interpolate), same layout
    u8 = to_uint8(x)                  # -> uint8 (T, H, W, 3) RGB on the same device

``read_image`` turns a PNG/JPEG (bytes or a path) into uint8 (H, W, 3) RGB at a given size; it is
the one image decoder of the project (image start for `generate` and the server).
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch

__all__ = ["unit_frames", "to_uint8", "from_uint8", "read_image", "ImageError"]


class ImageError(ValueError):
    """The bytes or the file are not a decodable image."""


def unit_frames(decoded: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] (batch item 0) -> (T, 3, H, W) float in [0, 1]."""
    return decoded[0].transpose(0, 1).float().add(1.0).mul_(0.5).clamp_(0.0, 1.0)


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """(T, 3, H, W) in [0, 1] -> uint8 (T, H, W, 3), rounded to nearest, on the same device."""
    return frames.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


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
