"""What every request handler of the server shares: configuration, the frame-source factory, the
encoder pool, the metrics, the session registry and the open sockets; access checks. Built once by
:func:`streamgen.server.app.build_app` and passed to each :class:`~streamgen.server.connection.Connection`."""

from __future__ import annotations

import hmac
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from streamgen.server.metrics import Metrics
from streamgen.server.sessions import SessionRegistry
from streamgen.server.sources import SourceFactory



def _web_root() -> Path:
    """The browser player: streamgen/web in an installed copy (clients/web is package data, see
    pyproject.toml), clients/web beside the package in a source checkout or an editable install."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "web"
    return installed if (installed / "index.html").is_file() else package.parent / "clients" / "web"


WEB_ROOT = _web_root()
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass
class ServerConfig:
    model: str = "testpattern"
    token: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    max_sessions: int = 4
    max_sessions_per_client: int = 2
    queue_fragments: int = 8
    log_fragments: int = 64
    max_lead_s: float | None = 0.75  # default lead, about one chunk (None: unpaced); start.lead overrides
    grace_s: float = 10.0
    unsent_bytes: int | None = 256 << 10  # TCP_NOTSENT_LOWAT per connection (None: OS default)
    encode_threads: int = 4
    preset: str = "veryfast"
    web_root: Path = WEB_ROOT
    max_connections: int = 256
    max_viewers_per_session: int = 8
    messages_per_s: float = 50.0  # per connection, on average
    messages_burst: float = 200.0
    public_hosts: list[str] = field(default_factory=list)  # Host names served besides loopback
    message_timeout_s: float = 20.0  # a client message (frame or fragments) must complete within this


class ServerState:
    def __init__(self, cfg: ServerConfig, factory: SourceFactory, executor: Executor, metrics: Metrics,
                 registry: SessionRegistry):
        self.cfg, self.factory, self.executor, self.metrics, self.registry = cfg, factory, executor, metrics, registry
        self.sockets: set = set()  # open Connection objects

    def host_ok(self, request) -> bool:
        """Without a token only loopback Host names (and ``public_hosts``) are served: a page on another
        site that rebinds its DNS name to this machine sends its own name as Host and is refused."""
        if self.cfg.token:
            return True
        host = (request.host or "").lower()
        name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        return name in _LOOPBACK or name in [h.lower() for h in self.cfg.public_hosts]

    def token_ok(self, request) -> bool:
        if not self.cfg.token:
            return True
        got = request.query.get("token")
        auth = request.headers.get("Authorization", "")
        if got is None and auth.lower().startswith("bearer "):
            got = auth[7:].strip()
        return got is not None and hmac.compare_digest(got.encode(), self.cfg.token.encode())

    def origin_ok(self, request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        allowed = self.cfg.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        return origin in (f"http://{request.host}", f"https://{request.host}")  # the server's own page
