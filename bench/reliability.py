"""Reliability figures of `streamgen serve` under hostile and unlucky clients (CPU, loopback).

Starts ``python -m streamgen serve --model testpattern`` (320x192 at 16 fps, 8 frames a chunk: one
fragment every 0.5 s) on a free loopback port and measures, from this process:

- RSS per idle connection: the server's VmRSS after N open, idle WebSockets, minus before, / N;
- RSS per stuck reader: K connections (4 KiB receive buffer) that each start a session and never
  read, after ``--seconds``; and per stuck second viewer of one session;
- RSS per stalled message: connections that send 8 MiB of a fragmented message and stall (they
  answer pings), and the time until the server cuts them off (message_timeout_s, 20 s);
- the slowdown of a normal viewer (real-time, wall-clock acks) under each attack: prompt flood,
  stuck readers, connect/disconnect churn, fuzzed frames: its fragment rate against real time and
  its p99 / largest gap between fragments, the median over ``--samples`` runs of ``--seconds``;
- the time to free a slot after a disconnect, on a server of one slot (--max-sessions 1,
  --grace G): from the disconnect to the first `start` of another client that gets `ready`, for
  a session dropped right after `start` (its `ready` never went out), one dropped 0.2 s after
  `start` unread (`ready` was written: the server cannot tell, so it waits the grace), one that
  was stopped, and a live one (after the grace).

    python bench/reliability.py                          # the figures in bench/BENCHMARKS.md
    python bench/reliability.py --samples 5 --seconds 10 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import msgpack
import websockets

from streamgen import protocol as P

CHUNK_S = 0.5  # the served test pattern: 8 frames at 16 fps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *extra: str):
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/v1/stream"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamgen", "serve", "--model", "testpattern", "--port", str(self.port),
             "--max-sessions", "64", "--max-sessions-per-client", "64", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1).read()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("the server did not start")
                time.sleep(0.05)
        raise RuntimeError("the server did not answer")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def connect(url: str, *, tiny: bool = False, port: int | None = None):
    if tiny:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        return await websockets.connect(url, sock=s, max_queue=1, max_size=None, close_timeout=0.2)
    return await websockets.connect(url, max_size=None, close_timeout=0.2)


async def until(ws, cls, timeout: float = 20.0):
    while True:
        m = P.decode(await asyncio.wait_for(ws.recv(), timeout), "server")
        if isinstance(m, cls):
            return m
        if isinstance(m, P.Error) and cls is not P.Error and m.fatal:
            raise RuntimeError(m.message)


# ---------------------------------------------------------------------------------------- viewer


async def normal_viewer(url: str, seconds: float) -> dict:
    """A real-time viewer (acks a wall-clock playhead): its fragment rate vs real time, and gaps."""
    ws = await connect(url)
    await ws.send(P.encode(P.Start(prompt="normal viewer")))
    times, t0, seqs = [], None, []
    t_end = time.monotonic() + seconds
    try:
        while time.monotonic() < t_end:
            try:
                m = P.decode(await asyncio.wait_for(ws.recv(), max(0.01, t_end - time.monotonic())), "server")
            except asyncio.TimeoutError:
                break
            if isinstance(m, P.Fragment):
                now = time.monotonic()
                t0 = t0 or now
                times.append(now)
                seqs.append(m.seq)
                await ws.send(P.encode(P.Ack(seq=m.seq, playhead=now - t0)))
    finally:
        await ws.close()
    steady = times[3:]  # after the first lead's burst
    gaps = sorted(b - a for a, b in zip(steady, steady[1:]))
    return {"rate": (len(steady) - 1) * CHUNK_S / (steady[-1] - steady[0]),
            "p99_gap_s": gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], "max_gap_s": gaps[-1],
            "in_order": seqs == list(range(len(seqs)))}


# ---------------------------------------------------------------------------------------- attacks


async def attack_prompt_flood(srv: Server, stop: asyncio.Event) -> None:
    ws = await connect(srv.url)
    await ws.send(P.encode(P.Start(prompt="flood")))
    await until(ws, P.Fragment)

    async def drain():
        async for _ in ws:
            pass

    reader = asyncio.create_task(drain())
    i = 0
    while not stop.is_set():
        await ws.send(P.encode(P.Prompt(prompt=f"prompt {i} " + "x" * 4000)))
        i += 1
        if i % 50 == 0:
            await asyncio.sleep(0)
    reader.cancel()
    await ws.close()


async def attack_stuck(srv: Server, stop: asyncio.Event, n: int = 16) -> None:
    conns = []
    for i in range(n):
        ws = await connect(srv.url, tiny=True, port=srv.port)
        await ws.send(P.encode(P.Start(prompt=f"stuck {i}")))
        conns.append(ws)
    await stop.wait()
    for ws in conns:
        ws.transport.abort()


async def attack_churn(srv: Server, stop: asyncio.Event) -> None:
    async def one(k0: int):
        k = k0
        while not stop.is_set():
            ws = await connect(srv.url)
            if k % 3 == 0:
                await ws.send(P.encode(P.Start(prompt=f"churn {k}")))
                ws.transport.abort()
            elif k % 3 == 1:
                await ws.send(P.encode(P.Start(prompt=f"churn {k}")))
                await until(ws, P.Fragment)
                await ws.send(P.encode(P.Stop()))
                await until(ws, P.End)
                await ws.close()
            else:
                await ws.close()
            k += 2

    await asyncio.gather(one(0), one(1))


def fuzz_frame(rng: random.Random) -> bytes | str:
    k = rng.randrange(7)
    if k == 0:
        return rng.randbytes(rng.randrange(1, 80))
    if k == 1:
        return "text frame " * rng.randrange(1, 9)
    if k == 2:
        return msgpack.packb({"type": rng.choice(["start", "ack", "attach", "launch", 7]), "prompt": rng.randrange(9),
                              "seq": "x", "width": 17, "session": "../x"})
    if k == 3:
        return msgpack.packb({"type": "start", "prompt": "z" * rng.choice([4097, 100_000])})
    if k == 4:
        return P.encode(rng.choice([P.Prompt(prompt="early"), P.Ack(seq=3, playhead=1e12), P.Stop(), P.Pause()]))
    if k == 5:
        return msgpack.packb([rng.random() for _ in range(rng.randrange(9))])
    return b"\x91" * 3000 + b"\xc0"


async def attack_fuzz(srv: Server, stop: asyncio.Event, n: int = 4) -> None:
    async def one(seed: int):
        rng = random.Random(seed)
        ws = await connect(srv.url)
        while not stop.is_set():
            batch = rng.randrange(1, 30)
            for _ in range(batch):
                await ws.send(fuzz_frame(rng))
            for _ in range(batch):
                await until(ws, P.Error)
        await ws.close()

    await asyncio.gather(*(one(i) for i in range(n)))


ATTACKS = {"none": None, "prompt flood": attack_prompt_flood, "16 stuck readers": attack_stuck,
           "churn (2 loops)": attack_churn, "fuzz (4 connections)": attack_fuzz}


async def slowdown(srv: Server, name: str, seconds: float) -> dict:
    stop = asyncio.Event()
    attack = ATTACKS[name]
    task = asyncio.create_task(attack(srv, stop)) if attack else None
    await asyncio.sleep(0.5)
    try:
        r = await normal_viewer(srv.url, seconds)
    finally:
        stop.set()
        if task is not None:
            await asyncio.wait_for(task, 20)
    await asyncio.sleep(1.0)  # let the server settle before the next run
    return r


# ---------------------------------------------------------------------------------------- memory


async def rss_idle(srv: Server, n: int) -> float:
    await asyncio.sleep(0.5)
    r0 = srv.rss_mib()
    conns = [await connect(srv.url) for _ in range(n)]
    await asyncio.sleep(1.0)
    per = (srv.rss_mib() - r0) * 1024 / n
    for ws in conns:
        await ws.close()
    return per  # KiB


async def rss_stuck(srv: Server, n: int, seconds: float) -> tuple[float, float]:
    """(MiB per stuck reader with its own session, MiB per stuck second viewer)"""
    await asyncio.sleep(0.5)
    r0 = srv.rss_mib()
    stop = asyncio.Event()
    task = asyncio.create_task(attack_stuck(srv, stop, n))
    await asyncio.sleep(seconds)
    per_reader = (srv.rss_mib() - r0) / n
    stop.set()
    await task
    await asyncio.sleep(1.0)
    owner = await connect(srv.url)
    await owner.send(P.encode(P.Start(prompt="owner")))
    ready = await until(owner, P.Ready)

    async def drain():
        async for _ in owner:
            pass

    reader = asyncio.create_task(drain())
    await asyncio.sleep(1.0)
    r1 = srv.rss_mib()
    viewers = []
    for _ in range(7):  # the viewer cap is 8 per session
        ws = await connect(srv.url, tiny=True, port=srv.port)
        await ws.send(P.encode(P.Attach(session=ready.session, from_seq=0)))
        viewers.append(ws)
    await asyncio.sleep(seconds)
    per_viewer = (srv.rss_mib() - r1) / len(viewers)
    for ws in viewers:
        ws.transport.abort()
    reader.cancel()
    await owner.close()
    return per_reader, per_viewer


async def rss_stalled_messages(srv: Server, n: int) -> tuple[float, float, float]:
    """(MiB per stalled 8 MiB message, seconds until cut off, MiB still held after the cut-off)"""
    await asyncio.sleep(0.5)
    r0 = srv.rss_mib()
    forever = asyncio.Event()

    async def fragments():
        yield b"\x00" * (8 << 20)
        await forever.wait()

    conns = [await connect(srv.url) for _ in range(n)]
    sends = [asyncio.create_task(ws.send(fragments())) for ws in conns]
    t0 = time.monotonic()
    await asyncio.sleep(3.0)
    per = (srv.rss_mib() - r0) / n

    async def closed(ws):
        try:
            async for _ in ws:
                pass
        except websockets.ConnectionClosed:
            pass
        return time.monotonic()

    ends = await asyncio.wait_for(asyncio.gather(*(closed(ws) for ws in conns)), 60)
    forever.set()
    for s in sends:
        s.cancel()
    await asyncio.sleep(1.0)
    return per, statistics.median(ends) - t0, srv.rss_mib() - r0


# ---------------------------------------------------------------------------------------- slots


async def slot_free_time(srv: Server, how: str) -> float:
    """Seconds from a disconnect until another client's start gets `ready` on a one-slot server."""
    ws = await connect(srv.url)
    while True:  # the slot of the last run's user may still be on its way back
        await ws.send(P.encode(P.Start(prompt=f"holder {how}")))
        if how in ("unreachable", "unread"):
            break
        if isinstance(await until(ws, (P.Ready, P.Error)), P.Ready):
            break
        await asyncio.sleep(0.05)
    if how == "unreachable":  # dropped right after `start`: its `ready` never went out
        ws.transport.abort()
    elif how == "unread":  # dropped 0.2 s after `start` without reading: `ready` was written to the
        await asyncio.sleep(0.2)  # socket, the server cannot tell it was not read: kept for the grace
        ws.transport.abort()
    elif how == "stopped":
        await until(ws, P.Fragment)
        await ws.send(P.encode(P.Stop()))
        await until(ws, P.End)
        await ws.close()
    else:  # live: a viewer that read fragments and dropped
        await until(ws, P.Fragment)
        ws.transport.abort()
    t0 = time.monotonic()
    other = await connect(srv.url)
    while True:
        await other.send(P.encode(P.Start(prompt="next user")))
        m = await until(other, (P.Ready, P.Error))
        if isinstance(m, P.Ready):
            took = time.monotonic() - t0
            break
        assert m.code == "busy", m
        await asyncio.sleep(0.01)
    await other.send(P.encode(P.Stop()))
    await until(other, P.End)
    await other.close()
    await asyncio.sleep(0.3)
    return took


# ---------------------------------------------------------------------------------------- main


def med(xs):
    return statistics.median(xs)


async def main_async(args) -> dict:
    out: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()}-core {platform.processor() or platform.machine()}",
                 "python": platform.python_version(), "samples": args.samples, "seconds": args.seconds}
    srv = Server()
    try:
        out["rss_idle_kib"] = med([await rss_idle(srv, args.idle) for _ in range(args.samples)])
        stuck = [await rss_stuck(srv, args.stuck, args.seconds) for _ in range(args.samples)]
        out["rss_stuck_reader_mib"] = med([s[0] for s in stuck])
        out["rss_stuck_viewer_mib"] = med([s[1] for s in stuck])
        stalled = [await rss_stalled_messages(srv, args.stalled) for _ in range(max(1, args.samples // 2))]
        out["rss_stalled_message_mib"] = med([s[0] for s in stalled])
        out["stalled_cut_off_s"] = med([s[1] for s in stalled])
        out["rss_after_cut_off_mib"] = med([s[2] for s in stalled])
        out["slowdown"] = {}
        for name in ATTACKS:
            runs = [await slowdown(srv, name, args.seconds) for _ in range(args.samples)]
            out["slowdown"][name] = {k: med([r[k] for r in runs]) for k in ("rate", "p99_gap_s", "max_gap_s")}
            out["slowdown"][name]["in_order"] = all(r["in_order"] for r in runs)
            print(name, out["slowdown"][name], flush=True)
        out["rss_server_end_mib"] = srv.rss_mib()
    finally:
        srv.close()
    one = Server("--max-sessions", "1", "--max-sessions-per-client", "1", "--grace", str(args.grace))
    try:
        out["grace_s"] = args.grace
        out["slot_free_s"] = {how: med([await slot_free_time(one, how) for _ in range(args.samples)])
                              for how in ("unreachable", "unread", "stopped", "live")}
    finally:
        one.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each viewer run / stuck phase")
    ap.add_argument("--idle", type=int, default=200, help="idle connections (the server's cap is 256)")
    ap.add_argument("--stuck", type=int, default=16)
    ap.add_argument("--stalled", type=int, default=8)
    ap.add_argument("--grace", type=float, default=2.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = asyncio.run(main_async(args))
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
