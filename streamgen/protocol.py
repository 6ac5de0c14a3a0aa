"""streamgen wire protocol v1, sans-I/O: bytes in, messages out; messages in, bytes out.

The language-neutral contract is ``protocol/README.md`` (message table, event order, errors,
versioning, limits) with golden byte vectors in ``protocol/vectors/``; ``clients/web/protocol.js``
implements the same rules. This module does no I/O and imports neither asyncio nor torch.

Public API
----------
- Messages: one frozen dataclass per type. Client -> server: ``Start``, ``Prompt``, ``Pause``,
  ``Resume``, ``Stop``, ``Ack``, ``Attach``. Server -> client: ``Ready``, ``Init``, ``Fragment``,
  ``Status``, ``End``, ``Error``. Field names are the wire names.
- ``encode(msg, limits=DEFAULT_LIMITS) -> bytes``: validate, then canonical msgpack (keys in
  ``SCHEMA`` order, ``"type"`` first, absent optionals omitted, smallest ints, float64 floats).
- ``decode(data, direction=None, limits=DEFAULT_LIMITS) -> message``; ``direction`` is
  ``"client"`` (frames a server receives), ``"server"`` (frames a client receives) or None.
- ``ProtocolError(code, message, field=, fatal=, ref=)``: every rejection; ``.to_message()``
  gives the ``Error`` to send back. Codes: ``bad_message``, ``unknown_type``, ``bad_field``,
  ``too_large``, ``out_of_order``, ``unsupported_version`` (the only fatal one here).
- ``ServerConnection`` / ``ClientConnection``: per-connection order checking.
  ``receive(data) -> message | None`` (None: a message that crossed ``end`` in flight and is
  ignored) raises ProtocolError for bad or out-of-order input without changing state;
  ``send(msg) -> bytes`` checks that *we* keep the order and encodes.
- ``Limits`` (``DEFAULT_LIMITS``): every size and range limit; a server may pass its own.
- ``SCHEMA``: type -> tuple of ``Field``; ``schema_json()`` renders it for
  ``protocol/schema.json`` (checked against both implementations by the tests).
  ``load_schema()`` reads that file from this copy: package data (``streamgen/spec/``) when
  installed, ``protocol/`` beside the package in a checkout.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Union

import msgpack

VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
ENDPOINT = "/v1/stream"
MAX_SEQ = 2**53 - 1  # exact in a JavaScript number
SESSION_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
INTERPOLATE_FACTORS = (1, 2, 4)  # start.interpolate: RIFE frame-rate multipliers


@dataclass(frozen=True)
class Limits:
    """Every limit the validator enforces. Sizes of str fields are UTF-8 bytes."""

    max_message_bytes: int = 9 * 2**20  # one client -> server frame
    max_server_message_bytes: int = 64 * 2**20  # one server -> client frame
    max_prompt_bytes: int = 4096
    max_model_bytes: int = 128
    max_image_bytes: int = 8 * 2**20
    min_size: int = 64  # width / height of a start
    max_size: int = 2048
    size_multiple: int = 16
    min_fps: int = 1
    max_fps: int = 120
    max_seed: int = 2**32 - 1
    max_chunks: int = 1_000_000
    max_text_bytes: int = 4096  # error.message
    max_pixels: int = 1280 * 720  # width * height of a stream (a served model may lower it); checked by the engine
    max_lead_s: float = 10.0  # start.lead


DEFAULT_LIMITS = Limits()


# --------------------------------------------------------------------------- errors


class ProtocolError(ValueError):
    """A message that breaks the protocol. ``field`` names the offending field (None: the frame
    as a whole), ``ref`` the type of the message it answers (None: unknown)."""

    def __init__(self, code: str, message: str, *, field: str | None = None, fatal: bool = False,
                 ref: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.fatal = fatal
        self.ref = ref

    def to_message(self) -> "Error":
        return Error(code=self.code, message=self.message[: DEFAULT_LIMITS.max_text_bytes // 4],
                     fatal=self.fatal, field=self.field, ref=self.ref)

    def __repr__(self) -> str:
        return f"ProtocolError({self.code!r}, {self.message!r}, field={self.field!r}, fatal={self.fatal})"


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Field:
    """One wire field. ``min``/``max`` bound the value of numbers and the byte length of str
    (UTF-8) and bin; a str names a ``Limits`` attribute. Too long str/bin -> ``too_large``,
    every other violation -> ``bad_field``."""

    name: str
    kind: str  # "str" | "int" | "float" | "bool" | "bin"
    required: bool = True
    min: int | float | str | None = None
    max: int | float | str | None = None
    multiple_of: int | str | None = None
    one_of: tuple[int, ...] | None = None
    pattern: str | None = None
    default: Any = None


_V = Field("v", "int", False, min=1, max=65535, default=VERSION)
_SIZE = dict(min="min_size", max="max_size", multiple_of="size_multiple")
_SHORT = dict(min=1, max=64)

SCHEMA: dict[str, tuple[Field, ...]] = {
    # client -> server
    "start": (
        _V,
        Field("prompt", "str", min=1, max="max_prompt_bytes"),
        Field("model", "str", False, min=1, max="max_model_bytes"),
        Field("width", "int", False, **_SIZE),
        Field("height", "int", False, **_SIZE),
        Field("fps", "int", False, min="min_fps", max="max_fps"),
        Field("seed", "int", False, min=0, max="max_seed"),
        Field("chunks", "int", False, min=1, max="max_chunks"),
        Field("interpolate", "int", False, one_of=INTERPOLATE_FACTORS),
        Field("image", "bin", False, min=1, max="max_image_bytes"),
        Field("lead", "float", False, min=0, max="max_lead_s"),
    ),
    "prompt": (Field("prompt", "str", min=1, max="max_prompt_bytes"),),
    "pause": (),
    "resume": (),
    "stop": (),
    "ack": (Field("seq", "int", min=0, max=MAX_SEQ), Field("playhead", "float", False, min=0)),
    "attach": (
        _V,
        Field("session", "str", pattern=SESSION_PATTERN, min=1, max=128),
        Field("from_seq", "int", min=0, max=MAX_SEQ),
    ),
    # server -> client
    "ready": (
        _V,
        Field("session", "str", pattern=SESSION_PATTERN, min=1, max=128),
        Field("mime", "str", min=1, max=256),
        Field("width", "int", min=1, max=16384),
        Field("height", "int", min=1, max=16384),
        Field("fps", "int", min=1, max=1000),
    ),
    "init": (Field("data", "bin", min=1, max="max_server_message_bytes"),),
    "fragment": (
        Field("seq", "int", min=0, max=MAX_SEQ),
        Field("data", "bin", min=1, max="max_server_message_bytes"),
        Field("pts", "float", min=0),
        Field("duration", "float", min=0),
        Field("frames", "int", min=1, max=2**31 - 1),
        Field("keyframe", "bool"),
    ),
    "status": (
        Field("state", "str", **_SHORT),
        Field("gen_fps", "float", min=0),
        Field("lead_s", "float"),
        Field("chunk", "int", False, min=0, max=MAX_SEQ),
        Field("queue", "int", False, min=0, max=MAX_SEQ),
        Field("dropped", "int", False, min=0, max=MAX_SEQ),
    ),
    "end": (Field("reason", "str", **_SHORT),),
    "error": (
        Field("code", "str", **_SHORT),
        Field("message", "str", min=0, max="max_text_bytes"),
        Field("fatal", "bool"),
        Field("field", "str", False, **_SHORT),
        Field("ref", "str", False, **_SHORT),
        Field("retry_after", "float", False, min=0),
    ),
}
CLIENT_TYPES = ("start", "prompt", "pause", "resume", "stop", "ack", "attach")
SERVER_TYPES = ("ready", "init", "fragment", "status", "end", "error")
OPEN_TYPES = ("status",)  # unknown fields are kept (Status.extra); elsewhere they are ignored


def schema_path() -> Path:
    """``protocol/schema.json`` of this copy: ``streamgen/spec/schema.json`` in an installed copy
    (package data, see pyproject.toml), ``protocol/schema.json`` beside the package in a checkout."""
    package = Path(__file__).resolve().parent
    installed = package / "spec" / "schema.json"
    return installed if installed.is_file() else package.parent / "protocol" / "schema.json"


def load_schema() -> dict:
    """The published schema (``schema_path()``) as JSON data; equal to ``schema_json()``."""
    return json.loads(schema_path().read_text(encoding="utf-8"))


def schema_json(limits: Limits = DEFAULT_LIMITS) -> dict:
    """``SCHEMA`` + limits as plain JSON data (the shape of ``protocol/schema.json``)."""
    out: dict[str, Any] = {"version": VERSION, "supported_versions": list(SUPPORTED_VERSIONS),
                           "client_types": list(CLIENT_TYPES), "server_types": list(SERVER_TYPES),
                           "open_types": list(OPEN_TYPES),
                           "limits": {f.name: getattr(limits, f.name) for f in fields(limits)},
                           "messages": {}}
    for t, fs in SCHEMA.items():
        rows = []
        for f in fs:
            row: dict[str, Any] = {"name": f.name, "kind": f.kind, "required": f.required}
            for k in ("min", "max", "multiple_of", "pattern", "default"):
                if getattr(f, k) is not None:
                    row[k] = getattr(f, k)
            if f.one_of is not None:
                row["one_of"] = list(f.one_of)
            rows.append(row)
        out["messages"][t] = rows
    return out


# --------------------------------------------------------------------------- messages


def _bin_repr(b: bytes | None) -> str:
    return "None" if b is None else f"<{len(b)} bytes>"


@dataclass(frozen=True, slots=True)
class Start:
    TYPE: ClassVar[str] = "start"
    prompt: str
    model: str | None = None
    width: int | None = None
    height: int | None = None
    fps: int | None = None
    seed: int | None = None
    chunks: int | None = None  # None: until stopped
    interpolate: int | None = None
    image: bytes | None = field(default=None, repr=False)
    lead: float | None = None  # seconds generated ahead of the viewer (None: the server's default)
    v: int = VERSION


@dataclass(frozen=True, slots=True)
class Prompt:
    TYPE: ClassVar[str] = "prompt"
    prompt: str


@dataclass(frozen=True, slots=True)
class Pause:
    TYPE: ClassVar[str] = "pause"


@dataclass(frozen=True, slots=True)
class Resume:
    TYPE: ClassVar[str] = "resume"


@dataclass(frozen=True, slots=True)
class Stop:
    TYPE: ClassVar[str] = "stop"


@dataclass(frozen=True, slots=True)
class Ack:
    TYPE: ClassVar[str] = "ack"
    seq: int
    playhead: float | None = None


@dataclass(frozen=True, slots=True)
class Attach:
    TYPE: ClassVar[str] = "attach"
    session: str
    from_seq: int
    v: int = VERSION


@dataclass(frozen=True, slots=True)
class Ready:
    TYPE: ClassVar[str] = "ready"
    session: str
    mime: str
    width: int
    height: int
    fps: int
    v: int = VERSION


@dataclass(frozen=True, slots=True)
class Init:
    TYPE: ClassVar[str] = "init"
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Fragment:
    TYPE: ClassVar[str] = "fragment"
    seq: int
    data: bytes = field(repr=False)
    pts: float  # seconds from the start of the stream
    duration: float  # seconds
    frames: int
    keyframe: bool


@dataclass(frozen=True, slots=True)
class Status:
    TYPE: ClassVar[str] = "status"
    state: str
    gen_fps: float
    lead_s: float
    chunk: int | None = None
    queue: int | None = None
    dropped: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown fields, in wire order


@dataclass(frozen=True, slots=True)
class End:
    TYPE: ClassVar[str] = "end"
    reason: str


@dataclass(frozen=True, slots=True)
class Error:
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    fatal: bool = False
    field: str | None = None
    ref: str | None = None
    retry_after: float | None = None  # seconds after which a refused start may be tried again (overloaded)


ClientMessage = Union[Start, Prompt, Pause, Resume, Stop, Ack, Attach]
ServerMessage = Union[Ready, Init, Fragment, Status, End, Error]
Message = Union[ClientMessage, ServerMessage]
MESSAGE_CLASSES: dict[str, type] = {c.TYPE: c for c in (Start, Prompt, Pause, Resume, Stop, Ack, Attach,
                                                        Ready, Init, Fragment, Status, End, Error)}


# --------------------------------------------------------------------------- validation


def _limit(value: int | float | str | None, limits: Limits):
    return getattr(limits, value) if isinstance(value, str) else value


def _check(t: str, f: Field, value: Any, limits: Limits) -> Any:
    """Return ``value`` normalized to ``f.kind`` or raise ProtocolError naming field and limit."""
    where = f"{t}.{f.name}"
    lo, hi = _limit(f.min, limits), _limit(f.max, limits)

    def bad(why: str, code: str = "bad_field") -> ProtocolError:
        if code == "too_large":
            return ProtocolError(code, f"{where}: {why}", field=f.name, ref=t)
        shown = value if not isinstance(value, (bytes, bytearray, memoryview, str)) or len(value) <= 40 else (
            f"<{len(value)} {'chars' if isinstance(value, str) else 'bytes'}>")
        return ProtocolError(code, f"{where}: {why}, got {shown!r}", field=f.name, ref=t)

    if f.kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"must be {'an integer' if f.kind == 'int' else 'a number'}")
        if isinstance(value, float) and not math.isfinite(value):
            raise bad("must be a finite number")
        if f.kind == "int":
            if isinstance(value, float):
                if not value.is_integer():
                    raise bad("must be an integer")
                value = int(value)
        else:
            value = float(value)
        if f.one_of is not None and value not in f.one_of:
            raise bad(f"must be one of {', '.join(map(str, f.one_of))}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = f"in {lo}..{hi}" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"
            mult = _limit(f.multiple_of, limits)
            raise bad(f"must be {rng}" + (f" and a multiple of {mult}" if mult else ""))
        mult = _limit(f.multiple_of, limits)
        if mult and value % mult:
            raise bad(f"must be a multiple of {mult} in {lo}..{hi}")
        return value
    if f.kind == "bool":
        if not isinstance(value, bool):
            raise bad("must be true or false")
        return value
    if f.kind == "str":
        if not isinstance(value, str):
            raise bad("must be a string")
        n = len(value.encode("utf-8", "surrogatepass"))
    elif f.kind == "bin":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise bad("must be binary (msgpack bin)")
        value = bytes(value)
        n = len(value)
    else:  # pragma: no cover - schema bug
        raise AssertionError(f.kind)
    unit = "bytes" + (" of UTF-8" if f.kind == "str" else "")
    if hi is not None and n > hi:
        raise bad(f"is {n} {unit}; the limit is {hi}", "too_large")
    if lo is not None and n < lo:
        raise bad("must not be empty" if lo == 1 else f"must be at least {lo} {unit}")
    if f.pattern is not None and not re.fullmatch(f.pattern.strip("^$"), value):
        raise bad(f"must match {f.pattern}")
    return value


def _message_limit(t: str | None, direction: str | None, limits: Limits) -> int:
    if direction == "client" or (direction is None and t in CLIENT_TYPES):
        return limits.max_message_bytes
    return limits.max_server_message_bytes


def _pairs(pairs: list[tuple[Any, Any]]) -> dict:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if not isinstance(k, str):
            raise ProtocolError("bad_message", f"map keys must be strings, got {k!r}")
        if k in out:
            raise ProtocolError("bad_message", f"duplicate map key {k!r}")
        out[k] = v
    return out


def _unpack(data: bytes, direction: str | None, limits: Limits) -> tuple[str, dict]:
    """Frame -> (type, map). Checks size, msgpack, map, the ``type`` field and its direction."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("bad_message", "a message is one binary WebSocket frame (got text)")
    limit = _message_limit(None, direction, limits) if direction else max(
        limits.max_message_bytes, limits.max_server_message_bytes)
    if len(data) > limit:
        raise ProtocolError("too_large", f"message is {len(data)} bytes; the limit is {limit}")
    try:
        obj = msgpack.unpackb(data, raw=False, object_pairs_hook=_pairs, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises several types (ExtraData, FormatError, ValueError, ...)
        raise ProtocolError("bad_message", f"not a single msgpack value: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_message", f"a message is a msgpack map, got {type(obj).__name__}")
    t = obj.get("type")
    if not isinstance(t, str):
        raise ProtocolError("bad_field", f"type: required string field, got {t!r}", field="type")
    allowed = {"client": CLIENT_TYPES, "server": SERVER_TYPES}.get(direction, CLIENT_TYPES + SERVER_TYPES)
    if t not in allowed:
        if t in SCHEMA:
            why = f"{t!r} is sent by the {'server' if t in SERVER_TYPES else 'client'}, not received by it"
        else:
            why = f"unknown message type {t[:64]!r}"
        raise ProtocolError("unknown_type", f"{why}; expected one of {', '.join(allowed)}", field="type")
    return t, obj


def _build(t: str, obj: dict, limits: Limits) -> Message:
    """Validated map -> message object (fields in schema order, first bad field reported)."""
    kwargs: dict[str, Any] = {}
    for f in SCHEMA[t]:
        value = obj.get(f.name)
        if value is None:
            if f.required:
                raise ProtocolError("bad_field", f"{t}.{f.name}: required field is missing", field=f.name, ref=t)
            if f.default is not None:
                kwargs[f.name] = f.default
            continue
        value = _check(t, f, value, limits)
        if f.name == "v" and value not in SUPPORTED_VERSIONS:
            raise ProtocolError(
                "unsupported_version",
                f"{t}.v: protocol version {value} is not supported; this side speaks "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}", field="v", fatal=True, ref=t)
        kwargs[f.name] = value
    if t in OPEN_TYPES:
        known = {f.name for f in SCHEMA[t]} | {"type"}
        kwargs["extra"] = {k: v for k, v in obj.items() if k not in known and v is not None}
    return MESSAGE_CLASSES[t](**kwargs)


def decode(data: bytes, direction: str | None = None, limits: Limits = DEFAULT_LIMITS) -> Message:
    """One frame -> message. ``direction``: "client" (frames sent by a client), "server" or None.
    Raises ProtocolError. Unknown fields are ignored (kept in ``Status.extra``); nil equals absent."""
    t, obj = _unpack(data, direction, limits)
    return _build(t, obj, limits)


def to_map(msg: Message, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Message -> validated, ordered map as it goes on the wire (``type`` first, schema order)."""
    t = msg.TYPE
    out: dict[str, Any] = {"type": t}
    for f in SCHEMA[t]:
        value = getattr(msg, f.name)
        if value is None:
            if f.required:
                raise ProtocolError("bad_field", f"{t}.{f.name}: required field is missing", field=f.name, ref=t)
            continue
        out[f.name] = _check(t, f, value, limits)
    if t in OPEN_TYPES:
        for k, v in msg.extra.items():
            if not isinstance(k, str) or k in out or k == "type" or any(f.name == k for f in SCHEMA[t]):
                raise ProtocolError("bad_field", f"{t}.extra: key {k!r} must be a new string field", field=k, ref=t)
            out[k] = v
    return out


def encode(msg: Message, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Message -> canonical msgpack bytes (validated; raises ProtocolError)."""
    try:
        data = msgpack.packb(to_map(msg, limits), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        if isinstance(e, ProtocolError):
            raise
        raise ProtocolError("bad_field", f"{msg.TYPE}: cannot encode: {e}", ref=msg.TYPE) from None
    limit = _message_limit(msg.TYPE, None, limits)
    if len(data) > limit:
        raise ProtocolError("too_large", f"{msg.TYPE} message is {len(data)} bytes; the limit is {limit}",
                            ref=msg.TYPE)
    return data


def from_map(obj: dict, limits: Limits = DEFAULT_LIMITS) -> Message:
    """A ``{"type": ..., field: value}`` map (e.g. parsed JSON) -> validated message."""
    t = obj.get("type")
    if t not in SCHEMA:
        raise ProtocolError("unknown_type", f"unknown message type {t!r}", field="type")
    return _build(t, obj, limits)


# --------------------------------------------------------------------------- connections


class Phase(enum.Enum):
    IDLE = "idle"  # no session: start or attach allowed
    STARTING = "starting"  # start/attach accepted, ready not yet sent
    ACTIVE = "active"  # ready sent: init, fragments, status until end
    CLOSED = "closed"  # a fatal error was sent or received


_ORDER_HINT = {
    Phase.IDLE: "send start or attach first",
    Phase.STARTING: "a session is already starting on this connection; send stop and wait for end",
    Phase.ACTIVE: "a session is already running on this connection; send stop and wait for end",
}


def _rejects_start(err: Error) -> bool:
    """A non-fatal error answering start/attach (other than a duplicate start) cancels that start."""
    return err.ref in ("start", "attach") and err.code != "out_of_order"


class _Connection:
    def __init__(self, limits: Limits = DEFAULT_LIMITS):
        self.limits = limits
        self.phase = Phase.IDLE
        self.stopping = False  # stop sent/received, end not yet
        self.had_session = False  # at least one session ended on this connection
        self.session: str | None = None
        self.last_seq: int | None = None  # highest fragment seq of the current session
        self.init_done = False
        self.pending: Start | Attach | None = None

    def _out_of_order(self, t: str, why: str | None = None) -> ProtocolError:
        return ProtocolError("out_of_order", f"{t}: not allowed now ({why or _ORDER_HINT.get(self.phase, self.phase.value)})",
                             field="type", ref=t)

    def _begin(self, msg: Start | Attach) -> None:
        self.phase, self.pending, self.stopping = Phase.STARTING, msg, False
        self.last_seq, self.init_done = None, False
        self.session = msg.session if isinstance(msg, Attach) else None

    def _ended(self) -> None:
        self.phase, self.stopping, self.had_session, self.pending = Phase.IDLE, False, True, None

    def _ready(self, msg: Ready) -> None:
        if isinstance(self.pending, Attach) and msg.session != self.pending.session:
            raise ProtocolError("bad_field", f"ready.session: {msg.session!r} does not match the attached "
                                f"session {self.pending.session!r}", field="session", ref="ready")
        self.phase, self.session = Phase.ACTIVE, msg.session

    def _check_client_order(self, t: str, *, received: bool) -> bool:
        """The order rules for a client message of type ``t`` (raises out_of_order). For a message
        a server ``received``, False means: ignore it silently (it crossed ``end``, or a repeated
        stop); a client sending it gets the error instead."""
        if t in ("start", "attach"):
            if self.phase is not Phase.IDLE:
                raise self._out_of_order(t)
        elif self.phase is Phase.IDLE:
            if received and self.had_session:
                return False
            raise self._out_of_order(t)
        elif self.stopping and t != "ack":
            if received and t == "stop":
                return False
            raise self._out_of_order(t, "stop was already sent")
        return True

    def _check_ack(self, seq: int) -> None:
        if self.last_seq is None or seq > self.last_seq:
            raise ProtocolError("bad_field", f"ack.seq: fragment {seq} was never sent on this connection "
                                f"(highest: {self.last_seq})", field="seq", ref="ack")

    def _client_message(self, msg: ClientMessage) -> None:
        """Apply one (accepted) client -> server message to the state."""
        if isinstance(msg, (Start, Attach)):
            self._begin(msg)
        elif isinstance(msg, Stop):
            self.stopping = True

    def _fragment(self, msg: Fragment) -> None:
        if not self.init_done:
            raise self._out_of_order("fragment", "init must come first")
        floor = self.pending.from_seq if isinstance(self.pending, Attach) and self.last_seq is None else 0
        if (self.last_seq is not None and msg.seq <= self.last_seq) or msg.seq < floor:
            raise ProtocolError("out_of_order", f"fragment.seq: {msg.seq} after {self.last_seq} "
                                f"(seq must increase{', from ' + str(floor) if floor else ''})", field="seq",
                                ref="fragment")
        self.last_seq = msg.seq

    def _server_message(self, msg: ServerMessage) -> None:
        """Apply one server -> client message to the state (both sides run the same rules)."""
        t = msg.TYPE
        if t == "error":
            if msg.fatal:
                self.phase = Phase.CLOSED
            elif self.phase is Phase.STARTING and _rejects_start(msg):
                self.phase, self.pending, self.session = Phase.IDLE, None, None
            return
        if t == "ready":
            if self.phase is not Phase.STARTING:
                raise self._out_of_order(t, "ready answers start/attach once")
            self._ready(msg)
        elif t == "init":
            if self.phase is not Phase.ACTIVE or self.init_done:
                raise self._out_of_order(t, "init comes once, right after ready")
            self.init_done = True
        elif t == "fragment":
            if self.phase is not Phase.ACTIVE:
                raise self._out_of_order(t, "no session is active")
            self._fragment(msg)
        elif t in ("status", "end"):
            if self.phase not in (Phase.STARTING, Phase.ACTIVE):
                raise self._out_of_order(t, "no session is active")
            if t == "end":
                self._ended()


class ServerConnection(_Connection):
    """Server side of one WebSocket: ``receive`` client frames, ``send`` server messages."""

    def receive(self, data: bytes) -> ClientMessage | None:
        """Decode + validate + order-check one client frame. Returns the message, or None when it is
        to be ignored (it crossed ``end`` in flight, a repeated stop, or the connection is closed).
        Raises ProtocolError (state unchanged); send ``err.to_message()`` back."""
        if self.phase is Phase.CLOSED:
            return None
        t, obj = _unpack(data, "client", self.limits)
        try:
            if not self._check_client_order(t, received=True):
                return None
            msg = _build(t, obj, self.limits)
        except ProtocolError as e:
            e.ref = t
            raise
        if isinstance(msg, Ack):
            self._check_ack(msg.seq)
        self._client_message(msg)
        return msg

    def send(self, msg: ServerMessage, data: bytes | None = None) -> bytes:
        """Check that the server keeps the order (raises ProtocolError on a server bug), update the
        state and return the frame. ``data``: ``encode(msg, limits)`` made once already (a fragment
        that goes to many viewers is serialised once, not once per viewer)."""
        if msg.TYPE not in SERVER_TYPES:
            raise TypeError(f"{msg.TYPE!r} is a client message")
        if self.phase is Phase.CLOSED:
            raise self._out_of_order(msg.TYPE, "the connection is closed")
        if data is None:
            data = encode(msg, self.limits)
        self._server_message(msg)
        return data


class ClientConnection(_Connection):
    """Client side of one WebSocket: ``send`` client messages, ``receive`` server frames.
    After a reconnect use a new ClientConnection and ``attach(session, last_seq + 1)``."""

    def send(self, msg: ClientMessage) -> bytes:
        """Check the order (raises ProtocolError locally; nothing is sent), update state, encode."""
        t = msg.TYPE
        if t not in CLIENT_TYPES:
            raise TypeError(f"{t!r} is a server message")
        if self.phase is Phase.CLOSED:
            raise self._out_of_order(t, "the connection is closed")
        self._check_client_order(t, received=False)
        if isinstance(msg, Ack):
            self._check_ack(msg.seq)
        data = encode(msg, self.limits)
        self._client_message(msg)
        return data

    def start(self, prompt: str, **kw: Any) -> bytes:
        return self.send(Start(prompt=prompt, **kw))

    def attach(self, session: str, from_seq: int) -> bytes:
        return self.send(Attach(session=session, from_seq=from_seq))

    def receive(self, data: bytes) -> ServerMessage | None:
        """Decode + validate + order-check one server frame; None once closed. Raises ProtocolError
        when the server breaks the protocol (state unchanged)."""
        if self.phase is Phase.CLOSED:
            return None
        msg = decode(data, "server", self.limits)
        self._server_message(msg)
        return msg
