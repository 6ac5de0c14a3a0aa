"""Engine workers as Ray actors: one ``Engine`` per actor (per GPU), sessions placed by free cache memory.

Ray is imported only by :class:`RayEnginePool` (``pip install streamgen[ray]``); importing this module
does not import it. This is the engine side of ``streamgen serve --ray`` (ARCHITECTURE.md, "Worker pool
on Ray"); the front does not use it yet.

``EngineWorker(preset, settings, device)`` (the actor's class, plain Python): builds the preset's
pipeline (``streamgen.pipeline.build``) and one started ``Engine``; an async actor, so the engine's
``SessionHandle``s live on the actor's event loop. Methods: ``info(width, height)`` (free pool bytes,
sessions, the cache a session of that size needs), ``open``, ``next_chunk`` (uint8 (T, H, W, 3), or
None after the last chunk), ``set_prompt``, ``close``.

``RayEnginePool(workers, preset=..., settings=..., num_gpus=...)``:

- ``await pool.open(sid, prompt, width, height, seed=, chunks=)`` places the session on the live worker
  with the most free cache memory that fits it (then the fewest sessions, then the lowest index; an
  unbounded pool counts as all free), and remembers the worker (affinity: every later call for
  ``sid``, an attach after a reconnect included, goes there). Returns the worker's index.
- ``await pool.next_chunk(sid)``; a worker that died raises :class:`WorkerLost` for each of its
  sessions (one clear message naming the session and the worker); the worker is marked down and gets no
  new sessions; the other workers' sessions go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["EngineWorker", "RayEnginePool", "WorkerLost"]


class WorkerLost(RuntimeError):
    """The engine worker holding a session died; the session is over."""


class EngineWorker:
    """One engine in one Ray actor (see the module docstring)."""

    def __init__(self, preset: str = "tiny", settings: dict | None = None, device: str | None = None):
        from streamgen.engine.core import Engine, EngineSettings
        from streamgen.pipeline import build

        self.engine = Engine(build(preset, device=device), EngineSettings(**(settings or {}))).start()
        self.handles: dict[str, Any] = {}

    def _req(self, prompt: str, width: int, height: int, seed: int = 0, chunks: int | None = None, name: str = ""):
        from streamgen.engine.core import GenRequest

        return GenRequest(prompt, width, height, seed=seed, chunks=chunks, name=name)

    async def info(self, width: int, height: int) -> dict:
        pool = self.engine.pool
        return {"free_bytes": pool.free_bytes, "sessions": len(self.handles),
                "need_bytes": self.engine.cache_bytes(self._req("", width, height))}

    async def open(self, sid: str, prompt: str, width: int, height: int, seed: int = 0,
                   chunks: int | None = None) -> None:
        req = self._req(prompt, width, height, seed, chunks, sid)
        self.engine.validate(req)
        self.handles[sid] = await self.engine.open(req)

    async def next_chunk(self, sid: str):
        try:
            return await self.handles[sid].get()
        except EOFError:
            return None

    async def set_prompt(self, sid: str, prompt: str) -> None:
        self.handles[sid].set_prompt(prompt)

    async def close(self, sid: str) -> None:
        h = self.handles.pop(sid, None)
        if h is not None:
            h.cancel()


@dataclass
class _Worker:
    index: int
    actor: Any
    alive: bool = True
    sessions: set[str] = field(default_factory=set)


class RayEnginePool:
    """Ray actors running :class:`EngineWorker`, with placement and affinity (see the module docstring)."""

    def __init__(self, workers: int, *, preset: str = "tiny", settings: dict | None = None, num_gpus: float = 0,
                 device: str | None = None):
        import ray  # the only place Ray is imported

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not ray.is_initialized():
            raise RuntimeError("RayEnginePool needs ray.init() (or ray.init(address=...)) first")
        self._ray = ray
        actor = ray.remote(num_cpus=0, num_gpus=num_gpus, max_restarts=0)(EngineWorker)
        self.workers = [_Worker(i, actor.remote(preset, settings, device)) for i in range(workers)]
        self._where: dict[str, _Worker] = {}
        self._lost: dict[str, str] = {}  # session -> why (its worker died)

    def worker_of(self, sid: str) -> int:
        """The index of the worker holding ``sid`` (where an attach goes)."""
        if sid in self._lost:
            raise WorkerLost(self._lost[sid])
        return self._where[sid].index

    def _down(self, w: _Worker, err: BaseException) -> None:
        w.alive = False
        for sid in w.sessions:
            self._lost[sid] = (f"session {sid}: engine worker {w.index} was lost "
                               f"({type(err).__name__}); start a new session")
            self._where.pop(sid, None)
        w.sessions.clear()

    async def _call(self, w: _Worker, method: str, *args):
        try:
            return await getattr(w.actor, method).remote(*args)
        except (self._ray.exceptions.RayActorError, self._ray.exceptions.ActorUnavailableError) as e:
            self._down(w, e)
            raise

    async def open(self, sid: str, prompt: str, width: int, height: int, *, seed: int = 0,
                   chunks: int | None = None) -> int:
        if sid in self._where or sid in self._lost:
            raise ValueError(f"session {sid!r} is already open")
        infos = []
        for w in [w for w in self.workers if w.alive]:
            try:
                infos.append((w, await self._call(w, "info", width, height)))
            except self._ray.exceptions.RayActorError:
                continue
        if not infos:
            raise WorkerLost("no engine worker is alive")

        def free(i: dict) -> float:
            return float("inf") if i["free_bytes"] is None else i["free_bytes"]

        fits = [(w, i) for w, i in infos if free(i) >= i["need_bytes"]] or infos  # none fits: the engine queues
        w, _ = min(fits, key=lambda wi: (-free(wi[1]), wi[1]["sessions"], wi[0].index))
        await self._call(w, "open", sid, prompt, width, height, seed, chunks)
        w.sessions.add(sid)
        self._where[sid] = w
        return w.index

    async def next_chunk(self, sid: str):
        w = self._where.get(sid)
        if w is None:
            raise WorkerLost(self._lost[sid]) if sid in self._lost else KeyError(f"no session {sid!r}")
        try:
            return await self._call(w, "next_chunk", sid)
        except self._ray.exceptions.RayActorError:
            raise WorkerLost(self._lost[sid]) from None

    async def set_prompt(self, sid: str, prompt: str) -> None:
        await self._call(self._where[sid], "set_prompt", sid, prompt)

    async def close(self, sid: str) -> None:
        self._lost.pop(sid, None)
        w = self._where.pop(sid, None)
        if w is not None and w.alive:
            w.sessions.discard(sid)
            try:
                await self._call(w, "close", sid)
            except self._ray.exceptions.RayActorError:
                pass

    def shutdown(self) -> None:
        for w in self.workers:
            self._ray.kill(w.actor)
