"""Frame sources: what a server session pulls chunks of video frames from.

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

:class:`EngineFactory` serves the generation engine (streamgen.engine): it checks what only the
served model knows (its name, its frame rate), decodes ``start.image`` and opens an engine session
(the engine checks the rest against the shared limits); :class:`EngineSource` is the server's view
of that session. A model generates at its native frame rate: ``start.fps`` may only name that rate
(or be left out), and ``interpolate`` multiplies it. :class:`TestPatternFactory` renders
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

from streamgen.media.frames import ImageError, read_image
from streamgen.protocol import Start as StreamRequest

__all__ = [
    "StreamRequest", "SourceError", "GenerationError", "FrameSource", "SourceFactory", "EngineSource", "EngineFactory",
    "TestPatternSource", "TestPatternFactory", "prompt_color", "read_frame_index", "decode_image",
]


class SourceError(ValueError):
    """A request the source cannot serve; ``field`` names the request field at fault (None: the
    request as a whole), ``code`` is the protocol error code: ``bad_field`` (a value outside what
    this model takes), ``unsupported`` (a valid request this server cannot honour), ``busy``
    (no capacity now) or ``overloaded`` (no memory now and the queue is full: ``retry_after`` s)."""

    def __init__(self, field_name: str | None, message: str, code: str = "bad_field",
                 retry_after: float | None = None):
        super().__init__(message)
        self.field = field_name
        self.code = code
        self.retry_after = retry_after


class GenerationError(RuntimeError):
    """Generation of a session failed; whoever raised it has logged it."""


class FrameSource(ABC):
    """One session's producer of video chunks. Attributes fixed at creation: width, height and
    fps (an int: frames per second of the frames produced, after any interpolation). ``switched``:
    the chunk ``next_chunk`` returned last is the first made under a prompt given by ``set_prompt``."""

    width: int
    height: int
    fps: int
    switched: bool = False

    @abstractmethod
    async def next_chunk(self) -> np.ndarray:
        """The next chunk: uint8 (T, H, W, 3) RGB, contiguous, owned by the caller."""

    @abstractmethod
    def set_prompt(self, prompt: str, *, abandon: bool = True) -> None:
        """Switch the prompt from the next chunk on. ``abandon``: a chunk of the old prompt still in
        progress may be dropped so the new prompt's comes sooner (False: the viewer's buffer would
        run dry before it; a source without the notion ignores it)."""

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
    async def create(self, request: StreamRequest, name: str = "", on_queued=None) -> FrameSource:
        """Validate ``request`` (raise SourceError naming the field) and create its source;
        ``name`` is the session id, for log lines. A source that must wait for capacity calls
        ``on_queued(position)`` (1 = next) whenever its place in the queue changes."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Free shared resources (model weights, worker threads)."""

    def describe_metrics(self, m) -> None:  # noqa: B027 - optional hook
        """Declare this source's own /metrics series on ``m`` (streamgen.server.metrics.Metrics)."""


# ---------------------------------------------------------------------------------------------
# Test pattern

_CODE_BITS = 24  # frame index code in the top band: 24 cells, white = 1


def prompt_color(prompt: str) -> tuple[int, int, int]:
    """Stable background colour of a prompt (mid-range, so the pattern stays visible)."""
    h = hashlib.blake2b(prompt.encode("utf-8"), digest_size=3).digest()
    return tuple(48 + (b * 160) // 255 for b in h)  # type: ignore[return-value]


def decode_image(data: bytes, width: int, height: int) -> np.ndarray:
    """``start.image`` bytes -> uint8 (height, width, 3) RGB. Raises SourceError("image")."""
    try:
        return read_image(data, width, height)
    except ImageError as e:
        raise SourceError("image", f"image must be a PNG or JPEG file: {e}") from None


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
        self._prompt = self._last_prompt = prompt
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

    def set_prompt(self, prompt: str, *, abandon: bool = True) -> None:
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
        self.switched = start > 0 and prompt != self._last_prompt
        self._last_prompt = prompt
        self._next += count
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._render, start, count, prompt)

    async def aclose(self) -> None:
        self._closed = True


class TestPatternFactory(SourceFactory):
    """Serves test-pattern sources under ``model``. Requests arrive checked against the protocol's
    limits (size, fps, interpolate); ``max_pixels`` is the pattern's own bound on width*height."""

    __test__ = False

    def __init__(self, model: str = "testpattern", *, width: int = 320, height: int = 192, fps: int = 16,
                 frames_per_chunk: int = 8, max_pixels: int = 1920 * 1088,
                 executor: Executor | None = None, delay_s: float = 0.0):
        self.model = model
        self.width, self.height, self.fps = width, height, fps
        self.frames_per_chunk = frames_per_chunk
        self.max_pixels = max_pixels
        self.executor = executor
        self.delay_s = delay_s

    async def create(self, request: StreamRequest, name: str = "", on_queued=None) -> FrameSource:
        if request.model not in (None, "", self.model):
            raise SourceError("model", f"model {request.model!r} is not served here; available: [{self.model!r}]")
        w = request.width or self.width
        h = request.height or self.height
        if w * h > self.max_pixels:
            raise SourceError("width", f"width*height must be <= {self.max_pixels}, got {w}x{h}")
        factor = request.interpolate or 1
        fps = (request.fps or self.fps) * factor
        image = None
        if request.image is not None:
            loop = asyncio.get_running_loop()
            image = await loop.run_in_executor(self.executor, decode_image, request.image, w // 4, h // 4)
        return TestPatternSource(w, h, int(fps), self.frames_per_chunk * factor, request.prompt,
                                 executor=self.executor, delay_s=self.delay_s, image=image)


# ---------------------------------------------------------------------------------------------
# The generation engine


class EngineSource(FrameSource):
    """One engine session as a frame source (``next_chunk`` awaits the busy loop's next chunk;
    ``set_prompt`` / ``pause`` / ``resume`` are commands to the busy loop; ``aclose`` cancels the
    session and frees its cache)."""

    def __init__(self, handle):
        self._h = handle
        self.width, self.height, self.fps = handle.width, handle.height, handle.fps

    async def next_chunk(self) -> np.ndarray:
        from streamgen.engine.core import EngineError

        try:
            frames = await self._h.get()
        except EngineError as e:
            raise GenerationError(str(e)) from None
        self.switched = self._h.last_switched
        return frames

    @property
    def lag_s(self) -> float | None:
        """Seconds the engine is behind real time on this session (status ``lag_s``)."""
        return self._h.lag_s

    def set_prompt(self, prompt: str, *, abandon: bool = True) -> None:
        self._h.set_prompt(prompt, abandon=abandon)

    def pause(self) -> None:
        self._h.pause()

    def resume(self) -> None:
        self._h.resume()

    async def aclose(self) -> None:
        self._h.cancel()


class EngineFactory(SourceFactory):
    """Serves one model through one :class:`streamgen.engine.Engine` (started here, closed by ``aclose``).
    ``width`` / ``height``: the size of a ``start`` that leaves them out."""

    def __init__(self, model: str, engine, *, width: int, height: int, executor: Executor | None = None):
        self.model, self.engine = model, engine
        self.width, self.height = width, height
        self.executor = executor
        engine.start()

    async def create(self, request: StreamRequest, name: str = "", on_queued=None) -> FrameSource:
        from streamgen.engine.core import EngineError, GenRequest

        if request.model not in (None, "", self.model):
            raise SourceError("model", f"model {request.model!r} is not served here; available: [{self.model!r}]")
        fps = self.engine.fps
        if request.fps not in (None, fps):
            raise SourceError("fps", f"{self.model} generates {fps} fps; ask for fps {fps} "
                                     f"(or leave it out) and use interpolate 2 or 4 for more")
        w, h = request.width or self.width, request.height or self.height
        req = GenRequest(prompt=request.prompt, width=w, height=h, seed=request.seed or 0, chunks=request.chunks,
                         interpolate=request.interpolate or 1, name=name)
        try:
            self.engine.validate(req)  # before the image is decoded at a size that may be refused
            if request.image is not None:
                req.image = await asyncio.get_running_loop().run_in_executor(
                    self.executor, decode_image, request.image, w, h)
            handle = await self.engine.open(req, on_queued=on_queued)
        except EngineError as e:
            raise SourceError(e.field, str(e), e.code, e.retry_after) from None
        return EngineSource(handle)

    def describe_metrics(self, m) -> None:
        eng = self.engine
        m.gauge("engine_pool_used_bytes", "bytes of the engine's KV cache pool reserved by sessions",
                fn=lambda: eng.pool.used_bytes)
        m.gauge("engine_pool_capacity_bytes", "bytes of the engine's KV cache pool (0: unbounded)",
                fn=lambda: eng.pool.capacity_bytes or 0)
        m.gauge("engine_pool_sessions", "sessions holding a range of the engine's KV cache pool",
                fn=lambda: eng.pool.sessions)
        m.gauge("engine_queue_length", "starts waiting for KV cache pool memory", fn=lambda: eng.queue_length)
        m.gauge("engine_session_lag_seconds", "seconds a session's generation is behind real time "
                "(negative: ahead), by session", labels=("session",),
                fn=lambda: {(name,): lag for name, lag in eng.lags.items()})

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.engine.close)
