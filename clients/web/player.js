// streamgen browser player: WebSocket (protocol v1) -> Media Source Extensions, plain ES module.
//
//   const player = new Player(videoElement, { url, token, keepBehindS, onStats, onMessage });
//   player.start({ prompt, width?, height?, fps?, seed?, chunks?, interpolate? });
//   player.setPrompt('...');  player.pause();  player.resume();  player.stop();
//
// The SourceBuffer runs in 'segments' mode: every fragment carries its own timestamps (tfdt), so
// a fragment replayed after a reconnect lands where it belongs and a fragment the server dropped
// for us leaves a gap that the player jumps over. Appends go through one queue (appendBuffer is
// asynchronous and only one operation may run at a time); old media behind the playhead is
// removed, and a QuotaExceededError frees space and retries. After each appended fragment and
// every ACK_INTERVAL_MS the player sends ack {seq, playhead}: the server paces generation by it.
// An unexpected disconnect reconnects with attach {session, from_seq: last seq + 1}.
//
// mountUI(document) wires the controls of index.html; URL parameters: prompt, autostart=1,
// token, width, height, fps, seed, chunks, interpolate, server (ws:// URL; default: this page's
// host + /v1/stream), keep (seconds of media kept behind the playhead).

import { ClientConnection, ENDPOINT, ProtocolError } from './protocol.js';

const ACK_INTERVAL_MS = 250;
const TICK_MS = 250;
const KEEP_BEHIND_S = 8; // default media kept behind the playhead (removed beyond 1.5x that)
const MAX_BEHIND_LIVE_S = 6; // further than this behind the newest media: jump forward
const LIVE_TARGET_S = 1.0; // ... to this far behind it
const RECONNECT_DELAYS_MS = [250, 500, 1000, 2000, 4000, 8000];

export class Player {
  constructor(video, { url = null, token = null, keepBehindS = KEEP_BEHIND_S, onStats = () => {},
    onMessage = () => {} } = {}) {
    this.video = video;
    this.url = url || defaultUrl();
    this.token = token;
    this.keepBehindS = keepBehindS;
    this.onStats = onStats;
    this.onMessage = onMessage;
    this.ws = null;
    this.conn = null;
    this.state = 'idle'; // idle | connecting | starting | playing | reconnecting | stopping | ended | error
    this.session = null;
    this.initSegment = null;
    this.mime = null;
    this.mediaSource = null;
    this.sb = null;
    this.queue = []; // pending SourceBuffer operations: {kind: 'init'|'fragment'|'remove', ...}
    this.current = null; // the operation in flight
    this.lastSeq = -1; // highest fragment seq received
    this.appendedSeq = -1; // highest fragment seq appended
    this.arrivals = []; // [{pts, end, t}] of recent fragments, for latency
    this.stats = freshStats();
    this.timers = [];
    this.reconnects = 0;
    this.wantEnd = false; // end of stream reached: endOfStream once the queue drains
  }

  // ------------------------------------------------------------------------------ controls

  async start(options) {
    if (this.state !== 'idle' && this.state !== 'ended' && this.state !== 'error') {
      throw new Error(`cannot start while ${this.state}`);
    }
    this.resetMedia();
    this.stats = freshStats();
    this.startOptions = cleanStart(options);
    this.reconnects = 0;
    this.setState('connecting');
    this.openSocket(() => this.sendMsg({ type: 'start', ...this.startOptions }));
    this.timers.push(setInterval(() => this.tick(), TICK_MS));
    this.timers.push(setInterval(() => this.sendAck(), ACK_INTERVAL_MS));
  }

  setPrompt(prompt) {
    if (!prompt) throw new Error('the prompt is empty');
    this.stats.prompt = prompt;
    this.stats.promptSwitches += 1;
    this.sendMsg({ type: 'prompt', prompt });
  }

  pause() { this.sendMsg({ type: 'pause' }); }

  resume() { this.sendMsg({ type: 'resume' }); }

  stop() {
    if (this.state === 'reconnecting' || !this.ws || this.ws.readyState !== WebSocket.OPEN) {
      this.finish('stopped');
      return;
    }
    if (this.conn.phase === 'idle' || this.conn.stopping) return;
    this.setState('stopping');
    this.sendMsg({ type: 'stop' });
  }

  // ------------------------------------------------------------------------------ socket

  socketUrl() {
    const u = new URL(this.url, location.href);
    if (this.token) u.searchParams.set('token', this.token);
    return u.toString();
  }

  openSocket(onOpen) {
    const ws = new WebSocket(this.socketUrl());
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    this.conn = new ClientConnection();
    let opened = false;
    ws.onopen = () => { opened = true; this.reconnects = 0; onOpen(); };
    ws.onmessage = (ev) => {
      if (ws !== this.ws) return;
      this.onFrame(ev.data);
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
        if (msg.type !== 'ack') this.message('warn', `not sent: ${e.message}`);
        return false;
      }
      throw e;
    }
    this.ws.send(data);
    return true;
  }

  sendAck() {
    if (this.appendedSeq < 0 || !this.conn || this.conn.phase !== 'active') return;
    const playhead = Math.max(0, this.video.currentTime || 0);
    this.sendMsg({ type: 'ack', seq: this.appendedSeq, playhead });
  }

  onClose(ev, opened) {
    if (this.state === 'ended' || this.state === 'idle' || this.state === 'error') return;
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
    this.mime = msg.mime;
    Object.assign(this.stats, { session: msg.session, width: msg.width, height: msg.height, fps: msg.fps,
      mime: msg.mime });
    if (!('MediaSource' in window) || !MediaSource.isTypeSupported(msg.mime)) {
      this.fail(`this browser cannot play ${msg.mime} with Media Source Extensions`);
      return;
    }
    this.setState('starting');
    const ms = new MediaSource();
    this.mediaSource = ms;
    this.video.src = URL.createObjectURL(ms);
    ms.addEventListener('sourceopen', () => {
      if (ms !== this.mediaSource) return;
      try {
        this.sb = ms.addSourceBuffer(msg.mime);
        this.sb.mode = 'segments';
      } catch (e) {
        this.fail(`could not create a SourceBuffer for ${msg.mime}: ${e.message}`);
        return;
      }
      this.sb.addEventListener('updateend', () => this.onUpdateEnd());
      this.sb.addEventListener('error', () => this.message('error', 'SourceBuffer append error'));
      this.pump();
    }, { once: true });
  }

  onInit(msg) {
    if (this.initSegment && equalBytes(this.initSegment, msg.data)) return; // same stream after attach
    this.initSegment = msg.data;
    this.queue.push({ kind: 'init', data: msg.data });
    this.pump();
  }

  onFragment(msg) {
    if (this.lastSeq >= 0 && msg.seq > this.lastSeq + 1) {
      this.stats.gaps += msg.seq - this.lastSeq - 1;
    }
    this.lastSeq = msg.seq;
    this.stats.fragments += 1;
    this.stats.bytes += msg.data.byteLength;
    this.arrivals.push({ pts: msg.pts, end: msg.pts + msg.duration, t: performance.now() });
    if (this.arrivals.length > 256) this.arrivals.splice(0, this.arrivals.length - 256);
    this.queue.push({ kind: 'fragment', data: msg.data, seq: msg.seq, pts: msg.pts });
    this.pump();
  }

  onStatus(msg) {
    this.stats.genFps = msg.gen_fps;
    this.stats.leadS = msg.lead_s;
    this.stats.serverState = msg.state;
    if (msg.dropped != null && msg.dropped > this.stats.dropped) {
      this.message('warn', `the server dropped ${msg.dropped} fragment(s) for this player so far ` +
        '(the network or this tab is too slow); playback skips ahead');
      this.stats.dropped = msg.dropped;
    }
  }

  onEnd(msg) {
    this.stats.endReason = msg.reason;
    this.wantEnd = true;
    this.setState('ended');
    this.message(msg.reason === 'error' ? 'error' : 'info', `stream ended: ${msg.reason}`);
    this.pump();
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
      this.fail(text); // a refused start/attach leaves nothing to play
    } else {
      this.message('error', text);
    }
  }

  // ------------------------------------------------------------------------------ media

  pump() {
    const sb = this.sb;
    if (!sb || sb.updating || this.current) return;
    const op = this.queue.shift();
    if (!op) {
      if (this.wantEnd && this.mediaSource?.readyState === 'open') {
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
          this.message('warn', 'media buffer full: dropped a fragment');
          setTimeout(() => this.pump(), 50);
        }
        return;
      }
      this.fail(`could not ${op.kind === 'remove' ? 'trim' : 'append'} media: ${e.name}: ${e.message}`);
    }
  }

  onUpdateEnd() {
    const op = this.current;
    this.current = null;
    if (op && op.kind === 'fragment') {
      this.appendedSeq = Math.max(this.appendedSeq, op.seq);
      this.stats.appended += 1;
      if (this.state === 'starting' || this.state === 'reconnecting') this.setState('playing');
      this.startPlaybackIfNeeded();
      this.sendAck();
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
      v.play().catch((e) => this.message('warn', `autoplay was blocked (${e.name}); press play`));
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

  tick() {
    const v = this.video;
    const b = v.buffered;
    if (b && b.length && this.state !== 'idle') {
      const liveEnd = b.end(b.length - 1);
      // 1. jump over gaps (fragments dropped by the server or on QuotaExceededError): the video
      //    stalls up to a frame before the end of the range it plays, or sits before the first one
      const frame = 1 / (this.stats.fps || 16);
      const stalled = v.readyState < 3 && !v.paused && bufferedAhead(b, v.currentTime) < Math.max(0.1, 1.5 * frame);
      if (!inRange(b, v.currentTime) || stalled) {
        const next = rangeStartingAfter(b, v.currentTime);
        if (next >= 0) {
          v.currentTime = b.start(next) + 0.001;
          this.stats.gapJumps += 1;
        }
      }
      // 2. stay near the live edge
      if (liveEnd - v.currentTime > MAX_BEHIND_LIVE_S) {
        v.currentTime = Math.max(0, liveEnd - LIVE_TARGET_S);
        this.stats.liveJumps += 1;
      }
      // 3. trim what is far behind
      if (v.currentTime - b.start(0) > this.keepBehindS * 1.5) this.freeSpace();
      if (v.paused && this.state === 'playing' && !v.ended) this.startPlaybackIfNeeded();
    }
    this.updateStats();
  }

  updateStats() {
    const v = this.video, b = v.buffered, s = this.stats;
    s.state = this.state;
    s.currentTime = v.currentTime;
    s.bufferedS = b && b.length ? bufferedAhead(b, v.currentTime) : 0;
    const q = v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality() : null;
    s.decodedFrames = q ? q.totalVideoFrames : 0;
    s.droppedFrames = q ? q.droppedVideoFrames : 0;
    // latency: how long ago the media now on screen arrived, minus how far into it we are
    const now = performance.now();
    const a = this.arrivals.find((x) => v.currentTime >= x.pts && v.currentTime < x.end);
    if (a) s.latencyS = (now - a.t) / 1000 - (v.currentTime - a.pts);
    s.mediaError = v.error ? `${v.error.code}: ${v.error.message}` : null;
    if (v.error && this.state !== 'error') this.fail(`the video element reported a media error ${s.mediaError}`);
    this.onStats(s);
  }

  // ------------------------------------------------------------------------------ lifecycle

  setState(state) {
    this.state = state;
    this.stats.state = state;
  }

  message(level, text) {
    this.onMessage(level, text);
  }

  fail(text) {
    this.setState('error');
    this.stats.lastError = text;
    this.message('error', text);
    this.closeSocket();
    this.clearTimers();
  }

  finish(reason) {
    this.stats.endReason = reason;
    this.setState('ended');
    this.closeSocket();
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

  resetMedia() {
    this.clearTimers();
    this.closeSocket();
    if (this.video.src) {
      URL.revokeObjectURL(this.video.src);
      this.video.removeAttribute('src');
      this.video.load();
    }
    Object.assign(this, { mediaSource: null, sb: null, queue: [], current: null, session: null, initSegment: null,
      lastSeq: -1, appendedSeq: -1, arrivals: [], wantEnd: false });
  }
}

// ------------------------------------------------------------------------------ helpers

function freshStats() {
  return { state: 'idle', session: null, fragments: 0, appended: 0, bytes: 0, gaps: 0, dropped: 0, errors: 0,
    lastError: null, genFps: 0, leadS: 0, latencyS: null, bufferedS: 0, currentTime: 0, decodedFrames: 0,
    droppedFrames: 0, liveJumps: 0, gapJumps: 0, quotaDrops: 0, promptSwitches: 0, endReason: null, mediaError: null };
}

function defaultUrl() {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${proto}//${location.host}${ENDPOINT}`;
}

function cleanStart(o) {
  const out = { prompt: String(o.prompt || '').trim() };
  if (!out.prompt) throw new Error('type a prompt first');
  for (const k of ['width', 'height', 'fps', 'seed', 'chunks', 'interpolate']) {
    if (o[k] !== undefined && o[k] !== null && o[k] !== '') out[k] = Number(o[k]);
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

function inRange(b, t) {
  for (let i = 0; i < b.length; i++) if (t >= b.start(i) && t < b.end(i)) return true;
  return false;
}

function rangeStartingAfter(b, t) {
  for (let i = 0; i < b.length; i++) if (b.start(i) > t) return i;
  return -1;
}

function bufferedAhead(b, t) {
  for (let i = 0; i < b.length; i++) if (t >= b.start(i) - 0.001 && t < b.end(i)) return b.end(i) - t;
  return 0;
}

// ------------------------------------------------------------------------------ page UI

export function mountUI(doc = document) {
  const $ = (id) => doc.getElementById(id);
  const params = new URLSearchParams(location.search);
  const video = $('video');
  const promptBox = $('prompt');
  const msgBox = $('message');
  const overlay = $('overlay');
  const fmt = (x, d = 1) => (x === null || x === undefined || Number.isNaN(x) ? '–' : Number(x).toFixed(d));

  const player = new Player(video, {
    url: params.get('server') || null,
    token: params.get('token'),
    keepBehindS: Number(params.get('keep')) > 0 ? Number(params.get('keep')) : KEEP_BEHIND_S,
    onMessage: (level, text) => {
      msgBox.textContent = text;
      msgBox.className = level;
      if (level === 'error') console.error('[streamgen]', text); else console.info('[streamgen]', text);
    },
    onStats: (s) => {
      overlay.textContent = [
        `${s.state}${s.serverState ? ' / ' + s.serverState : ''}`,
        `latency ${fmt(s.latencyS, 2)} s`,
        `generated ${fmt(s.genFps)} fps`,
        `buffered ${fmt(s.bufferedS, 2)} s`,
        `frames ${s.decodedFrames}`,
        s.dropped ? `dropped ${s.dropped}` : '',
      ].filter(Boolean).join('  ·  ');
      $('start').disabled = !['idle', 'ended', 'error'].includes(s.state);
      $('stop').disabled = ['idle', 'ended', 'error'].includes(s.state);
      $('apply').disabled = !['playing', 'starting'].includes(s.state);
    },
  });
  window.streamgen = player; // for the console and tests

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
    try {
      msgBox.textContent = '';
      msgBox.className = '';
      player.start(options());
    } catch (e) {
      player.message('error', e.message);
    }
  };
  $('controls').addEventListener('submit', (ev) => {
    ev.preventDefault();
    if (['playing', 'starting'].includes(player.state)) $('apply').click(); else start();
  });
  $('start').addEventListener('click', (ev) => { ev.preventDefault(); start(); });
  $('stop').addEventListener('click', (ev) => { ev.preventDefault(); player.stop(); });
  $('apply').addEventListener('click', (ev) => {
    ev.preventDefault();
    try {
      player.setPrompt(promptBox.value.trim());
      player.message('info', `prompt switched to "${promptBox.value.trim()}" from the next chunk`);
    } catch (e) {
      player.message('error', e.message);
    }
  });
  player.updateStats();
  if (params.get('autostart') === '1' && promptBox.value) start();
  return player;
}
