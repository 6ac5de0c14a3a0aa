// WebCodecs path of the player: the same fMP4 fragments -> VideoDecoder (optimizeForLatency) -> <canvas>.
//
// fmp4.js turns the init segment into the decoder configuration (codec string + avcC) and each
// moof+mdat into samples. Samples wait in a queue and are decoded a little ahead of the media
// clock (DECODE_AHEAD_S), so only a few VideoFrames are alive at a time. The media clock is ours:
// it advances with wall time times the playback rate, and holds at the end of the last decoded
// frame when nothing newer is there (a stall). Every animation frame shows the newest frame due;
// a decoded frame that never got shown is counted as dropped. jump() moves the clock forward:
// samples before the last keyframe at or before the new time are not decoded at all.

import { parseFragment, parseInit, toMicros } from './fmp4.js';

const DECODE_AHEAD_S = 0.5;
const MAX_DECODE_QUEUE = 6;

export class WebCodecsSink {
  /** hooks: {onAppended(seq), onShown(mediaTime, wallMs), onError(text), onWarn(text)} */
  constructor(canvas, { stats, hooks }) {
    this.kind = 'webcodecs';
    this.canvas = canvas;
    this.ctx = canvas.getContext('2d', { alpha: false });
    this.stats = stats;
    this.hooks = hooks;
    this.track = null; // parseInit() of the init segment
    this.decoder = null;
    this.configured = false;
    this.pendingRaw = []; // fragments received before the decoder is configured
    this.samples = []; // encoded, not yet decoded: {ts, dur, key, data, seq}
    this.frames = []; // decoded VideoFrames waiting to be shown, in timestamp order
    this.shown = null; // the VideoFrame on the canvas
    this.needKey = true;
    this.clock = 0; // media time shown (s)
    this.started = false;
    this.rate = 1;
    this.lastWall = null;
    this.receivedEnd = 0;
    this.decodedEnd = 0;
    this.stalled = false;
    this.wantEnd = false;
    this.closed = false;
    this.counts = { decoded: 0, shown: 0, dropped: 0, skipped: 0 };
    this.raf = null;
    this.lastRender = 0;
    this.watchdog = setInterval(() => { // rAF does not run in a hidden tab
      if (performance.now() - this.lastRender > 150) this.render(performance.now());
    }, 100);
    this.scheduleRender();
  }

  static available() {
    return typeof VideoDecoder === 'function' && typeof EncodedVideoChunk === 'function';
  }

  /** Init segment -> decoder; resolves false if this browser cannot decode it (the caller falls back). */
  async configure(initBytes) {
    const init = parseInit(initBytes);
    const config = { codec: init.codec, description: init.description, codedWidth: init.width,
      codedHeight: init.height, optimizeForLatency: true };
    let support;
    try {
      support = await VideoDecoder.isConfigSupported(config);
    } catch (e) {
      return false;
    }
    if (!support.supported || this.closed) return false;
    this.track = init;
    this.canvas.width = init.width;
    this.canvas.height = init.height;
    this.decoder = new VideoDecoder({
      output: (frame) => this.onOutput(frame),
      error: (e) => { if (!this.closed) this.hooks.onError(`the video decoder failed: ${e.name}: ${e.message}`); },
    });
    this.decoder.configure(config);
    this.configured = true;
    const pending = this.pendingRaw;
    this.pendingRaw = [];
    for (const f of pending) this.append(f);
    return true;
  }

  /** Fragments received but never decoded (handed to the MSE fallback). */
  takePending() {
    const p = this.pendingRaw;
    this.pendingRaw = [];
    return p;
  }

  append(frag) {
    if (this.closed) return;
    if (!this.configured) {
      this.pendingRaw.push(frag);
      return;
    }
    let parsed;
    try {
      parsed = parseFragment(frag.data, this.track);
    } catch (e) {
      this.hooks.onError(`fragment ${frag.seq} is not valid fMP4: ${e.message}`);
      return;
    }
    const ts = this.track.timescale;
    for (const s of parsed.samples) {
      this.samples.push({ ts: s.pts / ts, dur: s.duration / ts, key: s.keyframe, data: s.data, seq: frag.seq,
        us: toMicros(s.pts, ts), durUs: toMicros(s.duration, ts) });
    }
    this.receivedEnd = Math.max(this.receivedEnd, (parsed.baseMediaDecodeTime + parsed.durationTicks) / ts);
    if (!this.started && this.samples.length) this.clock = Math.max(this.clock, this.samples[0].ts);
    this.feed();
    this.hooks.onAppended(frag.seq);
  }

  feed() {
    const d = this.decoder;
    if (!d || d.state !== 'configured') return;
    while (this.samples.length && d.decodeQueueSize < MAX_DECODE_QUEUE
      && (!this.started || this.samples[0].ts < this.clock + DECODE_AHEAD_S)) {
      const s = this.samples.shift();
      if (this.needKey && !s.key) { this.counts.skipped += 1; continue; }
      this.needKey = false;
      try {
        d.decode(new EncodedVideoChunk({ type: s.key ? 'key' : 'delta', timestamp: s.us, duration: s.durUs, data: s.data }));
      } catch (e) {
        this.hooks.onError(`could not decode a sample of fragment ${s.seq}: ${e.name}: ${e.message}`);
        return;
      }
    }
    if (this.wantEnd && !this.samples.length && d.decodeQueueSize === 0) d.flush().catch(() => {});
  }

  onOutput(frame) {
    if (this.closed) { frame.close(); return; }
    this.counts.decoded += 1;
    const ts = frame.timestamp / 1e6, dur = (frame.duration ?? 0) / 1e6;
    if (this.started && ts + dur <= this.clock) { // behind the clock (after a jump)
      frame.close();
      this.counts.skipped += 1;
      return;
    }
    this.frames.push(frame);
    this.decodedEnd = Math.max(this.decodedEnd, ts + dur);
  }

  scheduleRender() {
    if (this.closed) return;
    this.raf = requestAnimationFrame((now) => { this.render(now); this.scheduleRender(); });
  }

  render(now) {
    if (this.closed) return;
    this.lastRender = performance.now();
    if (!this.started) {
      if (!this.frames.length) { this.feed(); return; }
      this.started = true;
      this.clock = this.frames[0].timestamp / 1e6;
      this.lastWall = now;
    } else {
      const dt = Math.max(0, (now - this.lastWall) / 1000);
      this.lastWall = now;
      const next = this.clock + dt * this.rate;
      this.stalled = next > this.decodedEnd && !this.wantEnd;
      this.clock = Math.min(next, Math.max(this.clock, this.decodedEnd));
    }
    // the newest frame due; older ones never shown are dropped
    let pick = -1;
    for (let i = 0; i < this.frames.length; i++) if (this.frames[i].timestamp / 1e6 <= this.clock + 1e-4) pick = i;
    if (pick >= 0) {
      for (let i = 0; i < pick; i++) { this.frames[i].close(); this.counts.dropped += 1; }
      const frame = this.frames[pick];
      this.frames.splice(0, pick + 1);
      this.ctx.drawImage(frame, 0, 0, this.canvas.width, this.canvas.height);
      if (this.shown) this.shown.close();
      this.shown = frame;
      this.counts.shown += 1;
      this.hooks.onShown(frame.timestamp / 1e6, now);
    }
    this.feed();
  }

  end() {
    this.wantEnd = true;
    this.feed();
  }

  get currentTime() {
    return this.clock;
  }

  get liveEnd() {
    return this.receivedEnd;
  }

  bufferedAhead() {
    return Math.max(0, this.receivedEnd - this.clock);
  }

  setRate(rate) {
    this.rate = rate;
  }

  jump(seconds) {
    const target = Math.min(this.clock + seconds, Math.max(this.clock, this.receivedEnd - 0.05));
    // decode from the last keyframe at or before the target; drop what is before it
    let k = -1;
    for (let i = 0; i < this.samples.length; i++) if (this.samples[i].key && this.samples[i].ts <= target) k = i;
    if (k > 0) {
      this.counts.skipped += k;
      this.samples.splice(0, k);
    }
    this.clock = target;
    for (const f of this.frames) if ((f.timestamp + (f.duration ?? 0)) / 1e6 <= target) this.counts.skipped += 1;
    this.frames = this.frames.filter((f) => {
      if ((f.timestamp + (f.duration ?? 0)) / 1e6 > target) return true;
      f.close();
      return false;
    });
    this.feed();
  }

  quality() {
    return { decoded: this.counts.decoded, dropped: this.counts.dropped, shown: this.counts.shown,
      skipped: this.counts.skipped };
  }

  tick() {}

  mediaError() {
    return null;
  }

  destroy() {
    this.closed = true;
    clearInterval(this.watchdog);
    if (this.raf !== null) cancelAnimationFrame(this.raf);
    for (const f of this.frames) f.close();
    this.frames = [];
    if (this.shown) { this.shown.close(); this.shown = null; }
    if (this.decoder && this.decoder.state !== 'closed') {
      try { this.decoder.close(); } catch (e) { /* already closed */ }
    }
  }
}
