"""Generation speed through `streamgen serve`: one session, encode included, per frame size.

Starts ``python -m streamgen serve`` (the default model unless --serve-args names another) on a
free loopback port, or uses a running server (--url). For each size it opens one session with
streamgen.client.StreamClient, lets it warm up, then samples the server's /metrics every
--window seconds for --seconds: generated frames/s = delta frames_generated_total / delta wall
time (the engine's busy thread and the encoder both run inside that time, on the same cores),
plus the share of generate / encode seconds and the session's status.gen_fps. Reports the
median (and min/max) of the windows.

Windows in which other processes used more than --max-other-cores are discarded (a shared
machine); the columns say how many cores the server and the others used.

The server is started unpaced (--max-lead 0) by default, so the figure is what the machine can
generate, not the viewer's real-time rate; pass --serve-args "" for the server's own pacing.

    python bench/serve_cpu.py                                   # 128x128, 192x192, 256x256
    python bench/serve_cpu.py --sizes 128x128 --seconds 60 --json out.json
    python bench/serve_cpu.py --url http://127.0.0.1:8765       # a server already running
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from streamgen.client import StreamClient  # noqa: E402
from test_toy_browser import free_port, streamgen_serve  # noqa: E402

METRICS = ("frames_generated_total", "generate_seconds_total", "encode_seconds_total", "fragments_generated_total")
PROMPT = "a red ball moving right on a black background"


TICK = os.sysconf("SC_CLK_TCK")


def cpu_busy_s() -> float:
    """CPU seconds all processes on this machine have used (busy jiffies of /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / TICK  # minus idle, iowait


def proc_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system, all threads) of these processes."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK
        except (OSError, IndexError):
            pass
    return total


def read_metrics(base: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    out = {}
    for name in METRICS:
        m = re.search(rf"^streamgen_{name} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


@contextlib.contextmanager
def serve(extra: list[str], nice: int = 0):
    """``python -m streamgen serve --port P`` + extra (the tests' launcher); yields (base URL, pid)
    once /healthz answers."""
    port = free_port()
    prefix = ("nice", "-n", str(nice)) if nice else ()
    with streamgen_serve(port, *extra, prefix=prefix, timeout=120) as (proc, _):
        print(f"server: {' '.join(shlex.quote(c) for c in proc.args)}", file=sys.stderr)
        yield f"http://127.0.0.1:{port}", proc.pid


async def measure(base: str, width: int, height: int, *, warmup: float, seconds: float, window: float,
                  prompt: str, seed: int, pids: list[int], max_other: float, max_seconds: float) -> dict:
    """Windows of ``window`` s until ``seconds`` of them had at most ``max_other`` cores used by other
    processes (this machine may be shared), or ``max_seconds`` passed; the median is over those."""
    samples, gen_fps = [], []
    mine = [*pids, os.getpid()]
    async with StreamClient(base) as c:
        it = c.start(prompt, width=width, height=height, seed=seed)
        first = asyncio.get_running_loop().create_future()

        ended: list[BaseException | None] = []

        async def consume():
            try:
                async for _ in it:
                    if not first.done():
                        first.set_result(time.monotonic())
                ended.append(None)
            except Exception as e:
                ended.append(e)
                if not first.done():
                    first.set_exception(e)

        task = asyncio.create_task(consume())
        try:
            t_start = time.monotonic()
            await asyncio.wait_for(asyncio.shield(first), 120)
            ttff = first.result() - t_start
            await asyncio.sleep(warmup)
            prev, t_prev, busy_prev, mine_prev = read_metrics(base), time.monotonic(), cpu_busy_s(), proc_cpu_s(mine)
            t_end = t_prev + max_seconds
            clean = lambda: [x for x in samples if x["other_cores"] <= max_other]  # noqa: E731
            while len(clean()) * window < seconds and time.monotonic() < t_end:
                await asyncio.sleep(window)
                cur, t, busy, own = read_metrics(base), time.monotonic(), cpu_busy_s(), proc_cpu_s(mine)
                d = {k: cur[k] - prev[k] for k in METRICS}
                dt = t - t_prev
                samples.append({"fps": d["frames_generated_total"] / dt, "frames": d["frames_generated_total"],
                                "wall_s": dt, "generate_s": d["generate_seconds_total"],
                                "encode_s": d["encode_seconds_total"], "own_cores": (own - mine_prev) / dt,
                                "other_cores": max(0.0, (busy - busy_prev) - (own - mine_prev)) / dt})
                if c.status is not None and c.status.gen_fps:
                    gen_fps.append(c.status.gen_fps)
                prev, t_prev, busy_prev, mine_prev = cur, t, busy, own
                if ended:
                    break
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if ended or not samples:
        raise RuntimeError(f"{width}x{height}: the stream ended early: {c.end_reason} {c.errors}")
    used = clean() or samples
    fps = [s["fps"] for s in used]
    frames = sum(s["frames"] for s in used)
    return {"size": f"{width}x{height}", "first_fragment_s": round(ttff, 2),
            "fps_median": round(statistics.median(fps), 2), "fps_min": round(min(fps), 2),
            "fps_max": round(max(fps), 2), "windows": len(fps), "window_s": window,
            "measured_s": round(sum(s["wall_s"] for s in used), 1), "frames": int(frames),
            "encode_ms_per_frame": round(1000 * sum(s["encode_s"] for s in used) / max(frames, 1), 2),
            "server_cores_median": round(statistics.median(s["own_cores"] for s in used), 2),
            "other_cores_max": round(max(s["other_cores"] for s in used), 2),
            "windows_discarded": len(samples) - len(used) if used is not samples else 0,
            "clean": used is not samples,
            "status_gen_fps_median": round(statistics.median(gen_fps), 2) if gen_fps else None,
            "fps_windows": [round(x, 2) for x in fps],
            "all_windows": [(round(s["fps"], 2), round(s["other_cores"], 2)) for s in samples]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (http://host:port); default: start `python -m streamgen serve`")
    ap.add_argument("--serve-args", default="--max-lead 0",
                    help="extra `streamgen serve` arguments (default: '--max-lead 0', unpaced)")
    ap.add_argument("--sizes", default="128x128,192x192,256x256", help="comma-separated WxH")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds streamed before sampling")
    ap.add_argument("--seconds", type=float, default=30.0, help="seconds sampled per size")
    ap.add_argument("--window", type=float, default=5.0, help="seconds per sample")
    ap.add_argument("--max-other-cores", type=float, default=0.15,
                    help="a window counts only when other processes used at most this many cores "
                         "(needs the server started here; default 0.15)")
    ap.add_argument("--max-seconds", type=float, default=300.0,
                    help="give up waiting for clean windows after this long per size (then all windows count)")
    ap.add_argument("--nice", type=int, default=0,
                    help="start the server under `nice -n N` (negative, as root: ahead of other work on a "
                         "shared machine; say so with the numbers)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]

    import signal

    import torch

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out

    machine = f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"

    async def run_all(base, pids):
        out = []
        for w, h in sizes:
            r = await measure(base, w, h, warmup=args.warmup, seconds=args.seconds, window=args.window,
                              prompt=args.prompt, seed=args.seed, pids=pids,
                              max_other=args.max_other_cores if pids else float("inf"), max_seconds=args.max_seconds)
            print(json.dumps(r), file=sys.stderr)
            out.append(r)
        return out

    with contextlib.ExitStack() as stack:
        base, pid = (args.url.rstrip("/"), None) if args.url else stack.enter_context(
            serve(shlex.split(args.serve_args), args.nice))
        results = asyncio.run(run_all(base, [pid] if pid else []))
    print(f"machine: {machine}")
    print(f"{'size':>9} {'gen fps (median)':>17} {'min..max':>13} {'windows':>8} {'encode ms/frame':>16} "
          f"{'status.gen_fps':>15} {'server cores':>13} {'others max':>11} {'first fragment s':>17}")
    for r in results:
        print(f"{r['size']:>9} {r['fps_median']:>17.2f} {r['fps_min']:>6.2f}..{r['fps_max']:<6.2f} {r['windows']:>8} "
              f"{r['encode_ms_per_frame']:>16.2f} {str(r['status_gen_fps_median']):>15} "
              f"{r['server_cores_median']:>13.2f} {r['other_cores_max']:>11.2f} {r['first_fragment_s']:>17.2f}"
              + ("" if r["clean"] else "  (no clean windows: machine busy)"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "serve_args": args.serve_args, "nice": args.nice, "url": args.url,
                       "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
