// streamgen browser player: WebSocket (protocol v1) -> WebCodecs or Media Source Extensions, plain ES module.
//
//   const player = new Player(videoElement, { canvas, url, token, path, targetS, keepBehindS, onStats, onMessage });
//   player.start({ prompt, width?, height?, fps?, seed?, chunks?, interpolate? });  // false: refused (see stats.lastError)
//   player.setPrompt('...');  player.pause();  player.resume();  player.stop();
//
// Two display paths take the same fMP4 fragments: 'webcodecs' (webcodecs.js: VideoDecoder with
// optimizeForLatency, drawn on a canvas by our own media clock; the lowest latency) and 'mse'
// (mse.js: a SourceBuffer behind the <video> element). path 'auto' (default) takes WebCodecs when
// the browser has it and can decode the stream, else MSE. Both are driven by one LiveEdge
// controller (liveedge.js): a small jitter buffer at the live edge (targetS of media kept ahead
// of the playhead at its low point), playback rate 1.0-1.1 to catch up, a jump when far behind.
// After each appended fragment and every ACK_INTERVAL_MS the player sends ack {seq, playhead}:
// the server paces generation by it. An unexpected disconnect reconnects with attach {session,
// from_seq: last seq + 1}. Every refused or failed start leaves the player in state 'error' with
// the reason in stats.lastError and onMessage('error', ...); start() may be called again.
//
// player.stats (also window.streamgenPlayer.stats on the page) is a plain object, updated every
// tick: state, path, latencyS (arrival -> shown of the media on screen), bufferedS, firstFrameS
// (start -> first frame shown), promptLatencyS / promptLatencies (prompt sent -> first frame of a
// fragment generated after it shown), stalls / stallS, decodedFrames / droppedFrames (MSE:
// getVideoPlaybackQuality; WebCodecs: decoded frames never shown), live (the LiveEdge snapshot:
// targetS, lowWaterS, rate, jumps, catchupS, paced, floorS), stallLog (when each stall began),
// promptSkips / promptSkippedS (jumps to a new prompt's first fragment), counters of fragments, gaps, errors.
//
// mountUI(document) wires the controls of index.html; URL parameters: prompt, autostart=1,
// token, width, height, fps, seed, chunks, interpolate, path (auto|webcodecs|mse), target (s of
// jitter buffer), server (ws:// URL; default: this page's host + /v1/stream), keep (seconds of
// media kept behind the playhead, MSE), skip=0 (play out the old prompt's buffered video after a
// prompt change instead of jumping to the first fragment of the new one: smoother, ~one chunk slower).

import { LiveEdge } from './liveedge.js';
import { MseSink } from './mse.js';
import { ClientConnection, ENDPOINT, ProtocolError, encode } from './protocol.js';
import { WebCodecsSink } from './webcodecs.js';

const ACK_INTERVAL_MS = 250;
const TICK_MS = 100;
const KEEP_BEHIND_S = 8; // default media kept behind the playhead (removed beyond 1.5x that)
const LIVE_TARGET_S = 0.3; // jitter buffer: media kept ahead of the playhead at its low point
const STOP_TIMEOUT_MS = 5000; // a stop the server never answers ends the session anyway
const RECONNECT_DELAYS_MS = [250, 500, 1000, 2000, 4000, 8000];
export const PATHS = ['auto', 'webcodecs', 'mse'];
const INACTIVE = ['idle', 'ended', 'error'];

export class Player {
  constructor(video, { canvas = null, url = null, token = null, path = 'auto', targetS = LIVE_TARGET_S,
    keepBehindS = KEEP_BEHIND_S, skipOnPrompt = true, onStats = () => {}, onMessage = () => {} } = {}) {
    this.video = video;
    this.canvas = canvas;
    this.url = url || defaultUrl();
    this.token = token;
    this.path = PATHS.includes(path) ? path : 'auto';
    this.keepBehindS = keepBehindS;
    this.skipOnPrompt = skipOnPrompt;
    this.edge = new LiveEdge({ targetS });
    this.onStats = onStats;
    this.onMessage = onMessage;
    this.ws = null;
    this.conn = null;
    this.state = 'idle'; // idle | connecting | starting | playing | reconnecting | stopping | ended | error
    this.session = null;
    this.initSegment = null;
    this.sink = null;
    this.sinkReady = null; // promise while WebCodecs is being configured
    this.lastSeq = -1; // highest fragment seq received
    this.appendedSeq = -1; // highest fragment seq appended
    this.arrivals = []; // [{seq, pts, end, t}] of recent fragments, for latency
    this.marks = []; // prompt switches waiting for their first frame
    this.skipTo = null; // seq of the first fragment of a new prompt, to jump to once appended
    this.provisional = null; // {mark, latency}: a prompt latency taken by estimate, until the server confirms it
    this.stats = freshStats();
    this.timers = [];
    this.stopTimer = null;
    this.reconnects = 0;
    this.t0 = 0; // performance.now() at start
    this.lastPlayhead = null;
    this.stalledNow = false;
    this.lastPromptAt = null; // performance.now() of the latest prompt change
    this.lastSkipAt = null; // performance.now() of the latest jump to a new prompt's fragment
  }

  /** The MSE SourceBuffer (null on the WebCodecs path). */
  get sb() {
    return this.sink && this.sink.kind === 'mse' ? this.sink.sb : null;
  }

  // ------------------------------------------------------------------------------ controls

  /** Begin a session. Returns true when the start is on its way; false when it was refused here
   * (empty prompt, a field out of range, already running): the reason is shown and kept in stats. */
  start(options) {
    if (!INACTIVE.includes(this.state)) return this.refuse(`cannot start while ${this.state}; press Stop first`, false);
    let msg;
    try {
      msg = { type: 'start', ...cleanStart(options) };
      encode(msg); // the same validation the socket would do, before anything changes
    } catch (e) {
      return this.refuse(e instanceof ProtocolError ? `not sent: ${e.message}` : e.message);
    }
    this.resetMedia();
    this.stats = freshStats();
    this.edge.reset();
    this.startOptions = msg;
    this.reconnects = 0;
    this.t0 = performance.now();
    this.setState('connecting');
    this.openSocket(() => {
      if (!this.sendMsg(msg)) this.fail('the start message could not be sent');
    });
    this.timers.push(setInterval(() => this.tick(), TICK_MS));
    this.timers.push(setInterval(() => this.sendAck(), ACK_INTERVAL_MS));
    return true;
  }

  /** The first time of each step of a start, in s since Start: socket open, ready, init, first
   * fragment received, first frame shown (stats.startLog: where the first frame's wait goes). */
  markStart(key, wallMs = performance.now()) {
    const log = this.stats.startLog;
    if (log && log[key] === undefined) log[key] = +((wallMs - this.t0) / 1000).toFixed(3);
  }

  refuse(text, toError = true) {
    this.stats.lastError = text;
    this.stats.errors += 1;
    if (toError) this.setState('error');
    this.message('error', text);
    this.updateStats();
    return false;
  }

  /** Switch the prompt from the next chunk. Returns false (and shows why) when it cannot be sent. */
  setPrompt(prompt) {
    prompt = String(prompt ?? '').trim();
    if (!prompt) return this.refuse('the prompt is empty: type a prompt first', false);
    if (!['starting', 'playing', 'reconnecting'].includes(this.state)) {
      return this.refuse(`no stream is running (${this.state}): press Start`, false);
    }
    if (!this.sendMsg({ type: 'prompt', prompt })) return false;
    this.stats.prompt = prompt;
    this.stats.promptSwitches += 1;
    this.lastPromptAt = performance.now();
    // the first fragment that can carry it: one the server has not sent yet (refined by a
    // status `prompt_seq`, when the server reports where the new prompt starts)
    this.marks.push({ prompt, sentAt: performance.now(), fromSeq: this.lastSeq + 1, method: 'estimate' });
    this.provisional = null;
    if (this.marks.length > 8) this.marks.shift();
    return true;
  }

  pause() { this.sendMsg({ type: 'pause' }); }

  resume() { this.sendMsg({ type: 'resume' }); }

  stop() {
    if (INACTIVE.includes(this.state)) return;
    if (this.state === 'connecting' || this.state === 'reconnecting' || !this.ws
      || this.ws.readyState !== WebSocket.OPEN || !this.conn || this.conn.phase === 'idle') {
      this.finish('stopped');
      return;
    }
    if (this.conn.stopping) return;
    this.setState('stopping');
    if (!this.sendMsg({ type: 'stop' })) {
      this.finish('stopped');
      return;
    }
    this.stopTimer = setTimeout(() => { if (this.state === 'stopping') this.finish('stopped'); }, STOP_TIMEOUT_MS);
  }

  // ------------------------------------------------------------------------------ socket

  socketUrl() {
    const u = new URL(this.url, location.href);
    if (this.token) u.searchParams.set('token', this.token);
    return u.toString();
  }

  openSocket(onOpen) {
    let ws;
    try {
      ws = new WebSocket(this.socketUrl());
    } catch (e) {
      this.fail(`could not open a WebSocket to ${this.url}: ${e.message}`);
      return;
    }
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    this.conn = new ClientConnection();
    let opened = false;
    ws.onopen = () => {
      this.markStart('openS');
      if (ws !== this.ws) return;
      opened = true;
      this.reconnects = 0;
      try {
        onOpen();
      } catch (e) {
        this.fail(`could not start: ${e.message}`);
      }
    };
    ws.onmessage = (ev) => {
      if (ws !== this.ws) return;
      try {
        this.onFrame(ev.data);
      } catch (e) {
        this.fail(`player error: ${e.name}: ${e.message}`);
      }
    };
    ws.onclose = (ev) => {
      if (ws !== this.ws) return;
      this.onClose(ev, opened);
    };
  }

  sendMsg(msg) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    let data;
    try {
      data = this.conn.send(msg);
    } catch (e) {
      if (e instanceof ProtocolError) {
        if (msg.type !== 'ack') this.message('error', `not sent: ${e.message}`);
        return false;
      }
      throw e;
    }
    this.ws.send(data);
    return true;
  }

  sendAck() {
    if (this.appendedSeq < 0 || !this.conn || this.conn.phase !== 'active' || !this.sink) return;
    const playhead = Math.max(0, this.sink.currentTime || 0);
    this.sendMsg({ type: 'ack', seq: this.appendedSeq, playhead });
  }

  onClose(ev, opened) {
    if (INACTIVE.includes(this.state)) return;
    const live = this.session && this.state !== 'stopping';
    if (live && this.reconnects < RECONNECT_DELAYS_MS.length) {
      const delay = RECONNECT_DELAYS_MS[this.reconnects++];
      this.setState('reconnecting');
      this.message('warn', `connection lost (code ${ev.code}); reconnecting in ${delay} ms`);
      setTimeout(() => {
        if (this.state !== 'reconnecting') return;
        this.openSocket(() => this.sendMsg({ type: 'attach', session: this.session, from_seq: this.lastSeq + 1 }));
      }, delay);
      return;
    }
    if (!opened) {
      this.fail(`could not connect to ${this.url}: the server is down, the token is missing or wrong, ` +
        `or this page's origin is not allowed (close code ${ev.code})`);
    } else if (this.state === 'stopping') {
      this.finish('stopped');
    } else {
      this.fail(`connection closed by the server (code ${ev.code}${ev.reason ? ': ' + ev.reason : ''})`);
    }
  }

  // ------------------------------------------------------------------------------ messages

  onFrame(data) {
    let msg;
    try {
      msg = this.conn.receive(new Uint8Array(data));
    } catch (e) {
      this.fail(`the server broke the protocol: ${e.message}`);
      return;
    }
    if (!msg) return;
    switch (msg.type) {
      case 'ready': return this.onReady(msg);
      case 'init': return this.onInit(msg);
      case 'fragment': return this.onFragment(msg);
      case 'status': return this.onStatus(msg);
      case 'end': return this.onEnd(msg);
      case 'error': return this.onError(msg);
    }
  }

  onReady(msg) {
    if (this.session && msg.session === this.session) {
      this.setState('playing');
      this.message('info', `reconnected to session ${msg.session}`);
      return;
    }
    this.session = msg.session;
    this.markStart('readyS');
    Object.assign(this.stats, { session: msg.session, width: msg.width, height: msg.height, fps: msg.fps,
      mime: msg.mime });
    this.setState('starting');
    const wc = this.path === 'webcodecs' || (this.path === 'auto' && this.canvas && WebCodecsSink.available());
    if (wc) {
      if (!this.canvas || !WebCodecsSink.available()) {
        this.fail('this browser has no WebCodecs VideoDecoder (it needs a secure context: https or localhost); ' +
          'use path=mse');
        return;
      }
      this.useSink(new WebCodecsSink(this.canvas, { stats: this.stats, hooks: this.hooks() }));
    } else {
      this.useMse();
    }
  }

  useMse() {
    const mime = this.stats.mime;
    if (!MseSink.supported(mime)) {
      this.fail(`this browser cannot play ${mime} with Media Source Extensions`);
      return false;
    }
    this.useSink(new MseSink(this.video, { mime, keepBehindS: this.keepBehindS, fps: this.stats.fps,
      stats: this.stats, hooks: this.hooks() }));
    return true;
  }

  useSink(sink) {
    if (this.sink) this.sink.destroy();
    this.sink = sink;
    this.stats.path = sink.kind;
    if (this.video) this.video.hidden = sink.kind !== 'mse';
    if (this.canvas) this.canvas.hidden = sink.kind !== 'webcodecs';
  }

  hooks() {
    return {
      onAppended: (seq) => {
        this.appendedSeq = Math.max(this.appendedSeq, seq);
        this.stats.appended += 1;
        this.trySkip();
        if (this.state === 'starting' || this.state === 'reconnecting') this.setState('playing');
        this.sendAck();
      },
      onShown: (mediaTime, wallMs) => this.onShown(mediaTime, wallMs),
      onError: (text) => this.fail(text),
      onWarn: (text) => this.message('warn', text),
    };
  }

  onInit(msg) {
    if (this.initSegment && equalBytes(this.initSegment, msg.data)) return; // same stream after attach
    this.initSegment = msg.data;
    this.markStart('initS');
    const sink = this.sink;
    if (!sink) return;
    if (sink.kind === 'mse') {
      sink.init(msg.data);
      return;
    }
    this.sinkReady = sink.configure(msg.data).then((ok) => {
      this.sinkReady = null;
      if (ok || sink !== this.sink || INACTIVE.includes(this.state)) return;
      if (this.path === 'webcodecs') {
        this.fail(`WebCodecs cannot decode ${this.stats.mime} in this browser; use path=mse`);
        return;
      }
      const pending = sink.takePending(); // fall back to MSE with what arrived meanwhile
      if (!this.useMse()) return;
      this.message('info', `WebCodecs cannot decode ${this.stats.mime} here: using Media Source Extensions`);
      this.sink.init(msg.data);
      for (const f of pending) this.sink.append(f);
    }, (e) => this.fail(`could not set up the video decoder: ${e.message}`));
  }

  onFragment(msg) {
    this.markStart('fragmentS');
    if (this.lastSeq >= 0 && msg.seq > this.lastSeq + 1) {
      this.stats.gaps += msg.seq - this.lastSeq - 1;
    }
    if (this.sink) this.liveStep(); // before it lands: the low point of the buffer's sawtooth
    this.lastSeq = Math.max(this.lastSeq, msg.seq);
    this.stats.fragments += 1;
    this.stats.bytes += msg.data.byteLength;
    this.edge.setChunkDuration(msg.duration);
    this.arrivals.push({ seq: msg.seq, pts: msg.pts, end: msg.pts + msg.duration, t: performance.now() });
    if (this.arrivals.length > 256) this.arrivals.splice(0, this.arrivals.length - 256);
    if (this.sink) this.sink.append({ seq: msg.seq, data: msg.data, pts: msg.pts, duration: msg.duration });
  }

  onStatus(msg) {
    this.stats.genFps = msg.gen_fps;
    this.stats.leadS = msg.lead_s;
    this.stats.serverState = msg.state;
    if (msg.state === 'generating' && msg.gen_fps > 0 && this.stats.fps) {
      // a source faster than real time is held back by the server's pacing: its lead is not lag
      this.edge.setPaced(msg.gen_fps > 1.2 * this.stats.fps);
    }
    if (Number.isInteger(msg.prompt_seq)) { // optional server hint: first seq made with the latest prompt
      // (only a fragment the server had not sent when the prompt left can carry it)
      const m = this.marks.findLast((x) => x.shownAt === undefined);
      const p = this.provisional;
      if (m && m.method !== 'server' && msg.prompt_seq >= m.fromSeq) {
        Object.assign(m, { fromSeq: msg.prompt_seq, method: 'server' });
        this.skipTo = msg.prompt_seq;
        this.trySkip();
      } else if (!m && p && msg.prompt_seq > p.mark.fromSeq) {
        // the estimate took a fragment still made under the old prompt (the one in progress when the
        // prompt arrived): measure again, from the fragment the server names, and skip to it
        this.provisional = null;
        this.marks.push(Object.assign(p.mark, { fromSeq: msg.prompt_seq, method: 'server', shownAt: undefined,
          revise: p.latency }));
        this.skipTo = msg.prompt_seq;
        this.trySkip();
      } else if (p && msg.prompt_seq === p.mark.fromSeq) {
        this.provisional = null; // the estimate was right
        if (this.stats.promptLatencyS === p.latency) this.stats.promptLatencyMethod = 'server';
      }
    }
    if (msg.dropped != null && msg.dropped > this.stats.dropped) {
      this.message('warn', `the server dropped ${msg.dropped} fragment(s) for this player so far ` +
        '(the network or this tab is too slow); playback skips ahead');
      this.stats.dropped = msg.dropped;
    }
  }

  onEnd(msg) {
    this.stats.endReason = msg.reason;
    this.stats.serverState = null;
    this.clearStopTimer();
    this.setState('ended');
    this.message(msg.reason === 'error' ? 'error' : 'info', `stream ended: ${msg.reason}`);
    if (this.sink) this.sink.end();
    this.closeSocket();
  }

  onError(msg) {
    this.stats.errors += 1;
    const where = msg.field ? ` (field "${msg.field}")` : '';
    const text = `${msg.code}${where}: ${msg.message}`;
    this.stats.lastError = text;
    if (msg.code === 'unknown_session' && this.state === 'reconnecting') {
      this.fail(`the session expired while reconnecting: ${msg.message}`);
    } else if (msg.fatal || ((msg.ref === 'start' || msg.ref === 'attach') && msg.code !== 'out_of_order')) {
      this.fail(`${msg.ref === 'start' ? 'start refused: ' : ''}${text}`); // nothing to play
    } else {
      this.message('error', text);
    }
  }

  // ------------------------------------------------------------------------------ display

  onShown(mediaTime, wallMs) {
    const s = this.stats;
    s.shownFrames += 1;
    if (s.firstFrameS === null) {
      s.firstFrameS = (wallMs - this.t0) / 1000;
      this.markStart('shownS', wallMs);
    }
    for (const m of this.marks) {
      if (m.shownAt !== undefined) continue;
      const a = this.arrivals.find((x) => x.seq >= m.fromSeq);
      if (a && mediaTime >= a.pts - 1e-3) {
        m.shownAt = wallMs;
        const latency = Math.max(0, (wallMs - m.sentAt) / 1000);
        s.promptLatencyS = latency;
        const k = m.revise === undefined ? -1 : s.promptLatencies.lastIndexOf(m.revise);
        if (k >= 0) s.promptLatencies[k] = latency; // a revised estimate replaces its sample
        else s.promptLatencies.push(latency);
        if (s.promptLatencies.length > 50) s.promptLatencies.shift();
        s.promptLatencyMethod = m.method;
        this.provisional = m.method === 'estimate' ? { mark: m, latency } : null;
      }
    }
    this.marks = this.marks.filter((m) => m.shownAt === undefined);
  }

  isPlaying() {
    return ['playing', 'reconnecting'].includes(this.state) && !!this.sink && this.sink.started
      && !(this.video && this.sink.kind === 'mse' && this.video.paused);
  }

  /** After a prompt change (skipOnPrompt): once the first fragment made under the new prompt is
   * appended, jump the playhead to it, over what is still buffered of the old prompt. The server
   * makes that fragment at once (not held to its lead), so the change shows one chunk sooner. */
  trySkip() {
    if (this.skipTo === null || !this.sink) return;
    if (!this.skipOnPrompt) { this.skipTo = null; return; }
    const a = this.arrivals.find((x) => x.seq === this.skipTo);
    if (!a || this.appendedSeq < a.seq) return;
    this.skipTo = null;
    const skip = a.pts - (this.sink.currentTime || 0);
    if (skip > 0.05) {
      this.sink.jump(skip);
      this.stats.promptSkips += 1;
      this.stats.promptSkippedS += skip;
      this.lastSkipAt = performance.now();
      this.sendAck(); // the server paces by the playhead: tell it at once, so the next chunk starts now
    }
  }

  /** One LiveEdge observation, applied to the sink; returns the seconds jumped. */
  liveStep() {
    const sink = this.sink, playing = this.isPlaying();
    const { rate, jump } = this.edge.update(performance.now() / 1000, sink.bufferedAhead(), playing);
    sink.setRate(playing ? rate : 1);
    if (jump > 0) {
      sink.jump(jump);
      this.stats.liveJumps += 1;
    }
    return jump;
  }

  tick() {
    const sink = this.sink;
    if (sink) {
      sink.tick(this.state === 'playing');
      const playing = this.isPlaying();
      const jump = this.liveStep();
      // a stall: playing, yet the playhead did not move since the last tick
      const t = sink.currentTime;
      const stalled = playing && this.lastPlayhead !== null && t - this.lastPlayhead < 1e-3 && !jump;
      if (stalled) {
        if (!this.stalledNow) {
          this.stats.stalls += 1;
          // when: seconds since start, and since the latest prompt change (null: none yet)
          const now = performance.now();
          // and since the latest jump to a new prompt's fragment (a stall right after one is the
          // decoder starting at the new keyframe, not the buffer running dry); forS: how long
          const since = (at) => (at === null ? null : +((now - at) / 1000).toFixed(2));
          this.stats.stallLog.push({ atS: +((now - this.t0) / 1000).toFixed(2),
            sincePromptS: since(this.lastPromptAt), sinceSkipS: since(this.lastSkipAt), forS: 0 });
          if (this.stats.stallLog.length > 20) this.stats.stallLog.shift();
        }
        this.stats.stallS += TICK_MS / 1000;
        const last = this.stats.stallLog[this.stats.stallLog.length - 1];
        if (last) last.forS = +(last.forS + TICK_MS / 1000).toFixed(3);
      }
      this.stalledNow = stalled;
      this.lastPlayhead = playing ? t : null;
    }
    this.updateStats();
  }

  updateStats() {
    const s = this.stats, sink = this.sink;
    s.state = this.state;
    if (sink) {
      s.currentTime = sink.currentTime;
      s.bufferedS = sink.bufferedAhead();
      const q = sink.quality();
      s.decodedFrames = q.decoded;
      s.droppedFrames = q.dropped;
      if (q.skipped !== undefined) s.skippedFrames = q.skipped;
      // latency: how long ago the media now on screen arrived, minus how far into it we are
      const now = performance.now();
      const a = this.arrivals.find((x) => s.currentTime >= x.pts && s.currentTime < x.end);
      if (a) s.latencyS = (now - a.t) / 1000 - (s.currentTime - a.pts);
      s.mediaError = sink.mediaError();
      if (s.mediaError && this.state !== 'error') this.fail(`the video element reported a media error ${s.mediaError}`);
    }
    s.live = this.edge.snapshot();
    this.onStats(s);
  }

  // ------------------------------------------------------------------------------ lifecycle

  setState(state) {
    this.state = state;
    this.stats.state = state;
    if (INACTIVE.includes(state)) this.stats.serverState = null;
    this.onStats(this.stats); // the controls follow at once (Stop is usable while connecting)
  }

  message(level, text) {
    this.onMessage(level, text);
  }

  fail(text) {
    this.setState('error');
    this.stats.lastError = text;
    this.clearStopTimer();
    this.message('error', text);
    this.closeSocket();
    this.clearTimers();
    if (this.sink) this.sink.setRate(1);
    this.updateStats();
  }

  finish(reason) {
    this.stats.endReason = reason;
    this.clearStopTimer();
    this.setState('ended');
    this.closeSocket();
    if (this.sink) this.sink.end();
    this.updateStats();
  }

  closeSocket() {
    const ws = this.ws;
    this.ws = null;
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000);
  }

  clearTimers() {
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
  }

  clearStopTimer() {
    if (this.stopTimer !== null) clearTimeout(this.stopTimer);
    this.stopTimer = null;
  }

  resetMedia() {
    this.clearTimers();
    this.clearStopTimer();
    this.closeSocket();
    if (this.sink) this.sink.destroy();
    Object.assign(this, { sink: null, sinkReady: null, session: null, initSegment: null, lastSeq: -1, appendedSeq: -1,
      arrivals: [], marks: [], skipTo: null, provisional: null, lastPlayhead: null, stalledNow: false,
      lastPromptAt: null, lastSkipAt: null });
  }
}

// ------------------------------------------------------------------------------ helpers

function freshStats() {
  return { state: 'idle', path: null, session: null, fragments: 0, appended: 0, bytes: 0, gaps: 0, dropped: 0,
    errors: 0, lastError: null, genFps: 0, leadS: 0, serverState: null, latencyS: null, bufferedS: 0,
    currentTime: 0, decodedFrames: 0, droppedFrames: 0, shownFrames: 0, stalls: 0, stallS: 0, liveJumps: 0,
    gapJumps: 0, quotaDrops: 0, promptSwitches: 0, stallLog: [], promptSkips: 0, promptSkippedS: 0, firstFrameS: null, startLog: {}, promptLatencyS: null, promptLatencies: [],
    promptLatencyMethod: null, endReason: null, mediaError: null, live: null };
}

function defaultUrl() {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${proto}//${location.host}${ENDPOINT}`;
}

function cleanStart(o) {
  const out = { prompt: String(o?.prompt || '').trim() };
  if (!out.prompt) throw new Error('the prompt is empty: type a prompt first');
  for (const k of ['width', 'height', 'fps', 'seed', 'chunks', 'interpolate']) {
    const v = o[k];
    if (v === undefined || v === null || v === '') continue;
    const n = Number(v);
    if (!Number.isFinite(n)) throw new Error(`${k} must be a number, got ${JSON.stringify(String(v))}`);
    out[k] = n;
  }
  if (o.model) out.model = String(o.model);
  if (o.image) out.image = o.image;
  return out;
}

function equalBytes(a, b) {
  if (a.byteLength !== b.byteLength) return false;
  for (let i = 0; i < a.byteLength; i++) if (a[i] !== b[i]) return false;
  return true;
}

// ------------------------------------------------------------------------------ page UI

export function mountUI(doc = document) {
  const $ = (id) => doc.getElementById(id);
  const params = new URLSearchParams(location.search);
  const promptBox = $('prompt');
  const msgBox = $('message');
  const overlay = $('overlay');
  const pathBox = $('path');
  const fmt = (x, d = 1) => (x === null || x === undefined || Number.isNaN(x) ? '–' : Number(x).toFixed(d));
  if (params.get('path') && PATHS.includes(params.get('path'))) pathBox.value = params.get('path');

  const showMessage = (level, text) => {
    msgBox.textContent = text;
    msgBox.className = level;
    if (level === 'error') console.error('[streamgen]', text); else console.info('[streamgen]', text);
  };
  const target = Number(params.get('target'));
  const player = new Player($('video'), {
    canvas: $('canvas'),
    url: params.get('server') || null,
    token: params.get('token'),
    path: pathBox.value,
    targetS: target > 0 ? target : LIVE_TARGET_S,
    keepBehindS: Number(params.get('keep')) > 0 ? Number(params.get('keep')) : KEEP_BEHIND_S,
    skipOnPrompt: params.get('skip') !== '0',
    onMessage: showMessage,
    onStats: (s) => {
      const active = !INACTIVE.includes(s.state);
      const head = s.state === 'error' ? 'error' : `${s.state}${active && s.serverState ? ' / ' + s.serverState : ''}`;
      overlay.textContent = [
        head + (s.path ? ` (${s.path})` : ''),
        `latency ${fmt(s.latencyS, 2)} s`,
        `generated ${fmt(s.genFps)} fps`,
        `buffered ${fmt(s.bufferedS, 2)} s`,
        `rate ${fmt(s.live?.rate, 2)}`,
        `frames ${s.decodedFrames}`,
        `dropped frames ${s.droppedFrames}`,
        `stalls ${s.stalls}`,
        s.firstFrameS !== null ? `first frame ${fmt(s.firstFrameS, 2)} s` : '',
        s.promptLatencyS !== null ? `prompt→frame ${fmt(s.promptLatencyS, 2)} s` : '',
        s.dropped ? `dropped fragments ${s.dropped}` : '',
      ].filter(Boolean).join('  ·  ');
      overlay.dataset.state = s.state;
      $('start').disabled = active;
      $('stop').disabled = !active;
      $('apply').disabled = !['playing', 'starting'].includes(s.state);
      pathBox.disabled = active;
    },
  });
  window.streamgen = player; // for the console and tests
  window.streamgenPlayer = player;

  if (params.get('prompt')) promptBox.value = params.get('prompt');
  const options = () => {
    const o = { prompt: promptBox.value };
    for (const k of ['width', 'height', 'fps', 'seed', 'chunks', 'interpolate', 'model']) {
      const el = $(k);
      const v = params.get(k) ?? (el ? el.value : '');
      if (v !== '' && v !== null) o[k] = v;
    }
    return o;
  };
  const start = () => {
    msgBox.textContent = '';
    msgBox.className = '';
    player.path = pathBox.value;
    player.start(options());
  };
  const apply = () => {
    const p = promptBox.value.trim();
    if (player.setPrompt(p)) showMessage('info', `prompt switched to "${p}" from the next chunk`);
  };
  const active = () => ['playing', 'starting', 'reconnecting'].includes(player.state);
  // Enter in the prompt box: change the prompt while a stream runs, start one otherwise (the form's
  // implicit submission does nothing while its default button, Start, is disabled)
  promptBox.addEventListener('keydown', (ev) => {
    if (ev.key !== 'Enter' || ev.isComposing) return;
    ev.preventDefault();
    if (active()) apply(); else if (INACTIVE.includes(player.state)) start();
  });
  $('controls').addEventListener('submit', (ev) => {
    ev.preventDefault();
    if (active()) apply(); else if (INACTIVE.includes(player.state)) start();
  });
  $('start').addEventListener('click', (ev) => { ev.preventDefault(); start(); });
  $('stop').addEventListener('click', (ev) => { ev.preventDefault(); player.stop(); });
  $('apply').addEventListener('click', (ev) => { ev.preventDefault(); apply(); });
  player.updateStats();
  if (params.get('autostart') === '1' && promptBox.value) start();
  return player;
}
