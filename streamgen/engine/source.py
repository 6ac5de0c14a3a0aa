"""Pluggable frame sources: what a streaming session pulls chunks of video frames from.

Contract
--------
A :class:`SourceFactory` validates a stream request (the protocol's ``start`` message,
:class:`streamgen.protocol.Start`, already checked against the protocol limits; absent fields
are None = the server's default) and creates one :class:`FrameSource` per session. A source produces chunks of uint8 RGB frames ``(T, H, W, 3)`` (T >= 1, fixed H, W for
the life of the source) via ``await source.next_chunk()``; it must never block the event loop
(CPU/GPU work runs in a thread or on the engine's busy loop, the coroutine only awaits it).
``set_prompt(text)`` takes effect from the next chunk that has not started yet; ``pause()`` /
``resume()`` (optional) stop and restart generating ahead while the viewer is paused; ``aclose()``
cancels any work in flight and frees the source's resources (a GPU cache slot for the engine).
Errors that a user can fix are raised as :class:`SourceError` with the offending request field.

The generation engine plugs in later as another factory; :class:`TestPatternFactory` renders
a moving pattern whose background colour is derived from the prompt (so a prompt switch is
visible) and whose top rows carry the absolute frame index as a binary code (so tests can
check that no frame was lost or duplicated). A ``start.image`` (PNG/JPEG) is decoded and shown
as an inset in the bottom-right corner.
"""

from __future__ import annotations

import asyncio
import hashlib
from abc import ABC, abstractmethod
from concurrent.futures import Executor

import numpy as np

from streamgen.protocol import Start as StreamRequest

__all__ = [
    "StreamRequest", "SourceError", "FrameSource", "SourceFactory",
    "TestPatternSource", "TestPatternFactory", "prompt_color", "read_frame_index", "decode_image",
]


class SourceError(ValueError):
    """A request the source cannot serve; ``field`` names the request field at fault (None: the
    request as a whole), ``code`` is the protocol error code: ``bad_field`` (a value outside what
    this model takes), ``unsupported`` (a valid request this server cannot honour) or ``busy``
    (no capacity now)."""

    def __init__(self, field_name: str | None, message: str, code: str = "bad_field"):
        super().__init__(message)
        self.field = field_name
        self.code = code


class FrameSource(ABC):
    """One session's producer of video chunks. Attributes fixed at creation: width, height and
    fps (an int: frames per second of the frames produced, after any interpolation)."""

    width: int
    height: int
    fps: int

    @abstractmethod
    async def next_chunk(self) -> np.ndarray:
        """The next chunk: uint8 (T, H, W, 3) RGB, contiguous, owned by the caller."""

    @abstractmethod
    def set_prompt(self, prompt: str) -> None:
        """Switch the prompt from the next chunk on."""

    def pause(self) -> None:  # noqa: B027 - optional hook
        """The viewer paused: make no chunks beyond the one in progress (the caller also stops
        pulling; a source without this hook is bounded by that alone)."""

    def resume(self) -> None:  # noqa: B027 - optional hook
        """Undo ``pause``."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Cancel work in flight and free resources. Idempotent."""


class SourceFactory(ABC):
    """Creates sources for one served model; ``model`` is the name clients may ask for."""

    model: str

    @abstractmethod
    async def create(self, request: StreamRequest) -> FrameSource:
        """Validate ``request`` (raise SourceError naming the field) and create its source."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Free shared resources (model weights, worker threads)."""


# ---------------------------------------------------------------------------------------------
# Test pattern

_CODE_BITS = 24  # frame index code in the top band: 24 cells, white = 1


def prompt_color(prompt: str) -> tuple[int, int, int]:
    """Stable background colour of a prompt (mid-range, so the pattern stays visible)."""
    h = hashlib.blake2b(prompt.encode("utf-8"), digest_size=3).digest()
    return tuple(48 + (b * 160) // 255 for b in h)  # type: ignore[return-value]


def decode_image(data: bytes, width: int, height: int) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 (height, width, 3) RGB, resized. Raises SourceError("image")."""
    import io

    import av

    try:
        with av.open(io.BytesIO(data)) as c:
            frame = next(c.decode(video=0))
            return frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
    except (av.FFmpegError, StopIteration, ValueError) as e:
        raise SourceError("image", f"image must be a PNG or JPEG file ({len(data)} bytes could not be decoded: {e})")


def read_frame_index(frame: np.ndarray) -> int:
    """Decode the frame index a TestPatternSource drew into ``frame`` (H, W, 3); survives lossy coding."""
    h, w = frame.shape[:2]
    band = frame[: max(2, h // 16)].astype(np.float32).mean(axis=(0, 2))  # (W,)
    cell = w // _CODE_BITS
    bits = [band[i * cell + cell // 4: (i + 1) * cell - cell // 4].mean() > 128 for i in range(_CODE_BITS)]
    return sum(1 << i for i, b in enumerate(bits) if b)


class TestPatternSource(FrameSource):
    """Moving bars over a prompt-coloured background, frame index coded in the top band.

    ``delay_s`` simulates generation time per chunk (slept in the worker thread).
    """

    __test__ = False  # not a pytest class

    def __init__(self, width: int, height: int, fps: int, frames_per_chunk: int, prompt: str,
                 *, executor: Executor | None = None, delay_s: float = 0.0, image: np.ndarray | None = None):
        if width < _CODE_BITS * 2:
            raise SourceError("width", f"width must be >= {_CODE_BITS * 2} for the test pattern, got {width}")
        self.width, self.height, self.fps = width, height, fps
        self.frames_per_chunk = frames_per_chunk
        self._prompt = prompt
        self._executor = executor
        self._delay_s = delay_s
        self._image = image  # (h, w, 3) inset or None
        self._next = 0
        self._closed = False
        yy, xx = np.mgrid[0:height, 0:width]
        self._diag = (xx + yy).astype(np.int32)  # (H, W)
        self._band = max(2, height // 16)
        cell = width // _CODE_BITS
        self._cell_of_x = np.minimum(np.arange(width) // cell, _CODE_BITS)  # (W,), _CODE_BITS = pad

    def set_prompt(self, prompt: str) -> None:
        self._prompt = prompt

    def _render(self, start: int, count: int, prompt: str) -> np.ndarray:
        import time

        if self._delay_s:
            time.sleep(self._delay_s)
        bg = np.array(prompt_color(prompt), np.uint8)
        out = np.empty((count, self.height, self.width, 3), np.uint8)
        for i in range(count):
            k = start + i
            f = out[i]
            f[:] = bg
            stripes = ((self._diag + 3 * k) // 12) % 4 == 0  # (H, W) moving diagonal bars
            f[stripes] = 255 - bg
            bx = (k * 4) % max(1, self.width - self.height // 4)  # moving square
            f[self.height // 2: self.height // 2 + self.height // 4, bx: bx + self.height // 4] = (255, 255, 255)
            if self._image is not None:
                ih, iw = self._image.shape[:2]
                f[-ih:, -iw:] = self._image
            bits = np.array([(k >> j) & 1 for j in range(_CODE_BITS)] + [0], np.uint8) * 255  # (CODE_BITS+1,)
            f[: self._band] = bits[self._cell_of_x][None, :, None]
        return out

    async def next_chunk(self) -> np.ndarray:
        if self._closed:
            raise RuntimeError("source is closed")
        start, count, prompt = self._next, self.frames_per_chunk, self._prompt
        self._next += count
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._render, start, count, prompt)

    async def aclose(self) -> None:
        self._closed = True


class TestPatternFactory(SourceFactory):
    """Serves test-pattern sources under ``model``; validates sizes and fps like a real model would."""

    __test__ = False

    def __init__(self, model: str = "testpattern", *, width: int = 320, height: int = 192, fps: int = 16,
                 frames_per_chunk: int = 8, max_pixels: int = 1920 * 1088, max_fps: int = 60,
                 executor: Executor | None = None, delay_s: float = 0.0):
        self.model = model
        self.width, self.height, self.fps = width, height, fps
        self.frames_per_chunk = frames_per_chunk
        self.max_pixels, self.max_fps = max_pixels, max_fps
        self.executor = executor
        self.delay_s = delay_s

    async def create(self, request: StreamRequest) -> FrameSource:
        if request.model not in (None, "", self.model):
            raise SourceError("model", f"model {request.model!r} is not served here; available: [{self.model!r}]")
        w = request.width or self.width
        h = request.height or self.height
        for name, v in (("width", w), ("height", h)):
            if v % 16 or v < 64:
                raise SourceError(name, f"{name} must be a multiple of 16 and >= 64, got {v}")
        if w * h > self.max_pixels:
            raise SourceError("width", f"width*height must be <= {self.max_pixels}, got {w}x{h}")
        base_fps = request.fps or self.fps
        if not (0 < base_fps <= self.max_fps):
            raise SourceError("fps", f"fps must be in (0, {self.max_fps}], got {base_fps}")
        factor = request.interpolate or 1
        if factor not in (1, 2, 4):
            raise SourceError("interpolate", f"interpolate must be 1, 2 or 4, got {factor}")
        fps = base_fps * factor
        if fps > self.max_fps * 4:
            raise SourceError("interpolate", f"fps*interpolate must be <= {self.max_fps * 4}, got {fps}")
        image = None
        if request.image is not None:
            loop = asyncio.get_running_loop()
            image = await loop.run_in_executor(self.executor, decode_image, request.image, w // 4, h // 4)
        return TestPatternSource(w, h, int(fps), self.frames_per_chunk * factor, request.prompt,
                                 executor=self.executor, delay_s=self.delay_s, image=image)
