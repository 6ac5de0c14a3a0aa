// Media Source Extensions path of the player: fMP4 fragments -> SourceBuffer -> <video>.
//
// The SourceBuffer runs in 'segments' mode: every fragment carries its own timestamps (tfdt), so
// a fragment replayed after a reconnect lands where it belongs and a fragment the server dropped
// for us leaves a gap that tick() jumps over. Appends go through one queue (appendBuffer is
// asynchronous and only one operation may run at a time); old media behind the playhead is
// removed, and a QuotaExceededError frees space and retries. Playback speed and live-edge jumps
// come from the player's LiveEdge controller (setRate / jump).

export class MseSink {
  /** hooks: {onAppended(seq), onShown(mediaTime, wallMs), onError(text), onWarn(text)}; stats: shared object */
  constructor(video, { mime, keepBehindS, fps, stats, hooks }) {
    this.kind = 'mse';
    this.video = video;
    this.mime = mime;
    this.keepBehindS = keepBehindS;
    this.fps = fps || 16;
    this.stats = stats;
    this.hooks = hooks;
    this.queue = []; // pending SourceBuffer operations: {kind: 'init'|'fragment'|'remove', ...}
    this.current = null;
    this.sb = null;
    this.wantEnd = false;
    this.closed = false;
    this.frameCallback = null;
    this.mediaSource = new MediaSource();
    this.url = URL.createObjectURL(this.mediaSource);
    video.src = this.url;
    const ms = this.mediaSource;
    ms.addEventListener('sourceopen', () => {
      if (this.closed) return;
      try {
        this.sb = ms.addSourceBuffer(mime);
        this.sb.mode = 'segments';
      } catch (e) {
        this.hooks.onError(`could not create a SourceBuffer for ${mime}: ${e.message}`);
        return;
      }
      this.sb.addEventListener('updateend', () => this.onUpdateEnd());
      this.sb.addEventListener('error', () => this.hooks.onWarn('SourceBuffer append error'));
      this.pump();
    }, { once: true });
    this.watchFrames();
  }

  static supported(mime) {
    return 'MediaSource' in window && MediaSource.isTypeSupported(mime);
  }

  watchFrames() { // presentation times of shown frames, for first-frame and prompt latency
    const v = this.video;
    if (typeof v.requestVideoFrameCallback !== 'function') return;
    const cb = (now, meta) => {
      if (this.closed) return;
      this.hooks.onShown(meta.mediaTime, meta.presentationTime ?? now);
      this.frameCallback = v.requestVideoFrameCallback(cb);
    };
    this.frameCallback = v.requestVideoFrameCallback(cb);
  }

  init(data) {
    this.queue.push({ kind: 'init', data });
    this.pump();
  }

  append(frag) {
    this.queue.push({ kind: 'fragment', data: frag.data, seq: frag.seq, pts: frag.pts });
    this.pump();
  }

  end() {
    this.wantEnd = true;
    this.pump();
  }

  get currentTime() {
    return this.video.currentTime || 0;
  }

  get started() {
    return this.video.buffered.length > 0 && !this.video.paused;
  }

  get liveEnd() {
    const b = this.video.buffered;
    return b.length ? b.end(b.length - 1) : 0;
  }

  bufferedAhead() {
    const b = this.video.buffered;
    return b && b.length ? bufferedAhead(b, this.video.currentTime) : 0;
  }

  setRate(rate) {
    if (Math.abs(this.video.playbackRate - rate) > 1e-3) this.video.playbackRate = rate;
  }

  jump(seconds) {
    const v = this.video;
    v.currentTime = Math.min(v.currentTime + seconds, Math.max(v.currentTime, this.liveEnd - 0.05));
  }

  quality() {
    const q = this.video.getVideoPlaybackQuality ? this.video.getVideoPlaybackQuality() : null;
    return { decoded: q ? q.totalVideoFrames : 0, dropped: q ? q.droppedVideoFrames : 0 };
  }

  pump() {
    const sb = this.sb;
    if (!sb || sb.updating || this.current || this.closed) return;
    const op = this.queue.shift();
    if (!op) {
      if (this.wantEnd && this.mediaSource.readyState === 'open') {
        try { this.mediaSource.endOfStream(); } catch (e) { /* already ended */ }
      }
      return;
    }
    this.current = op;
    try {
      if (op.kind === 'remove') sb.remove(op.start, op.end);
      else sb.appendBuffer(op.data);
    } catch (e) {
      this.current = null;
      if (e.name === 'QuotaExceededError' && op.kind !== 'remove') {
        this.queue.unshift(op);
        if (!this.freeSpace(true)) {
          // nothing behind the playhead to free: drop the oldest pending fragment
          const i = this.queue.findIndex((o) => o.kind === 'fragment');
          if (i >= 0) this.queue.splice(i, 1);
          this.stats.quotaDrops += 1;
          this.hooks.onWarn('media buffer full: dropped a fragment');
          setTimeout(() => this.pump(), 50);
        }
        return;
      }
      this.hooks.onError(`could not ${op.kind === 'remove' ? 'trim' : 'append'} media: ${e.name}: ${e.message}`);
    }
  }

  onUpdateEnd() {
    const op = this.current;
    this.current = null;
    if (op && op.kind === 'fragment') {
      this.startPlaybackIfNeeded();
      this.hooks.onAppended(op.seq);
    }
    this.pump();
  }

  startPlaybackIfNeeded() {
    const v = this.video;
    const b = v.buffered;
    if (!b.length) return;
    if (!inRange(b, v.currentTime)) {
      const i = rangeStartingAfter(b, v.currentTime);
      if (i >= 0) v.currentTime = b.start(i);
    }
    if (v.paused) {
      v.play().catch((e) => this.hooks.onWarn(`autoplay was blocked (${e.name}); press play`));
    }
  }

  freeSpace(aggressive = false) {
    const v = this.video, b = this.sb?.buffered;
    if (!b || !b.length) return false;
    const keep = aggressive ? Math.min(1, this.keepBehindS) : this.keepBehindS;
    const end = v.currentTime - keep;
    if (end <= b.start(0) + 0.1) return false;
    if (!this.queue.some((o) => o.kind === 'remove')) this.queue.unshift({ kind: 'remove', start: 0, end });
    this.pump();
    return true;
  }

  /** Periodic housekeeping: jump over gaps, trim old media, keep playing. */
  tick(active) {
    const v = this.video;
    const b = v.buffered;
    if (!b || !b.length) return;
    // the video stalls up to a frame before the end of the range it plays, or sits before the first one
    const frame = 1 / this.fps;
    const stalled = v.readyState < 3 && !v.paused && bufferedAhead(b, v.currentTime) < Math.max(0.1, 1.5 * frame);
    if (!inRange(b, v.currentTime) || stalled) {
      const next = rangeStartingAfter(b, v.currentTime);
      if (next >= 0) {
        v.currentTime = b.start(next) + 0.001;
        this.stats.gapJumps += 1;
      }
    }
    if (v.currentTime - b.start(0) > this.keepBehindS * 1.5) this.freeSpace();
    if (v.paused && active && !v.ended) this.startPlaybackIfNeeded();
  }

  mediaError() {
    const e = this.video.error;
    return e ? `${e.code}: ${e.message}` : null;
  }

  /** Whatever was received but not appended yet (nothing to hand over: MSE keeps it all). */
  destroy() {
    this.closed = true;
    const v = this.video;
    if (this.frameCallback !== null && v.cancelVideoFrameCallback) v.cancelVideoFrameCallback(this.frameCallback);
    v.playbackRate = 1;
    URL.revokeObjectURL(this.url);
    v.removeAttribute('src');
    v.load();
  }
}

export function inRange(b, t) {
  for (let i = 0; i < b.length; i++) if (t >= b.start(i) && t < b.end(i)) return true;
  return false;
}

export function rangeStartingAfter(b, t) {
  for (let i = 0; i < b.length; i++) if (b.start(i) > t) return i;
  return -1;
}

export function bufferedAhead(b, t) {
  for (let i = 0; i < b.length; i++) if (t >= b.start(i) - 0.001 && t < b.end(i)) return b.end(i) - t;
  return 0;
}
