#!/usr/bin/env python3
"""Watch and/or record a streamgen stream from the command line.

    python clients/python/streamgen_watch.py ws://127.0.0.1:8765 --prompt "a red fox" --play
    python clients/python/streamgen_watch.py http://gpu-box:8765 --prompt "waves" --out waves.mp4 --chunks 40

Built on ``streamgen.client.StreamClient`` (needs only ``websockets`` and ``msgpack``, no torch).
``--play`` pipes the fragmented MP4 into ``ffplay`` or ``mpv`` as it arrives; ``--out`` records it
(both may be given). Type a line + Enter while it plays to switch the prompt; Ctrl-C stops
cleanly (the file stays playable), a second Ctrl-C aborts.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

try:
    from streamgen import client as sgc
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from streamgen import client as sgc

PLAYERS = {
    "ffplay": ["ffplay", "-loglevel", "error", "-fflags", "nobuffer", "-flags", "low_delay", "-framedrop", "-i", "-"],
    "mpv": ["mpv", "--really-quiet", "--profile=low-latency", "--cache=no", "-"],
}


def open_player(name: str | None) -> subprocess.Popen:
    names = [name] if name else list(PLAYERS)
    for n in names:
        if shutil.which(n):
            return subprocess.Popen(PLAYERS[n], stdin=subprocess.PIPE)
    raise SystemExit(f"--play needs one of {', '.join(names)} on PATH (or record with --out and play the file)")


async def read_prompts(c: sgc.StreamClient) -> None:
    """Each line typed on stdin becomes the new prompt."""
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        if line.strip():
            print(f"prompt -> {line.strip()!r}", file=sys.stderr)
            c.set_prompt(line.strip())


async def main(args: argparse.Namespace) -> int:
    player = open_player(args.player) if args.play else None
    out = open(args.out, "wb") if args.out else None
    sinks = [s for s in (out, player.stdin if player else None) if s is not None]
    if not sinks:
        raise SystemExit("nothing to do: give --out FILE and/or --play")
    fields = {k: getattr(args, k) for k in ("model", "width", "height", "fps", "seed", "chunks", "interpolate")
              if getattr(args, k) is not None}
    keyboard = None
    try:
        async with sgc.StreamClient(args.url, token=args.token) as c:
            sgc.stop_on_ctrl_c(c, lambda *a: print(*a, file=sys.stderr))
            if sys.stdin.isatty():
                keyboard = asyncio.ensure_future(read_prompts(c))
            async for frag in c.start(args.prompt, **fields):
                if c.fragments == 1:
                    print(f"first fragment after {c.time_to_first_fragment * 1000:.0f} ms "
                          f"({c.ready.width}x{c.ready.height} @ {c.ready.fps} fps)", file=sys.stderr)
                    for s in sinks:
                        s.write(c.init_segment)
                for s in list(sinks):
                    try:
                        s.write(frag.data)
                        s.flush()
                    except BrokenPipeError:  # the player window was closed: stop streaming
                        sinks.remove(s)
                        c.stop()
            st = c.stats()
            print(f"{st.fragments} fragments, {st.frames} frames, {st.video_s:.1f} s of video; "
                  f"receive rate {st.receive_fps or 0:.1f} fps; end: {c.end_reason}", file=sys.stderr)
    except sgc.StreamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if keyboard is not None:
            keyboard.cancel()
        if out is not None:
            out.close()
        if player is not None:
            try:
                player.stdin.close()
            except BrokenPipeError:
                pass
            player.wait()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="server, e.g. ws://127.0.0.1:8765 or http://host:8765")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", help="record the fragmented MP4 to this file")
    p.add_argument("--play", action="store_true", help="play while receiving (ffplay or mpv)")
    p.add_argument("--player", choices=sorted(PLAYERS), help="which player --play uses (default: the first found)")
    p.add_argument("--token")
    p.add_argument("--chunks", type=int)
    for name in ("model",):
        p.add_argument(f"--{name}")
    for name in ("width", "height", "fps", "seed"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--interpolate", type=int, choices=(1, 2, 4))
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
