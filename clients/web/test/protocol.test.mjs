// node --test: clients/web/protocol.js + msgpack.js against protocol/vectors/ and protocol/schema.json.
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { test } from 'node:test';

import { decode as unpack, encode as pack, Float } from '../msgpack.js';
import * as P from '../protocol.js';

const ROOT = new URL('../../../protocol/', import.meta.url);
const VECTOR_DIR = new URL('vectors/', ROOT);
const vectors = readdirSync(VECTOR_DIR).filter((f) => f.endsWith('.json')).sort().map((f) => {
  const doc = JSON.parse(readFileSync(new URL(f, VECTOR_DIR), 'utf8'));
  return { name: f.slice(0, -5), doc, bytes: new Uint8Array(readFileSync(new URL(doc.bytes_file, VECTOR_DIR))) };
});

function fromJson(x) {
  if (Array.isArray(x)) return x.map(fromJson);
  if (x && typeof x === 'object') {
    const keys = Object.keys(x);
    if (keys.length === 1 && keys[0] === '$bin') return new Uint8Array(Buffer.from(x.$bin, 'base64'));
    return Object.fromEntries(keys.map((k) => [k, fromJson(x[k])]));
  }
  return x;
}

const hex = (b) => Buffer.from(b).toString('hex');

test('vector set covers every message type', () => {
  const types = new Set(vectors.filter((v) => v.doc.valid).map((v) => v.doc.message.type));
  assert.deepEqual([...types].sort(), Object.keys(P.SCHEMA).sort());
  assert.ok(vectors.length >= 60);
});

for (const { name, doc, bytes } of vectors) {
  const limits = { ...P.DEFAULT_LIMITS, ...(doc.limits ?? {}) };
  if (doc.valid) {
    test(`valid vector ${name}: byte-identical encode, decode back`, () => {
      const wire = fromJson(doc.message);
      assert.equal(hex(P.encode(wire, limits)), hex(bytes));
      const msg = P.decode(bytes, doc.direction, limits);
      assert.deepEqual(msg, wire);
      assert.deepEqual(Object.keys(msg), Object.keys(wire), 'canonical key order');
      assert.equal(hex(P.encode(msg, limits)), hex(bytes));
    });
  } else {
    test(`invalid vector ${name}: ${doc.error.code} ${doc.error.field}`, () => {
      assert.throws(() => P.decode(bytes, doc.direction, limits), (e) => {
        assert.ok(e instanceof P.ProtocolError, String(e));
        assert.deepEqual({ code: e.code, field: e.field }, doc.error, e.message);
        assert.equal(e.fatal, e.code === 'unsupported_version');
        if (e.field && e.field !== 'type') assert.ok(e.message.includes(e.field), e.message);
        return true;
      });
    });
  }
}

test('schema.json matches protocol.js', () => {
  const schema = JSON.parse(readFileSync(new URL('schema.json', ROOT), 'utf8'));
  assert.deepEqual(P.schemaJson(), schema);
});

test('msgpack: shortest integer encodings at every boundary', () => {
  const cases = [
    [0, '00'], [127, '7f'], [128, 'cc80'], [255, 'ccff'], [256, 'cd0100'], [65535, 'cdffff'],
    [65536, 'ce00010000'], [2 ** 32 - 1, 'ceffffffff'], [2 ** 32, 'cf0000000100000000'],
    [-1, 'ff'], [-32, 'e0'], [-33, 'd0df'], [-128, 'd080'], [-129, 'd1ff7f'], [-32768, 'd18000'],
    [-32769, 'd2ffff7fff'], [-(2 ** 31), 'd280000000'], [-(2 ** 31) - 1, 'd3ffffffff7fffffff'],
    [2n ** 64n - 1n, 'cfffffffffffffffff'], [1.5, 'cb3ff8000000000000'], [new Float(2), 'cb4000000000000000'],
  ];
  for (const [value, expected] of cases) {
    assert.equal(hex(pack(value)), expected, String(value));
    const back = unpack(pack(value));
    assert.equal(back, value instanceof Float ? value.value : value);
  }
});

test('msgpack: str/bin/map/array headers and round trip', () => {
  for (const n of [0, 31, 32, 255, 256, 65535, 65536]) {
    const s = 'x'.repeat(n);
    const b = new Uint8Array(n).fill(7);
    const head = (x) => hex(pack(x)).slice(0, n < 32 ? 2 : n < 256 ? 4 : n < 65536 ? 6 : 10);
    assert.equal(head(s), n < 32 ? (0xa0 | n).toString(16) : n < 256 ? `d9${n.toString(16).padStart(2, '0')}`
      : n < 65536 ? `da${n.toString(16).padStart(4, '0')}` : `db${n.toString(16).padStart(8, '0')}`);
    assert.equal(unpack(pack(s)), s);
    assert.deepEqual(unpack(pack(b)), b);
    assert.equal(hex(pack(b)).slice(0, 2), n < 256 ? 'c4' : n < 65536 ? 'c5' : 'c6');
  }
  const value = { a: [1, -2, 'x', null, true, false, 0.25, new Uint8Array([1, 2])], b: { c: {} } };
  assert.deepEqual(unpack(pack(value)), value);
  const big = Object.fromEntries(Array.from({ length: 16 }, (_, i) => [`k${i}`, i]));
  assert.equal(hex(pack(big)).slice(0, 6), 'de0010');
  assert.deepEqual(unpack(pack(big)), big);
  assert.equal(hex(pack(Array(16).fill(0))).slice(0, 6), 'dc0010');
});

test('msgpack: hostile keys do not touch prototypes', () => {
  const bytes = Uint8Array.from(Buffer.from('81a95f5f70726f746f5f5f81a17801', 'hex')); // {"__proto__": {"x": 1}}
  const obj = unpack(bytes);
  assert.equal(Object.getPrototypeOf(obj), Object.prototype);
  assert.deepEqual(Object.keys(obj), ['__proto__']);
  assert.equal({}.x, undefined);
});

test('utf8Length counts bytes like Python', () => {
  assert.equal(P.utf8Length('a'), 1);
  assert.equal(P.utf8Length('é'), 2);
  assert.equal(P.utf8Length('狐'), 3);
  assert.equal(P.utf8Length('🦊'), 4);
  assert.equal(P.utf8Length('\ud83e'), 3);
});

const READY = { type: 'ready', session: 'abc', mime: 'video/mp4; codecs="avc1.42C01E"', width: 64, height: 64, fps: 16 };
const frag = (seq) => ({ type: 'fragment', seq, data: new Uint8Array([seq]), pts: seq * 0.5, duration: 0.5, frames: 8, keyframe: true });

test('connections: a whole session, both sides', () => {
  const c = new P.ClientConnection();
  const s = new P.ServerConnection();
  assert.equal(s.receive(c.send({ type: 'start', prompt: 'a fox', chunks: 2 })).prompt, 'a fox');
  assert.equal(c.phase, 'starting');
  assert.equal(s.receive(c.send({ type: 'prompt', prompt: 'pipelined before ready' })).type, 'prompt');
  c.receive(s.send({ type: 'status', state: 'queued', gen_fps: 0, lead_s: 0 }));
  c.receive(s.send(READY));
  c.receive(s.send({ type: 'init', data: new Uint8Array([1]) }));
  for (const seq of [0, 1, 3]) c.receive(s.send(frag(seq)));
  assert.equal(c.lastSeq, 3);
  assert.equal(s.receive(c.send({ type: 'ack', seq: 3, playhead: 0.25 })).seq, 3);
  assert.throws(() => c.send({ type: 'ack', seq: 4 }), { code: 'bad_field', field: 'seq' });
  assert.throws(() => c.receive(P.encode(frag(2))), { code: 'out_of_order', field: 'seq' });
  s.receive(c.send({ type: 'stop' }));
  assert.throws(() => c.send({ type: 'prompt', prompt: 'late' }), { code: 'out_of_order' });
  c.receive(s.send({ type: 'end', reason: 'stopped' }));
  assert.equal(c.phase, 'idle');
  assert.equal(s.receive(P.encode({ type: 'ack', seq: 5 })), null, 'ack crossing end is ignored');
  s.receive(c.send({ type: 'start', prompt: 'again' }));
  assert.equal(s.phase, 'starting');
});

test('connections: out-of-order and rejected starts keep the connection usable', () => {
  const s = new P.ServerConnection();
  assert.throws(() => s.receive(P.encode({ type: 'prompt', prompt: 'x' })), { code: 'out_of_order', ref: 'prompt' });
  assert.throws(() => s.receive(P.encode({ type: 'ack', seq: 0 })), { code: 'out_of_order' });
  let err;
  try {
    s.receive(pack({ type: 'start', prompt: 'x', width: 100 }));
  } catch (e) {
    err = e;
  }
  assert.equal(err.ref, 'start');
  assert.equal(s.phase, 'idle');
  const c = new P.ClientConnection();
  c.send({ type: 'start', prompt: 'x' });
  c.receive(s.send(P.toErrorMessage(err)));
  assert.equal(c.phase, 'idle', 'a rejected start returns to idle');
  s.receive(P.encode({ type: 'start', prompt: 'ok' }));
  assert.throws(() => s.receive(pack({ type: 'start', prompt: 'twice', width: 3 })), { code: 'out_of_order', ref: 'start' });
  const dup = s.send({ type: 'error', code: 'out_of_order', message: 'no', fatal: false, ref: 'start' });
  assert.equal(s.phase, 'starting', 'a duplicate start does not cancel the pending one');
  assert.ok(dup.byteLength > 0);
  s.send({ type: 'error', code: 'busy', message: 'full', fatal: false, ref: 'start' });
  assert.equal(s.phase, 'idle');
  s.send({ type: 'error', code: 'internal', message: 'boom', fatal: true });
  assert.equal(s.phase, 'closed');
  assert.equal(s.receive(P.encode({ type: 'stop' })), null);
});

test('connections: attach checks session and from_seq', () => {
  const c = new P.ClientConnection();
  c.send({ type: 'attach', session: 'abc', from_seq: 5 });
  assert.throws(() => c.receive(P.encode({ ...READY, session: 'other' })), { code: 'bad_field', field: 'session' });
  c.receive(P.encode(READY));
  c.receive(P.encode({ type: 'init', data: new Uint8Array([1]) }));
  assert.throws(() => c.receive(P.encode(frag(4))), { code: 'out_of_order', field: 'seq' });
  assert.equal(c.receive(P.encode(frag(6))).seq, 6);
});

const SEQ_DIR = new URL('sequences/', VECTOR_DIR);
for (const f of readdirSync(SEQ_DIR).filter((n) => n.endsWith('.json')).sort()) {
  const doc = JSON.parse(readFileSync(new URL(f, SEQ_DIR), 'utf8'));
  test(`state machine sequence ${f.slice(0, -5)}`, () => {
    const conn = doc.side === 'server' ? new P.ServerConnection() : new P.ClientConnection();
    doc.steps.forEach((step, i) => {
      const where = `step ${i}: ${JSON.stringify(step)}`;
      const op = step.recv ? () => conn.receive(pack(fromJson(step.recv))) : () => conn.send(fromJson(step.send));
      if (typeof step.expect === 'object') {
        assert.throws(op, (e) => {
          assert.ok(e instanceof P.ProtocolError, `${where}: ${e}`);
          assert.deepEqual({ code: e.code, field: e.field }, step.expect, where);
          return true;
        });
      } else {
        const out = op();
        assert.equal(out === null, step.expect === 'ignored', where);
      }
      if (step.phase) assert.equal(conn.phase, step.phase, where);
    });
  });
}
