"""The aiohttp application: the browser player, the v1 WebSocket, health and metrics.

Routes
------
``GET /``            the browser player (``state.WEB_ROOT``: clients/web, installed as streamgen/web)
``GET /v1/stream``   WebSocket, protocol v1 (see protocol/README.md), one msgpack map per binary frame
``GET /healthz``     JSON {"status": "ok", "model", "sessions"}
``GET /metrics``     Prometheus text (sessions, fragments/bytes sent, generation fps, send queue
                     depths, dropped fragments, errors by code)

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
from streamgen.server.metrics import Metrics
from streamgen.server.sessions import SessionLimits, SessionRegistry
from streamgen.server.sources import SourceFactory
from streamgen.server.state import ServerConfig, ServerState

log = logging.getLogger(__name__)

STATE = web.AppKey("state", ServerState)
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
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


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
        return web.Response(text=self.state.metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

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
    for name, kind, text in (
        ("sessions", "gauge", "live sessions"),
        ("connections", "gauge", "open WebSocket connections"),
        ("sessions_started_total", "counter", "sessions created"),
        ("fragments_generated_total", "counter", "fragments produced (one per chunk)"),
        ("frames_generated_total", "counter", "video frames produced"),
        ("fragment_bytes_total", "counter", "bytes of encoded fMP4 fragments produced"),
        ("fragments_sent_total", "counter", "fragment messages written to clients"),
        ("bytes_sent_total", "counter", "bytes of fragment messages written to clients"),
        ("fragments_dropped_total", "counter", "fragments skipped for clients that fell behind"),
        ("generate_seconds_total", "counter", "wall seconds spent waiting for frame sources"),
        ("encode_seconds_total", "counter", "wall seconds spent encoding"),
        ("errors_total", "counter", "errors sent to clients, by code"),
        ("bad_messages_total", "counter", "client frames rejected by the protocol validator"),
        ("generation_fps", "gauge", "sum over sessions of recent generation speed (frames/s)"),
        ("send_queue_fragments", "gauge", "fragments waiting in all clients' send windows"),
        ("send_queue_fragments_max", "gauge", "largest single client send window in use"),
        ("fragment_log_bytes", "gauge", "bytes held in session replay logs"),
    ):
        m.describe(name, kind, text, labelled=name == "errors_total")
    reg = state.registry
    m.gauge_fn("sessions", lambda: len(reg.sessions))
    m.gauge_fn("connections", lambda: len(state.sockets))
    m.gauge_fn("generation_fps", lambda: sum(s.gen_fps for s in reg.sessions.values() if s.state == "generating"))
    m.gauge_fn("send_queue_fragments", lambda: sum(sub.depth for s in reg.sessions.values() for sub in s.subscribers))
    m.gauge_fn("send_queue_fragments_max",
               lambda: max([sub.depth for s in reg.sessions.values() for sub in s.subscribers], default=0))
    m.gauge_fn("fragment_log_bytes", lambda: sum(s.log.bytes for s in reg.sessions.values()))
    m.describe("stuck_subscribers", "gauge", "viewers whose socket has not taken a fragment for 5 s")
    m.gauge_fn("stuck_subscribers", lambda: sum(1 for s in reg.sessions.values() for sub in s.subscribers
                                                 if sub.blocked_since is not None
                                                 and time.monotonic() - sub.blocked_since > 5.0))
