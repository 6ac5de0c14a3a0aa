// node --test: the live-edge controller (liveedge.js) in a simulated stream: a source making
// fragments, a jittery network, a player whose playhead moves at the controller's rate.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { LiveEdge } from '../liveedge.js';

function rng(seed) { // mulberry32
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** speed: media seconds generated per wall second; lead: server pacing (null: unpaced);
 * jitter(t, rand) -> network delay of a fragment sent at t; returns per-step trace. */
function simulate({ seconds, D = 0.5, speed = 1.0, lead = null, jitter = () => 0.02, seed = 1, edge, dt = 0.02,
  paced = false }) {
  const rand = rng(seed);
  edge.setChunkDuration(D);
  edge.setPaced(paced);
  let generated = 0, busyUntil = 0, playhead = 0, lastArrival = 0, started = false;
  const inFlight = []; // [arrival time, media end]
  let received = 0, stalls = 0, stalledS = 0, wasStalled = false, fastS = 0;
  const trace = [];
  for (let t = 0; t < seconds; t += dt) {
    // source: one fragment at a time, each takes D / speed; paced by the playhead the player acks
    while (busyUntil <= t && (lead === null || generated - playhead < lead)) {
      const start = Math.max(busyUntil, t - dt);
      busyUntil = start + D / speed;
      generated += D;
      const arrival = Math.max(lastArrival, busyUntil + jitter(busyUntil, rand));
      lastArrival = arrival;
      inFlight.push([arrival, generated]);
    }
    while (inFlight.length && inFlight[0][0] <= t) received = inFlight.shift()[1];
    if (!started && received > 0) started = true;
    if (!started) continue;
    const { rate, jump } = edge.update(t, received - playhead, true);
    if (jump) playhead = Math.min(received, playhead + jump);
    if (rate > 1) fastS += dt;
    const next = playhead + dt * rate;
    const stalled = next > received;
    playhead = Math.min(next, received);
    if (stalled) { stalledS += dt; if (!wasStalled) stalls += 1; }
    wasStalled = stalled;
    trace.push({ t, ahead: received - playhead, rate, latency: generated - playhead });
  }
  return { trace, stalls, stalledS, fastS };
}

const window = (trace, a, b) => trace.filter((s) => s.t >= a && s.t < b);
const max = (xs) => Math.max(...xs);
const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;

test('a source 4% faster than real time: no drift over 10 minutes, rate within 1.0..1.1', () => {
  const edge = new LiveEdge({ targetS: 0.3 });
  const { trace, stalls } = simulate({ seconds: 600, speed: 1.04, edge, jitter: (t, r) => 0.02 + 0.05 * r() });
  const early = window(trace, 30, 90), late = window(trace, 540, 600);
  assert.ok(max(late.map((s) => s.ahead)) < 0.3 + 0.5 + 0.4, `late max ahead ${max(late.map((s) => s.ahead))}`);
  assert.ok(Math.abs(mean(late.map((s) => s.ahead)) - mean(early.map((s) => s.ahead))) < 0.15);
  assert.ok(trace.every((s) => s.rate >= 1 && s.rate <= 1.1 + 1e-9));
  assert.equal(stalls, 0);
  assert.equal(edge.jumps, 0);
  assert.equal(edge.paced, false);
  assert.ok(edge.gainedS > 0.03 * 500, `catch-up absorbed the drift: ${edge.gainedS}`);
});

test('network jitter with spikes: stalls refill, then catch-up returns to the target', () => {
  const edge = new LiveEdge({ targetS: 0.3 });
  const jitter = (t, r) => (Math.floor(t) % 20 === 10 && r() < 0.5 ? 1.2 : 0.3 * r());
  const { trace } = simulate({ seconds: 180, speed: 1.0, edge, jitter, seed: 7 });
  // right after a spike the buffer is larger; 8 s later it is back near target + one fragment
  for (let k = 1; k < 8; k++) {
    const calm = window(trace, 20 * k + 8, 20 * k + 10);
    assert.ok(max(calm.map((s) => s.ahead)) < 0.3 + 0.5 + 0.45, `t=${20 * k + 8}: ${max(calm.map((s) => s.ahead))}`);
  }
  assert.equal(edge.jumps, 0);
  assert.ok(edge.gainedS > 0.5);
});

test('a long outage (8 s) on a real-time source: one jump, then back at the live edge', () => {
  const edge = new LiveEdge({ targetS: 0.3, jumpS: 2.0 });
  const jitter = (t) => (t > 30 && t < 38 ? 38 - t : 0.02);
  const { trace } = simulate({ seconds: 80, speed: 1.0, edge, jitter });
  assert.equal(edge.jumps, 1);
  assert.equal(edge.paced, false);
  assert.ok(max(window(trace, 50, 80).map((s) => s.ahead)) < 1.0);
});

test('a fast source paced by the server (lead 3 s): learned, no endless catch-up or jumps', () => {
  const edge = new LiveEdge({ targetS: 0.3 });
  const { trace, fastS } = simulate({ seconds: 120, speed: 20, lead: 3.0, edge });
  assert.ok(edge.paced);
  assert.ok(edge.jumps <= 1, `jumps ${edge.jumps}`);
  assert.ok(fastS < 15, `played fast for ${fastS} s`);
  assert.ok(window(trace, 60, 120).every((s) => s.rate === 1));
});

test('the paced hint: the server lead is left alone from the start', () => {
  const edge = new LiveEdge({ targetS: 0.3 });
  const { fastS } = simulate({ seconds: 60, speed: 20, lead: 3.0, edge, paced: true });
  assert.equal(edge.jumps, 0);
  assert.equal(fastS, 0);
});

test('not playing: no rate change and no evidence kept', () => {
  const edge = new LiveEdge();
  for (let t = 0; t < 10; t += 0.1) assert.deepEqual(edge.update(t, 5, false), { rate: 1, jump: 0 });
  assert.equal(edge.samples.length, 0);
  const r = edge.update(10, 5, true);
  assert.deepEqual(r, { rate: 1, jump: 0 }); // a fresh window first
});
