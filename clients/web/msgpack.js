// Minimal msgpack (https://github.com/msgpack/msgpack/blob/master/spec.md) for the streamgen
// protocol: plain ES module, no dependencies, browser and node.
//
// encode(value) -> Uint8Array, canonical: shortest headers, shortest integer encoding, str for
//   strings, bin for Uint8Array/ArrayBuffer, maps in insertion order. A JS number that is a safe
//   integer is written as an integer, any other number as float64; wrap a number in `Float` to
//   force float64 (the protocol's float fields). BigInt -> (u)int64.
// decode(bytes) -> value. Maps become plain objects (keys must be strings, no duplicates), bin a
//   Uint8Array view into `bytes` (no copy), (u)int64 a Number when exact else a BigInt, ext an
//   `Ext`. Throws MsgpackError on malformed input, invalid UTF-8 or trailing bytes.

export class MsgpackError extends Error {
  constructor(message) {
    super(message);
    this.name = 'MsgpackError';
  }
}

/** A number that is always encoded as float64, even when integral. */
export class Float {
  constructor(value) {
    this.value = Number(value);
  }
}

/** An ext value (type -128..127, data bytes); the protocol uses none. */
export class Ext {
  constructor(type, data) {
    this.type = type;
    this.data = data;
  }
}

const textEncoder = new TextEncoder();
const textDecoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
const MAX_DEPTH = 512;

class Writer {
  constructor(size = 256) {
    this.buf = new Uint8Array(size);
    this.view = new DataView(this.buf.buffer);
    this.pos = 0;
  }

  reserve(n) {
    if (this.pos + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.pos + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.pos));
    this.buf = next;
    this.view = new DataView(next.buffer);
  }

  u8(x) { this.reserve(1); this.buf[this.pos++] = x; }
  u16(x) { this.reserve(2); this.view.setUint16(this.pos, x); this.pos += 2; }
  u32(x) { this.reserve(4); this.view.setUint32(this.pos, x); this.pos += 4; }
  bytes(b) { this.reserve(b.length); this.buf.set(b, this.pos); this.pos += b.length; }
  head(x, len, fix, fixMax, c8, c16, c32) {
    // fix: base of the fix* form (null: none); c8: code of the 8-bit-length form (null: none)
    if (fix !== null && len <= fixMax) this.u8(fix | len);
    else if (c8 !== null && len < 0x100) { this.u8(c8); this.u8(len); }
    else if (len < 0x10000) { this.u8(c16); this.u16(len); }
    else if (len <= 0xffffffff) { this.u8(c32); this.u32(len); }
    else throw new MsgpackError(`${x} too long for msgpack (${len})`);
  }
}

function writeInt(w, x) {
  // x: safe integer Number or BigInt
  if (typeof x === 'bigint') {
    if (x >= 0n) {
      if (x <= BigInt(Number.MAX_SAFE_INTEGER)) return writeInt(w, Number(x));
      if (x > 0xffffffffffffffffn) throw new MsgpackError(`integer ${x} does not fit in uint64`);
      w.u8(0xcf); w.reserve(8); w.view.setBigUint64(w.pos, x); w.pos += 8;
    } else {
      if (x >= -BigInt(Number.MAX_SAFE_INTEGER)) return writeInt(w, Number(x));
      if (x < -0x8000000000000000n) throw new MsgpackError(`integer ${x} does not fit in int64`);
      w.u8(0xd3); w.reserve(8); w.view.setBigInt64(w.pos, x); w.pos += 8;
    }
    return;
  }
  if (x >= 0) {
    if (x < 0x80) w.u8(x);
    else if (x < 0x100) { w.u8(0xcc); w.u8(x); }
    else if (x < 0x10000) { w.u8(0xcd); w.u16(x); }
    else if (x < 0x100000000) { w.u8(0xce); w.u32(x); }
    else { w.u8(0xcf); w.reserve(8); w.view.setBigUint64(w.pos, BigInt(x)); w.pos += 8; }
  } else if (x >= -32) w.u8(x & 0xff);
  else if (x >= -0x80) { w.u8(0xd0); w.reserve(1); w.view.setInt8(w.pos, x); w.pos += 1; }
  else if (x >= -0x8000) { w.u8(0xd1); w.reserve(2); w.view.setInt16(w.pos, x); w.pos += 2; }
  else if (x >= -0x80000000) { w.u8(0xd2); w.reserve(4); w.view.setInt32(w.pos, x); w.pos += 4; }
  else { w.u8(0xd3); w.reserve(8); w.view.setBigInt64(w.pos, BigInt(x)); w.pos += 8; }
}

function writeFloat(w, x) {
  w.u8(0xcb); w.reserve(8); w.view.setFloat64(w.pos, x); w.pos += 8;
}

function write(w, x, depth) {
  if (depth > MAX_DEPTH) throw new MsgpackError('value nested too deeply');
  if (x === null || x === undefined) w.u8(0xc0);
  else if (x === false) w.u8(0xc2);
  else if (x === true) w.u8(0xc3);
  else if (typeof x === 'number') {
    if (Number.isSafeInteger(x) && !Object.is(x, -0)) writeInt(w, x);
    else writeFloat(w, x);
  } else if (typeof x === 'bigint') writeInt(w, x);
  else if (x instanceof Float) writeFloat(w, x.value);
  else if (typeof x === 'string') {
    const b = textEncoder.encode(x);
    w.head('str', b.length, 0xa0, 31, 0xd9, 0xda, 0xdb);
    w.bytes(b);
  } else if (x instanceof Uint8Array || x instanceof ArrayBuffer) {
    const b = x instanceof ArrayBuffer ? new Uint8Array(x) : x;
    w.head('bin', b.length, null, 0, 0xc4, 0xc5, 0xc6);
    w.bytes(b);
  } else if (Array.isArray(x)) {
    w.head('array', x.length, 0x90, 15, null, 0xdc, 0xdd);
    for (const v of x) write(w, v, depth + 1);
  } else if (x instanceof Ext) {
    const n = x.data.length;
    const fixed = { 1: 0xd4, 2: 0xd5, 4: 0xd6, 8: 0xd7, 16: 0xd8 }[n];
    if (fixed) w.u8(fixed);
    else w.head('ext', n, null, 0, 0xc7, 0xc8, 0xc9);
    w.reserve(1); w.view.setInt8(w.pos, x.type); w.pos += 1;
    w.bytes(x.data);
  } else if (x instanceof Map || typeof x === 'object') {
    const entries = x instanceof Map ? [...x.entries()] : Object.entries(x);
    w.head('map', entries.length, 0x80, 15, null, 0xde, 0xdf);
    for (const [k, v] of entries) {
      write(w, k, depth + 1);
      write(w, v, depth + 1);
    }
  } else throw new MsgpackError(`cannot encode a ${typeof x}`);
}

/** Value -> canonical msgpack bytes. */
export function encode(value) {
  const w = new Writer();
  write(w, value, 0);
  return w.buf.slice(0, w.pos);
}

class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
  }

  need(n) {
    if (this.pos + n > this.bytes.length) {
      throw new MsgpackError(`truncated: need ${n} bytes at offset ${this.pos}, have ${this.bytes.length - this.pos}`);
    }
  }

  u8() { this.need(1); return this.bytes[this.pos++]; }
  u16() { this.need(2); const x = this.view.getUint16(this.pos); this.pos += 2; return x; }
  u32() { this.need(4); const x = this.view.getUint32(this.pos); this.pos += 4; return x; }
  take(n) {
    this.need(n);
    const b = new Uint8Array(this.bytes.buffer, this.bytes.byteOffset + this.pos, n);
    this.pos += n;
    return b;
  }
  num(get, size) { this.need(size); const x = this.view[get](this.pos); this.pos += size; return x; }
}

function big(x) {
  const n = Number(x);
  return Number.isSafeInteger(n) && BigInt(n) === x ? n : x;
}

function readStr(r, n) {
  try {
    return textDecoder.decode(r.take(n));
  } catch (e) {
    if (e instanceof MsgpackError) throw e;
    throw new MsgpackError(`str at offset ${r.pos - n} is not valid UTF-8`);
  }
}

function readMap(r, n, depth) {
  const obj = {};
  for (let i = 0; i < n; i++) {
    const k = read(r, depth + 1);
    if (typeof k !== 'string') throw new MsgpackError(`map keys must be strings, got ${typeof k}`);
    const v = read(r, depth + 1);
    if (Object.prototype.hasOwnProperty.call(obj, k)) throw new MsgpackError(`duplicate map key "${k}"`);
    Object.defineProperty(obj, k, { value: v, enumerable: true, writable: true, configurable: true });
  }
  return obj;
}

function readArray(r, n, depth) {
  const out = new Array(n);
  for (let i = 0; i < n; i++) out[i] = read(r, depth + 1);
  return out;
}

function readExt(r, n) {
  const type = r.num('getInt8', 1);
  return new Ext(type, r.take(n));
}

function read(r, depth) {
  if (depth > MAX_DEPTH) throw new MsgpackError('value nested too deeply');
  const c = r.u8();
  if (c < 0x80) return c;
  if (c < 0x90) return readMap(r, c & 0x0f, depth);
  if (c < 0xa0) return readArray(r, c & 0x0f, depth);
  if (c < 0xc0) return readStr(r, c & 0x1f);
  if (c >= 0xe0) return c - 0x100;
  switch (c) {
    case 0xc0: return null;
    case 0xc2: return false;
    case 0xc3: return true;
    case 0xc4: return r.take(r.u8());
    case 0xc5: return r.take(r.u16());
    case 0xc6: return r.take(r.u32());
    case 0xc7: return readExt(r, r.u8());
    case 0xc8: return readExt(r, r.u16());
    case 0xc9: return readExt(r, r.u32());
    case 0xca: return r.num('getFloat32', 4);
    case 0xcb: return r.num('getFloat64', 8);
    case 0xcc: return r.u8();
    case 0xcd: return r.u16();
    case 0xce: return r.u32();
    case 0xcf: return big(r.num('getBigUint64', 8));
    case 0xd0: return r.num('getInt8', 1);
    case 0xd1: return r.num('getInt16', 2);
    case 0xd2: return r.num('getInt32', 4);
    case 0xd3: return big(r.num('getBigInt64', 8));
    case 0xd4: return readExt(r, 1);
    case 0xd5: return readExt(r, 2);
    case 0xd6: return readExt(r, 4);
    case 0xd7: return readExt(r, 8);
    case 0xd8: return readExt(r, 16);
    case 0xd9: return readStr(r, r.u8());
    case 0xda: return readStr(r, r.u16());
    case 0xdb: return readStr(r, r.u32());
    case 0xdc: return readArray(r, r.u16(), depth);
    case 0xdd: return readArray(r, r.u32(), depth);
    case 0xde: return readMap(r, r.u16(), depth);
    case 0xdf: return readMap(r, r.u32(), depth);
    default: throw new MsgpackError(`byte 0x${c.toString(16)} at offset ${r.pos - 1} is never used in msgpack`);
  }
}

/** Exactly one msgpack value (Uint8Array or ArrayBuffer) -> JS value. */
export function decode(bytes) {
  const b = bytes instanceof ArrayBuffer ? new Uint8Array(bytes) : bytes;
  if (!(b instanceof Uint8Array)) throw new MsgpackError('decode takes a Uint8Array or an ArrayBuffer');
  const r = new Reader(b);
  const value = read(r, 0);
  if (r.pos !== b.length) throw new MsgpackError(`${b.length - r.pos} extra bytes after the value`);
  return value;
}
