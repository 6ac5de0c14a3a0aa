"""Small H.264 files for the file-tool tests: frames (H, W, 3) uint8 RGB -> PATH."""

from __future__ import annotations

from collections.abc import Iterable

import av
import numpy as np


def write_h264(path, frames: Iterable[np.ndarray], *, fps: int = 8, pix_fmt: str = "yuv420p") -> None:
    frames = list(frames)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = pix_fmt
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode(None))


def flat_frames(n: int, h: int, w: int, step: int) -> list[np.ndarray]:
    """n frames of one grey level each: 0, step, 2*step, ..."""
    return [np.full((h, w, 3), step * i, np.uint8) for i in range(n)]
