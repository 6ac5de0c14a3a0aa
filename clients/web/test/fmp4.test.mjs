// node --test: clients/web/fmp4.js against a real stream from streamgen's encoder (fixtures/, made by
// make_fixture.py) and against hand-built boxes for the cases the encoder does not write.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import { Mp4Error, avcCodecString, parseFragment, parseInit, readBoxes, toMicros } from '../fmp4.js';

const DIR = new URL('fixtures/', import.meta.url);
const meta = JSON.parse(readFileSync(new URL('fixture.json', DIR), 'utf8'));
const load = (f) => new Uint8Array(readFileSync(new URL(f, DIR)));
const initBytes = load('init.bin');

test('init segment: codec string, size, timescale, avcC parameter sets', () => {
  const init = parseInit(initBytes);
  assert.equal(init.codec, meta.codec);
  assert.equal(meta.mime, `video/mp4; codecs="${init.codec}"`);
  assert.equal(init.width, meta.width);
  assert.equal(init.height, meta.height);
  assert.equal(init.timescale, meta.timescale);
  assert.equal(init.trackId, 1);
  assert.equal(init.description[0], 1); // AVCDecoderConfigurationRecord version
  assert.equal(init.sps.length, 1);
  assert.equal(init.pps.length, 1);
  assert.equal(init.sps[0][0] & 0x1f, 7);
  assert.equal(init.pps[0][0] & 0x1f, 8);
  assert.equal(init.nalLengthSize, 4);
  assert.equal(avcCodecString(init.description), meta.codec);
});

test('fragments: seq, base time, one sample per frame, keyframe first, sizes cover the NAL units', () => {
  const init = parseInit(initBytes);
  let expectDts = 0;
  for (const f of meta.fragments) {
    const bytes = load(f.file);
    const frag = parseFragment(bytes, init);
    assert.equal(frag.sequenceNumber, f.seq + 1);
    assert.equal(frag.baseMediaDecodeTime, f.base_time);
    assert.equal(frag.baseMediaDecodeTime, expectDts);
    assert.equal(frag.durationTicks, f.duration_ticks);
    assert.equal(frag.samples.length, f.frames);
    assert.deepEqual(frag.samples.map((s) => s.keyframe), frag.samples.map((_, i) => i === 0));
    assert.equal(f.keyframe, true);
    const mdat = readBoxes(bytes).find((x) => x.type === 'mdat');
    assert.equal(frag.samples[0].offset, mdat.body);
    assert.equal(frag.samples.at(-1).offset + frag.samples.at(-1).size, mdat.end);
    for (const s of frag.samples) {
      assert.equal(s.pts, s.dts); // no B-frames: no composition offsets
      // AVCC: 4-byte NAL lengths tile the sample exactly
      const dv = new DataView(s.data.buffer, s.data.byteOffset, s.data.byteLength);
      let i = 0, types = [];
      while (i < s.size) { const n = dv.getUint32(i); types.push(s.data[i + 4] & 0x1f); i += 4 + n; }
      assert.equal(i, s.size);
      assert.ok(types.includes(s.keyframe ? 5 : 1), `NAL types ${types}`);
    }
    assert.equal(toMicros(frag.baseMediaDecodeTime, init.timescale), Math.round(f.pts * 1e6));
    assert.equal(toMicros(frag.durationTicks, init.timescale), Math.round(f.duration * 1e6));
    expectDts += f.duration_ticks;
  }
});

// ---- hand-built boxes
const be32 = (x) => [(x >>> 24) & 255, (x >>> 16) & 255, (x >>> 8) & 255, x & 255];
const box = (type, ...parts) => {
  const body = parts.flat();
  return [...be32(8 + body.length), ...[...type].map((c) => c.charCodeAt(0)), ...body];
};
const full = (type, version, flags, ...parts) => box(type, [version, ...be32(flags).slice(1)], ...parts);

const NON_SYNC_FLAG = 0x01010000;

test('tfhd defaults, first-sample flags, signed composition offsets, continuing truns', () => {
  const init = { trackId: 7, timescale: 1000, defaults: { duration: 0, size: 0, flags: 0 } };
  const payload = [1, 2, 3, 4, 5, 6, 7, 8, 9];
  const traf = box('traf',
    full('tfhd', 0, 0x020000 | 0x8 | 0x10 | 0x20, be32(7), be32(40), be32(3), be32(NON_SYNC_FLAG)),
    full('tfdt', 0, 0, be32(1234)),
    full('trun', 1, 0x1 | 0x4 | 0x800, be32(2), be32(0 /* patched */), be32(0x02000000), be32(0), be32(-40 >>> 0)),
    full('trun', 0, 0x0, be32(1)));
  const moof = box('moof', full('mfhd', 0, 0, be32(9)), traf);
  const bytes = new Uint8Array([...moof, ...box('mdat', payload)]);
  // patch the first trun's data offset: from the moof start to the mdat payload
  const trafBox = readBoxes(bytes, 8, moof.length).find((x) => x.type === 'traf');
  const trun = readBoxes(bytes, trafBox.body, trafBox.end).find((x) => x.type === 'trun');
  bytes.set(be32(moof.length + 8), trun.body + 8);
  const frag = parseFragment(bytes, init);
  assert.equal(frag.sequenceNumber, 9);
  assert.equal(frag.baseMediaDecodeTime, 1234);
  assert.deepEqual(frag.samples.map((s) => [s.dts, s.pts, s.size, s.keyframe, s.duration]),
    [[1234, 1234, 3, true, 40], [1274, 1234, 3, false, 40], [1314, 1314, 3, false, 40]]);
  assert.deepEqual([...frag.samples[2].data], [7, 8, 9]);
});
test('box sizes: 64-bit, to-the-end, and malformed input raise Mp4Error', () => {
  const big = [...be32(1), ...[...'free'].map((c) => c.charCodeAt(0)), 0, 0, 0, 0, ...be32(20), 1, 2, 3, 4];
  const rest = [...be32(0), ...[...'mdat'].map((c) => c.charCodeAt(0)), 9, 9];
  const boxes = readBoxes(new Uint8Array([...big, ...rest]));
  assert.deepEqual(boxes.map((x) => [x.type, x.start, x.body, x.end]), [['free', 0, 16, 20], ['mdat', 20, 28, 30]]);
  assert.throws(() => readBoxes(new Uint8Array([0, 0, 0, 50, 109, 111, 111, 102])), Mp4Error);
  assert.throws(() => readBoxes(new Uint8Array([0, 0, 0])), Mp4Error);
  assert.throws(() => parseFragment(initBytes, parseInit(initBytes)), /no moof/);
  assert.throws(() => parseInit(load('frag0.bin')), /no top-level "moov"/);
  const frag = load('frag0.bin');
  assert.throws(() => parseFragment(frag.subarray(0, frag.byteLength - 10), parseInit(initBytes)), Mp4Error);
  assert.throws(() => avcCodecString(new Uint8Array([0, 1, 2, 3])), Mp4Error);
});
