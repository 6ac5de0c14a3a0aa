"""Interactive latency in the real browser player against a real `streamgen serve` (default model).

Starts ``python -m streamgen serve --port P`` (plus --serve-args) and headless Chromium (the CDP
helpers of tests/test_browser.py), then for each of --starts streams: types a prompt and presses
Start, waits for playback, and types --switches prompt changes (+ Enter) while it plays,
alternating colours of the toy's vocabulary. Per start it records the player's own stats
(window.streamgenPlayer.stats): firstFrameS (Start -> first frame shown) and promptLatencyS
(prompt sent -> first frame of a fragment made after it shown; 'server' when the server said
which fragment that is, 'estimate' otherwise), and, measured here, the wall time from the Enter
key to the first polled frame whose object has the new colour (streamgen.training.toy_data's
analysis of the pixels read back from the page; polled every ~50 ms). Medians over all samples.

    python bench/browser_latency.py                          # both paths, 4 starts x 3 switches
    python bench/browser_latency.py --serve-args "--max-lead 0.75" --paths webcodecs
    python bench/browser_latency.py --starts 1 --switches 12 --settle 10     # a 2-minute stream per path

Each page is left ``--idle`` seconds (2) after it loads before the prompt is typed, as a user
reads it first; the player's stats.startLog splits the first frame's wait (socket open, ready,
init, first fragment, first frame shown).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from test_browser import CHROMIUM, chromium_tab  # noqa: E402
from test_player import open_page, type_into_prompt, until  # noqa: E402
from test_toy_browser import free_port, shown_frame, streamgen_serve  # noqa: E402

COLOURS = ["red", "blue", "green", "yellow", "purple", "cyan"]


def prompt(colour: str) -> str:
    return f"a {colour} ball moving right on a black background"


async def one_start(cdp, session, port: int, path: str, seed: int, switches: int, settle: float,
                    idle: float = 0.0) -> dict:
    await open_page(cdp, session, f"http://127.0.0.1:{port}/?path={path}&seed={seed}")
    await asyncio.sleep(idle)  # a user reads the page and types a prompt before pressing Start
    first = COLOURS[seed % len(COLOURS)]
    await cdp.eval(session, "document.getElementById('prompt').focus()")
    await cdp.call("Input.insertText", {"text": prompt(first)}, session)
    await cdp.eval(session, "document.getElementById('start').click()")
    s = await until(cdp, session, lambda s: s["firstFrameS"] is not None and s["state"] == "playing",
                    "the first frame", timeout=30)
    out = {"path": s["path"], "seed": seed, "first_frame_s": s["firstFrameS"], "start_log": s.get("startLog"),
           "prompt_latency_s": [],
           "method": [], "colour_visible_s": []}
    await asyncio.sleep(settle)
    colour = first
    for k in range(switches):
        colour = COLOURS[(COLOURS.index(colour) + 1 + k % 2) % len(COLOURS)]
        n = len((await cdp.eval(session, "window.streamgenPlayer.stats.promptLatencies")))
        await type_into_prompt(cdp, session, prompt(colour))
        t0 = time.monotonic()
        seen = None
        while time.monotonic() - t0 < 15:
            a, _ = await shown_frame(cdp, session)
            if a["colour"] == colour:
                seen = time.monotonic() - t0
                break
            await asyncio.sleep(0.05)
        s = await until(cdp, session, lambda s: len(s["promptLatencies"]) > n, "the prompt latency", timeout=15)
        if s["promptLatencyMethod"] == "estimate":  # the server may still name a later fragment (the player revises)
            try:
                s = await until(cdp, session, lambda s: s["promptLatencyMethod"] == "server", "a revision", timeout=2)
            except AssertionError:
                pass
        out["prompt_latency_s"].append(s["promptLatencyS"])
        out["method"].append(s["promptLatencyMethod"])
        out["colour_visible_s"].append(seen)
        await asyncio.sleep(settle)
    s = await until(cdp, session, lambda s: True, "stats")
    out.update(stalls=s["stalls"], stall_log=s.get("stallLog"), dropped_frames=s["droppedFrames"], gaps=s["gaps"], buffered_s=s["bufferedS"],
               lead_s=s.get("leadS"))
    await cdp.eval(session, "document.getElementById('stop').click()")
    await until(cdp, session, lambda s: s["state"] in ("ended", "error"), "the stream to end", allow_error=True)
    return out


def med(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 2) if xs else None


async def run(args) -> dict:
    port = free_port()
    extra = shlex.split(args.serve_args)
    results = {}
    with streamgen_serve(port, *extra) as (_, health):
        async with chromium_tab() as (cdp, session):
            for path in args.paths.split(","):
                rows = []
                for i in range(args.starts):
                    r = await one_start(cdp, session, port, path, i, args.switches, args.settle, args.idle)
                    print(json.dumps(r), file=sys.stderr)
                    rows.append(r)
                flat = lambda k: [x for r in rows for x in r[k]]  # noqa: E731
                results[path] = {
                    "shown_path": rows[0]["path"], "starts": len(rows), "switches": len(flat("prompt_latency_s")),
                    "first_frame_s_median": med([r["first_frame_s"] for r in rows]),
                    "first_frame_s": [round(r["first_frame_s"], 2) for r in rows],
                    "prompt_latency_s_median": med(flat("prompt_latency_s")),
                    "prompt_latency_s": [round(x, 2) for x in flat("prompt_latency_s")],
                    "methods": sorted(set(flat("method"))),
                    "colour_visible_s_median": med(flat("colour_visible_s")),
                    "colour_visible_s": [None if x is None else round(x, 2) for x in flat("colour_visible_s")],
                    "stalls": [r["stalls"] for r in rows], "stall_logs": [r["stall_log"] for r in rows],
                    "gaps": [r["gaps"] for r in rows]}
    return {"serve": f"python -m streamgen serve --port P {args.serve_args}".strip(), "health": json.loads(health),
            "results": results}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve-args", default="", help="extra `streamgen serve` arguments (default: none)")
    ap.add_argument("--paths", default="auto,mse", help="player paths (auto = WebCodecs in Chromium)")
    ap.add_argument("--starts", type=int, default=4)
    ap.add_argument("--switches", type=int, default=3, help="prompt changes per start")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds of playback between switches")
    ap.add_argument("--idle", type=float, default=2.0,
                    help="seconds between the page's load and typing the prompt (a user reading and typing; on "
                         "2 cores a Start at once competes with Chromium's own start-up: 1.2-1.3 s instead of 0.5)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if CHROMIUM is None:
        print("chromium is not installed (scripts/setup.sh installs it)", file=sys.stderr)
        return 2
    out = asyncio.run(run(args))
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
