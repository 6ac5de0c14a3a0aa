"""`streamgen serve`: aiohttp server with the browser player, the v1 WebSocket, health and metrics.

Routes
------
``GET /``            the browser player (clients/web/index.html) and its ES modules / css
``GET /v1/stream``   WebSocket, protocol v1 (see protocol/README.md), one msgpack map per binary frame
``GET /healthz``     JSON {"status": "ok", "model", "sessions"}
``GET /metrics``     Prometheus text (sessions, fragments/bytes sent, generation fps, send queue
                     depths, dropped fragments, errors by code)

Access: with ``--token`` the WebSocket and /metrics need ``?token=T`` or ``Authorization: Bearer
T`` (else HTTP 401). A WebSocket request carrying an ``Origin`` header must come from an
``--allowed-origin`` (``*`` allows any); without that option only the server's own origin is
allowed (else HTTP 403). Requests without an Origin (non-browser clients) pass the check.

Each connection holds at most one session at a time (``start`` creates one, ``attach`` joins one
by id after a reconnect). Sessions live in streamgen.server.sessions; frames come from a
pluggable streamgen.engine.source.SourceFactory: the generation engine
(streamgen.engine.serving) or a test pattern that needs no model. Bad client input is answered with an ``error`` naming the field; it never closes
other connections or the server.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

STATE = None  # web.AppKey for the ServerState, set in build_app (aiohttp imported lazily)
WEB_ROOT = Path(__file__).resolve().parents[2] / "clients" / "web"
_STATIC_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
                 ".html": "text/html", ".ico": "image/x-icon", ".svg": "image/svg+xml"}


@dataclass
class ServerConfig:
    model: str = "testpattern"
    token: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    max_sessions: int = 8
    max_sessions_per_client: int = 2
    queue_fragments: int = 8
    log_fragments: int = 64
    max_lead_s: float | None = 3.0
    grace_s: float = 10.0
    unsent_bytes: int | None = 256 << 10  # TCP_NOTSENT_LOWAT per connection (None: OS default)
    encode_threads: int = 4
    preset: str = "veryfast"
    web_root: Path = WEB_ROOT


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny",
                   help="model served (clients may ask for it in `start`): a streaming preset of `streamgen generate` "
                        "(default: the built-in 'tiny'), or 'testpattern' (no model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token", default=os.environ.get("STREAMGEN_TOKEN"),
                   help="require this token (?token= or Authorization: Bearer); default $STREAMGEN_TOKEN")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="browser origin allowed to open the WebSocket (repeatable; '*' = any). "
                        "Default: only this server's own origin")
    p.add_argument("--max-sessions", type=int, default=8, help="sessions on this server at once")
    p.add_argument("--max-sessions-per-client", type=int, default=2, help="sessions per client address")
    p.add_argument("--source", choices=["auto", "testpattern", "engine"], default="auto",
                   help="frame source: the generation engine, or a test pattern (no model needed); "
                        "auto: testpattern for --model testpattern, else engine")
    p.add_argument("--queue-fragments", type=int, default=8,
                   help="per-client send window; a slower client drops whole fragments beyond it")
    p.add_argument("--max-lead", type=float, default=3.0,
                   help="seconds of video generated ahead of the viewer's playhead (<= 0: unpaced)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds a session waits for `attach` after a disconnect")
    p.add_argument("--encode-threads", type=int, default=4, help="H.264 encoder worker threads (shared)")
    p.add_argument("--preset", default="veryfast", help="libx264 preset (ultrafast..medium)")
    p.add_argument("--width", type=int, default=None, help="default width (testpattern: 320)")
    p.add_argument("--height", type=int, default=None, help="default height (testpattern: 192)")
    p.add_argument("--fps", type=int, default=None, help="default fps (testpattern: 16)")
    add_engine_arguments(p)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `streamgen serve --source engine` (the model flags match `streamgen generate`)."""
    g = p.add_argument_group("engine (--source engine)")
    g.add_argument("--checkpoint", default=None, help="Wan DiT weights (file or folder); not needed for 'tiny'")
    g.add_argument("--vae", default=None, help="decoder weights (Wan2.1_VAE.pth or taew2_1.pth)")
    g.add_argument("--text-encoder", default=None, help="umT5-XXL folder or models_t5_umt5-xxl-enc-bf16.pth")
    g.add_argument("--decoder", choices=["wan", "taehv"], default=None, help="video decoder (default: the model's)")
    g.add_argument("--rife", default="auto",
                   help="RIFE flownet.pkl for interpolate 2/4 ('auto': $STREAMGEN_RIFE_WEIGHTS or the bundled "
                        "search path; 'none': no interpolation)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT blocks (static shapes; ~1.5x on an H100, falls back to eager)")
    g.add_argument("--quant", choices=["fp8", "int8-weight"], default=None,
                   help="quantize the DiT blocks' linear layers (fp8: 1.1x on 14B, half the weight memory)")
    g.add_argument("--offload", type=int, default=None, metavar="PREFETCH",
                   help="keep the DiT blocks in pinned host memory and stream them onto the GPU PREFETCH blocks ahead")
    g.add_argument("--local-frames", type=int, default=12,
                   help="attention window in latent frames (sink included); streams are endless, so one is needed")
    g.add_argument("--sink-frames", type=int, default=3, help="latent frames kept at the window's front")
    g.add_argument("--engine-sessions", type=int, default=4, help="streams generated at once (each holds a KV cache)")


def make_source_factory(args: argparse.Namespace, executor: ThreadPoolExecutor):
    from streamgen.engine.source import TestPatternFactory

    if args.source == "testpattern" or (args.source == "auto" and args.model == "testpattern"):
        kw = {k: v for k, v in (("width", args.width), ("height", args.height), ("fps", args.fps)) if v}
        return TestPatternFactory(args.model, executor=executor, **kw)
    from streamgen.engine import serving

    return serving.make_source_factory(args)


def run(args: argparse.Namespace) -> int:
    from aiohttp import web

    cfg = ServerConfig(
        model=args.model, token=args.token or None, allowed_origins=list(args.allowed_origin),
        max_sessions=args.max_sessions, max_sessions_per_client=args.max_sessions_per_client,
        queue_fragments=args.queue_fragments, max_lead_s=args.max_lead if args.max_lead > 0 else None,
        grace_s=args.grace, encode_threads=args.encode_threads, preset=args.preset,
    )
    executor = ThreadPoolExecutor(max_workers=max(1, cfg.encode_threads), thread_name_prefix="encode")
    factory = make_source_factory(args, executor)
    app = build_app(cfg, factory, executor=executor)
    url = f"http://{args.host}:{args.port}/"
    if cfg.token:
        url += f"?token={cfg.token}"
    log.info("serving model %r (%s source) at %s", cfg.model, args.source, url)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)
    return 0


# ---------------------------------------------------------------------------------------------


def build_app(cfg: ServerConfig, factory, *, executor: ThreadPoolExecutor | None = None):
    """The aiohttp Application. ``factory`` is a SourceFactory; ``executor`` runs encoders."""
    from aiohttp import web

    from streamgen.server.metrics import Metrics
    from streamgen.server.sessions import SessionRegistry

    global STATE
    if STATE is None:
        STATE = web.AppKey("state", ServerState)
    own_executor = executor is None
    if executor is None:
        executor = ThreadPoolExecutor(max_workers=max(1, cfg.encode_threads), thread_name_prefix="encode")
    app = web.Application()
    metrics = Metrics()
    registry = SessionRegistry(cfg.max_sessions, cfg.max_sessions_per_client)
    state = ServerState(cfg, factory, executor, metrics, registry)
    app[STATE] = state
    _describe_metrics(metrics, state)

    app.router.add_get("/", state.index)
    app.router.add_get("/healthz", state.healthz)
    app.router.add_get("/metrics", state.metrics_handler)
    app.router.add_get("/v1/stream", state.stream)
    app.router.add_get(r"/{name:[A-Za-z0-9_.-]+\.(?:js|mjs|css|html|ico|svg)}", state.static)

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

    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


def _describe_metrics(m, state: "ServerState") -> None:
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


class ServerState:
    def __init__(self, cfg: ServerConfig, factory, executor, metrics, registry):
        self.cfg, self.factory, self.executor, self.metrics, self.registry = cfg, factory, executor, metrics, registry
        self.sockets: set = set()  # open Connection objects

    # -- access control --------------------------------------------------------------------------

    def _token_ok(self, request) -> bool:
        if not self.cfg.token:
            return True
        got = request.query.get("token")
        auth = request.headers.get("Authorization", "")
        if got is None and auth.lower().startswith("bearer "):
            got = auth[7:].strip()
        return got is not None and hmac.compare_digest(got.encode(), self.cfg.token.encode())

    def _origin_ok(self, request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        allowed = self.cfg.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        if not allowed:  # same origin only
            return origin in (f"http://{request.host}", f"https://{request.host}")
        return False

    # -- plain HTTP --------------------------------------------------------------------------------

    async def index(self, request):
        return self._file("index.html")

    async def static(self, request):
        return self._file(request.match_info["name"])

    def _file(self, name: str):
        from aiohttp import web

        path = (self.cfg.web_root / name).resolve()
        if path.parent != self.cfg.web_root.resolve() or not path.is_file():
            raise web.HTTPNotFound(text=f"{name} not found")
        ctype = _STATIC_TYPES.get(path.suffix, "application/octet-stream")
        return web.Response(body=path.read_bytes(), content_type=ctype, headers={"Cache-Control": "no-cache"})

    async def healthz(self, request):
        from aiohttp import web

        return web.json_response({"status": "ok", "model": self.cfg.model, "sessions": len(self.registry.sessions)})

    async def metrics_handler(self, request):
        from aiohttp import web

        if not self._token_ok(request):
            raise web.HTTPUnauthorized(text="missing or wrong token")
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    # -- WebSocket ---------------------------------------------------------------------------------

    async def stream(self, request):
        from aiohttp import web

        from streamgen.server.connection import Connection

        if not self._token_ok(request):
            self.metrics.inc("errors_total", code="unauthorized")
            raise web.HTTPUnauthorized(text="missing or wrong token: pass ?token=... or Authorization: Bearer ...")
        if not self._origin_ok(request):
            self.metrics.inc("errors_total", code="forbidden_origin")
            raise web.HTTPForbidden(text=f"origin {request.headers.get('Origin')!r} is not allowed")
        conn = Connection(self, request)
        return await conn.serve()
