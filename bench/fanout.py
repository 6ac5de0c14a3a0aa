"""Front-end fan-out: fragments/s one aiohttp server process delivers, and its CPU per fragment (CPU, loopback).

Starts one server process (the real app: ``server.app.build_app`` with the test pattern, 320x192 at
16 fps, 8 frames a chunk: one fragment every 0.5 s per session) pinned to CPU 0, with the viewer caps
raised (``max_connections``, ``max_viewers_per_session``: the bench sets them, serve has no options for
them). The driver (this process, pinned to CPU 1) opens ``--sessions`` sessions, each with one real-time
viewer that acks a wall-clock playhead (so the session is paced at real time), then attaches
``V - 1`` more viewers to each session (they read and count, never ack). For each V it measures,
over ``--seconds``:

- delivered fragments/s (all viewers) and MB/s;
- the server's CPU (utime + stime from /proc/PID/stat) as a fraction of one core;
- fragments per server CPU-second (= what one core would deliver at 100%), and the marginal CPU per
  extra delivered fragment against the V=1 run (which holds the encoding of the sessions);
- the real-time viewers' rate (1 = real time) and how many viewers got < 90% of the fragments due.

    PYTHONPATH=. python bench/fanout.py                       # the figures in bench/BENCHMARKS.md
    PYTHONPATH=. python bench/fanout.py --sessions 4 --viewers 1,50,200 --seconds 10 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request

CHUNK_S = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and cpu < os.cpu_count():
        os.sched_setaffinity(0, {cpu})


def serve(port: int, sessions: int) -> None:
    """The server process: the real app, viewer caps raised, on one core."""
    from concurrent.futures import ThreadPoolExecutor

    from aiohttp import web

    from streamgen.server.app import build_app
    from streamgen.server.sources import TestPatternFactory
    from streamgen.server.state import ServerConfig

    pin(0)
    cfg = ServerConfig(max_sessions=2 * sessions, max_sessions_per_client=2 * sessions, max_connections=20000,
                       max_viewers_per_session=20000, encode_threads=2, grace_s=0.5)
    ex = ThreadPoolExecutor(max_workers=cfg.encode_threads, thread_name_prefix="encode")
    app = build_app(cfg, TestPatternFactory(width=320, height=192, fps=16, executor=ex), executor=ex)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def run_level(url: str, pid: int, sessions: int, viewers: int, seconds: float) -> dict:
    import websockets

    from streamgen import protocol as P

    counts: list[int] = []
    sizes: list[int] = []
    stop = asyncio.Event()
    conns = []

    async def primary(k: int, ready: asyncio.Future):
        ws = await websockets.connect(url, max_size=None, close_timeout=0.2)
        conns.append(ws)
        await ws.send(P.encode(P.Start(prompt=f"fanout {k}")))
        t0, times = None, []
        while not stop.is_set():
            try:
                m = P.decode(await asyncio.wait_for(ws.recv(), 1.0), "server")
            except asyncio.TimeoutError:
                continue
            if isinstance(m, P.Ready) and not ready.done():
                ready.set_result(m.session)
            if isinstance(m, P.Error) and not ready.done():
                ready.set_exception(RuntimeError(f"start refused: {m.code}: {m.message}"))
            if isinstance(m, P.Fragment):
                now = time.monotonic()
                t0 = t0 or now
                times.append(now)
                sizes.append(len(m.data))
                await ws.send(P.encode(P.Ack(seq=m.seq, playhead=now - t0)))
        return times

    async def passive(session: str, i: int):
        ws = await websockets.connect(url, max_size=None, close_timeout=0.2)
        conns.append(ws)
        await ws.send(P.encode(P.Attach(session=session, from_seq=0)))
        while not stop.is_set():
            try:
                raw = await asyncio.wait_for(ws.recv(), 1.0)
            except asyncio.TimeoutError:
                continue
            counts[i] += len(raw) > 1000  # a fragment message (control messages are small)

    readies = [asyncio.get_running_loop().create_future() for _ in range(sessions)]
    prim = [asyncio.create_task(primary(k, readies[k])) for k in range(sessions)]
    ids = await asyncio.gather(*readies)
    pas = []
    for k, sid in enumerate(ids):
        for _ in range(viewers - 1):
            counts.append(0)
            pas.append(asyncio.create_task(passive(sid, len(counts) - 1)))
            if len(pas) % 50 == 0:
                await asyncio.sleep(0.05)
    await asyncio.sleep(2.0)  # every viewer attached and caught up
    sizes.clear()
    c0, before, t0 = cpu_s(pid), list(counts), time.monotonic()
    prim_start = t0
    await asyncio.sleep(seconds)
    c1, after, t1 = cpu_s(pid), list(counts), time.monotonic()
    n0, n1 = sum(before), sum(after)
    stop.set()
    times = await asyncio.gather(*prim)
    await asyncio.gather(*pas, return_exceptions=True)
    for ws in conns:
        await ws.close()
    wall = t1 - t0
    prim_frags = sum(sum(1 for x in ts if prim_start <= x <= prim_start + seconds) for ts in times)
    delivered = (n1 - n0) + prim_frags
    due = seconds / CHUNK_S
    rates = []
    for ts in times:
        w = [x for x in ts if prim_start <= x <= prim_start + seconds]
        rates.append((len(w) - 1) * CHUNK_S / (w[-1] - w[0]) if len(w) > 2 else 0.0)
    short = sum(1 for a, b in zip(before, after) if b - a < 0.9 * due)
    cpu = c1 - c0
    mean_size = sum(sizes) / max(1, len(sizes))
    return {"sessions": sessions, "viewers_per_session": viewers, "connections": sessions * viewers,
            "delivered_per_s": delivered / wall, "MB_per_s": delivered * mean_size / wall / 1e6,
            "fragment_kB": mean_size / 1e3, "server_cpu_frac": cpu / wall,
            "fragments_per_cpu_s": delivered / cpu if cpu > 0 else float("inf"),
            "realtime_rate_min": min(rates), "passive_short_of_90pct": short, "due_per_viewer": due, "cpu_s": cpu, "delivered": delivered,
            "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--viewers", default="1,25,100,200", help="viewers per session, comma-separated")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.sessions)
        return 0
    levels = [int(v) for v in args.viewers.split(",")]
    if any(v < 1 for v in levels):
        ap.error("--viewers: each level must be >= 1")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--sessions", str(args.sessions)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("the server did not start")
                time.sleep(0.05)
        pin(1)
        url = f"ws://127.0.0.1:{port}/v1/stream"
        results = []
        for v in levels:
            r = asyncio.run(run_level(url, proc.pid, args.sessions, v, args.seconds))
            results.append(r)
            base = results[0]
            extra = r["delivered"] / r["wall_s"] - base["delivered"] / base["wall_s"]
            r["marginal_cpu_ms_per_fragment"] = (
                1e3 * (r["server_cpu_frac"] - base["server_cpu_frac"]) / extra if extra > 0 else None)
            print(json.dumps({k: round(x, 4) if isinstance(x, float) else x for k, x in r.items()}), flush=True)
            time.sleep(1.5)  # the level's sessions end (grace 0.5 s) before the next opens
    finally:
        proc.terminate()
        proc.wait(10)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                       "python": platform.python_version(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
