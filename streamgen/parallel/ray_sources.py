"""The server's frame sources on engine workers in Ray (``streamgen serve --ray``).

:class:`RaySourceFactory` is the :class:`~streamgen.server.sources.SourceFactory` of the front when the
engines run as Ray actors (:class:`~streamgen.parallel.ray_pool.RayEnginePool`); it behaves as
``EngineFactory`` does for everything the server relies on: the same checks (model name, native fps,
then the engine's own ``validate`` on a worker, before an image is decoded), the same ``SourceError``
fields and codes (``overloaded`` with ``retry_after`` from the worker's engine), queue positions
(``on_queued``, polled from the worker), ``interpolate`` (RIFE on the worker). :class:`RaySource` is one
session on its worker: ``next_chunk`` (uint8 frames through Ray's object store), ``switched`` (the
engine's, so ``status.prompt_seq`` names the first fragment of a new prompt), ``lag_s``, ``set_prompt`` /
``pause`` / ``resume`` (sent at once, not awaited), ``aclose``. A lost worker ends the session with
``GenerationError`` (logged here once, at ERROR, with the session id); other failures are the engine's,
logged on the worker.

Data path: through the front. A worker returns each chunk's frames; the front encodes them (its
encoder pool) into the session's one ``FragmentLog``, and every viewer is sent those bytes (no copy
per viewer). ``/metrics`` sums the workers' engine gauges (pool bytes, sessions, queue) and shows each
worker (``worker`` label: up, sessions, frames, pid/node), from stats refreshed every
``health_interval_s`` by the pool's health check, which also takes a replaced worker back.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor

import numpy as np

from streamgen.server.sources import FrameSource, GenerationError, SourceError, SourceFactory, StreamRequest, \
    decode_image

log = logging.getLogger(__name__)

__all__ = ["RaySource", "RaySourceFactory"]


class RaySource(FrameSource):
    """One engine session on a Ray worker (see the module docstring)."""

    def __init__(self, pool, sid: str, width: int, height: int, fps: int):
        self._pool, self.sid = pool, sid
        self.width, self.height, self.fps = width, height, fps
        self._lag: float | None = None
        self._closed = False

    async def next_chunk(self) -> np.ndarray:
        from streamgen.engine.core import EngineError
        from streamgen.parallel.ray_pool import WorkerLost

        if self._closed:
            raise RuntimeError("source is closed")
        try:
            chunk = await self._pool.next_chunk(self.sid)
        except WorkerLost as e:
            log.error("%s", e)
            raise GenerationError(str(e)) from None
        except EngineError as e:  # logged by the engine on its worker
            raise GenerationError(str(e)) from None
        if chunk is None:
            raise EOFError("no more chunks")
        self.switched, self._lag = chunk.switched, chunk.lag_s
        return chunk.frames

    @property
    def lag_s(self) -> float | None:
        return self._lag

    def set_prompt(self, prompt: str, *, abandon: bool = True) -> None:  # the worker's engine always abandons
        self._pool.control(self.sid, "prompt", prompt)

    def pause(self) -> None:
        self._pool.control(self.sid, "pause")

    def resume(self) -> None:
        self._pool.control(self.sid, "resume")

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._pool.close(self.sid)


class RaySourceFactory(SourceFactory):
    """Serves ``model`` from a started :class:`RayEnginePool` (its ``ready()`` answered): ``fps`` is the
    engines' native rate; ``width`` / ``height`` the size of a start that leaves them out. ``aclose``
    shuts the pool down (and Ray, when ``owns_ray``)."""

    def __init__(self, model: str, pool, *, width: int, height: int, fps: int, executor: Executor | None = None,
                 health_interval_s: float = 1.0, owns_ray: bool = False):
        self.model, self.pool = model, pool
        self.width, self.height, self.fps = width, height, fps
        self.executor = executor
        self.health_interval_s = health_interval_s
        self.owns_ray = owns_ray

    async def create(self, request: StreamRequest, name: str = "", on_queued=None) -> FrameSource:
        from streamgen.engine.core import EngineError
        from streamgen.parallel.ray_pool import WorkerLost

        self.pool.start_health(self.health_interval_s)  # idempotent; a server starts it in on_startup
        if request.model not in (None, "", self.model):
            raise SourceError("model", f"model {request.model!r} is not served here; available: [{self.model!r}]")
        if request.fps not in (None, self.fps):
            raise SourceError("fps", f"{self.model} generates {self.fps} fps; ask for fps {self.fps} "
                                     f"(or leave it out) and use interpolate 2 or 4 for more")
        w, h = request.width or self.width, request.height or self.height
        factor = request.interpolate or 1
        kw = dict(seed=request.seed or 0, chunks=request.chunks, interpolate=factor)
        try:
            image = None
            if request.image is not None:  # checked before the image is decoded at a size that may be refused
                await self.pool.validate(request.prompt, w, h, **kw)
                image = await asyncio.get_running_loop().run_in_executor(
                    self.executor, decode_image, request.image, w, h)
            await self.pool.open(name, request.prompt, w, h, image=image, on_queued=on_queued, **kw)
        except EngineError as e:
            raise SourceError(e.field, str(e), e.code, e.retry_after) from None
        except WorkerLost as e:
            raise SourceError(None, str(e), "busy") from None
        return RaySource(self.pool, name, w, h, self.fps * factor)

    def describe_metrics(self, m) -> None:
        stats = lambda: self.pool.stats  # noqa: E731 - index -> the worker's latest stats, "up"

        def total(key: str):
            return lambda: sum(st.get(key) or 0 for st in stats().values() if st["up"])

        def per_worker(key: str):
            return lambda: {(str(i),): st.get(key) or 0 for i, st in stats().items()}

        m.gauge("engine_pool_used_bytes", "bytes of the engines' KV cache pools reserved by sessions, all workers",
                fn=total("used_bytes"))
        m.gauge("engine_pool_capacity_bytes", "bytes of the engines' KV cache pools, all live workers (0: unbounded)",
                fn=lambda: 0 if any(st["up"] and st.get("capacity_bytes") is None for st in stats().values())
                else total("capacity_bytes")())
        m.gauge("engine_pool_sessions", "sessions holding a range of an engine's KV cache pool, all workers",
                fn=total("sessions"))
        m.gauge("engine_queue_length", "starts waiting for KV cache pool memory, all workers", fn=total("queue_length"))
        m.gauge("engine_session_lag_seconds", "seconds a session's generation is behind real time "
                "(negative: ahead), by session", labels=("session",),
                fn=lambda: {(name,): lag for st in stats().values() if st["up"]
                            for name, lag in (st.get("lags") or {}).items()})
        m.gauge("engine_workers_up", "engine workers (Ray actors) alive and taking sessions",
                fn=lambda: sum(st["up"] for st in stats().values()))
        m.gauge("engine_worker_up", "1 while the engine worker is alive and takes sessions, by worker",
                labels=("worker",), fn=lambda: {(str(i),): int(st["up"]) for i, st in stats().items()})
        m.gauge("engine_worker_sessions", "sessions on the engine worker, by worker", labels=("worker",),
                fn=per_worker("sessions"))
        m.gauge("engine_worker_frames", "frames the engine worker generated since its actor started, by worker",
                labels=("worker",), fn=per_worker("frames"))
        m.gauge("engine_worker_info", "the engine worker's current actor: its process and node (value 1)",
                labels=("worker", "pid", "node"),
                fn=lambda: {(str(i), str(st["pid"]), str(st.get("node"))): 1 for i, st in stats().items()
                            if st.get("pid") is not None})

    async def on_startup(self, app=None) -> None:
        """Start the pool's health check on the server's loop (aiohttp ``on_startup``)."""
        self.pool.start_health(self.health_interval_s)

    async def aclose(self) -> None:
        self.pool.shutdown()
        if self.owns_ray:
            import ray

            await asyncio.get_running_loop().run_in_executor(None, ray.shutdown)
