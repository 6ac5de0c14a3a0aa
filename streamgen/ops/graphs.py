"""CUDA graphs over a session's whole chunk step, as a transform applied from outside.

``graphs = ChunkGraphs(model)`` once per model, then ``graphs.attach(session)`` for each
``SessionState`` (False, after one log line, when it cannot apply: no CUDA, CFG/multistep sampler,
offload hooks). An attached session's ``_chunk_step`` (the 4 denoising ``forward_chunk`` calls and
the cache pass at t=0) runs as one CUDA graph replay over its preallocated, fixed-shape ``WanCache``:
the self-attention over the cache, the cache writes and the cross-attention over the prompt's K/V
(``cache.cross_k``/``cross_v``, static buffers that ``set_prompt`` refills in place) are inside it.

What is outside the graph, per chunk (so one graph serves every chunk of the same cache layout):
1. the noise: the session's generator draws ``num_steps`` tensors into static buffers, in the
   order eager draws them, so the stream is the same random stream;
2. RoPE cos/sin of the chunk's absolute frames, copied into static buffers (``model._rope`` is
   shadowed by them during capture), so the absolute position is not baked in;
3. the cache's Python bookkeeping (``frames_written``, ring end): a dry run of ``cache._plan`` /
   ``cache._commit`` for the step's calls. The plans' slot layout (which slots are written, how many
   keys are attended) is the graph's key. With a rolling window the layouts repeat every
   ``ring / frames_per_chunk`` chunks; without one, every chunk position is its own graph.

A layout runs eager the first time this transform sees it (kernel loading, cuDNN/cuBLAS set-up,
compilation), then is captured, once per cache. Caches are pooled: a new session of the same geometry
takes a free cache of an ended session (prompt K/V rewritten, self-attention reset), so its graphs
are already there. Eager stays the reference: the replay computes what ``SessionState._chunk_step``
computes (the same code is what gets captured). If capture fails, this transform logs one line and
every session runs eager from then on.

``graph_factory`` makes the graph objects (``capture(fn)`` records, ``replay()`` reruns): the default
wraps ``torch.cuda.CUDAGraph``; :class:`EmulatedGraph` reruns the captured Python function and lets
the CPU tests drive every part of this path except the CUDA capture itself.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

__all__ = ["ChunkGraphs", "CudaGraph", "EmulatedGraph"]


class CudaGraph:
    """``torch.cuda.CUDAGraph`` behind the two calls ChunkGraphs uses; all graphs of one
    ChunkGraphs share one memory pool (their replays never overlap)."""

    def __init__(self, pool):
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn: Callable[[], None]) -> None:
        with torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local"):
            fn()

    def replay(self) -> None:
        self.graph.replay()


class EmulatedGraph:
    """Replays by calling the captured function again: same static buffers, same bookkeeping, no CUDA."""

    def __init__(self, pool=None):
        self.fn: Callable[[], None] | None = None

    def capture(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        fn()

    def replay(self) -> None:
        self.fn()


def _book(cache) -> tuple[int, int, int]:
    return cache.origin, cache.frames_written, cache._ring_end


def _set_book(cache, book: tuple[int, int, int]) -> None:
    cache.origin, cache.frames_written, cache._ring_end = book


def _plan_sig(p) -> tuple:
    """What of a chunk plan the kernels see (slots written, keys attended); positions are not in it."""
    return tuple(p.write), p.n_prefix_keys, tuple(p.key_slots), p.concat_chunk, p.commit


@contextlib.contextmanager
def _shadowed(*items: tuple[Any, str, Any]):
    """Set instance attributes for the duration (nn.Module too), then put back what was there."""
    saved = []
    try:
        for obj, name, value in items:
            saved.append((obj, name, name in obj.__dict__, obj.__dict__.get(name)))
            object.__setattr__(obj, name, value)
        yield
    finally:
        for obj, name, had, old in reversed(saved):
            if had:
                object.__setattr__(obj, name, old)
            else:
                object.__delattr__(obj, name)


@dataclass
class _Entry:
    """One captured chunk step: its graph and the static buffers it reads and writes."""

    plans: tuple
    start: int  # capture-time position (the emulated replay re-runs it there)
    pre: tuple[int, int, int]  # capture-time cache bookkeeping before the step
    noise: list[torch.Tensor]
    rope: tuple[torch.Tensor, torch.Tensor]
    t: torch.Tensor
    t_ctx: torch.Tensor
    out: torch.Tensor
    graph: Any = None
    session: Any = None  # the session being served, only while capturing / replaying
    replays: int = 0


@dataclass
class _Stats:
    eager: int = 0  # chunk steps run eager by this transform (first sight of a layout, fallbacks)
    captures: int = 0
    replays: int = 0
    pooled: int = 0  # sessions that took a pooled cache
    extra: dict = field(default_factory=dict)


class ChunkGraphs:
    """CUDA graphs for the chunk steps of sessions over one ``WanModel`` (see the module docstring).

    max_free_caches: caches of ended sessions kept for reuse per geometry (their graphs with them).
    graph_factory: ``factory(pool) -> graph``; None: :class:`CudaGraph` (needs CUDA sessions).
    """

    def __init__(self, model, *, max_free_caches: int = 2, graph_factory: Callable | None = None):
        self.model = model
        self.max_free_caches = max_free_caches
        self._cuda = graph_factory is None
        self._factory = graph_factory or CudaGraph
        self._pool = torch.cuda.graph_pool_handle() if self._cuda and torch.cuda.is_available() else None
        self._graphs: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()  # cache -> key -> entry
        self._warm: set = set()  # layouts run eager once (kernels loaded, tuned, compiled)
        self._free: dict[tuple, list] = {}  # geometry -> free caches
        self.enabled = True
        self.stats = _Stats()
        self._said: set[str] = set()

    # -- setup --------------------------------------------------------------------------------
    def _say(self, kind: str, msg: str, *args, level=logging.INFO) -> None:
        """One log line per kind of fallback."""
        if kind not in self._said:
            self._said.add(kind)
            log.log(level, msg, *args)

    def _why_not(self, session) -> str | None:
        if not self.enabled:
            return "CUDA graph capture failed earlier in this process"
        if self._cuda and (session.device.type != "cuda" or not torch.cuda.is_available()):
            return f"CUDA graphs need a CUDA device (session on {session.device})"
        if session.config.sampler != "self-forcing" or session.cache_uncond is not None:
            return f"CUDA graphs cover the self-forcing sampler without CFG (got {session.config.sampler!r})"
        if any(b._forward_pre_hooks or b._forward_hooks for b in self.model.blocks):
            return "CUDA graphs cannot capture blocks with forward hooks (offload)"
        if session.model is not self.model:
            raise ValueError("this ChunkGraphs was made for another model")
        return None

    def attach(self, session) -> bool:
        """Route ``session``'s chunk steps through CUDA graphs. False (one log line) when not applicable;
        the session then runs eager, unchanged."""
        why = self._why_not(session)
        if why is not None:
            self._say(why, "%s; running eager", why)
            return False
        geom = self._geometry(session.cache)
        free = self._free.get(geom)
        if free and session.next_frame == 0 and session._pending_prompt is None:
            cache = free.pop()
            cache.reset_self_attn(0)
            self.model.set_prompt(cache, session._prompt.context)
            session.cache = cache  # the session's own fresh cache is dropped
            self.stats.pooled += 1
        weakref.finalize(session, self._release, geom, session.cache)
        ref = weakref.ref(session)
        session._chunk_step = lambda start: self._step(ref(), start)  # shadows SessionState._chunk_step
        return True

    @staticmethod
    def detach(session) -> None:
        session.__dict__.pop("_chunk_step", None)

    @staticmethod
    def _geometry(cache) -> tuple:
        return (cache.batch, cache.latent_hw, cache.capacity, cache.local_frames, cache.sink_frames,
                cache.dtype, cache.device)

    def _release(self, geom: tuple, cache) -> None:
        free = self._free.setdefault(geom, [])
        if len(free) < self.max_free_caches:
            free.append(cache)

    # -- the step -----------------------------------------------------------------------------
    def _step(self, session, start: int) -> torch.Tensor:
        cache = session.cache
        eager = type(session)._chunk_step
        if not self.enabled:
            return eager(session, start)
        f = session.frames_per_chunk
        flags = [False] * len(session.timesteps) + [True]
        pre = _book(cache)
        # 1. bookkeeping of the step's calls, as forward_chunk does it (no kernels)
        try:
            plans = []
            for update in flags:
                p = cache._plan(start, f, update)
                cache._commit(p)
                plans.append(_plan_sig(p))
        except ValueError:
            _set_book(cache, pre)
            return eager(session, start)  # raises the same error, eagerly
        post = _book(cache)
        key = (tuple(plans), f, tuple(session._sigmas), tuple(session.timesteps.tolist()),
               float(session.config.context_t), session.latent_dtype, tuple(session._noise.shape))
        per_cache = self._graphs.setdefault(cache, {})
        entry = per_cache.get(key)
        if entry is None:
            if key not in self._warm:
                self._warm.add(key)
                self.stats.eager += 1
                _set_book(cache, pre)
                return eager(session, start)
            try:
                entry = self._capture(session, start, pre, key)
            except Exception as e:  # noqa: BLE001 - capture fails in many ways (sync, unsupported op)
                self.enabled = False
                self._say("capture", "CUDA graph capture failed (%s: %s); running eager from now on",
                          type(e).__name__, (str(e).splitlines() or [""])[0][:200], level=logging.WARNING)
                _set_book(cache, pre)
                self.stats.eager += 1
                return eager(session, start)
            per_cache[key] = entry
            self.stats.captures += 1
        # 2. per-chunk inputs into the static buffers, then one replay
        for buf in entry.noise:
            session._randn(buf)
        cos, sin = self.model._rope((f, *cache.grid_hw), start, session.device)
        entry.rope[0].copy_(cos)
        entry.rope[1].copy_(sin)
        entry.session = session
        try:
            entry.graph.replay()
        finally:
            entry.session = None
        _set_book(cache, post)
        entry.replays += 1
        self.stats.replays += 1
        return entry.out.clone()

    def _capture(self, session, start: int, pre: tuple, key: tuple) -> _Entry:
        noise = [torch.empty_like(session._noise) for _ in range(len(session.timesteps))]
        cos, sin = self.model._rope((session.frames_per_chunk, *session.cache.grid_hw), start, session.device)
        entry = _Entry(plans=key[0], start=start, pre=pre, noise=noise, rope=(cos.clone(), sin.clone()),
                       t=session._t.clone(), t_ctx=session._t_ctx.clone(), out=torch.empty_like(session._noise))
        for buf in noise:
            buf.zero_()  # placeholders; every replay draws the real noise first
        entry.graph = self._factory(self._pool)
        entry.session = session
        saved = _book(session.cache)
        try:
            entry.graph.capture(lambda: self._body(entry))
        finally:
            entry.session = None
            _set_book(session.cache, saved)
        return entry

    def _body(self, entry: _Entry) -> None:
        """What the graph holds: ``SessionState._chunk_step`` at the capture-time position, reading
        noise, RoPE and timesteps from the entry's static buffers, writing x0 into ``entry.out``.
        Leaves the cache's Python bookkeeping as it found it; checks the plans are the key's."""
        session = entry.session
        cache = session.cache
        saved = _book(cache)
        noise = iter(entry.noise)
        seen: list[tuple] = []
        real_plan = cache._plan

        def plan(start_frame, f, update_cache):
            p = real_plan(start_frame, f, update_cache)
            seen.append(_plan_sig(p))
            return p

        _set_book(cache, entry.pre)
        try:
            with _shadowed((session, "_randn", lambda out: next(noise)), (session, "_t", entry.t),
                           (session, "_t_ctx", entry.t_ctx), (self.model, "_rope", lambda grid, s, d: entry.rope),
                           (cache, "_plan", plan)):
                x0 = type(session)._chunk_step(session, entry.start)
            entry.out.copy_(x0)
        finally:
            _set_book(cache, saved)
        if tuple(seen) != entry.plans:
            raise RuntimeError(f"chunk step made other cache plans than its dry run: {seen} != {entry.plans}")
