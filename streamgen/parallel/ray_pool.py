"""Engine workers as Ray actors: one ``Engine`` per actor (per GPU), sessions placed by free cache memory.

Ray is imported only by :class:`RayEnginePool` (``pip install streamgen[ray]``); importing this module
does not import it. ``streamgen serve --ray`` puts the server's frame sources on this pool
(streamgen.parallel.ray_sources; ARCHITECTURE.md, "Worker pool on Ray").

``EngineWorker(preset, settings, device, make_engine)`` (the actor's class, plain Python): builds one
``Engine`` (``make_engine()``, a picklable callable, e.g. ``serve --ray``'s engine from its command
line; else the preset's pipeline with ``EngineSettings(**settings)``) and starts it. A build error is
kept, not raised, so the front can print it as one line: ``ready()`` returns it. An async actor: the
engine's ``SessionHandle``s live on the actor's event loop; the engine's busy loop is its own thread.

``RayEnginePool(workers, preset=..., settings=..., num_gpus=..., make_engine=...)``:

- ``await pool.ready()``: waits for every worker's engine; returns their stats (``fps``, ``error``, ...).
- ``await pool.open(sid, prompt, width, height, seed=, chunks=, interpolate=, image=, on_queued=)``
  places the session on the live worker with the most free cache memory that fits it (then the fewest
  sessions, opens in flight counted; then the lowest index; an unbounded pool counts as all free) and
  remembers the worker (affinity: every later call for ``sid``, an attach after a reconnect included,
  goes there). A start that fits nowhere waits in that worker's engine queue; ``on_queued(position)``
  is polled from it. A refused request raises the engine's ``EngineError`` (field, code). Returns the
  worker's index.
- ``await pool.next_chunk(sid)``: a :class:`Chunk` (uint8 frames, ``switched``, ``lag_s``) or None
  after the last chunk. A worker that died raises :class:`WorkerLost` for each of its sessions (one
  line naming the session and the worker); the worker is marked down and gets no new sessions; the
  other workers' sessions go on.
- ``pool.control(sid, kind, arg)``: ``prompt`` (arg: the text), ``pause``, ``resume``, sent at once and
  not awaited; numbered, so the latest of each kind wins on the worker.
- ``await pool.check_health()`` (``start_health(interval_s)`` runs it periodically): refreshes each live
  worker's stats (``pool.stats``: what ``/metrics`` shows), marks a dead one down, and replaces a down
  worker by a new actor (``max_restarts=0``: the pool re-creates it); once the new actor's engine
  answers, the worker is back in placement under the same index.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["Chunk", "EngineWorker", "RayEnginePool", "WorkerLost"]


class WorkerLost(RuntimeError):
    """The engine worker holding a session died (or none is alive); the session is over."""


@dataclass
class Chunk:
    frames: Any  # uint8 numpy (T, H, W, 3), read-only when it came through Ray's object store
    switched: bool  # the first chunk made under a prompt given by set_prompt
    lag_s: float | None  # the engine's lag of the session after this chunk


class EngineWorker:
    """One engine in one Ray actor (see the module docstring)."""

    def __init__(self, preset: str = "tiny", settings: dict | None = None, device: str | None = None,
                 make_engine: Callable | None = None):
        self.handles: dict[str, Any] = {}
        self.queued: dict[str, int] = {}  # sid -> queue position while its open is in flight (0: not queued)
        self.cancelled: set[str] = set()  # closed while their open was in flight
        self.control_seq: dict[tuple[str, str], int] = {}  # (sid, prompt|run) -> the latest control call applied
        self.engine, self.error = None, None
        try:
            if make_engine is not None:
                engine = make_engine()
            else:
                from streamgen.engine.core import Engine, EngineSettings
                from streamgen.pipeline import build

                engine = Engine(build(preset, device=device), EngineSettings(**(settings or {})))
            self.engine = engine.start()
        except Exception as e:  # noqa: BLE001 - reported by ready(), as one line on the front
            self.error = str(e) if type(e).__name__ == "UsageError" else f"{type(e).__name__}: {e}"

    def _req(self, prompt: str, width: int, height: int, seed: int = 0, chunks: int | None = None,
             interpolate: int = 1, image=None, name: str = ""):
        from streamgen.engine.core import GenRequest

        return GenRequest(prompt, width, height, seed=seed, chunks=chunks, interpolate=interpolate, image=image,
                          name=name)

    def _check(self):
        if self.engine is None:
            raise RuntimeError(f"engine worker failed to start: {self.error}")
        return self.engine

    async def ready(self) -> dict:
        """This worker's stats (see ``stats``), or ``{"error": why}`` when its engine did not build."""
        return {"error": self.error, "pid": os.getpid()} if self.engine is None else await self.stats()

    async def stats(self) -> dict:
        import ray

        eng = self._check()
        pool = eng.pool
        return {"error": None, "pid": os.getpid(), "node": ray.util.get_node_ip_address(), "fps": eng.fps,
                "free_bytes": pool.free_bytes, "used_bytes": pool.used_bytes, "capacity_bytes": pool.capacity_bytes,
                "sessions": len(self.handles), "queue_length": eng.queue_length,
                "frames": eng.stats["frames"], "chunks": eng.stats["chunks"], "lags": dict(eng.lags)}

    async def info(self, width: int, height: int) -> dict:
        """What placement needs: free pool bytes, sessions, the cache a session of this size takes."""
        eng = self._check()
        return {"free_bytes": eng.pool.free_bytes, "sessions": len(self.handles),
                "need_bytes": eng.cache_bytes(self._req("", width, height))}

    async def validate(self, prompt: str, width: int, height: int, seed: int = 0, chunks: int | None = None,
                       interpolate: int = 1) -> None:
        self._check().validate(self._req(prompt, width, height, seed, chunks, interpolate))

    async def open(self, sid: str, prompt: str, width: int, height: int, seed: int = 0,
                   chunks: int | None = None, interpolate: int = 1, image=None) -> None:
        eng = self._check()
        req = self._req(prompt, width, height, seed, chunks, interpolate, image, sid)

        def queued(position: int) -> None:
            self.queued[sid] = position

        self.queued[sid] = 0
        try:
            handle = await eng.open(req, on_queued=queued)
        finally:
            self.queued.pop(sid, None)
        if sid in self.cancelled:
            self.cancelled.discard(sid)
            handle.cancel()
            raise RuntimeError(f"session {sid} was closed while it opened")
        self.handles[sid] = handle

    async def queue_position(self, sid: str) -> int | None:
        return self.queued.get(sid) or None

    async def next_chunk(self, sid: str):
        """(frames, switched, lag_s), or None after the session's last chunk."""
        h = self.handles[sid]
        try:
            frames = await h.get()
        except EOFError:
            return None
        return frames, h.last_switched, h.lag_s

    async def control(self, sid: str, kind: str, n: int, arg=None) -> None:
        """``kind``: ``prompt`` (arg: the text), ``pause`` or ``resume``; ``n`` numbers the caller's
        calls of the session, so one that overtook a later one (an async actor may start them out of
        order) is dropped: the latest prompt and the latest pause/resume win."""
        h = self.handles.get(sid)
        key = (sid, "prompt" if kind == "prompt" else "run")
        if h is None or n <= self.control_seq.get(key, -1):
            return
        self.control_seq[key] = n
        if kind == "prompt":
            h.set_prompt(arg)
        elif kind == "pause":
            h.pause()
        else:
            h.resume()

    async def close(self, sid: str) -> None:
        h = self.handles.pop(sid, None)
        self.control_seq.pop((sid, "prompt"), None)
        self.control_seq.pop((sid, "run"), None)
        if h is not None:
            h.cancel()
        elif sid in self.queued:  # its open is still in flight: the open cancels it when it returns
            self.cancelled.add(sid)


@dataclass(eq=False)
class _Worker:
    index: int
    actor: Any
    alive: bool = True
    sessions: set[str] = field(default_factory=set)
    opening: int = 0  # opens placed here and still in flight
    opening_bytes: int = 0
    stats: dict = field(default_factory=dict)  # the latest stats() (health check)
    rejoin: asyncio.Task | None = None  # a replacement actor being started


class RayEnginePool:
    """Ray actors running :class:`EngineWorker`, with placement and affinity (see the module docstring)."""

    def __init__(self, workers: int, *, preset: str = "tiny", settings: dict | None = None, num_gpus: float = 0,
                 device: str | None = None, make_engine: Callable | None = None, call_timeout_s: float = 30.0):
        import ray  # the only place Ray is imported

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not ray.is_initialized():
            raise RuntimeError("RayEnginePool needs ray.init() (or ray.init(address=...)) first")
        self._ray = ray
        self._lost_errors = (ray.exceptions.RayActorError,)  # ActorDiedError, ActorUnavailableError
        self._actor_class = ray.remote(num_cpus=0, num_gpus=num_gpus, max_restarts=0)(EngineWorker)
        self._actor_args = (preset, settings, device, make_engine)
        self.workers = [_Worker(i, self._new_actor()) for i in range(workers)]
        self.call_timeout_s = call_timeout_s  # health and placement calls (a busy worker still answers)
        self._where: dict[str, _Worker] = {}
        self._lost: dict[str, str] = {}  # session -> why (its worker died)
        self._placing: asyncio.Lock | None = None  # made on the loop that first opens
        self._health: asyncio.Task | None = None
        self._posted: set = set()  # control calls in flight (the loop keeps only weak references)
        self._control_n = 0

    def _new_actor(self):
        return self._actor_class.remote(*self._actor_args)

    # -- state -----------------------------------------------------------------------------------

    def worker_of(self, sid: str) -> int:
        """The index of the worker holding ``sid`` (where an attach goes)."""
        if sid in self._lost:
            raise WorkerLost(self._lost[sid])
        return self._where[sid].index

    @property
    def stats(self) -> dict[int, dict]:
        """index -> the worker's latest stats with ``up`` (bool); refreshed by ``check_health``."""
        return {w.index: {**w.stats, "up": w.alive} for w in self.workers}

    def _down(self, w: _Worker, err: BaseException) -> None:
        if w.alive:
            log.error("engine worker %d was lost (%s); its %d session(s) end, no new ones go there until it is back",
                      w.index, type(err).__name__, len(w.sessions))
        w.alive = False
        for sid in w.sessions:
            self._lost[sid] = (f"session {sid}: engine worker {w.index} was lost "
                               f"({type(err).__name__}); start a new session")
            self._where.pop(sid, None)
        w.sessions.clear()

    async def _call(self, w: _Worker, method: str, *args, timeout: float | None = None):
        actor = w.actor
        try:
            ref = getattr(actor, method).remote(*args)
            return await (ref if timeout is None else asyncio.wait_for(ref, timeout))
        except self._lost_errors as e:
            if w.actor is actor:  # not a stale call to an actor already replaced
                self._down(w, e)
            raise

    @staticmethod
    def _cause(e: BaseException) -> BaseException:
        """The worker's own exception inside Ray's RayTaskError (whose str is a traceback)."""
        return getattr(e, "cause", None) or e

    # -- start-up and health ---------------------------------------------------------------------

    async def ready(self) -> list[dict]:
        """Wait for every worker's engine to be built; each one's stats or ``{"error": ...}``."""
        out = []
        for w in self.workers:
            try:
                w.stats = st = await self._call(w, "ready")
            except self._lost_errors as e:
                st = {"error": f"its actor died: {e}"}
            out.append(st)
        return out

    async def check_health(self) -> None:
        """One round: refresh live workers' stats, replace down ones (see the module docstring)."""
        async def one(w: _Worker) -> None:
            if w.alive:
                try:
                    w.stats = await self._call(w, "stats", timeout=self.call_timeout_s)
                except self._lost_errors:
                    pass  # marked down by _call; replaced from the next round on
                except Exception as e:  # noqa: BLE001 - slow (timeout) or failing, not lost
                    log.debug("engine worker %d: stats failed: %r", w.index, e)
            elif w.rejoin is None or w.rejoin.done():
                w.rejoin = asyncio.create_task(self._replace(w), name=f"rejoin-worker-{w.index}")

        await asyncio.gather(*(one(w) for w in self.workers))

    async def _replace(self, w: _Worker) -> None:
        try:
            self._ray.kill(w.actor, no_restart=True)  # frees its GPU for the replacement
        except Exception:  # noqa: BLE001 - already gone
            pass
        actor = self._new_actor()
        try:
            st = await actor.ready.remote()
        except self._lost_errors as e:
            log.warning("engine worker %d: its replacement died while starting: %s", w.index, e)
            return
        if st.get("error"):
            log.warning("engine worker %d: its replacement failed to start: %s", w.index, st["error"])
            self._ray.kill(actor, no_restart=True)
            return
        w.actor, w.stats, w.alive = actor, st, True
        log.info("engine worker %d is back (pid %s on %s): placing sessions there again", w.index,
                 st.get("pid"), st.get("node"))

    def start_health(self, interval_s: float = 1.0) -> None:
        """Run ``check_health`` every ``interval_s`` on the running loop until ``shutdown``."""
        async def loop() -> None:
            while True:
                try:
                    await self.check_health()
                except Exception:  # noqa: BLE001 - the health loop must go on
                    log.exception("engine worker health check failed")
                await asyncio.sleep(interval_s)

        if self._health is None:
            self._health = asyncio.create_task(loop(), name="ray-pool-health")

    # -- sessions --------------------------------------------------------------------------------

    async def _place(self, width: int, height: int) -> tuple[_Worker, int]:
        live = [w for w in self.workers if w.alive]

        async def info(w: _Worker):
            try:
                return w, await self._call(w, "info", width, height, timeout=self.call_timeout_s)
            except (self._ray.exceptions.RayError, asyncio.TimeoutError):
                return w, None

        infos = [(w, i) for w, i in await asyncio.gather(*(info(w) for w in live)) if i is not None]
        if not infos:
            raise WorkerLost("no engine worker is alive; try again later")

        def free(w: _Worker, i: dict) -> float:
            return float("inf") if i["free_bytes"] is None else i["free_bytes"] - w.opening_bytes

        fits = [(w, i) for w, i in infos if free(w, i) >= i["need_bytes"]] or infos  # none fits: the engine queues
        w, i = min(fits, key=lambda wi: (-free(*wi), wi[1]["sessions"] + wi[0].opening, wi[0].index))
        return w, i["need_bytes"]

    async def open(self, sid: str, prompt: str, width: int, height: int, *, seed: int = 0,
                   chunks: int | None = None, interpolate: int = 1, image=None, on_queued=None) -> int:
        if sid in self._where or sid in self._lost:
            raise ValueError(f"session {sid!r} is already open")
        if self._placing is None:
            self._placing = asyncio.Lock()
        async with self._placing:  # concurrent starts see each other's placement
            w, need = await self._place(width, height)
            w.opening += 1
            w.opening_bytes += need
        actor, position = w.actor, None
        try:
            ref = actor.open.remote(sid, prompt, width, height, seed, chunks, interpolate, image)
            fut = asyncio.ensure_future(ref)
            try:
                while True:
                    done, _ = await asyncio.wait([fut], timeout=0.5)
                    if done:
                        fut.result()
                        break
                    if on_queued is not None:  # waiting for cache memory on the worker: where it stands
                        pos = await self._call(w, "queue_position", sid)
                        if pos is not None and pos != position:
                            position = pos
                            on_queued(pos)
            except asyncio.CancelledError:  # the client left while its start waited: nothing stays there
                self._ray.cancel(ref)
                actor.close.remote(sid)
                raise
        except self._lost_errors as e:
            if w.actor is actor:
                self._down(w, e)
            raise WorkerLost(f"session {sid}: engine worker {w.index} was lost while opening it; "
                             "try again") from None
        except self._ray.exceptions.RayTaskError as e:
            raise self._cause(e) from None
        finally:
            w.opening -= 1
            w.opening_bytes -= need
        w.sessions.add(sid)
        self._where[sid] = w
        return w.index

    async def validate(self, prompt: str, width: int, height: int, *, seed: int = 0, chunks: int | None = None,
                       interpolate: int = 1) -> None:
        """The engine's check of a request (raises its EngineError) on a live worker, e.g. before a
        start's image is decoded."""
        for w in [w for w in self.workers if w.alive]:
            try:
                return await self._call(w, "validate", prompt, width, height, seed, chunks, interpolate)
            except self._lost_errors:
                continue
            except self._ray.exceptions.RayTaskError as e:
                raise self._cause(e) from None
        raise WorkerLost("no engine worker is alive; try again later")

    async def next_chunk(self, sid: str) -> Chunk | None:
        w = self._where.get(sid)
        if w is None:
            raise WorkerLost(self._lost[sid]) if sid in self._lost else KeyError(f"no session {sid!r}")
        try:
            out = await self._call(w, "next_chunk", sid)
        except self._lost_errors:
            raise WorkerLost(self._lost.get(sid) or f"session {sid}: engine worker {w.index} was lost") from None
        except self._ray.exceptions.RayTaskError as e:
            raise self._cause(e) from None
        return None if out is None else Chunk(*out)

    def control(self, sid: str, kind: str, arg=None) -> None:
        """Send a control call (``prompt`` with its text, ``pause``, ``resume``) to the session's worker
        now; not awaited (a lost worker ends the session at its next chunk). The latest one of each
        kind wins on the worker, whatever order Ray runs them in."""
        w = self._where.get(sid)
        if w is None:
            return  # lost or closed: nothing to control
        self._control_n += 1
        fut = asyncio.ensure_future(w.actor.control.remote(sid, kind, self._control_n, arg))
        self._posted.add(fut)

        def done(f: asyncio.Future) -> None:
            self._posted.discard(f)
            if not f.cancelled() and f.exception() is not None:
                log.debug("session %s: %s on engine worker %d failed: %r", sid, kind, w.index, f.exception())

        fut.add_done_callback(done)

    async def close(self, sid: str, timeout: float = 10.0) -> None:
        self._lost.pop(sid, None)
        w = self._where.pop(sid, None)
        if w is not None:
            w.sessions.discard(sid)
            if w.alive:
                try:
                    await self._call(w, "close", sid, timeout=timeout)
                except (self._ray.exceptions.RayError, asyncio.TimeoutError):
                    pass

    def shutdown(self) -> None:
        if self._health is not None:
            self._health.cancel()
            self._health = None
        for w in self.workers:
            if w.rejoin is not None:
                w.rejoin.cancel()
            try:
                self._ray.kill(w.actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
