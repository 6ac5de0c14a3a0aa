"""The generation engine: one busy-loop thread owns the model and the GPU; the event loop talks
to it through queues (vLLM v1 ``EngineCore`` busy loop vs ``AsyncLLM``).

Flow of one chunk (busy thread)::

    scheduler.next() -> SessionState.next_chunk()          # denoise, cache pass, decode
                     -> (T,3,H,W) in [0,1] -> RIFE (factor)  # boundary pair kept in state
                     -> uint8 (T,H,W,3) -> pinned host copy + CUDA event (no host sync)
                     -> handle's asyncio.Queue via call_soon_threadsafe

The event-loop side (:class:`SessionHandle`) awaits the event in a worker thread, so neither loop
ever blocks the other. Commands (open, prompt, pause, cancel, request) are queued to the busy
thread, which is the only thread that touches models, caches and CUDA state. A failure inside one
session (bad image, OOM, a prompt the text encoder rejects, a bug) is delivered to that session's
handle as :class:`EngineError` and the loop goes on with the others; a cancelled session's cache
is dropped at once. When the loop ends (``close()``) every handle still waiting gets an
EngineError, and ``open()`` refuses new streams, so no awaiting coroutine is left hanging.

Threads: ``_handles`` is shared by both sides and guarded by ``_lock``; every other piece of
state (sessions, scheduler, interpolators, stats) belongs to the busy thread. The engine admits
every session it is given: how many may run at once is decided by the caller (the server's
session registry holds the one admission count). The owner of a handle must cancel it.

Sessions are served one chunk at a time, round robin (:mod:`streamgen.engine.scheduler`); each
keeps its own cache position, so sessions are not batched into one forward. A request with
``chunks`` ends after exactly that many chunks (then ``get()`` raises EOFError); without an
attention window (``local_frames=None``) the cache is sized for ``chunks`` and a request must
give it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from streamgen.engine.scheduler import Scheduler
from streamgen.media.frames import to_uint8, unit_frames
from streamgen.protocol import DEFAULT_LIMITS, INTERPOLATE_FACTORS, Limits

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """Generation of one session failed or was refused. ``code`` is a protocol error code."""

    def __init__(self, message: str, code: str = "generation_failed", field: str | None = None):
        super().__init__(message)
        self.code, self.field = code, field


@dataclass
class Pipeline:
    """The shared, stateless parts: one set serves every session.

    model: WanModel (block-causal); text_encoder: ``encode(list[str])`` (a PromptCache);
    decoder: ``new_state()`` / ``decode_chunk``; vae: WanVAE for image start, or None;
    rife: IFNet for interpolation, or None; fps: frame rate of decoded video (before RIFE);
    preset: the streamgen.pipeline.ModelPreset it was built from (None when assembled by hand);
    graphs: a ChunkGraphs transform that every new session is attached to, or None.
    """

    model: Any
    text_encoder: Any
    decoder: Any
    vae: Any = None
    rife: Any = None
    fps: int = 16
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    preset: Any = None
    graphs: Any = None  # streamgen.ops.graphs.ChunkGraphs: each session's chunk step replayed as CUDA graphs


@dataclass
class GenRequest:
    """One session. image: uint8 (height, width, 3) RGB first frame, or None; chunks: how many
    chunks in all (None: until cancelled); prompts: {chunk index: prompt} switches that take effect
    exactly at that chunk (`generate --prompt-at`); name: the session's id in log lines."""

    prompt: str
    width: int
    height: int
    seed: int = 0
    chunks: int | None = None
    interpolate: int = 1
    image: np.ndarray | None = None
    prompts: dict[int, str] = field(default_factory=dict)
    name: str = ""


@dataclass
class EngineSettings:
    """max_ahead: chunks a session may make before its consumer asks for them (0: on demand, which
    keeps a prompt change one chunk from the screen; more: throughput for files); local_frames /
    sink_frames: attention window of every session (None: no window, each session's cache is sized
    for its ``chunks``); sampler / guidance / negative_prompt: the chunk loop's sampler (CFG only
    for euler/unipc); scene_threshold: RIFE scene-cut detection; limits: the request limits
    (streamgen.protocol.Limits, shared with the wire protocol)."""

    max_ahead: int = 0
    local_frames: int | None = 12
    sink_frames: int = 3
    scene_threshold: float | None = 0.15
    frames_per_chunk: int | None = None
    num_steps: int = 4
    shift: float = 5.0
    sampler: str = "self-forcing"
    guidance: float = 1.0
    negative_prompt: str | None = None
    limits: Limits = DEFAULT_LIMITS
    warmup: GenRequest | None = None  # a throwaway session run once when the busy loop starts


@dataclass
class _Chunk:
    frames: torch.Tensor  # uint8 (T, H, W, 3) on the host (pinned when the device is CUDA)
    ready: Any  # torch.cuda.Event recorded after the copy (blocking: waiting sleeps), or None
    switched: bool


class _EngineSession:
    """Busy-thread state of one session: its chunk loop (caches, noise, prompt) and RIFE state."""

    def __init__(self, state, interp, req: GenRequest):
        self.state, self.interp, self.istate = state, interp, interp.new_state()
        self.prompts = dict(req.prompts)
        self.name = req.name
        self.pending_prompt: str | None = None  # the latest `prompt` command; encoded at the next chunk


class SessionHandle:
    """Event-loop side of one session. ``await get()`` returns the next chunk as uint8 (T,H,W,3)."""

    def __init__(self, engine: "Engine", sid: int, width: int, height: int, fps: int):
        self._engine, self.sid, self.width, self.height, self.fps = engine, sid, width, height, fps
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._closed = False  # no more chunks will be returned
        self._cancelled = False  # the engine was told to drop the session
        self.last_switched = False  # a prompt switch took effect at the chunk get() returned last

    def _deliver(self, item) -> None:  # from the busy thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    async def get(self) -> np.ndarray:
        """The next chunk; raises EngineError if generation failed, EOFError after the last chunk."""
        if self._closed:
            raise EOFError("session is closed")
        self._engine._command("request", self.sid)
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._closed = True
            raise item
        if item is None:
            self._closed = True
            raise EOFError("no more chunks")
        self.last_switched = item.switched
        if item.ready is not None:
            await asyncio.get_running_loop().run_in_executor(None, item.ready.synchronize)
        return item.frames.numpy()

    def set_prompt(self, prompt: str) -> None:
        self._engine._command("prompt", self.sid, prompt)

    def pause(self) -> None:
        self._engine._command("pause", self.sid)

    def resume(self) -> None:
        self._engine._command("resume", self.sid)

    def cancel(self) -> None:
        """Stop generating and free the session's cache. Idempotent."""
        self._closed = True
        if not self._cancelled:
            self._cancelled = True
            self._engine._command("cancel", self.sid)


class Engine:
    """Owns the pipeline and the busy-loop thread; ``open()`` sessions from the event loop."""

    def __init__(self, pipeline: Pipeline, settings: EngineSettings | None = None):
        self.pipeline = pipeline
        self.settings = s = settings or EngineSettings()
        fpc = s.frames_per_chunk or pipeline.model.cfg.frames_per_chunk
        if s.local_frames and fpc > s.local_frames - s.sink_frames:
            raise EngineError(f"frames_per_chunk={fpc} does not fit the attention window: need frames_per_chunk <= "
                              f"local_frames - sink_frames = {s.local_frames} - {s.sink_frames}", "bad_field", "local_frames")
        self.scheduler = Scheduler(s.max_ahead)
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[int, SessionHandle] = {}
        self._sessions: dict[int, _EngineSession] = {}
        self._interps: dict[int, Any] = {}  # factor -> Interpolator (they share pipeline.rife)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.stats = {"chunks": 0, "frames": 0, "busy_s": 0.0, "errors": 0}

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="streamgen-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the busy loop (after the chunk in progress); waiting handles get EngineError."""
        self._stop.set()
        self._cmds.put(("wake", 0, None))
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # a chunk is still running: keep the thread to join later
                log.warning("engine busy loop did not stop within %.0f s (a chunk is still running)", timeout)
                return
            self._thread = None

    # -- event-loop API --------------------------------------------------------------------------

    @property
    def fps(self) -> int:
        return self.pipeline.fps

    def validate(self, req: GenRequest) -> None:
        """Raise EngineError naming the field when ``req`` is outside what this engine takes
        (``settings.limits``, the table the wire protocol checks too, and this pipeline's parts)."""
        lim, p = self.settings.limits, self.pipeline
        if req.interpolate not in INTERPOLATE_FACTORS:
            raise EngineError(f"interpolate must be one of {INTERPOLATE_FACTORS}, got {req.interpolate!r}",
                              "bad_field", "interpolate")
        if req.interpolate > 1 and p.rife is None:
            raise EngineError("interpolate > 1 needs RIFE weights, which this engine was started without "
                              "(--rife PATH/flownet.pkl)", "unsupported", "interpolate")
        for name in ("width", "height"):
            v = getattr(req, name)
            if v % lim.size_multiple or not lim.size_multiple <= v <= lim.max_size:
                raise EngineError(f"{name} must be a multiple of {lim.size_multiple} in {lim.size_multiple}.."
                                  f"{lim.max_size}, got {v}", "bad_field", name)
        if req.width * req.height > lim.max_pixels:
            raise EngineError(f"width*height must be <= {lim.max_pixels} for this model, got {req.width}x{req.height}",
                              "bad_field", "width")
        if req.image is not None and p.vae is None:
            raise EngineError("image start needs the Wan VAE; this model decodes with TAEHV only",
                              "unsupported", "image")
        if req.chunks is not None and not 1 <= req.chunks <= lim.max_chunks:
            raise EngineError(f"chunks must be in 1..{lim.max_chunks}, got {req.chunks}", "bad_field", "chunks")
        if req.chunks is None and not self.settings.local_frames:
            raise EngineError("chunks is required: this engine runs without an attention window, so each "
                              "session's cache is sized for its chunk count", "bad_field", "chunks")
        bad = [i for i in req.prompts if not (req.chunks is None or 0 <= i < req.chunks)]
        if bad:
            raise EngineError(f"prompts: a switch at chunk {bad[0]} is beyond the last chunk {req.chunks - 1}",
                              "bad_field", "prompts")

    async def open(self, req: GenRequest) -> SessionHandle:
        """Start a session. Raises EngineError for a bad request (see ``validate``) or, with code
        ``busy``, when the engine is not running."""
        self.validate(req)
        sid = next(self._ids)
        handle = SessionHandle(self, sid, req.width, req.height, self.pipeline.fps * req.interpolate)
        with self._lock:
            if self._thread is None or self._stop.is_set():
                raise EngineError("the generation engine is not running (the server is shutting down); "
                                  "try again later", "busy")
            self._handles[sid] = handle
        self._command("open", sid, req)
        return handle

    def _command(self, kind: str, sid: int, arg: Any = None) -> None:
        self._cmds.put((kind, sid, arg))

    # -- busy loop (engine thread only) ----------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        if self.settings.warmup is not None:
            self._warmup(self.settings.warmup)
        try:
            while not self._stop.is_set():
                slot = self.scheduler.next()
                try:  # block only when there is nothing to run
                    cmd = self._cmds.get(timeout=0.5) if slot is None else self._cmds.get_nowait()
                except queue.Empty:
                    cmd = None
                if cmd is not None:
                    self._handle_command(*cmd)
                    continue  # drain all commands before the next chunk
                if slot is not None:
                    self._step(slot.sid)
        except BaseException:
            log.exception("engine busy loop crashed")
            raise
        finally:
            self._stop.set()
            with self._lock:
                waiting = [h for h in self._handles.values() if not h._cancelled]
            for h in waiting:
                h._deliver(EngineError("the generation engine stopped", "generation_failed"))
            for sid in list(self._sessions):
                self._drop(sid)

    def _handle_command(self, kind: str, sid: int, arg: Any) -> None:
        try:
            self._apply_command(kind, sid, arg)
        except Exception as e:  # noqa: BLE001 - e.g. a prompt the text encoder rejects: this session only
            self._fail(sid, e, f"{kind} failed")

    def _apply_command(self, kind: str, sid: int, arg: Any) -> None:
        if kind == "open":
            self._open_session(sid, arg)
        elif kind == "cancel":
            self._drop(sid)
        elif sid not in self._sessions:
            return  # the session ended already
        elif kind == "request":
            self.scheduler.requested(sid)
        elif kind == "prompt":  # coalesced: a flood of prompts costs one text encoding per chunk
            self._sessions[sid].pending_prompt = arg
        elif kind in ("pause", "resume"):
            self.scheduler.set_paused(sid, kind == "pause")

    def _make_session(self, req: GenRequest) -> _EngineSession:
        from streamgen.sampling.stream import SessionState, StreamConfig

        p, s = self.pipeline, self.settings
        image = None
        if req.image is not None:
            img = torch.from_numpy(req.image).to(p.device).permute(2, 0, 1)  # (3, H, W) uint8
            img = img.to(next(p.vae.parameters()).dtype).div(127.5).sub(1)[None, :, None]  # (1,3,1,H,W)
            image = p.vae.encode(img)
        cfg = StreamConfig(frames_per_chunk=s.frames_per_chunk, num_steps=s.num_steps, shift=s.shift,
                           sampler=s.sampler, guidance_scale=s.guidance,
                           local_frames=s.local_frames, sink_frames=s.sink_frames if s.local_frames else None,
                           seed=req.seed)
        fpc = s.frames_per_chunk or p.model.cfg.frames_per_chunk
        total = None if s.local_frames else req.chunks * fpc + (image is not None)
        state = SessionState(p.model, req.prompts.get(0, req.prompt), height=req.height, width=req.width, config=cfg,
                             text_encoder=p.text_encoder, decoder=p.decoder, negative_prompt=s.negative_prompt,
                             image=image, total_frames=total, device=p.device, dtype=p.dtype)
        if p.graphs is not None:
            p.graphs.attach(state)
        return _EngineSession(state, self._interpolator(req.interpolate), req)

    def _open_session(self, sid: int, req: GenRequest) -> None:
        with self._lock:
            handle = self._handles.get(sid)
        if handle is None or handle._cancelled:
            return
        try:
            self._sessions[sid] = self._make_session(req)
            self.scheduler.admit(sid, limit=req.chunks)
        except Exception as e:  # noqa: BLE001 - reported to this session only
            self._fail(sid, e, "could not start", name=req.name)

    def _warmup(self, req: GenRequest, chunks: int = 2) -> None:
        """Run a throwaway session so that kernel loading, cuDNN autotuning and compilation happen
        before the first viewer arrives (the first chunk on a cold H100 takes seconds, later ones < 1 s).
        Settings were validated when the engine was built, so a failure here is a bug: it is logged
        with its traceback and the engine goes on."""
        t0 = time.perf_counter()
        try:
            es = self._make_session(req)
            for _ in range(chunks):
                out = self._compute(es)
            if out.ready is not None:
                out.ready.synchronize()
        except Exception:  # noqa: BLE001 - the first viewer then pays the warm-up time
            log.exception("engine warm-up failed")
            return
        log.info("engine warm-up: %d chunks at %dx%d in %.1f s", chunks, req.width, req.height,
                 time.perf_counter() - t0)

    def _interpolator(self, factor: int):
        from streamgen.media.interpolate import Interpolator

        if factor not in self._interps:
            self._interps[factor] = Interpolator(self.pipeline.rife if factor > 1 else None, factor,
                                                 self.settings.scene_threshold)
        return self._interps[factor]

    def _step(self, sid: int) -> None:
        es = self._sessions[sid]
        t0 = time.perf_counter()
        try:
            out = self._compute(es)
        except Exception as e:  # noqa: BLE001 - one session's failure must not stop the others
            if isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            self._fail(sid, e, "generation failed")
            return
        self.scheduler.served(sid)
        self.stats["chunks"] += 1
        self.stats["frames"] += out.frames.shape[0]
        self.stats["busy_s"] += time.perf_counter() - t0
        with self._lock:
            handle = self._handles.get(sid)
        if handle is not None:
            handle._deliver(out)
            if self.scheduler.slots[sid].done:
                handle._deliver(None)
                self._drop(sid, keep_handle=True)

    def _compute(self, es: _EngineSession) -> _Chunk:
        """One chunk of one session: generate, decode, interpolate, uint8, copy to (pinned) host memory."""
        st = es.state
        switch = es.prompts.pop(st.chunk_index, None)
        if es.pending_prompt is not None:
            switch, es.pending_prompt = es.pending_prompt, None
        if switch is not None and switch != st.prompt:
            st.set_prompt(switch)
        chunk = st.next_chunk()
        if chunk.switched:
            es.istate.cut()
        u8 = to_uint8(es.interp.process(unit_frames(chunk.frames), es.istate))  # (T, H, W, 3)
        ready = None
        if u8.is_cuda:
            host = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(u8, non_blocking=True)
            ready = torch.cuda.Event(blocking=True)  # the waiting worker thread sleeps, not spins
            ready.record()
        else:
            host = u8.contiguous().clone()
        return _Chunk(host, ready, chunk.switched)

    def _fail(self, sid: int, e: BaseException, what: str, name: str | None = None) -> None:
        """Log a session's failure once (ERROR, with the session's name) and end that session."""
        self.stats["errors"] += 1
        es = self._sessions.get(sid)
        name = name or (es.name if es is not None else "") or f"#{sid}"
        if isinstance(e, EngineError):
            log.error("session %s: %s: %s", name, what, e)
        else:
            log.error("session %s: %s", name, what, exc_info=e)
        with self._lock:
            handle = self._handles.get(sid)
        if handle is not None:
            err = e if isinstance(e, EngineError) else EngineError(f"{type(e).__name__}: {e}")
            handle._deliver(err)
        self._drop(sid, keep_handle=True)

    def _drop(self, sid: int, keep_handle: bool = False) -> None:
        self._sessions.pop(sid, None)
        self.scheduler.remove(sid)
        if not keep_handle:
            with self._lock:
                self._handles.pop(sid, None)
