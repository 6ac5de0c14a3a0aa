"""Issue 10's latencies at the client, over loopback, where no browser exists (a GPU machine).

    python bench/client_latency.py --json $OUT/client_latency.json               # wan,taehv on the GPU
    python bench/client_latency.py --decoder taehv --sessions 6 --seconds 120    # one decoder, a 2-minute stream
    python bench/client_latency.py --smoke                                       # tiny configs on the CPU (a check)

On an H200 the default run (both decoders; 1 cold + 4 warm sessions x 3 switches and a 60 s stream
each) takes about 4-5 minutes: per decoder ~35 s of process start, model build and warm-up, ~40 s of
sessions, the 60 s stream.

Per decoder, one server PROCESS: Wan2.1 1.3B with random bf16 weights at 832x480 (the decoder
"wan" or "taehv" and random RIFE, built as bench/pipeline.py ``build`` does, the decoder in bf16 as
``streamgen serve`` loads it, the attention backend chosen as serve does), served by
``streamgen.server.serve.run`` with every server setting at ``streamgen serve``'s defaults
(``--max-lead`` 0.75 s, warm-up at 832x480 included), the ``self-forcing-1.3b`` preset's sampling
settings (4 steps, window 12 latent frames with 3 sink frames). ``--smoke``: the ``tiny`` preset
(128x128) with tiny random configs on the CPU. The script waits until the engine's warm-up has
finished before the first session; the cold engine start (model build, warm-up) is reported apart.

The client is ``streamgen.client.StreamClient`` in this process; every prompt change is a real
``prompt`` message. Like the browser player (clients/web/player.js) it acks ``{seq, playhead}``
after each fragment and every 250 ms, so the server paces generation by the simulated playhead
(with the client's plain seq-only acks it would run unpaced). The playback simulation mirrors the
player's WebCodecs sink: a media clock that starts ``--jitter-buffer`` seconds after the first
fragment arrives (the player's live-edge target; 0: at once, as the WebCodecs sink does) and
advances at real time (rate 1.0: the LiveEdge catch-up is not simulated), holds at the end of the
media received (a *stall*, until the next fragment), and, after a prompt change, jumps over the
old prompt's buffered media to the first fragment the server names as made under the new prompt
(``status.prompt_seq``; the player's ``skipOnPrompt``; ``--no-skip``: play the old tail out).

Measured, per decoder:
  (a) start -> first fragment: from before the WebSocket opens (as the player's ``firstFrameS``)
      to the first fragment received, and to its first frame decoded with PyAV from the init
      segment + that fragment (every frame of it is decoded and counted: proof that it plays);
      one cold session (the first after warm-up) reported apart, then ``--sessions`` warm ones.
  (b) prompt change -> the first fragment made under the new prompt received (the server's
      ``status.prompt_seq``, as ``streamgen watch`` computes its prompt latency), decoded, and
      shown by the simulated player; ``--switches`` per session, ``--switch-gap`` s of playback apart.
  (c) one ``--seconds`` stream (a prompt change every ``--smooth-switch-every`` s), every fragment
      decoded: stalls (count of those longer than one frame, total, longest, when), jumps to a new
      prompt, fragments dropped by the server, and its prompt latencies.
Prints one JSON line per decoder, then a table; ``--json PATH`` writes everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamgen import protocol as P  # noqa: E402
from streamgen.client import StreamClient  # noqa: E402

MARK = "@@client_latency "  # the server process's event lines on its stdout
ACK_INTERVAL_S = 0.25  # as clients/web/player.js ACK_INTERVAL_MS
PROMPTS = ("a red fox running through snow", "a blue whale gliding under the sea", "a city street at night in the rain",
           "a hot air balloon over green hills", "a sailing boat on a stormy ocean")


# ------------------------------------------------------------------------------ the server process


def serve_child(decoder: str, port: int, smoke: bool) -> int:
    """Build the pipeline, then ``streamgen serve``'s own ``run`` over it (blocks until SIGINT)."""
    t0 = time.monotonic()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def emit(**ev) -> None:
        print(MARK + json.dumps(ev), flush=True)

    class WarmupDone(logging.Handler):  # the engine logs one line per warm-up size, or its failure
        def emit(self, record: logging.LogRecord) -> None:
            msg = str(record.msg)
            if msg.startswith("engine warm-up:"):
                emit(event="warm", warmup_s=float(record.args[-1]), since_start_s=time.monotonic() - t0)
            elif msg.startswith("engine warm-up failed"):
                emit(event="warm", failed=True, since_start_s=time.monotonic() - t0)

    logging.getLogger("streamgen.engine.core").addHandler(WarmupDone())
    import torch

    from bench.pipeline import build
    from streamgen.ops.attention import use_backend
    from streamgen.server import serve

    dev = torch.device("cpu" if smoke else "cuda")
    t1 = time.monotonic()
    name, *opts = decoder.split("+")  # the decoder in the model dtype, as serve loads it
    pipe = build(name, "compile" in opts, dev, smoke, bf16_decoder=True, graphs="graphs" in opts,
                 quant="fp8" if "fp8" in opts else None)
    use_backend(pipe.model)  # as streamgen.pipeline.build does
    if dev.type == "cuda":
        torch.cuda.synchronize()
    emit(event="built", build_s=time.monotonic() - t1, since_start_s=time.monotonic() - t0,
         device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__)
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    args = p.parse_args(["--model", "tiny" if smoke else "self-forcing-1.3b", "--host", "127.0.0.1",
                         "--port", str(port)])
    return serve.run(args, pipe)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The server process of one decoder: start, wait for its warm-up and its port, stop."""

    def __init__(self, decoder: str, port: int, smoke: bool, log_path: Path):
        self.decoder, self.port, self.smoke, self.log_path = decoder, port, smoke, log_path
        self.events: dict[str, dict] = {}
        self._warm = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None
        self.returncode: int | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self, timeout: float) -> dict:
        t0 = time.monotonic()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "wb")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "--_serve", self.decoder, "--port", str(self.port),
            *(["--smoke"] if self.smoke else []), stdout=asyncio.subprocess.PIPE, stderr=self._log, env=env, cwd=ROOT)
        self._reader = asyncio.create_task(self._read())
        try:
            await asyncio.wait_for(self._ready(), timeout)
        except (asyncio.TimeoutError, RuntimeError) as e:
            await self.stop()
            why = e or "timed out"
            raise RuntimeError(f"server ({self.decoder}) not ready: {why}; its log:\n{self.tail()}") from None
        built, warm = self.events.get("built", {}), self.events["warm"]
        return {"process_to_built_s": built.get("since_start_s"), "build_s": built.get("build_s"),
                "warmup_s": warm.get("warmup_s"), "warmup_failed": bool(warm.get("failed")),
                "process_to_warm_s": warm.get("since_start_s"), "process_to_ready_s": time.monotonic() - t0,
                "device": built.get("device"), "torch": built.get("torch")}

    async def _read(self) -> None:
        async for line in self.proc.stdout:
            text = line.decode(errors="replace")
            if text.startswith(MARK):
                ev = json.loads(text[len(MARK):])
                self.events[ev["event"]] = ev
                if ev["event"] == "warm":
                    self._warm.set()

    async def _ready(self) -> None:
        waiter = asyncio.create_task(self._warm.wait())
        exited = asyncio.create_task(self.proc.wait())
        done, _ = await asyncio.wait({waiter, exited}, return_when=asyncio.FIRST_COMPLETED)
        if exited in done:
            raise RuntimeError(f"the server process exited ({self.proc.returncode})")
        exited.cancel()
        while True:  # serve listens after the engine is built; the warm-up runs on the engine thread meanwhile
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return
            except OSError:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"the server process exited ({self.proc.returncode})")
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)  # aiohttp's graceful shutdown: sessions end, the engine closes
            t = time.monotonic()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
                self.shutdown_s = time.monotonic() - t
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.returncode = None if self.proc is None else self.proc.returncode
        if getattr(self, "_reader", None) is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._reader, 5)
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


# ------------------------------------------------------------------------------ the player at the client


class Playback:
    """The player's media clock (clients/web/webcodecs.js), event-driven and exact: it starts
    ``startup_s`` after the first fragment arrives, runs at real time, holds at the end of what was
    received (a stall) and jumps forward on request (``jump_to``: the player's trySkip)."""

    def __init__(self, startup_s: float, frame_s: float = 1 / 16):
        self.startup_s = startup_s
        self.frame_s = frame_s
        self.clock: float | None = None  # media time shown (s)
        self.wall = 0.0  # monotonic time the clock was last advanced to
        self.start_at: float | None = None
        self.first_pts = 0.0
        self.received_end = 0.0
        self.stalled_since: float | None = None
        self.stalls: list[dict] = []  # {at_s, s, since_prompt_s}
        self.skips: list[float] = []  # seconds jumped over at prompt changes
        self.t0: float | None = None
        self.last_prompt_at: float | None = None
        self._watch: list[list] = []  # [pts, callback(wall time)] fired when the clock reaches pts

    def advance(self, now: float) -> None:
        if self.clock is None:
            if self.start_at is None or now < self.start_at:
                return
            self.clock, self.wall = self.first_pts, self.start_at
            self._fire(now)
        if self.stalled_since is None and now > self.wall:
            nxt = self.clock + (now - self.wall)
            if nxt > self.received_end:  # ran dry: the stall began when the clock reached the end
                self.stalled_since = self.wall + (self.received_end - self.clock)
                self._pass(self.received_end)
                self.clock = self.received_end
            else:
                self._pass(nxt)
                self.clock = nxt
        self.wall = now

    def _pass(self, to: float) -> None:
        for w in self._watch:
            if w[1] is not None and w[0] <= to + 1e-6:
                w[1](self.wall + max(0.0, w[0] - self.clock))
                w[1] = None
        self._watch = [w for w in self._watch if w[1] is not None]

    def _fire(self, now: float) -> None:
        self._pass(self.clock)

    def receive(self, pts: float, duration: float, now: float) -> None:
        if self.t0 is None:
            self.t0, self.first_pts, self.start_at = now, pts, now + self.startup_s
        self.advance(now)
        self.received_end = max(self.received_end, pts + duration)
        if self.stalled_since is not None:  # media again: the clock moves on from now
            s = now - self.stalled_since
            self.stalls.append({"at_s": round(self.stalled_since - self.t0, 3), "s": round(s, 4),
                                "since_prompt_s": None if self.last_prompt_at is None
                                else round(self.stalled_since - self.last_prompt_at, 3)})
            self.stalled_since, self.wall = None, now
        self.advance(now)

    def when_shown(self, pts: float, callback) -> None:
        """``callback(wall time)`` once the clock reaches ``pts`` (the player's onShown of that fragment)."""
        if self.clock is not None and self.clock >= pts - 1e-6:
            callback(self.wall)
        else:
            self._watch.append([pts - 1e-3, callback])

    def jump_to(self, pts: float, now: float) -> float:
        """skipOnPrompt: the playhead to ``pts`` (a fragment just received), over the old prompt's tail."""
        self.advance(now)
        if self.clock is None:
            return 0.0
        skip = pts - self.clock
        if skip <= 0.05:
            return 0.0
        self.clock = min(self.clock + skip, max(self.clock, self.received_end - 0.05))
        self.wall = now
        self.skips.append(skip)
        self._pass(self.clock)
        return skip

    def playhead(self, now: float) -> float:
        self.advance(now)
        return max(0.0, self.clock if self.clock is not None else self.first_pts)

    def finish(self, now: float) -> None:
        self.advance(now)  # a stall still open at the end of the stream is not one (the stream ended)


class PlayerClient(StreamClient):
    """StreamClient whose acks carry the simulated playhead, as the browser player's do."""

    def __init__(self, url: str, playback: Playback, **kw):
        super().__init__(url, **kw)
        self.playback = playback

    async def _send_ack(self, seq: int) -> None:
        if not self._connected.is_set() or self._conn.phase is not P.Phase.ACTIVE:
            return
        try:
            async with self._send_lock:
                ack = P.Ack(seq=seq, playhead=round(self.playback.playhead(time.monotonic()), 4))
                await self._ws.send(self._conn.send(ack))
        except Exception as e:  # noqa: BLE001 - a lost connection is the receive loop's
            logging.debug("ack %d not sent: %s", seq, e)

    def ack_soon(self, seq: int) -> None:
        """An ack with the playhead now (after a jump), without waiting for the next interval."""
        task = asyncio.ensure_future(self._send_ack(seq))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def ack_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.last_seq is not None:
                await self._send_ack(self.last_seq)


def decode(init: bytes, data: bytes) -> tuple[float, int, tuple[int, int]]:
    """Decode init segment + one fragment with PyAV: (monotonic time of the first decoded frame,
    frames decoded, (width, height)). Raises when nothing decodes."""
    import av

    t_first, n, size = None, 0, (0, 0)
    with av.open(io.BytesIO(init + data), format="mp4") as c:
        for f in c.decode(video=0):
            if t_first is None:
                t_first, size = time.monotonic(), (f.width, f.height)
            n += 1
    if not n:
        raise RuntimeError("the fragment decoded to no frame")
    return t_first, n, size


@dataclass
class Switch:
    prompt: str
    sent: float
    last_seq: int  # the last fragment received when the prompt left: a newer one carries it
    seq: int | None = None
    received_s: float | None = None
    decoded_s: float | None = None
    shown_s: float | None = None
    skipped_s: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def row(self) -> dict:
        return {"seq": self.seq, "received_s": self.received_s, "decoded_s": self.decoded_s,
                "shown_s": self.shown_s, "skipped_s": round(self.skipped_s, 4)}


async def session(url: str, k: int, args, *, switches: int, seconds: float | None = None,
                  switch_every: float | None = None, decode_all: bool = False) -> dict:
    """One start: first fragment (received, decoded), then ``switches`` prompt changes (or, with
    ``seconds``, a stream of that many seconds of video with a change every ``switch_every`` s)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="decode")
    loop = asyncio.get_running_loop()
    pb = Playback(args.jitter_buffer)
    c = PlayerClient(url, pb, open_timeout=30.0)
    fields = {k2: v for k2, v in (("width", args.width), ("height", args.height), ("interpolate", args.interpolate))
              if v is not None}
    out: dict = {"session": k}
    sw: list[Switch] = []
    decodes: list[tuple[int, asyncio.Future]] = []
    first = asyncio.Event()
    t0 = time.monotonic()
    await c.connect()
    out["connect_s"] = time.monotonic() - t0
    acker = asyncio.create_task(c.ack_every(ACK_INTERVAL_S))

    async def controller() -> None:
        await first.wait()
        await asyncio.sleep(args.jitter_buffer + args.switch_gap)  # some playback first
        i = 0
        while (seconds is not None or i < switches) and not c.stop_requested:
            s = Switch(f"{PROMPTS[(k + i + 1) % len(PROMPTS)]}, take {k}.{i}", time.monotonic(), c.last_seq)
            sw.append(s)
            pb.last_prompt_at = s.sent
            c.set_prompt(s.prompt)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(s.done.wait(), args.switch_timeout)
            i += 1
            wait = args.switch_gap if seconds is None else switch_every - (time.monotonic() - s.sent)
            await asyncio.sleep(max(0.0, wait))
        c.stop()

    ctl = asyncio.create_task(controller()) if (switches or switch_every) else None
    limit = 120.0 + (seconds or 0.0) * 3 + switches * (args.switch_timeout + args.switch_gap)  # a hung stream fails
    try:
        async with asyncio.timeout(limit):
            await _play(c, k, args, fields, out, sw, decodes, pb, pool, loop, first, t0, ctl, seconds, decode_all)
    finally:
        acker.cancel()
        if ctl is not None:
            ctl.cancel()
        await c.close()
    if ctl is not None and ctl.done() and not ctl.cancelled() and ctl.exception() is not None:
        raise ctl.exception()
    results = dict(zip((seq for seq, _ in decodes),
                       await asyncio.gather(*(f for _, f in decodes), return_exceptions=True)))
    results = list(results.values())  # one per fragment (a new prompt's first one is decoded twice with decode_all)
    pool.shutdown(wait=False)  # every decode is done (gathered)
    st = c.stats()
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    out.update({"switches": [s.row() for s in sw], "end": c.end_reason, "fragments": st.fragments,
                "frames": st.frames, "video_s": round(st.video_s, 3), "dropped": st.dropped, "fps": st.stream_fps,
                "decode_errors": len(errors) + ("decode_error" in out), "decoded_fragments": len(results) - len(errors),
                "decoded_frames": sum(r[1] for r in results if not isinstance(r, BaseException)),
                "stalls_all": pb.stalls, "prompt_skips": len(pb.skips), "prompt_skipped_s": round(sum(pb.skips), 3),
                "lag_s": (c.status.extra.get("lag_s") if c.status is not None else None),
                "errors": [f"{e.code}: {e.message}" for e in c.errors]})
    visible = [x for x in pb.stalls if x["s"] > pb.frame_s]  # shorter than a frame: that frame is late, nothing freezes
    out.update({"stalls": len(visible), "stall_s": round(sum(x["s"] for x in visible), 3),
                "longest_stall_s": max((x["s"] for x in pb.stalls), default=0.0)})
    if errors:
        out["decode_error_samples"] = errors[:3]
    return out


async def _play(c, k, args, fields, out, sw, decodes, pb, pool, loop, first, t0, ctl, seconds, decode_all) -> None:
    """The fragment loop of ``session``: timing, decoding, the playback simulation, new-prompt detection."""
    stream = c.start(f"{PROMPTS[k % len(PROMPTS)]}, take {k}", seed=k, **fields)
    async for frag in stream:
        now = time.monotonic()
        if c.fragments == 1:  # the first fragment
            out["start_to_fragment_s"] = now - t0
            out["start_msg_to_fragment_s"] = c.time_to_first_fragment
            out["fragment"] = {"seq": frag.seq, "frames": frag.frames, "duration": frag.duration,
                               "bytes": len(frag.data)}
            fut = loop.run_in_executor(pool, decode, c.init_segment, frag.data)
            fut.add_done_callback(lambda f, t0=t0: out.update(
                {"start_to_decoded_s": f.result()[0] - t0, "first_decoded_frames": f.result()[1],
                 "decoded_size": f.result()[2]} if not f.exception() else
                {"decode_error": repr(f.exception())}))
            decodes.append((frag.seq, fut))
            pb.frame_s = frag.duration / max(1, frag.frames)
            first.set()
        elif decode_all:
            decodes.append((frag.seq, loop.run_in_executor(pool, decode, c.init_segment, frag.data)))
        pb.receive(frag.pts, frag.duration, now)
        st = c.status
        ps = st.extra.get("prompt_seq") if st is not None else None
        s = sw[-1] if sw else None
        if s is not None and s.seq is None and isinstance(ps, int) and ps > s.last_seq and frag.seq >= ps:
            s.seq, s.received_s = frag.seq, now - s.sent  # the first fragment of the new prompt
            if not args.no_skip:
                s.skipped_s = pb.jump_to(frag.pts, now)
                if s.skipped_s:  # as the player: the server paces by the playhead, so tell it at once
                    c.ack_soon(frag.seq)
            pb.when_shown(frag.pts, lambda t, s=s: setattr(s, "shown_s", t - s.sent))
            fut = loop.run_in_executor(pool, decode, c.init_segment, frag.data)
            fut.add_done_callback(lambda f, s=s: setattr(s, "decoded_s", f.result()[0] - s.sent)
                                  if not f.exception() else None)
            decodes.append((frag.seq, fut))
            s.done.set()
        if ctl is not None and ctl.done() and not ctl.cancelled() and ctl.exception() is not None:
            raise ctl.exception()  # the controller failed: no more switches or stop would come
        if seconds is not None and c.video_s >= seconds and not c.stop_requested:
            c.stop()
    pb.finish(time.monotonic())


# ------------------------------------------------------------------------------ one decoder, all decoders


def med(vals: list) -> dict | None:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


async def bench_decoder(decoder: str, args) -> dict:
    port = args.port or free_port()
    log_path = Path(args.json).with_suffix(f".{decoder}.server.log") if args.json else \
        Path(tempfile.gettempdir()) / f"client_latency.{decoder}.server.log"
    srv = Server(decoder, port, args.smoke, log_path)
    t0 = time.monotonic()
    r: dict = {"decoder": decoder, "server_log": str(log_path)}
    r["cold_engine"] = await srv.start(args.ready_timeout)
    print(f"[{decoder}] server ready: {json.dumps(r['cold_engine'])}", file=sys.stderr, flush=True)
    try:
        runs = []
        for k in range(args.sessions + 1):  # 0: the cold session (the first after warm-up)
            s = await session(srv.url, k, args, switches=args.switches)
            runs.append(s)
            print(f"[{decoder}] session {k}: start->fragment {s.get('start_to_fragment_s', float('nan')):.3f} s, "
                  f"decoded {s.get('start_to_decoded_s', float('nan')):.3f} s, prompt->new fragment "
                  f"{[x['received_s'] and round(x['received_s'], 3) for x in s['switches']]}, stalls {s['stalls']}",
                  file=sys.stderr, flush=True)
        r["sessions"] = runs
        warm = runs[1:]
        r["cold_session"] = {key: runs[0].get(key) for key in ("start_to_fragment_s", "start_to_decoded_s",
                                                                  "start_msg_to_fragment_s")}
        r["cold_session"]["prompt_received_s"] = [x["received_s"] for x in runs[0]["switches"]]
        for key in ("start_to_fragment_s", "start_to_decoded_s", "start_msg_to_fragment_s", "connect_s"):
            r[key] = med([s.get(key) for s in warm])
        for key in ("received_s", "decoded_s", "shown_s", "skipped_s"):
            r["prompt_" + key] = med([x[key] for s in warm for x in s["switches"]])
        r["session_stalls"] = sum(s["stalls"] for s in runs)
        r["prompt_missed"] = sum(1 for s in warm for x in s["switches"] if x["received_s"] is None)
        r["sessions_decodable"] = all(s.get("first_decoded_frames") == s.get("fragment", {}).get("frames") and
                                      not s["decode_errors"] for s in runs)
        if args.seconds > 0:
            sm = await session(srv.url, args.sessions + 1, args, switches=0, seconds=args.seconds,
                               switch_every=args.smooth_switch_every or None, decode_all=True)
            sm["prompt_received_s"] = med([x["received_s"] for x in sm["switches"]])
            sm["prompt_shown_s"] = med([x["shown_s"] for x in sm["switches"]])
            r["smooth"] = sm
            print(f"[{decoder}] smooth stream: {sm['video_s']} s, stalls {sm['stalls']} ({sm['stall_s']} s), "
                  f"prompt skips {sm['prompt_skips']}, dropped {sm['dropped']}, decoded {sm['decoded_frames']}/"
                  f"{sm['frames']} frames", file=sys.stderr, flush=True)
        r["server"] = await server_split(srv.port)
    finally:
        await srv.stop()
        r["server_exit"], r["server_shutdown_s"] = srv.returncode, getattr(srv, "shutdown_s", None)
        r["wall_s"] = time.monotonic() - t0
    return r


async def server_split(port: int) -> dict:
    """The server's own account from its /metrics, over every session of the run: wall ms per
    fragment in the source (engine: generate, decode, RIFE, copy) and in the H.264 encoder, and its
    mean time to first fragment / prompt switch -> first new fragment (the client's figures minus
    the network and the client)."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
    vals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("streamgen_") and "{" not in line:
            name, _, v = line.partition(" ")
            with contextlib.suppress(ValueError):
                vals[name[len("streamgen_"):]] = float(v)
    n = vals.get("fragments_generated_total") or 0
    out = {"fragments": n}
    if n:
        out["generate_ms_per_fragment"] = 1e3 * vals.get("generate_seconds_total", 0) / n
        out["encode_ms_per_fragment"] = 1e3 * vals.get("encode_seconds_total", 0) / n
    for h in ("time_to_first_fragment_seconds", "prompt_switch_seconds"):
        c = vals.get(h + "_count")
        if c:
            out[h.replace("_seconds", "_mean_s")] = vals.get(h + "_sum", 0) / c
    return out


def fmt(m: dict | None, unit: str = "") -> str:
    if not m:
        return "n/a"
    return f"{m['median']:.3f} ({m['min']:.2f}..{m['max']:.2f})"


def table(rows: list[dict], args) -> str:
    lines = [f"client_latency: {'smoke (tiny, CPU)' if args.smoke else 'Wan2.1 1.3B random bf16, 832x480'}; "
             f"{args.sessions} warm sessions x {args.switches} switches (median (min..max)); "
             f"smooth stream {args.seconds:g} s; jitter buffer {args.jitter_buffer:g} s; "
             f"skip on prompt {'off' if args.no_skip else 'on'}",
             "| decoder | build s | warm-up s | cold session start->decoded s | start->fragment s | start->decoded s "
             "| prompt->new fragment received s | ->shown s | smooth: stalls (s) | prompt skips | dropped "
             "| server: generate / encode ms per fragment |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['decoder']} | ERROR: {r['error'][:200]} |")
            continue
        ce, cs, sm, sv = r["cold_engine"], r["cold_session"], r.get("smooth") or {}, r.get("server") or {}
        g = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        missed = f" ({r['prompt_missed']} missed)" if r["prompt_missed"] else ""
        smooth = f"{sm['stalls']} ({sm['stall_s']:.2f}) in {sm['video_s']:.0f} s" if sm else "-"
        lines.append(f"| {r['decoder']} | {g(ce['build_s'])} | {g(ce['warmup_s'])} | {g(cs['start_to_decoded_s'])} | "
                     f"{fmt(r['start_to_fragment_s'])} | {fmt(r['start_to_decoded_s'])} | {fmt(r['prompt_received_s'])}"
                     f"{missed} | {fmt(r['prompt_shown_s'])} | "
                     f"{smooth} | {sm.get('prompt_skips', '-')} | {sm.get('dropped', '-')} | "
                     f"{g(sv.get('generate_ms_per_fragment'))} / {g(sv.get('encode_ms_per_fragment'))} |")
    return "\n".join(lines)


async def amain(args) -> int:
    rows = []
    for d in args.decoders:
        try:
            rows.append(await bench_decoder(d, args))
        except Exception as e:  # noqa: BLE001 - report, go on with the next decoder
            rows.append({"decoder": d, "error": f"{type(e).__name__}: {e}"})
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("sessions", "smooth")}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(table(rows, args), flush=True)
    return 0 if all("error" not in r for r in rows) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decoder", action="append", default=None, metavar="wan|taehv[+compile][+graphs][+fp8]",
                    help="decoder(s), repeatable or a comma list; each in its own server process (default wan,taehv); "
                         "+compile / +graphs / +fp8: the DiT as `serve --compile` / `--cuda-graphs` / `--quant fp8`")
    ap.add_argument("--sessions", type=int, default=None, help="warm sessions after the cold one (default 4; smoke 2)")
    ap.add_argument("--switches", type=int, default=None, help="prompt changes per session (default 3; smoke 2)")
    ap.add_argument("--switch-gap", type=float, default=1.0,
                    help="seconds of playback before the first change and after each new prompt arrives (default 1)")
    ap.add_argument("--switch-timeout", type=float, default=15.0, help="give up on a change's new fragment after this")
    ap.add_argument("--seconds", type=float, default=None,
                    help="seconds of video of the smoothness stream (default 60; smoke 6; 0: none)")
    ap.add_argument("--smooth-switch-every", type=float, default=10.0,
                    help="a prompt change every this many seconds in the smoothness stream (0: none)")
    ap.add_argument("--jitter-buffer", type=float, default=0.3,
                    help="seconds after the first fragment before the simulated playhead starts (default 0.3)")
    ap.add_argument("--no-skip", action="store_true", help="play the old prompt's buffered tail out (player's skip=0)")
    ap.add_argument("--width", type=int, default=None, help="start.width (default: the server's, 832; smoke 128)")
    ap.add_argument("--height", type=int, default=None, help="start.height (default: the server's, 480)")
    ap.add_argument("--interpolate", type=int, choices=(1, 2, 4), default=None,
                    help="start.interpolate (default: none sent, as the player: 1)")
    ap.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    ap.add_argument("--ready-timeout", type=float, default=600.0, help="seconds for model build + warm-up")
    ap.add_argument("--json", default=None, metavar="PATH", help="write everything here (server logs beside it)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny configs on the CPU (checks the script, times nothing real)")
    ap.add_argument("--_serve", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._serve:
        return serve_child(args._serve, args.port, args.smoke)
    args.decoders = [d.strip() for item in (args.decoder or ["wan,taehv"]) for d in item.split(",") if d.strip()]
    bad = [d for d in args.decoders if d.split("+")[0] not in ("wan", "taehv")
           or not set(d.split("+")[1:]) <= {"compile", "graphs", "fp8"}]
    if bad:
        ap.error(f"--decoder {bad[0]}: allowed: wan or taehv, each with +compile, +graphs, +fp8")
    for key, full, smoke in (("sessions", 4, 2), ("switches", 3, 2), ("seconds", 60.0, 6.0)):
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else full)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    raise SystemExit(main())
