"""The generation engine: one busy-loop thread owns the model and the GPU; the event loop talks
to it through queues (vLLM v1 ``EngineCore`` busy loop vs ``AsyncLLM``).

Flow of one step (busy thread)::

    scheduler.next_batch() -> one chunk program per session (SessionState.chunk_program)
        -> batch.run_programs: the sessions' model calls of one shape run as one forward
           (WanModel.forward_rows: each row its own cache slot in the pool, position, valid length)
        -> per session: decode -> (T,3,H,W) in [0,1] -> RIFE (factor)  # boundary pair kept in state
        -> uint8 (T,H,W,3) -> pinned host copy + CUDA event (no host sync)
        -> handle's asyncio.Queue via call_soon_threadsafe

The event-loop side (:class:`SessionHandle`) awaits the event in a worker thread, so neither loop
ever blocks the other. Commands (open, prompt, pause, cancel, request) are queued to the busy
thread, which is the only thread that touches models, caches and CUDA state. A failure inside one
session (bad image, OOM, a prompt the text encoder rejects, a bug) is delivered to that session's
handle as :class:`EngineError` and the loop goes on with the others; a cancelled session's cache
is dropped at once. A prompt command also marks its session (``_new_prompt``, read by the busy
thread between forwards): a chunk of the old prompt still in its denoising steps is abandoned there
(``batch.run_programs``' interrupt: nothing of it is committed, the session stays due), so the
new prompt's re-cache and first chunk start at once instead of after it
(``EngineSettings.interrupt_on_prompt``); a cancel command marks it too (``_cancelling``), and a
cancelled session's chunk is abandoned the same way, so its batch and the next open do not wait. When the loop ends (``close()``) every handle still waiting gets an
EngineError, and ``open()`` refuses new streams, so no awaiting coroutine is left hanging.

Threads: ``_handles`` is shared by both sides and guarded by ``_lock``; every other piece of
state (sessions, scheduler, interpolators, stats) belongs to the busy thread. The owner of a
handle must cancel it.

Admission by memory: ``open`` reserves the session's KV cache in the pool (:mod:`streamgen.engine.pool`,
size from the model config, frame size, window and CFG) before the session exists. When it does not
fit, the open waits in a bounded FIFO queue (``on_queued(position)`` tells the caller where it
stands) until a session ends and frees enough; when the queue is full it is refused at once with
code ``overloaded`` and a ``retry_after`` hint; a session larger than the whole pool is refused with
``bad_field`` ``width``. A cancelled or ended session's range is released in the same step, and the
head of the queue is admitted. How many sessions a server admits in all is also capped by its
session registry.

Each step runs one batch chosen by :mod:`streamgen.engine.scheduler` (sessions of the same frame
size, most urgent first: new sessions, then those behind real time): one chunk for each, their model
calls batched by :mod:`streamgen.engine.batch`. Every session keeps its own cache position, prompt
and noise, so a session's chunks are the same bytes (CPU, float32) whether it ran alone or in any
batch. A request with ``chunks`` ends after exactly that many chunks (then ``get()`` raises
EOFError); without an attention window (``local_frames=None``) the cache is sized for ``chunks`` and
a request must give it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from streamgen.engine.batch import Interrupted, run_programs
from streamgen.engine.pool import CachePool, Reservation
from streamgen.engine.scheduler import Scheduler
from streamgen.media.frames import to_uint8, unit_frames
from streamgen.protocol import DEFAULT_LIMITS, INTERPOLATE_FACTORS, Limits

log = logging.getLogger(__name__)



class EngineError(RuntimeError):
    """Generation of one session failed or was refused. ``code`` is a protocol error code;
    ``retry_after``: seconds after which a refused start may be tried again (``overloaded``)."""

    def __init__(self, message: str, code: str = "generation_failed", field: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.code, self.field, self.retry_after = code, field, retry_after


@contextmanager
def engine_threads(device: torch.device | str) -> Iterator[int | None]:
    """For a process whose heavy torch work runs on one engine's busy thread (`serve`, `generate`):
    on the CPU, the calling thread keeps one intra-op thread while the block runs, and the block gets
    torch's thread count for ``EngineSettings.threads`` (the busy thread takes them); elsewhere None.
    Enter it before this thread runs any parallel torch op (building the pipeline included).

    Why: torch's OpenMP runtime (libgomp) gives every thread that runs a parallel op its own team
    of workers, and once the process holds more of them than there are cores it stops letting
    idle workers spin between parallel regions. A chunk is thousands of small parallel ops, and each
    then waits for a sleeping worker to wake. On the 2-core CI machine the toy's chunk took 265-305 ms
    on the busy thread after the main thread had built the pipeline with two threads, and 177-210 ms
    when the main thread never had a team (tests/test_cpu_paths.py checks who holds the threads)."""
    if torch.device(device).type != "cpu":
        yield None
        return
    n = torch.get_num_threads()  # also fixes this thread's OpenMP setting before it is changed below
    torch.set_num_threads(1)
    try:
        yield n
    finally:
        torch.set_num_threads(n)


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
    compiled: bool = False  # the DiT's blocks run compiled (one graph per input shape: the warm-up covers batch sizes)


@dataclass
class GenRequest:
    """One session. image: uint8 (height, width, 3) RGB first frame, or None; chunks: how many
    chunks in all (None: until cancelled); prompts: {chunk index: prompt} switches that take effect
    exactly at that chunk (`generate --prompt-at`); name: the session's id in log lines; lead_s:
    with ``SessionHandle.set_viewer`` reports, the session yields while this many seconds of media
    ahead of its viewer (None: paced by its requests alone, as the server's sessions are)."""

    prompt: str
    width: int
    height: int
    seed: int = 0
    chunks: int | None = None
    interpolate: int = 1
    image: np.ndarray | None = None
    prompts: dict[int, str] = field(default_factory=dict)
    name: str = ""
    lead_s: float | None = None


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
    warmup: GenRequest | tuple[GenRequest, ...] | None = None  # throwaway sessions run once when the busy loop starts
    warmup_switch: bool | None = None  # the warm-up also fills the window and switches prompt (None: on CUDA)
    # with compiled blocks (one graph per batch size), the warm-up also runs one batched chunk at every
    # batch size 2..warmup_batch (None: max_batch; 0 or 1: none)
    warmup_batch: int | None = None
    # batching and admission (see the module docstring)
    max_batch: int = 8  # sessions in one step's batch
    cache_memory: int | None = None  # bytes of the KV cache pool; None: unbounded on the CPU, on CUDA
    #                                  cache_fraction of the memory free when the engine is built
    cache_fraction: float = 0.6
    queue_limit: int = 8  # opens that may wait for pool memory; more are refused ("overloaded")
    retry_after_s: float = 10.0  # the retry hint of an "overloaded" refusal
    # a prompt change abandons the old prompt's chunk still being denoised (nothing of it is
    # committed yet), so the new prompt's first chunk starts at the next forward, not after it
    interrupt_on_prompt: bool = True
    # intra-op CPU threads of the busy thread (torch.set_num_threads there); None: leave torch's setting
    # (see ``engine_threads``, which `serve` and `generate` use on the CPU)
    threads: int | None = None


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


@dataclass(eq=False)
class _Waiter:
    need: int
    name: str
    fut: asyncio.Future
    on_queued: Any = None
    position: int = 0


class SessionHandle:
    """Event-loop side of one session. ``await get()`` returns the next chunk as uint8 (T,H,W,3)."""

    def __init__(self, engine: "Engine", sid: int, width: int, height: int, fps: int):
        self._engine, self.sid, self.width, self.height, self.fps = engine, sid, width, height, fps
        self.reservation: Reservation | None = None  # its cache range in the engine's pool
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

    def set_prompt(self, prompt: str, *, abandon: bool = True) -> None:
        """From the next chunk on. ``abandon`` (with ``interrupt_on_prompt``): the old prompt's chunk
        in progress may be dropped; False lets it finish (its viewer needs it to bridge the wait)."""
        self._engine._command("prompt", self.sid, prompt, interrupt=abandon)

    def pause(self) -> None:
        self._engine._command("pause", self.sid)

    def resume(self) -> None:
        self._engine._command("resume", self.sid)

    @property
    def lag_s(self) -> float | None:
        """Seconds this session's generation is behind real time (< 0: ahead); None before its
        first chunk."""
        return self._engine._lag_by_sid.get(self.sid)

    def set_viewer(self, position_s: float | None) -> None:
        """The viewer's position (media seconds): the session yields when ``lead_s`` ahead of it."""
        self._engine._command("viewer", self.sid, position_s)

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
        self.scheduler = Scheduler(s.max_ahead, s.max_batch)
        self.pool = CachePool(self._pool_capacity(), device=pipeline.device)
        self._waiting: list[_Waiter] = []  # opens waiting for pool memory, FIFO (event loop only)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[int, SessionHandle] = {}
        self._sessions: dict[int, _EngineSession] = {}
        self._interps: dict[int, Any] = {}  # factor -> Interpolator (they share pipeline.rife)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.stats = {"chunks": 0, "frames": 0, "busy_s": 0.0, "errors": 0, "steps": 0, "forwards": 0, "rows": 0,
                      "interrupted": 0}
        self._new_prompt: dict[int, str] = {}  # sid -> its latest prompt command not yet applied (any thread sets)
        self._cancelling: set[int] = set()  # sessions with a cancel command not yet applied (any thread adds)
        self.lags: dict[str, float] = {}  # session name -> seconds behind real time (busy thread writes)
        self._lag_by_sid: dict[int, float] = {}

    def _pool_capacity(self) -> int | None:
        s, dev = self.settings, torch.device(self.pipeline.device)
        if s.cache_memory is not None:
            return s.cache_memory
        if dev.type == "cuda" and torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info(dev)
            return int(free * s.cache_fraction)
        return None

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

    def cache_bytes(self, req: GenRequest) -> int:
        """Bytes of pool memory a session of ``req`` takes: its KV cache(s), from the model config,
        the frame size and the attention window (or, without one, its chunk count)."""
        from streamgen.sampling.stream import SessionState

        p, s = self.pipeline, self.settings
        fpc = s.frames_per_chunk or p.model.cfg.frames_per_chunk
        frames = s.local_frames or (req.chunks or 1) * fpc + (req.image is not None)
        caches = 2 if s.guidance != 1.0 else 1
        size = torch.empty((), dtype=p.dtype).element_size()
        return caches * SessionState.model_cache_numel(p.model, 1, (req.height // 8, req.width // 8), frames) * size

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    async def open(self, req: GenRequest, on_queued=None) -> SessionHandle:
        """Start a session. Raises EngineError for a bad request (see ``validate``), with code
        ``busy`` when the engine is not running, ``overloaded`` (``retry_after`` set) when the pool
        is full and so is its queue. While the session waits for pool memory, ``on_queued(position)``
        (1 = next) is called each time its position changes."""
        self.validate(req)
        need = self.cache_bytes(req)
        if not self.pool.fits_ever(need):
            raise EngineError(f"a {req.width}x{req.height} session needs {need / 2**20:.1f} MiB of KV cache; this "
                              f"engine's pool holds {self.pool.capacity_bytes / 2**20:.1f} MiB: ask for a smaller size",
                              "bad_field", "width")
        self._check_running()
        self._loop = asyncio.get_running_loop()
        res = self.pool.reserve(need, req.name) if not self._waiting else None  # FIFO: no overtaking
        if res is None:
            res = await self._wait_for_memory(need, req.name, on_queued)
        sid = next(self._ids)
        handle = SessionHandle(self, sid, req.width, req.height, self.pipeline.fps * req.interpolate)
        handle.reservation = res
        with self._lock:
            if self._thread is None or self._stop.is_set():
                self.pool.release(res)
                self._check_running()
            self._handles[sid] = handle
        self._command("open", sid, req)
        return handle

    def _check_running(self) -> None:
        if self._thread is None or self._stop.is_set():
            raise EngineError("the generation engine is not running (the server is shutting down); "
                              "try again later", "busy")

    async def _wait_for_memory(self, need: int, name: str, on_queued) -> Reservation:
        if len(self._waiting) >= self.settings.queue_limit:
            raise EngineError(f"the generation engine is full ({self.pool.sessions} sessions hold its cache memory, "
                              f"{len(self._waiting)} starts are waiting); try again in "
                              f"{self.settings.retry_after_s:g} s", "overloaded", retry_after=self.settings.retry_after_s)
        w = _Waiter(need, name, asyncio.get_running_loop().create_future(), on_queued)
        self._waiting.append(w)
        self._grant()  # memory freed between the failed reserve and now is not lost
        try:
            return await w.fut
        except BaseException:
            if w in self._waiting:
                self._waiting.remove(w)
                self._grant()  # the next one may fit where this one did not
            elif w.fut.done() and not w.fut.cancelled() and w.fut.exception() is None:
                self.pool.release(w.fut.result())  # granted just as the caller gave up
                self._grant()
            raise

    def _report_positions(self) -> None:
        for i, w in enumerate(self._waiting, 1):
            if w.position != i:
                w.position = i
                if w.on_queued is not None:
                    try:
                        w.on_queued(i)
                    except Exception:  # noqa: BLE001 - a reporting callback must not stop admission
                        log.exception("queue position callback failed")

    def _grant(self) -> None:
        """Admit waiting opens, in order, while the head fits (event loop)."""
        if self._stop.is_set():
            for w in self._waiting:
                if not w.fut.done():
                    w.fut.set_exception(EngineError("the generation engine stopped", "busy"))
            self._waiting.clear()
            return
        while self._waiting:
            w = self._waiting[0]
            if w.fut.done():
                self._waiting.pop(0)
                continue
            res = self.pool.reserve(w.need, w.name)
            if res is None:
                break
            self._waiting.pop(0)
            w.fut.set_result(res)
        self._report_positions()

    def _memory_freed(self) -> None:  # any thread
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._grant)
            except RuntimeError:  # the loop is closed
                pass

    def _command(self, kind: str, sid: int, arg: Any = None, *, interrupt: bool = True) -> None:
        if kind == "prompt" and interrupt:
            self._new_prompt[sid] = arg  # before the command: the busy thread removes it when applying it
        elif kind == "prompt":
            self._new_prompt.pop(sid, None)  # the latest prompt asks to keep the chunk in progress
        elif kind == "cancel":
            self._cancelling.add(sid)  # its chunk in progress is abandoned at the next forward
        self._cmds.put((kind, sid, arg))

    # -- busy loop (engine thread only) ----------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
            log.info("engine: the busy thread runs %d intra-op CPU threads", torch.get_num_threads())
        warm = self.settings.warmup
        for req in (warm,) if isinstance(warm, GenRequest) else (warm or ()):
            self._warmup(req)  # one per frame size: kernel choice and autotuning are per shape
        try:
            while not self._stop.is_set():
                batch = self.scheduler.next_batch()
                try:  # block only when there is nothing to run
                    cmd = self._cmds.get(timeout=0.5) if not batch else self._cmds.get_nowait()
                except queue.Empty:
                    cmd = None
                if cmd is not None:
                    self._handle_command(*cmd)
                    continue  # drain all commands before the next step
                if batch:
                    self._step([slot.sid for slot in batch])
        except BaseException:
            log.exception("engine busy loop crashed")
            raise
        finally:
            self._stop.set()
            with self._lock:
                waiting = [h for h in self._handles.values() if not h._cancelled]
            for h in waiting:
                h._deliver(EngineError("the generation engine stopped", "generation_failed"))
            for sid in list(self._handles):
                self._drop(sid)
            self._memory_freed()  # fails the opens still waiting

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
            if self._new_prompt.get(sid) == arg:  # (a later prompt may be queued behind this one)
                self._new_prompt.pop(sid, None)
            self._sessions[sid].pending_prompt = arg
        elif kind in ("pause", "resume"):
            self.scheduler.set_paused(sid, kind == "pause")
        elif kind == "viewer":
            self.scheduler.set_viewer(sid, arg)

    def _make_session(self, req: GenRequest, res: Reservation | None = None) -> _EngineSession:
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
        storage = None if res is None else (lambda numel, dtype: self.pool.storage(res, numel, dtype))
        state = SessionState(p.model, req.prompts.get(0, req.prompt), height=req.height, width=req.width, config=cfg,
                             text_encoder=p.text_encoder, decoder=p.decoder, negative_prompt=s.negative_prompt,
                             image=image, total_frames=total, device=p.device, dtype=p.dtype, cache_storage=storage)
        if p.graphs is not None:
            p.graphs.attach(state)
        es = _EngineSession(state, self._interpolator(req.interpolate), req)
        es.fps = p.fps * req.interpolate
        return es

    def _open_session(self, sid: int, req: GenRequest) -> None:
        with self._lock:
            handle = self._handles.get(sid)
        if handle is None or handle._cancelled:
            return
        try:
            self._sessions[sid] = es = self._make_session(req, handle.reservation)
            # sessions of one frame size and chunk shape can share a forward
            key = (req.height, req.width) if es.state.batchable else ("alone", sid)
            self.scheduler.admit(sid, limit=req.chunks, key=key, lead_s=req.lead_s)
        except Exception as e:  # noqa: BLE001 - reported to this session only
            self._fail(sid, e, "could not start", name=req.name)

    def _warmup(self, req: GenRequest, chunks: int = 2) -> None:
        """Run a throwaway session so that kernel loading, cuDNN autotuning and compilation happen
        before the first viewer arrives (the first chunk on a cold H100 takes seconds, later ones < 1 s).
        On CUDA it also streams until the attention window is full and switches the prompt once, so
        the re-cache's one forward over the whole window (a shape no chunk has) is not first met by
        a viewer's prompt change. Settings were validated when the engine was built, so a failure
        here is a bug: it is logged with its traceback and the engine goes on."""
        t0 = time.perf_counter()
        s = self.settings
        on = s.warmup_switch if s.warmup_switch is not None else torch.device(self.pipeline.device).type == "cuda"
        switch = on and bool(s.local_frames)
        if switch:
            fpc = s.frames_per_chunk or self.pipeline.model.cfg.frames_per_chunk
            chunks = max(chunks, -(-s.local_frames // fpc))
        try:
            es = self._make_session(req)
            for _ in range(chunks):
                out = self._compute(es)
            if switch:
                es.pending_prompt = req.prompt + " (switched)"
                out = self._compute(es)
            if out.ready is not None:
                out.ready.synchronize()
        except Exception:  # noqa: BLE001 - the first viewer then pays the warm-up time
            log.exception("engine warm-up failed")
            return
        log.info("engine warm-up: %d chunks%s at %dx%d in %.1f s", chunks, " and a prompt switch" if switch else "",
                 req.width, req.height, time.perf_counter() - t0)
        if self.pipeline.compiled:
            self._warmup_batches(req)

    def _warmup_batches(self, req: GenRequest) -> None:
        """One chunk of B warm-up sessions batched, at every batch size B = 2..warmup_batch: compiled
        blocks make one graph per batch size, and without this the first viewer to join a batch,
        and every viewer already in it (they share that step), waits for its compile (5-6 s at 832x480
        on an H200). The sessions' caches come from the pool; where it holds no more, it stops there."""
        s = self.settings
        top = min(s.max_batch, s.max_batch if s.warmup_batch is None else s.warmup_batch)
        t0, done = time.perf_counter(), 1
        for b in range(2, top + 1):
            need = self.cache_bytes(req)
            held = [r for r in (self.pool.reserve(need, "warm-up") for _ in range(b)) if r is not None]
            try:
                if len(held) < b:
                    log.info("engine warm-up: batches up to %d (the cache pool holds no %d sessions of %dx%d)",
                             done, b, req.width, req.height)
                    break
                sessions = [self._make_session(req, r) for r in held]
                out = run_programs(self.pipeline.model, {i: self._program(es) for i, es in enumerate(sessions)})
                err = next((o for o in out.values() if isinstance(o, BaseException)), None)
                if err is not None:
                    raise err
                done = b
            except Exception:  # noqa: BLE001 - as a failed warm-up: the viewers then pay the compile
                log.exception("engine warm-up of batch size %d failed", b)
                break
            finally:
                for r in held:
                    self.pool.release(r)
        if done > 1:
            log.info("engine warm-up: batch sizes 2..%d at %dx%d in %.1f s", done, req.width, req.height,
                     time.perf_counter() - t0)

    def _interpolator(self, factor: int):
        from streamgen.media.interpolate import Interpolator

        if factor not in self._interps:
            self._interps[factor] = Interpolator(self.pipeline.rife if factor > 1 else None, factor,
                                                 self.settings.scene_threshold)
        return self._interps[factor]

    def _step(self, sids: list[int]) -> None:
        """One chunk for each session of ``sids``, their model calls batched (engine.batch)."""
        t0 = time.perf_counter()
        programs = {sid: self._program(self._sessions[sid]) for sid in sids}
        interrupt = self._interrupt
        results = run_programs(self.pipeline.model, programs, self.stats, interrupt=interrupt)
        self.stats["steps"] += 1
        self.stats["busy_s"] += time.perf_counter() - t0
        for sid in sids:
            out = results[sid]
            if isinstance(out, Interrupted):  # still due: its next step starts under the new prompt
                self.stats["interrupted"] += 1
                continue
            if isinstance(out, BaseException):  # one session's failure must not stop the others
                if isinstance(out, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                self._fail(sid, out, "generation failed")
                continue
            es = self._sessions[sid]
            self.scheduler.served(sid, out.frames.shape[0] / es.fps)
            self.stats["chunks"] += 1
            self.stats["frames"] += out.frames.shape[0]
            with self._lock:
                handle = self._handles.get(sid)
            if handle is not None:
                handle._deliver(out)
                if self.scheduler.slots[sid].done:
                    handle._deliver(None)
                    self._drop(sid, keep_handle=True)
        self._update_lags()

    def _interrupt(self, sid: int) -> bool:
        """run_programs' interrupt (busy thread): the session was cancelled (nobody will take the
        chunk: the other sessions and the next open need not wait for it), or, with
        ``interrupt_on_prompt``, a prompt other than its own arrived."""
        if sid in self._cancelling:
            return True
        new = self._new_prompt.get(sid) if self.settings.interrupt_on_prompt else None
        return new is not None and new != self._sessions[sid].state.prompt

    def _update_lags(self) -> None:
        by_sid = {sid: lag for sid, lag in self.scheduler.lags().items() if sid in self._sessions}
        # replaced whole: /metrics and the handles read them from the event loop
        self.lags = {self._sessions[sid].name or f"#{sid}": lag for sid, lag in by_sid.items()}
        self._lag_by_sid = by_sid

    def _compute(self, es: _EngineSession) -> _Chunk:
        """One chunk of one session, alone."""
        from streamgen.sampling.stream import run_alone

        return run_alone(self.pipeline.model, self._program(es))

    def _program(self, es: _EngineSession):
        """One chunk of one session as a program (see engine.batch): prompt switch, generate, decode,
        interpolate, uint8, copy to (pinned) host memory; its result is the _Chunk."""
        st = es.state
        switch = es.prompts.pop(st.chunk_index, None)
        if es.pending_prompt is not None:
            switch, es.pending_prompt = es.pending_prompt, None
        if switch is not None and switch != st.prompt:
            st.set_prompt(switch)
        chunk = yield from st.chunk_program()
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
        """Forget a session: its state, its schedule and its pool range (freed now; the queue's head
        may then be admitted)."""
        self._sessions.pop(sid, None)
        self._new_prompt.pop(sid, None)
        self._cancelling.discard(sid)
        self.scheduler.remove(sid)
        self._update_lags()
        with self._lock:
            handle = self._handles.get(sid) if keep_handle else self._handles.pop(sid, None)
        if handle is not None and handle.reservation is not None:
            self.pool.release(handle.reservation)
            self._memory_freed()
