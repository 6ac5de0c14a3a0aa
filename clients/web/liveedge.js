// Live-edge controller: how fast to play, and when to jump, to keep a small jitter buffer.
// Plain ES module, no DOM: the MSE and WebCodecs paths both feed it, node tests simulate it.
//
//   const edge = new LiveEdge({ targetS: 0.3 });
//   edge.setChunkDuration(0.5);                 // one fragment's duration (sets the window)
//   const { rate, jump } = edge.update(nowS, bufferedAheadS, playing);
//   video.playbackRate = rate; if (jump) video.currentTime += jump;
//
// Media arrives in whole fragments, so the media buffered ahead of the playhead is a sawtooth:
// it jumps up by a fragment on arrival and drains in real time until the next one. What decides
// whether playback can stall is its low-water mark, the minimum over the last few fragments
// (`windowS`, at least 3 fragment durations). The controller keeps that minimum at `targetS`:
//   - excess = lowWater - targetS - floorS; above `deadbandS` it plays faster, proportionally,
//     up to `maxRate` (1.1: hard to see; 1 s of excess is gone in 10 s);
//   - more than `jumpS` of excess: skip it at once (after a long stall or a background tab);
//   - never slower than 1.0: a stall (the buffer ran dry) simply refills it.
// `floorS` is lead the player cannot remove: a server that paces generation by the acked playhead
// (`max_lead`) stays that far ahead however fast the player plays. The controller learns it
// (a full-speed catch-up that does not shrink the buffer, a jump that refills at once, or a hint that the
// source generates faster than real time: `setPaced(true)`) and then leaves that lead alone, so
// it never plays fast forever nor jumps again and again. The floor follows the buffer down.

export const LIVE_DEFAULTS = Object.freeze({
  targetS: 0.3, // low-water mark kept ahead of the playhead
  maxRate: 1.1,
  gain: 0.4, // playback rate above 1 per second of excess
  deadbandS: 0.05,
  jumpS: 2.0, // excess beyond this is skipped
  windowS: 2.0, // minimum low-water window (also >= 3 fragment durations)
  probeS: 5.0, // a catch-up this long that does not shrink the buffer means the server paces us
});

export class LiveEdge {
  constructor(options = {}) {
    this.o = { ...LIVE_DEFAULTS, ...options };
    this.windowS = this.o.windowS;
    this.reset();
  }

  reset() {
    this.samples = []; // [t, ahead] within the window
    this.since = null; // time of the first sample of this observation period
    this.lastT = null;
    this.rate = 1;
    this.floorS = 0;
    this.pacedHint = false;
    this.pacedLearned = false;
    this.lowWaterS = null;
    this.excessS = 0;
    this.gainedS = 0; // media seconds skipped by playing faster than 1.0
    this.jumps = 0;
    this.jumpedS = 0;
    this.probe = null;
    this.jumpCheck = null;
  }

  setChunkDuration(d) {
    if (d > 0) this.windowS = Math.max(this.o.windowS, 3 * d);
  }

  /** Hint: the source could generate faster than real time, so the server's lead is pacing, not lag. */
  setPaced(paced) {
    this.pacedHint = !!paced;
  }

  get paced() {
    return this.pacedHint || this.pacedLearned;
  }

  /** One observation: wall time `t` (s), media buffered ahead of the playhead (s), whether it plays
   * (stalled counts as playing; paused or not started does not). Returns {rate, jump}. */
  update(t, aheadS, playing = true) {
    if (this.lastT !== null && this.rate > 1) this.gainedS += (this.rate - 1) * (t - this.lastT);
    this.lastT = t;
    if (!playing) {
      this.samples = [];
      this.since = null;
      this.probe = null;
      this.rate = 1;
      return { rate: 1, jump: 0 };
    }
    if (this.since === null) this.since = t;
    if (t < this.since) return { rate: 1, jump: 0 }; // settling after a jump
    this.samples.push([t, Math.max(0, aheadS)]);
    while (this.samples.length > 1 && this.samples[0][0] < t - this.windowS) this.samples.shift();
    let low = Infinity;
    for (const s of this.samples) low = Math.min(low, s[1]);
    this.lowWaterS = low;
    if (t - this.since < this.windowS) { // not a full window of evidence yet
      this.rate = 1;
      return { rate: 1, jump: 0 };
    }
    const over = low - this.o.targetS;
    if (this.pacedHint) this.floorS = Math.max(0, over);
    else if (over < this.floorS) this.floorS = Math.max(0, over);
    if (this.jumpCheck) { // did the last jump stick, or did the server refill the buffer at once?
      if (low > this.jumpCheck.low - 0.5 * this.jumpCheck.jump) this.learnFloor(over);
      this.jumpCheck = null;
    }
    const excess = over - this.floorS;
    this.excessS = excess;
    if (excess > this.o.jumpS) {
      this.jumps += 1;
      this.jumpedS += excess;
      this.jumpCheck = { low, jump: excess };
      this.samples = [];
      this.since = t + this.windowS / 2; // let the buffer refill (or not) before judging again
      this.probe = null;
      this.rate = 1;
      return { rate: 1, jump: excess };
    }
    let rate = 1;
    if (excess > this.o.deadbandS) rate = Math.min(this.o.maxRate, 1 + this.o.gain * (excess - this.o.deadbandS));
    if (rate >= this.o.maxRate - 1e-6) { // only a full-speed catch-up tells a paced server from a fast source
      if (!this.probe) this.probe = { t, low, gained: this.gainedS };
      else if (t - this.probe.t >= this.o.probeS) {
        const expected = this.gainedS - this.probe.gained;
        if (expected > 0.05 && this.probe.low - low < 0.3 * expected) {
          this.learnFloor(over);
          rate = 1;
        }
        this.probe = null;
      }
    } else {
      this.probe = null;
    }
    this.rate = rate;
    return { rate, jump: 0 };
  }

  learnFloor(over) {
    this.floorS = Math.max(this.floorS, over);
    this.pacedLearned = true;
  }

  /** Plain numbers for stats objects. */
  snapshot() {
    return { targetS: this.o.targetS, lowWaterS: this.lowWaterS, excessS: this.excessS, rate: this.rate,
      floorS: this.floorS, paced: this.paced, catchupS: this.gainedS, jumps: this.jumps, jumpedS: this.jumpedS,
      windowS: this.windowS };
  }
}
