"""The README's first experience, end to end: `python -m streamgen serve` with no model arguments
(the built-in default, streamgen-toy), the browser player in headless Chromium, a typed prompt,
and a typed change while it plays. The decoded frames are read back from the page (the canvas of
the WebCodecs path, the <video> of the MSE path) and analysed with the toy's own colour analysis
(streamgen.training.toy_data.analyse_frame): a red ball on black before the switch (and not blue),
a blue one within two chunks of media after the first fragment made with the new prompt.

Uses the Chromium/CDP helpers of test_browser.py and the page helpers of test_player.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter

import numpy as np
import pytest
import torch

from streamgen.training import toy_data as td
from test_browser import CHROMIUM, chromium_tab
from test_player import open_page, state, type_into_prompt, until

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh installs it)")

RED = "a red ball moving right on a black background"
BLUE = "a blue ball moving right on a black background"
CHUNK_S = 12 / td.FPS  # the toy's steady chunk: 3 latent frames -> 12 video frames

# the frame on screen (WebCodecs canvas or <video>, by path), its media time, as base64 RGB
FRAME_JS = """(() => {
  const p = window.streamgenPlayer;
  const el = p.stats.path === 'webcodecs' ? document.getElementById('canvas') : document.getElementById('video');
  const w = el.videoWidth || el.width, h = el.videoHeight || el.height;
  if (!w || !h) return null;
  const c = document.createElement('canvas'); c.width = w; c.height = h;
  const g = c.getContext('2d'); g.drawImage(el, 0, 0, w, h);
  const d = g.getImageData(0, 0, w, h).data;
  let s = '';
  for (let i = 0; i < d.length; i += 4) s += String.fromCharCode(d[i], d[i + 1], d[i + 2]);
  return {w, h, t: p.sink ? p.sink.currentTime : null, rgb: btoa(s)};
})()"""


# remember the media time of the first frame the player counts as made with the new prompt
WATCH_SWITCH_JS = """(() => {
  const p = window.streamgenPlayer, shown = p.onShown.bind(p);
  window.firstNewFrame = null;
  p.onShown = (mediaTime, wallMs) => {
    const n = p.stats.promptLatencies.length;
    shown(mediaTime, wallMs);
    if (p.stats.promptLatencies.length > n && !window.firstNewFrame)
      window.firstNewFrame = {mediaTime, method: p.stats.promptLatencyMethod};
  };
})()"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def streamgen_serve(port: int, *args: str, prefix: tuple[str, ...] = (), timeout: float = 60):
    """`python -m streamgen serve --port PORT` as a user starts it (no model arguments: the default);
    ``prefix``: a command it runs under (e.g. nice -n 5). Yields (process, /healthz body)."""
    log = tempfile.TemporaryFile("w+")
    env = {k: v for k, v in os.environ.items() if k != "STREAMGEN_RIFE_WEIGHTS"}  # conftest's; a new user has none
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "streamgen", "serve", "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"streamgen serve exited {proc.returncode}:\n{log.read()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    health = r.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, f"streamgen serve did not answer /healthz within {timeout:g} s"
                time.sleep(0.2)
        try:
            yield proc, health
        except BaseException:
            log.seek(0)
            print("streamgen serve log:\n" + log.read()[-4000:])
            raise
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def shown_frame(cdp, session) -> tuple[dict, float | None]:
    """Analyse the frame on screen: (toy_data.analyse_frame of it, its media time)."""
    f = await cdp.eval(session, FRAME_JS)
    assert f is not None, "nothing on screen yet"
    rgb = np.frombuffer(base64.b64decode(f["rgb"]), np.uint8).reshape(f["h"], f["w"], 3)
    frame = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div(127.5).sub(1)
    return td.analyse_frame(frame), f["t"]


async def frames_over(cdp, session, seconds: float, every: float = 0.1) -> list[tuple[dict, float | None]]:
    out, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        out.append(await shown_frame(cdp, session))
        await asyncio.sleep(every)
    return out


@pytest.mark.parametrize("path", ["auto", "mse"])
async def test_default_serve_shows_the_typed_prompt_and_a_typed_change(path):
    port = free_port()
    with streamgen_serve(port) as (_, health):
        assert '"model": "toy"' in health, health  # no arguments: the built-in default
        async with chromium_tab() as (cdp, session):
            await open_page(cdp, session, f"http://127.0.0.1:{port}/?path={path}&seed=0")
            # type the prompt, press Start
            await cdp.eval(session, "document.getElementById('prompt').focus()")
            await cdp.call("Input.insertText", {"text": RED}, session)
            await cdp.eval(session, "document.getElementById('start').click()")
            s = await until(cdp, session, lambda s: s["state"] == "playing" and s["shownFrames"] > 8, "playback",
                            timeout=30)
            assert s["path"] == ("webcodecs" if path == "auto" else "mse"), s

            # before the switch: a red object on black, in (nearly) every frame, and never blue
            before = await frames_over(cdp, session, 2.0)
            assert len(before) >= 3, before
            colours = Counter(a["colour"] for a, _ in before)
            backgrounds = Counter(a["background"] for a, _ in before)
            assert "blue" not in colours, colours
            assert colours["red"] >= 0.8 * len(before), colours
            assert backgrounds["black"] >= 0.9 * len(before), backgrounds
            areas = [a["area"] for a, _ in before if a["colour"] == "red"]
            assert 150 < float(np.median(areas)) < 3000, areas  # a ball (r ~ 17 px at 128x128), not a wash of red

            # type the change + Enter while it plays
            await cdp.eval(session, WATCH_SWITCH_JS)
            await type_into_prompt(cdp, session, BLUE)
            s = await until(cdp, session, lambda s: s["promptLatencyS"] is not None,
                            "the first frame made with the new prompt", timeout=20)
            assert s["promptSwitches"] == 1 and s["state"] == "playing", s
            switch = await cdp.eval(session, "window.firstNewFrame")
            # the player knows where the new prompt starts from the server (status.prompt_seq), or
            # estimates it as the next fragment it has not received: up to two chunks too early (the
            # one the engine holds ready and the one being encoded were made with the old prompt)
            allowed = (2 if switch["method"] == "server" else 4) * CHUNK_S + 0.25

            # blue within two chunks of media after the first new fragment, and it stays blue, on black
            deadline, seen = time.monotonic() + 10, []
            while time.monotonic() < deadline:
                a, t = await shown_frame(cdp, session)
                seen.append((a["colour"], a["background"], t))
                if a["colour"] == "blue":
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"the player never showed blue after the switch: {seen}")
            assert t - switch["mediaTime"] <= allowed, (t - switch["mediaTime"], switch, seen)
            after = await frames_over(cdp, session, 2.0)  # >= 3 frames even on two busy cores
            assert len(after) >= 3, after
            colours = Counter(a["colour"] for a, _ in after)
            assert colours["blue"] >= 0.8 * len(after) and "red" not in colours, colours
            assert Counter(a["background"] for a, _ in after)["black"] >= 0.9 * len(after), after
            s = await state(cdp, session)
            assert s["gaps"] == 0 and s["lastError"] is None, s
            print(f"\n{s['path']}: first frame {s['firstFrameS']:.2f} s, prompt->frame {s['promptLatencyS']:.2f} s, "
                  f"({switch['method']}), blue {t - switch['mediaTime']:.2f} s of media after the first new fragment")
