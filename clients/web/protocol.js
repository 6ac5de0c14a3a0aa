// streamgen wire protocol v1 (spec: protocol/README.md), sans-I/O, plain ES module.
// Mirrors streamgen/protocol.py; both are checked against protocol/vectors/ and protocol/schema.json.
//
// Messages are plain objects `{type, ...fields}` with bin fields as Uint8Array.
//   encode(msg, limits?) -> Uint8Array        validated, canonical msgpack
//   decode(bytes, direction?, limits?) -> msg  direction "client" (frames a server receives),
//                                              "server" (frames a client receives) or null
//   ProtocolError {code, field, fatal, ref, message}; toErrorMessage(err) -> an `error` message
//   ClientConnection / ServerConnection: receive(bytes) -> msg | null, send(msg) -> bytes, with
//   the order rules of the spec (phase: idle | starting | active | closed).

import { decode as unpack, encode as pack, Float, MsgpackError } from './msgpack.js';

export const VERSION = 1;
export const SUPPORTED_VERSIONS = [1];
export const ENDPOINT = '/v1/stream';
export const MAX_SEQ = Number.MAX_SAFE_INTEGER;
export const SESSION_PATTERN = '^[A-Za-z0-9_-]{1,128}$';

export const DEFAULT_LIMITS = Object.freeze({
  max_message_bytes: 9 * 2 ** 20,
  max_server_message_bytes: 64 * 2 ** 20,
  max_prompt_bytes: 4096,
  max_model_bytes: 128,
  max_image_bytes: 8 * 2 ** 20,
  min_size: 64,
  max_size: 2048,
  size_multiple: 16,
  min_fps: 1,
  max_fps: 120,
  max_seed: 2 ** 32 - 1,
  max_chunks: 1000000,
  max_text_bytes: 4096,
  max_pixels: 921600, // width * height, checked by the server's engine
  max_lead_s: 10.0,
});

export class ProtocolError extends Error {
  constructor(code, message, { field = null, fatal = false, ref = null } = {}) {
    super(message);
    this.name = 'ProtocolError';
    this.code = code;
    this.field = field;
    this.fatal = fatal;
    this.ref = ref;
  }
}

// Field: [name, kind, required, constraints]; a string constraint names a DEFAULT_LIMITS key.
const F = (name, kind, required = true, c = {}) => ({ name, kind, required, ...c });
const V = F('v', 'int', false, { min: 1, max: 65535, default: VERSION });
const SIZE = { min: 'min_size', max: 'max_size', multiple_of: 'size_multiple' };
const SHORT = { min: 1, max: 64 };
const SESSION = F('session', 'str', true, { min: 1, max: 128, pattern: SESSION_PATTERN });

export const SCHEMA = {
  start: [
    V,
    F('prompt', 'str', true, { min: 1, max: 'max_prompt_bytes' }),
    F('model', 'str', false, { min: 1, max: 'max_model_bytes' }),
    F('width', 'int', false, SIZE),
    F('height', 'int', false, SIZE),
    F('fps', 'int', false, { min: 'min_fps', max: 'max_fps' }),
    F('seed', 'int', false, { min: 0, max: 'max_seed' }),
    F('chunks', 'int', false, { min: 1, max: 'max_chunks' }),
    F('interpolate', 'int', false, { one_of: [1, 2, 4] }),
    F('image', 'bin', false, { min: 1, max: 'max_image_bytes' }),
    F('lead', 'float', false, { min: 0, max: 'max_lead_s' }),
  ],
  prompt: [F('prompt', 'str', true, { min: 1, max: 'max_prompt_bytes' })],
  pause: [],
  resume: [],
  stop: [],
  ack: [F('seq', 'int', true, { min: 0, max: MAX_SEQ }), F('playhead', 'float', false, { min: 0 })],
  attach: [V, SESSION, F('from_seq', 'int', true, { min: 0, max: MAX_SEQ })],
  ready: [
    V,
    SESSION,
    F('mime', 'str', true, { min: 1, max: 256 }),
    F('width', 'int', true, { min: 1, max: 16384 }),
    F('height', 'int', true, { min: 1, max: 16384 }),
    F('fps', 'int', true, { min: 1, max: 1000 }),
  ],
  init: [F('data', 'bin', true, { min: 1, max: 'max_server_message_bytes' })],
  fragment: [
    F('seq', 'int', true, { min: 0, max: MAX_SEQ }),
    F('data', 'bin', true, { min: 1, max: 'max_server_message_bytes' }),
    F('pts', 'float', true, { min: 0 }),
    F('duration', 'float', true, { min: 0 }),
    F('frames', 'int', true, { min: 1, max: 2 ** 31 - 1 }),
    F('keyframe', 'bool'),
  ],
  status: [
    F('state', 'str', true, SHORT),
    F('gen_fps', 'float', true, { min: 0 }),
    F('lead_s', 'float'),
    F('chunk', 'int', false, { min: 0, max: MAX_SEQ }),
    F('queue', 'int', false, { min: 0, max: MAX_SEQ }),
    F('dropped', 'int', false, { min: 0, max: MAX_SEQ }),
  ],
  end: [F('reason', 'str', true, SHORT)],
  error: [
    F('code', 'str', true, SHORT),
    F('message', 'str', true, { min: 0, max: 'max_text_bytes' }),
    F('fatal', 'bool'),
    F('field', 'str', false, SHORT),
    F('ref', 'str', false, SHORT),
    F('retry_after', 'float', false, { min: 0 }),
  ],
};
export const CLIENT_TYPES = ['start', 'prompt', 'pause', 'resume', 'stop', 'ack', 'attach'];
export const SERVER_TYPES = ['ready', 'init', 'fragment', 'status', 'end', 'error'];
export const OPEN_TYPES = ['status'];

/** The schema as plain data, same shape as protocol/schema.json. */
export function schemaJson(limits = DEFAULT_LIMITS) {
  const messages = {};
  for (const [t, fields] of Object.entries(SCHEMA)) {
    messages[t] = fields.map((f) => {
      const row = { name: f.name, kind: f.kind, required: f.required };
      for (const k of ['min', 'max', 'multiple_of', 'pattern', 'default']) if (f[k] !== undefined) row[k] = f[k];
      if (f.one_of !== undefined) row.one_of = [...f.one_of];
      return row;
    });
  }
  return {
    version: VERSION, supported_versions: [...SUPPORTED_VERSIONS], client_types: [...CLIENT_TYPES],
    server_types: [...SERVER_TYPES], open_types: [...OPEN_TYPES], limits: { ...limits }, messages,
  };
}

// ------------------------------------------------------------------------------- validation

const lim = (x, limits) => (typeof x === 'string' ? limits[x] : x);
const isBytes = (x) => x instanceof Uint8Array || x instanceof ArrayBuffer;

/** UTF-8 length of a JS string (a lone surrogate counts 3 bytes). */
export function utf8Length(s) {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c < 0xdc00 && i + 1 < s.length && (s.charCodeAt(i + 1) & 0xfc00) === 0xdc00) {
      n += 4;
      i += 1;
    } else n += 3;
  }
  return n;
}

function show(value) {
  if (typeof value === 'string') return value.length <= 40 ? JSON.stringify(value) : `<${value.length} chars>`;
  if (isBytes(value)) return `<${value.byteLength} bytes>`;
  if (typeof value === 'bigint') return value.toString();
  if (value === undefined) return 'undefined';
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}

function check(t, f, value, limits) {
  const lo = lim(f.min, limits);
  const hi = lim(f.max, limits);
  const bad = (why, code = 'bad_field') => new ProtocolError(code,
    `${t}.${f.name}: ${why}${code === 'too_large' ? '' : `, got ${show(value)}`}`, { field: f.name, ref: t });
  if (f.kind === 'int' || f.kind === 'float') {
    if (typeof value !== 'number' && typeof value !== 'bigint') {
      throw bad(f.kind === 'int' ? 'must be an integer' : 'must be a number');
    }
    if (typeof value === 'number' && !Number.isFinite(value)) throw bad('must be a finite number');
    if (f.kind === 'int' && typeof value === 'number' && !Number.isInteger(value)) throw bad('must be an integer');
    if (f.kind === 'float' && typeof value === 'bigint') value = Number(value);
    if (f.one_of !== undefined && !f.one_of.some((x) => x == value)) throw bad(`must be one of ${f.one_of.join(', ')}`);
    const mult = lim(f.multiple_of, limits);
    if ((lo !== undefined && value < lo) || (hi !== undefined && value > hi)) {
      const rng = lo !== undefined && hi !== undefined ? `in ${lo}..${hi}` : lo !== undefined ? `>= ${lo}` : `<= ${hi}`;
      throw bad(`must be ${rng}${mult ? ` and a multiple of ${mult}` : ''}`);
    }
    value = Number(value);
    if (mult && value % mult) throw bad(`must be a multiple of ${mult} in ${lo}..${hi}`);
    return value;
  }
  if (f.kind === 'bool') {
    if (typeof value !== 'boolean') throw bad('must be true or false');
    return value;
  }
  let n;
  if (f.kind === 'str') {
    if (typeof value !== 'string') throw bad('must be a string');
    n = utf8Length(value);
  } else {
    if (!isBytes(value)) throw bad('must be binary (msgpack bin)');
    if (value instanceof ArrayBuffer) value = new Uint8Array(value);
    n = value.byteLength;
  }
  const unit = f.kind === 'str' ? 'bytes of UTF-8' : 'bytes';
  if (hi !== undefined && n > hi) throw bad(`is ${n} ${unit}; the limit is ${hi}`, 'too_large');
  if (lo !== undefined && n < lo) throw bad(lo === 1 ? 'must not be empty' : `must be at least ${lo} ${unit}`);
  if (f.pattern !== undefined && !new RegExp(f.pattern).test(value)) throw bad(`must match ${f.pattern}`);
  return value;
}

function messageLimit(t, direction, limits) {
  if (direction === 'client' || (!direction && CLIENT_TYPES.includes(t))) return limits.max_message_bytes;
  return limits.max_server_message_bytes;
}

function unpackFrame(data, direction, limits) {
  if (typeof data === 'string') throw new ProtocolError('bad_message', 'a message is one binary WebSocket frame (got text)');
  const bytes = data instanceof ArrayBuffer ? new Uint8Array(data) : data;
  if (!(bytes instanceof Uint8Array)) throw new ProtocolError('bad_message', 'a message is binary data');
  const limit = direction ? messageLimit(null, direction, limits)
    : Math.max(limits.max_message_bytes, limits.max_server_message_bytes);
  if (bytes.byteLength > limit) {
    throw new ProtocolError('too_large', `message is ${bytes.byteLength} bytes; the limit is ${limit}`);
  }
  let obj;
  try {
    obj = unpack(bytes);
  } catch (e) {
    if (!(e instanceof MsgpackError)) throw e;
    throw new ProtocolError('bad_message', `not a single msgpack value: ${e.message}`);
  }
  if (obj === null || typeof obj !== 'object' || Object.getPrototypeOf(obj) !== Object.prototype) {
    const kind = obj === null ? 'nil' : Array.isArray(obj) ? 'array' : isBytes(obj) ? 'bin' : typeof obj;
    throw new ProtocolError('bad_message', `a message is a msgpack map, got ${kind}`);
  }
  const t = obj.type;
  if (typeof t !== 'string') {
    throw new ProtocolError('bad_field', `type: required string field, got ${show(t)}`, { field: 'type' });
  }
  const allowed = direction === 'client' ? CLIENT_TYPES : direction === 'server' ? SERVER_TYPES
    : [...CLIENT_TYPES, ...SERVER_TYPES];
  if (!allowed.includes(t)) {
    const why = Object.hasOwn(SCHEMA, t)
      ? `"${t}" is sent by the ${SERVER_TYPES.includes(t) ? 'server' : 'client'}, not received by it`
      : `unknown message type ${JSON.stringify(t.slice(0, 64))}`;
    throw new ProtocolError('unknown_type', `${why}; expected one of ${allowed.join(', ')}`, { field: 'type' });
  }
  return [t, obj];
}

function build(t, obj, limits) {
  const msg = { type: t };
  for (const f of SCHEMA[t]) {
    let value = Object.hasOwn(obj, f.name) ? obj[f.name] : undefined;
    if (value === undefined || value === null) {
      if (f.required) {
        throw new ProtocolError('bad_field', `${t}.${f.name}: required field is missing`, { field: f.name, ref: t });
      }
      if (f.default !== undefined) msg[f.name] = f.default;
      continue;
    }
    value = check(t, f, value, limits);
    if (f.name === 'v' && !SUPPORTED_VERSIONS.includes(value)) {
      throw new ProtocolError('unsupported_version',
        `${t}.v: protocol version ${value} is not supported; this side speaks ${SUPPORTED_VERSIONS.join(', ')}`,
        { field: 'v', fatal: true, ref: t });
    }
    msg[f.name] = value;
  }
  if (OPEN_TYPES.includes(t)) {
    const known = new Set(SCHEMA[t].map((f) => f.name));
    for (const [k, v] of Object.entries(obj)) {
      if (k !== 'type' && !known.has(k) && v !== null && v !== undefined) msg[k] = v;
    }
  }
  return msg;
}

/** One frame -> validated message object. Throws ProtocolError. */
export function decode(data, direction = null, limits = DEFAULT_LIMITS) {
  const [t, obj] = unpackFrame(data, direction, limits);
  return build(t, obj, limits);
}

/** A `{type, ...}` object (e.g. parsed JSON) -> validated message with defaults applied. */
export function fromMap(obj, limits = DEFAULT_LIMITS) {
  if (!Object.hasOwn(SCHEMA, obj?.type)) {
    throw new ProtocolError('unknown_type', `unknown message type ${show(obj?.type)}`, { field: 'type' });
  }
  return build(obj.type, obj, limits);
}

function toWire(msg, limits) {
  const t = msg.type;
  if (!Object.hasOwn(SCHEMA, t)) throw new ProtocolError('unknown_type', `unknown message type ${show(t)}`, { field: 'type' });
  const out = { type: t };
  const known = new Set(['type']);
  for (const f of SCHEMA[t]) {
    known.add(f.name);
    let value = msg[f.name];
    if ((value === undefined || value === null) && f.name === 'v') value = VERSION;
    if (value === undefined || value === null) {
      if (f.required) {
        throw new ProtocolError('bad_field', `${t}.${f.name}: required field is missing`, { field: f.name, ref: t });
      }
      continue;
    }
    value = check(t, f, value, limits);
    out[f.name] = f.kind === 'float' ? new Float(value) : value;
  }
  if (OPEN_TYPES.includes(t)) {
    for (const [k, v] of Object.entries(msg)) if (!known.has(k) && v !== undefined && v !== null) out[k] = v;
  }
  return out;
}

/** Message object -> canonical msgpack bytes (validated; throws ProtocolError). */
export function encode(msg, limits = DEFAULT_LIMITS) {
  let data;
  try {
    data = pack(toWire(msg, limits));
  } catch (e) {
    if (!(e instanceof MsgpackError)) throw e;
    throw new ProtocolError('bad_field', `${msg.type}: cannot encode: ${e.message}`, { ref: msg.type });
  }
  const limit = messageLimit(msg.type, null, limits);
  if (data.byteLength > limit) {
    throw new ProtocolError('too_large', `${msg.type} message is ${data.byteLength} bytes; the limit is ${limit}`,
      { ref: msg.type });
  }
  return data;
}

/** The `error` message answering a ProtocolError. */
export function toErrorMessage(err) {
  const m = { type: 'error', code: err.code, message: String(err.message).slice(0, 1024), fatal: !!err.fatal };
  if (err.field) m.field = err.field;
  if (err.ref) m.ref = err.ref;
  return m;
}

// ------------------------------------------------------------------------------- connections

const ORDER_HINT = {
  idle: 'send start or attach first',
  starting: 'a session is already starting on this connection; send stop and wait for end',
  active: 'a session is already running on this connection; send stop and wait for end',
};

class Connection {
  constructor(limits = DEFAULT_LIMITS) {
    this.limits = limits;
    this.phase = 'idle';
    this.stopping = false;
    this.hadSession = false;
    this.session = null;
    this.lastSeq = null;
    this.initDone = false;
    this.pending = null;
  }

  outOfOrder(t, why) {
    return new ProtocolError('out_of_order', `${t}: not allowed now (${why ?? ORDER_HINT[this.phase] ?? this.phase})`,
      { field: 'type', ref: t });
  }

  begin(msg) {
    this.phase = 'starting';
    this.pending = msg;
    this.stopping = false;
    this.lastSeq = null;
    this.initDone = false;
    this.session = msg.type === 'attach' ? msg.session : null;
  }

  ended() {
    this.phase = 'idle';
    this.stopping = false;
    this.hadSession = true;
    this.pending = null;
  }

  /** Order rules for a client message of type `t` (throws out_of_order). For a message a server
   *  `received`, false means: ignore it silently (it crossed `end`, or a repeated stop). */
  checkClientOrder(t, received) {
    if (t === 'start' || t === 'attach') {
      if (this.phase !== 'idle') throw this.outOfOrder(t);
    } else if (this.phase === 'idle') {
      if (received && this.hadSession) return false;
      throw this.outOfOrder(t);
    } else if (this.stopping && t !== 'ack') {
      if (received && t === 'stop') return false;
      throw this.outOfOrder(t, 'stop was already sent');
    }
    return true;
  }

  checkAck(seq) {
    if (this.lastSeq === null || seq > this.lastSeq) {
      throw new ProtocolError('bad_field',
        `ack.seq: fragment ${seq} was never sent on this connection (highest: ${this.lastSeq})`,
        { field: 'seq', ref: 'ack' });
    }
  }

  /** Apply one accepted client -> server message (with defaults applied) to the state. */
  clientMessage(msg) {
    if (msg.type === 'start' || msg.type === 'attach') this.begin(msg);
    else if (msg.type === 'stop') this.stopping = true;
  }

  serverMessage(msg) {
    const t = msg.type;
    if (t === 'error') {
      if (msg.fatal) this.phase = 'closed';
      else if (this.phase === 'starting' && (msg.ref === 'start' || msg.ref === 'attach') && msg.code !== 'out_of_order') {
        this.phase = 'idle';
        this.pending = null;
        this.session = null;
      }
      return;
    }
    if (t === 'ready') {
      if (this.phase !== 'starting') throw this.outOfOrder(t, 'ready answers start/attach once');
      if (this.pending?.type === 'attach' && msg.session !== this.pending.session) {
        throw new ProtocolError('bad_field',
          `ready.session: "${msg.session}" does not match the attached session "${this.pending.session}"`,
          { field: 'session', ref: 'ready' });
      }
      this.phase = 'active';
      this.session = msg.session;
    } else if (t === 'init') {
      if (this.phase !== 'active' || this.initDone) throw this.outOfOrder(t, 'init comes once, right after ready');
      this.initDone = true;
    } else if (t === 'fragment') {
      if (this.phase !== 'active') throw this.outOfOrder(t, 'no session is active');
      if (!this.initDone) throw this.outOfOrder(t, 'init must come first');
      const floor = this.pending?.type === 'attach' && this.lastSeq === null ? this.pending.from_seq : 0;
      if ((this.lastSeq !== null && msg.seq <= this.lastSeq) || msg.seq < floor) {
        throw new ProtocolError('out_of_order',
          `fragment.seq: ${msg.seq} after ${this.lastSeq} (seq must increase${floor ? `, from ${floor}` : ''})`,
          { field: 'seq', ref: 'fragment' });
      }
      this.lastSeq = msg.seq;
    } else if (t === 'status' || t === 'end') {
      if (this.phase !== 'starting' && this.phase !== 'active') throw this.outOfOrder(t, 'no session is active');
      if (t === 'end') this.ended();
    }
  }
}

/** Client side of one WebSocket. After a reconnect: a new ClientConnection, attach(session, lastSeq + 1). */
export class ClientConnection extends Connection {
  /** Check the order (throws ProtocolError; nothing to send), update state, return the frame. */
  send(msg) {
    const t = msg.type;
    if (!CLIENT_TYPES.includes(t)) throw new TypeError(`"${t}" is not a client message`);
    if (this.phase === 'closed') throw this.outOfOrder(t, 'the connection is closed');
    this.checkClientOrder(t, false);
    if (t === 'ack') this.checkAck(msg.seq);
    const data = encode(msg, this.limits);
    this.clientMessage(t === 'start' || t === 'attach' ? fromMap(msg, this.limits) : msg);
    return data;
  }

  /** Decode + validate + order-check one server frame; null once closed. Throws ProtocolError. */
  receive(data) {
    if (this.phase === 'closed') return null;
    const msg = decode(data, 'server', this.limits);
    this.serverMessage(msg);
    return msg;
  }
}

/** Server side of one WebSocket (mirror of streamgen.protocol.ServerConnection). */
export class ServerConnection extends Connection {
  /** Returns the message, or null when it is ignored (crossed `end`, repeated stop, closed). */
  receive(data) {
    if (this.phase === 'closed') return null;
    const [t, obj] = unpackFrame(data, 'client', this.limits);
    let msg;
    try {
      if (!this.checkClientOrder(t, true)) return null;
      msg = build(t, obj, this.limits);
    } catch (e) {
      if (e instanceof ProtocolError) e.ref = t;
      throw e;
    }
    if (t === 'ack') this.checkAck(msg.seq);
    this.clientMessage(msg);
    return msg;
  }

  send(msg) {
    if (!SERVER_TYPES.includes(msg.type)) throw new TypeError(`"${msg.type}" is not a server message`);
    if (this.phase === 'closed') throw this.outOfOrder(msg.type, 'the connection is closed');
    const data = encode(msg, this.limits);
    this.serverMessage(msg);
    return data;
  }
}
