"""Serve the browser player with the test-pattern source (no model, no GPU) and watch it.

    python examples/serve_testpattern.py            # then open http://127.0.0.1:8765/
    python examples/serve_testpattern.py --record   # also records 3 s with the Python client

Equivalent to `streamgen serve --source testpattern`; shown here as a library call so that a
custom FrameSource / SourceFactory can be plugged in the same way.
"""

from __future__ import annotations

import argparse
import asyncio
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from streamgen.server.sources import TestPatternFactory
from streamgen.server.app import ServerConfig, build_app


async def record(url: str, path: str, seconds: float) -> None:
    from streamgen.client import StreamClient

    async with StreamClient(url) as c:
        with open(path, "wb") as out:
            async for frag in c.start(prompt="a test pattern", chunks=max(1, int(seconds * 2))):
                if frag.seq == 0:
                    out.write(c.init_segment)
                out.write(frag.data)
                if frag.seq == 2:
                    await c.prompt("another prompt, another colour")
    print(f"recorded {c.fragments} fragments ({c.frames} frames) to {path}; end: {c.end_reason}")


async def main(args: argparse.Namespace) -> None:
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="encode")
    factory = TestPatternFactory("testpattern", width=args.width, height=args.height, fps=args.fps,
                                 frames_per_chunk=args.fps // 2, executor=executor)
    app = build_app(ServerConfig(model="testpattern", max_lead_s=3.0), factory, executor=executor)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    print(f"player: http://{args.host}:{args.port}/?prompt=hello&autostart=1")
    try:
        if args.record:
            await record(f"ws://{args.host}:{args.port}/v1/stream", args.record, 3.0)
        else:
            await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=288)
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--record", nargs="?", const="testpattern.mp4", default=None, metavar="OUT.mp4")
    try:
        asyncio.run(main(p.parse_args()))
    except KeyboardInterrupt:
        pass
