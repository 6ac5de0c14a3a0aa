// Minimal fragmented-MP4 (ISO BMFF) reader for the WebCodecs path: plain ES module, no dependencies.
//
//   const init = parseInit(initBytes);     // ftyp+moov -> {trackId, timescale, width, height, codec,
//                                          //   description (avcC payload), sps: [], pps: [], defaults}
//   const frag = parseFragment(bytes, init);  // moof+mdat -> {sequenceNumber, baseMediaDecodeTime,
//                                          //   durationTicks, samples: [{data, dts, pts, duration,
//                                          //   keyframe, ...}]} (times in init.timescale ticks)
//   toMicros(ticks, timescale)             // what EncodedVideoChunk.timestamp / duration take
//
// Only what streamgen's encoder writes (and what is common in live fMP4) is handled: one video
// track (avc1/avc3 + avcC), trex/tfhd defaults, tfdt v0/v1, any number of trun boxes with or without
// per-sample fields, composition offsets v0/v1. Anything malformed raises Mp4Error.

export class Mp4Error extends Error {
  constructor(message) {
    super(message);
    this.name = 'Mp4Error';
  }
}

const u8 = (b) => (b instanceof Uint8Array ? b : new Uint8Array(b));
const fourcc = (b, i) => String.fromCharCode(b[i], b[i + 1], b[i + 2], b[i + 3]);

/** The boxes in bytes[start, end): [{type, start, body, end}] (body: offset of the payload). */
export function readBoxes(bytes, start = 0, end = bytes.byteLength) {
  const b = u8(bytes);
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const out = [];
  let i = start;
  while (i < end) {
    if (end - i < 8) throw new Mp4Error(`truncated box header at byte ${i} (${end - i} bytes left)`);
    let size = dv.getUint32(i);
    const type = fourcc(b, i + 4);
    let body = i + 8;
    if (size === 1) {
      if (end - i < 16) throw new Mp4Error(`truncated 64-bit box size of "${type}" at byte ${i}`);
      size = Number(dv.getBigUint64(i + 8));
      body = i + 16;
    } else if (size === 0) {
      size = end - i; // extends to the end of the enclosing space
    }
    if (size < body - i || i + size > end) {
      throw new Mp4Error(`box "${type}" at byte ${i} has size ${size}, beyond the ${end - i} bytes left`);
    }
    out.push({ type, start: i, body, end: i + size });
    i += size;
  }
  return out;
}

function child(bytes, box, type, required = true) {
  const found = readBoxes(bytes, box.body, box.end).find((x) => x.type === type);
  if (!found && required) throw new Mp4Error(`"${box.type}" has no "${type}" box`);
  return found || null;
}

function children(bytes, box, type) {
  return readBoxes(bytes, box.body, box.end).filter((x) => x.type === type);
}

function top(bytes, type) {
  const found = readBoxes(bytes).find((x) => x.type === type);
  if (!found) throw new Mp4Error(`no top-level "${type}" box`);
  return found;
}

const hex2 = (x) => x.toString(16).toUpperCase().padStart(2, '0');

/** RFC 6381 codec string from an avcC payload (AVCDecoderConfigurationRecord). */
export function avcCodecString(avcc, prefix = 'avc1') {
  const a = u8(avcc);
  if (a.byteLength < 4 || a[0] !== 1) throw new Mp4Error('avcC: not an AVCDecoderConfigurationRecord (version 1)');
  return `${prefix}.${hex2(a[1])}${hex2(a[2])}${hex2(a[3])}`;
}

function parameterSets(a) {
  // [version, profile, compat, level, 0xFC|lengthSizeMinusOne, 0xE0|numSps, (len16, sps)*, numPps, (len16, pps)*]
  const sps = [], pps = [];
  let i = 5;
  const take = (n, list) => {
    for (let k = 0; k < n; k++) {
      if (i + 2 > a.byteLength) throw new Mp4Error('avcC: truncated parameter set length');
      const len = (a[i] << 8) | a[i + 1];
      if (i + 2 + len > a.byteLength) throw new Mp4Error('avcC: truncated parameter set');
      list.push(a.slice(i + 2, i + 2 + len));
      i += 2 + len;
    }
  };
  if (a.byteLength < 6) throw new Mp4Error('avcC: too short');
  take(a[i++] & 0x1f, sps);
  if (i >= a.byteLength) throw new Mp4Error('avcC: no PPS count');
  take(a[i++], pps);
  return { sps, pps, nalLengthSize: (a[4] & 3) + 1 };
}

/** Initialization segment (ftyp+moov) -> the video track's decoder setup. */
export function parseInit(bytes) {
  const b = u8(bytes);
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const moov = top(b, 'moov');
  const traks = children(b, moov, 'trak');
  for (const trak of traks) {
    const mdia = child(b, trak, 'mdia');
    const hdlr = child(b, mdia, 'hdlr');
    if (fourcc(b, hdlr.body + 8) !== 'vide') continue;
    const tkhd = child(b, trak, 'tkhd');
    const tkv = b[tkhd.body];
    const trackId = dv.getUint32(tkhd.body + 4 + (tkv === 1 ? 16 : 8));
    const mdhd = child(b, mdia, 'mdhd');
    const timescale = dv.getUint32(mdhd.body + 4 + (b[mdhd.body] === 1 ? 16 : 8));
    if (!timescale) throw new Mp4Error('mdhd: timescale is 0');
    const stsd = child(b, child(b, child(b, mdia, 'minf'), 'stbl'), 'stsd');
    const entries = readBoxes(b, stsd.body + 8, stsd.end);
    const entry = entries.find((e) => e.type === 'avc1' || e.type === 'avc3');
    if (!entry) throw new Mp4Error(`stsd: no avc1/avc3 sample entry (found ${entries.map((e) => e.type).join(', ')})`);
    const width = dv.getUint16(entry.body + 24), height = dv.getUint16(entry.body + 26);
    const avcC = readBoxes(b, entry.body + 78, entry.end).find((x) => x.type === 'avcC');
    if (!avcC) throw new Mp4Error(`"${entry.type}" sample entry has no avcC box`);
    const description = b.slice(avcC.body, avcC.end);
    const defaults = { duration: 0, size: 0, flags: 0 };
    const mvex = child(b, moov, 'mvex', false);
    for (const trex of mvex ? children(b, mvex, 'trex') : []) {
      if (dv.getUint32(trex.body + 4) !== trackId) continue;
      defaults.duration = dv.getUint32(trex.body + 12);
      defaults.size = dv.getUint32(trex.body + 16);
      defaults.flags = dv.getUint32(trex.body + 20);
    }
    return { trackId, timescale, width, height, codec: avcCodecString(description, entry.type), description,
      ...parameterSets(description), defaults };
  }
  throw new Mp4Error(`moov has no video track (${traks.length} track(s))`);
}

const NON_SYNC = 0x00010000; // sample_is_non_sync_sample

/** Media segment(s) (moof+mdat, possibly several) -> samples of the init's track, in decode order. */
export function parseFragment(bytes, init) {
  const b = u8(bytes);
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const moofs = readBoxes(b).filter((x) => x.type === 'moof');
  if (!moofs.length) throw new Mp4Error('no moof box: not a media segment');
  const samples = [];
  let sequenceNumber = null, baseMediaDecodeTime = null;
  for (const moof of moofs) {
    const mfhd = child(b, moof, 'mfhd');
    if (sequenceNumber === null) sequenceNumber = dv.getUint32(mfhd.body + 4);
    let nextDataStart = null; // where a trun without data-offset continues
    for (const traf of children(b, moof, 'traf')) {
      const tfhd = child(b, traf, 'tfhd');
      const flags = dv.getUint32(tfhd.body) & 0xffffff;
      const trackId = dv.getUint32(tfhd.body + 4);
      if (init && trackId !== init.trackId) continue;
      let i = tfhd.body + 8;
      let base = moof.start;
      if (flags & 0x1) { base = Number(dv.getBigUint64(i)); i += 8; }
      if (flags & 0x2) i += 4; // sample_description_index
      const def = { ...(init?.defaults ?? { duration: 0, size: 0, flags: 0 }) };
      if (flags & 0x8) { def.duration = dv.getUint32(i); i += 4; }
      if (flags & 0x10) { def.size = dv.getUint32(i); i += 4; }
      if (flags & 0x20) { def.flags = dv.getUint32(i); i += 4; }
      const tfdt = child(b, traf, 'tfdt', false);
      let dts = 0;
      if (tfdt) dts = b[tfdt.body] === 1 ? Number(dv.getBigUint64(tfdt.body + 4)) : dv.getUint32(tfdt.body + 4);
      else if (samples.length) dts = samples[samples.length - 1].dts + samples[samples.length - 1].duration;
      if (baseMediaDecodeTime === null) baseMediaDecodeTime = dts;
      for (const trun of children(b, traf, 'trun')) {
        const version = b[trun.body];
        const tf = dv.getUint32(trun.body) & 0xffffff;
        const count = dv.getUint32(trun.body + 4);
        let j = trun.body + 8;
        let offset;
        if (tf & 0x1) { offset = base + dv.getInt32(j); j += 4; } else offset = nextDataStart ?? base;
        let firstFlags = null;
        if (tf & 0x4) { firstFlags = dv.getUint32(j); j += 4; }
        const row = ((tf & 0x100) ? 4 : 0) + ((tf & 0x200) ? 4 : 0) + ((tf & 0x400) ? 4 : 0) + ((tf & 0x800) ? 4 : 0);
        if (j + row * count > trun.end) throw new Mp4Error(`trun: ${count} samples do not fit in the box`);
        for (let k = 0; k < count; k++) {
          const duration = (tf & 0x100) ? dv.getUint32((j += 4) - 4) : def.duration;
          const size = (tf & 0x200) ? dv.getUint32((j += 4) - 4) : def.size;
          let sflags = (tf & 0x400) ? dv.getUint32((j += 4) - 4) : def.flags;
          if (k === 0 && firstFlags !== null) sflags = firstFlags;
          let cto = 0;
          if (tf & 0x800) cto = version === 0 ? dv.getUint32((j += 4) - 4) : dv.getInt32((j += 4) - 4);
          if (offset < 0 || offset + size > b.byteLength) {
            throw new Mp4Error(`sample ${samples.length} (${size} bytes at ${offset}) lies outside the ${b.byteLength} bytes`);
          }
          samples.push({ data: b.subarray(offset, offset + size), offset, size, duration, flags: sflags,
            keyframe: !(sflags & NON_SYNC), dts, pts: dts + cto, cto });
          offset += size;
          dts += duration;
        }
        nextDataStart = offset;
      }
    }
  }
  const durationTicks = samples.reduce((n, s) => n + s.duration, 0);
  return { sequenceNumber, baseMediaDecodeTime: baseMediaDecodeTime ?? 0, durationTicks, samples };
}

/** Ticks of `timescale` -> integer microseconds (EncodedVideoChunk timestamp / duration). */
export function toMicros(ticks, timescale) {
  return Math.round((ticks * 1e6) / timescale);
}
