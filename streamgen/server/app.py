"""The aiohttp application: the browser player, the v1 WebSocket, health and metrics.

Routes
------
``GET /``            the browser player (``state.WEB_ROOT``: clients/web, installed as streamgen/web)
``GET /v1/stream``   WebSocket, protocol v1 (see protocol/README.md), one msgpack map per binary frame
``GET /healthz``     JSON {"status": "ok", "model", "sessions"}
``GET /metrics``     Prometheus text via prometheus_client (sessions, fragments/bytes sent, generation
                     fps, send queue depths, dropped fragments, errors by code; histograms of chunk
                     time, time to first fragment and prompt-switch latency): ``_describe_metrics``

Access: with a token the WebSocket and /metrics need ``?token=T`` or ``Authorization: Bearer T``
(else HTTP 401). A WebSocket request carrying an ``Origin`` header must come from an allowed
origin (``*`` allows any); without one configured only the server's own origin is allowed (else
HTTP 403). Requests without an Origin (non-browser clients) pass the check.

Each connection (streamgen.server.connection) holds at most one session at a time; sessions live
in the registry (streamgen.server.sessions), which creates them from the frame-source factory
(streamgen.server.sources). The command line is streamgen.server.serve.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor, ThreadPoolExecutor

from aiohttp import web

from streamgen.server.connection import Connection
from streamgen.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from streamgen.server.metrics import Metrics
from streamgen.server.sessions import SessionLimits, SessionRegistry
from streamgen.server.sources import SourceFactory
from streamgen.server.state import ServerConfig, ServerState

log = logging.getLogger(__name__)

STATE = web.AppKey("state", ServerState)
ENCODER_WARMUP = web.AppKey("encoder_warmup", asyncio.Future)  # the start-up encode (see on_startup)
_STATIC_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
                 ".html": "text/html", ".ico": "image/x-icon", ".svg": "image/svg+xml"}


def build_app(cfg: ServerConfig, factory: SourceFactory, *, executor: Executor | None = None) -> web.Application:
    """The aiohttp Application. ``factory`` is a SourceFactory; ``executor`` runs encoders (one is
    made, and shut down with the app, when none is given)."""
    own_executor = executor is None
    if executor is None:
        executor = ThreadPoolExecutor(max_workers=max(1, cfg.encode_threads), thread_name_prefix="encode")
    metrics = Metrics()
    limits = SessionLimits(queue_fragments=cfg.queue_fragments, log_fragments=cfg.log_fragments,
                           max_lead_s=cfg.max_lead_s, grace_s=cfg.grace_s)
    registry = SessionRegistry(factory, executor=executor, metrics=metrics, limits=limits, preset=cfg.preset,
                               max_sessions=cfg.max_sessions, max_sessions_per_client=cfg.max_sessions_per_client)
    state = ServerState(cfg, factory, executor, metrics, registry)
    app = web.Application()
    app[STATE] = state
    _describe_metrics(metrics, state)
    h = _Handlers(state)
    app.router.add_get("/", h.index)
    app.router.add_get("/healthz", h.healthz)
    app.router.add_get("/metrics", h.metrics)
    app.router.add_get("/v1/stream", h.stream)
    app.router.add_get(r"/{name:[A-Za-z0-9_.-]+\.(?:js|mjs|css|html|ico|svg)}", h.static)

    async def on_startup(app):
        # the first H.264 encoder of a process costs ~50 ms (x264's one-time set-up): pay it here,
        # not in the first viewer's start (in the background: the server listens meanwhile)
        app[ENCODER_WARMUP] = asyncio.get_running_loop().run_in_executor(executor, _warm_encoder, factory,
                                                                            cfg.preset)

    async def on_shutdown(app):
        senders = []
        for s in list(registry.sessions.values()):
            s.stop("shutdown")
            senders += [sub.task for sub in s.subscribers if sub.task is not None]
        if senders:  # let subscribers receive `end {reason: "shutdown"}`
            await asyncio.wait(senders, timeout=1.0)
        await asyncio.gather(*(c.close(1001, b"server shutting down") for c in list(state.sockets)),
                             return_exceptions=True)

    async def on_cleanup(app):
        await registry.aclose()
        await factory.aclose()
        if own_executor:
            executor.shutdown(wait=False, cancel_futures=True)

    async def on_prepare(request, response):
        response.headers["Server"] = "streamgen"  # not the Python / aiohttp versions

    app.on_response_prepare.append(on_prepare)
    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


def _warm_encoder(factory: SourceFactory, preset: str) -> None:
    """Encode one chunk of black frames at the factory's default size (no session sees it)."""
    import numpy as np

    from streamgen.media.encode import FMP4Encoder

    w, h = getattr(factory, "width", None) or 64, getattr(factory, "height", None) or 64
    fps = getattr(factory, "fps", None) or 16
    try:
        FMP4Encoder(w, h, fps, preset=preset).encode_chunk(np.zeros((4, h, w, 3), np.uint8))
    except Exception as e:  # noqa: BLE001 - a session's own encoder reports a real problem
        log.warning("encoder warm-up at %dx%d failed: %s", w, h, e)


class _Handlers:
    def __init__(self, state: ServerState):
        self.state = state

    async def index(self, request):
        return self._file("index.html")

    async def static(self, request):
        return self._file(request.match_info["name"])

    def _file(self, name: str):
        root = self.state.cfg.web_root.resolve()
        path = (root / name).resolve()
        if path.parent != root or not path.is_file():  # the route's pattern already has no '/'; this holds anyway
            raise web.HTTPNotFound(text=f"{name} not found")
        ctype = _STATIC_TYPES.get(path.suffix, "application/octet-stream")
        return web.Response(body=path.read_bytes(), content_type=ctype, headers={"Cache-Control": "no-cache"})

    async def healthz(self, request):
        """Liveness for anyone; the model and the session count only with the token (when one is set)."""
        st = self.state
        if st.cfg.token and not st.token_ok(request):
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "ok", "model": st.cfg.model, "sessions": len(st.registry.sessions)})

    async def metrics(self, request):
        if not self.state.host_ok(request):
            raise web.HTTPForbidden(text=f"host {request.host!r} is not served without a token (see --public-host)")
        if not self.state.token_ok(request):
            raise web.HTTPUnauthorized(text="missing or wrong token")
        return web.Response(body=self.state.metrics.render().encode(),
                            headers={"Content-Type": METRICS_CONTENT_TYPE, "X-Content-Type-Options": "nosniff"})

    async def stream(self, request):
        st = self.state
        if not st.host_ok(request):
            st.metrics.inc("errors_total", code="forbidden_host")
            raise web.HTTPForbidden(text=f"host {request.host!r} is not served without a token (see --public-host)")
        if len(st.sockets) >= st.cfg.max_connections:
            st.metrics.inc("errors_total", code="busy")
            raise web.HTTPServiceUnavailable(text=f"the server holds its limit of {st.cfg.max_connections} "
                                                  "connections; try again later")
        if not st.token_ok(request):
            st.metrics.inc("errors_total", code="unauthorized")
            raise web.HTTPUnauthorized(text="missing or wrong token: pass ?token=... or Authorization: Bearer ...")
        if not st.origin_ok(request):
            st.metrics.inc("errors_total", code="forbidden_origin")
            raise web.HTTPForbidden(text=f"origin {request.headers.get('Origin')!r} is not allowed")
        return await Connection(st, request).serve()


def _describe_metrics(m: Metrics, state: ServerState) -> None:
    """Every series of /metrics (more gauges: ``m.gauge(name, help, fn=...)``, see server/metrics.py)."""
    for name, text in (
        ("sessions_started_total", "sessions created"),
        ("fragments_generated_total", "fragments produced (one per chunk)"),
        ("frames_generated_total", "video frames produced"),
        ("fragment_bytes_total", "bytes of encoded fMP4 fragments produced"),
        ("fragments_sent_total", "fragment messages written to clients"),
        ("bytes_sent_total", "bytes of fragment messages written to clients"),
        ("fragments_dropped_total", "fragments skipped for clients that fell behind"),
        ("generate_seconds_total", "wall seconds spent waiting for frame sources"),
        ("encode_seconds_total", "wall seconds spent encoding"),
        ("bad_messages_total", "client frames rejected by the protocol validator"),
    ):
        m.counter(name, text)
    m.counter("errors_total", "errors sent to clients, by code", labels=("code",))
    m.histogram("chunk_seconds", "wall seconds from asking the frame source for a chunk to its fragment "
                "being ready to send (generation + encoding)")
    m.histogram("time_to_first_fragment_seconds", "wall seconds from a start reaching the server to the "
                "session's first fragment being ready to send (engine open, first chunk, encoding)")
    m.histogram("prompt_switch_seconds", "wall seconds from a prompt message to the first fragment made "
                "under it being ready to send (the latest prompt of a coalesced run)")
    reg = state.registry
    m.gauge("sessions", "live sessions", fn=lambda: len(reg.sessions))
    m.gauge("connections", "open WebSocket connections", fn=lambda: len(state.sockets))
    m.gauge("generation_fps", "sum over sessions of recent generation speed (frames/s)",
            fn=lambda: sum(s.gen_fps for s in reg.sessions.values() if s.state == "generating"))
    m.gauge("send_queue_fragments", "fragments waiting in all clients' send windows",
            fn=lambda: sum(sub.depth for s in reg.sessions.values() for sub in s.subscribers))
    m.gauge("send_queue_fragments_max", "largest single client send window in use",
            fn=lambda: max([sub.depth for s in reg.sessions.values() for sub in s.subscribers], default=0))
    m.gauge("fragment_log_bytes", "bytes held in session replay logs",
            fn=lambda: sum(s.log.bytes for s in reg.sessions.values()))
    m.gauge("stuck_subscribers", "viewers whose socket has not taken a fragment for 5 s",
            fn=lambda: sum(1 for s in reg.sessions.values() for sub in s.subscribers
                           if sub.blocked_since is not None and time.monotonic() - sub.blocked_since > 5.0))
    state.factory.describe_metrics(m)  # the source's own series (the engine's pool, queue and lags)
