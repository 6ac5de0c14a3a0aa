"""Headless Chromium plays the served player page: playback advances, prompt switch, reconnect, stop.

Drives Debian's chromium over the DevTools protocol with the `websockets` package. Skipped only
when no chromium binary is installed (scripts/setup.sh installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import tempfile
from urllib.parse import quote

import pytest
import websockets
from aiohttp import web

from streamgen.server.sources import TestPatternFactory, prompt_color
from streamgen.server import app as app_module
from streamgen.server.app import ServerConfig, build_app

CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                             shutil.which("chromium-browser"), shutil.which("google-chrome")) if p and os.path.exists(p)),
                None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh installs it)")

W, H = 256, 144


class CDP:
    """Minimal DevTools client: one browser connection, flat sessions, commands by id."""

    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.console: list[str] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self):
        try:
            await self._dispatch()
        except websockets.ConnectionClosed:
            pass

    async def _dispatch(self):
        async for raw in self.ws:
            msg = json.loads(raw)
            if "id" in msg and msg["id"] in self.pending:
                self.pending.pop(msg["id"]).set_result(msg)
            elif msg.get("method") == "Runtime.consoleAPICalled":
                p = msg["params"]
                self.console.append(p["type"] + ": " + " ".join(str(a.get("value", a.get("description", "")))
                                                                 for a in p["args"]))
            elif msg.get("method") == "Runtime.exceptionThrown":
                self.console.append("exception: " + json.dumps(msg["params"]["exceptionDetails"])[:500])

    async def call(self, method: str, params: dict | None = None, session: str | None = None, timeout=20.0):
        i = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[i] = fut
        msg = {"id": i, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await self.ws.send(json.dumps(msg))
        res = await asyncio.wait_for(fut, timeout)
        if "error" in res:
            raise RuntimeError(f"{method}: {res['error']}")
        return res["result"]

    async def eval(self, session: str, expr: str):
        r = await self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True},
                            session)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr[:80]}: {r['exceptionDetails']}")
        return r["result"].get("value")


async def launch_chromium(user_data_dir: str):
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--autoplay-policy=no-user-gesture-required", "--mute-audio",
            f"--user-data-dir={user_data_dir}", "--remote-debugging-port=0", "about:blank"]
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    lines, url = [], None
    port_file = os.path.join(user_data_dir, "DevToolsActivePort")
    try:
        async with asyncio.timeout(30):
            while url is None:
                try:
                    line = (await asyncio.wait_for(proc.stderr.readline(), 0.5)).decode(errors="replace")
                except asyncio.TimeoutError:
                    line = None
                if line == "":
                    raise RuntimeError("chromium exited before DevTools started:\n" + "".join(lines[-20:]))
                if line:
                    lines.append(line)
                    m = re.search(r"DevTools listening on (ws://\S+)", line)
                    url = m.group(1) if m else None
                if url is None and os.path.exists(port_file):  # "PORT\n/devtools/browser/ID"
                    parts = open(port_file).read().split()
                    if len(parts) == 2:
                        url = f"ws://127.0.0.1:{parts[0]}{parts[1]}"
    except BaseException:
        proc.kill()
        await proc.wait()
        raise

    async def drain():  # keep reading stderr so chromium never blocks on a full pipe
        while await proc.stderr.readline():
            pass

    drainer = asyncio.create_task(drain())
    return proc, url, drainer


STATE_JS = """(() => {
  const v = document.getElementById('video');
  if (!v || !document.getElementById('message')) return {t: 0, frames: 0, error: null, state: 'loading'};
  const q = v.getVideoPlaybackQuality();
  const s = window.streamgen ? window.streamgen.stats : {};
  return {t: v.currentTime, frames: q.totalVideoFrames, error: v.error ? v.error.code + ' ' + v.error.message : null,
          state: s.state, session: s.session, gaps: s.gaps, fragments: s.fragments, appended: s.appended,
          lastError: s.lastError, endReason: s.endReason, mime: s.mime, message: document.getElementById('message').textContent,
          bufStart: v.buffered.length ? v.buffered.start(0) : null, quotaDrops: s.quotaDrops,
          gapJumps: s.gapJumps, ranges: Array.from({length: v.buffered.length}, (_, i) => [v.buffered.start(i), v.buffered.end(i)]),
          overlay: document.getElementById('overlay').textContent,
          supported: window.MediaSource ? MediaSource.isTypeSupported(s.mime || 'video/mp4; codecs="avc1.42C01E"') : false};
})()"""

# median colour of the video below the frame-index band, read back through a canvas
COLOR_JS = f"""(() => {{
  const v = document.getElementById('video');
  const c = document.createElement('canvas'); c.width = {W}; c.height = {H};
  const g = c.getContext('2d'); g.drawImage(v, 0, 0, {W}, {H});
  const d = g.getImageData(0, {H // 8}, {W}, {H - H // 8}).data;
  const ch = [[], [], []];
  for (let i = 0; i < d.length; i += 4 * 7) for (let k = 0; k < 3; k++) ch[k].push(d[i + k]);
  return ch.map((a) => a.sort((x, y) => x - y)[a.length >> 1]);
}})()"""


async def wait_for(cdp, session, cond, what: str, timeout: float = 25.0):
    last = None
    for _ in range(int(timeout / 0.2)):
        last = await cdp.eval(session, STATE_JS)
        if last["error"] or last.get("state") == "error":
            raise AssertionError(f"player error while waiting for {what}: {last}\nconsole: {cdp.console[-10:]}")
        if cond(last):
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: {last}\nconsole: {cdp.console[-10:]}")


def close_color(got, prompt: str, tol: int = 24) -> bool:
    return max(abs(a - b) for a, b in zip(got, prompt_color(prompt))) <= tol


@contextlib.asynccontextmanager
async def chromium_tab():
    """A headless Chromium with one blank tab over CDP. Yields (cdp, tab session id); closes the browser."""
    tmp = tempfile.mkdtemp(prefix="streamgen-chromium-")
    proc, browser_url, drainer = await launch_chromium(tmp)
    try:
        async with websockets.connect(browser_url, max_size=None) as ws:
            cdp = CDP(ws)
            target = await cdp.call("Target.createTarget", {"url": "about:blank"})
            session = (await cdp.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}))[
                "sessionId"]
            await cdp.call("Runtime.enable", session=session)
            await cdp.call("Page.enable", session=session)
            yield cdp, session
            try:
                await cdp.call("Browser.close", timeout=5)
            except Exception:
                pass
            cdp.reader.cancel()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        drainer.cancel()
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.asynccontextmanager
async def served_page(app):
    """Serve ``app`` on a loopback port and open a headless Chromium tab over CDP.
    Yields (cdp, tab session id, port, runner); closes the browser and the server afterwards."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        async with chromium_tab() as (cdp, session):
            yield cdp, session, port, runner
    finally:
        await runner.cleanup()


async def test_browser_plays_switches_prompt_reconnects_and_stops():
    factory = TestPatternFactory("testpattern", width=W, height=H, fps=16, frames_per_chunk=8)
    app = build_app(ServerConfig(preset="veryfast", max_lead_s=2.0, grace_s=10.0, encode_threads=2), factory)
    async with served_page(app) as (cdp, session, port, runner):
        state = runner.app[app_module.STATE]
        p1, p2 = "a red fox in the snow", "a blue whale at dusk"
        page = f"http://127.0.0.1:{port}/?path=mse&autostart=1&keep=1&prompt={quote(p1)}"  # keep 1 s behind
        await cdp.call("Page.navigate", {"url": page}, session)

        # 1. playback starts and advances
        s = await wait_for(cdp, session, lambda s: s["t"] > 1.0 and s["frames"] > 0, "playback to start")
        assert s["supported"], f"chromium cannot play {s['mime']}"
        assert s["mime"].startswith('video/mp4; codecs="avc1.64'), s  # preset veryfast: High profile
        assert s["state"] == "playing" and s["lastError"] is None, s
        overlay = re.search(r"latency (\d+\.\d+) s .* generated (\d+\.\d) fps .* buffered (\d+\.\d+) s",
                            s["overlay"])
        assert overlay and float(overlay[2]) > 0, s["overlay"]
        assert close_color(await cdp.eval(session, COLOR_JS), p1)
        t1 = s["t"]

        # 2. change the prompt through the UI while playing; playback continues and shows it
        await cdp.eval(session, f"""(() => {{
            const box = document.getElementById('prompt'); box.value = {json.dumps(p2)};
            document.getElementById('apply').click(); }})()""")
        s = await wait_for(cdp, session, lambda s: s["t"] > t1 + 1.5, "playback after the prompt switch")
        (sess,) = state.registry.sessions.values()
        assert sess.source._prompt == p2
        for _ in range(50):
            if close_color(await cdp.eval(session, COLOR_JS), p2):
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"new prompt never shown: {await cdp.eval(session, COLOR_JS)} vs {prompt_color(p2)}")

        # 3. old media behind the playhead is trimmed (keep=1: at most ~1.5 s stays behind)
        s = await wait_for(cdp, session, lambda s: s["bufStart"] is not None and s["t"] > 3.0
                           and 0.5 < s["bufStart"] and s["t"] - s["bufStart"] < 2.5, "old media to be trimmed")

        # 4. the SourceBuffer reports QuotaExceededError (injected twice into the real one): the
        #    player frees space or drops a fragment, and playback goes on without an error
        await cdp.eval(session, """(() => {
            const sb = window.streamgen.sb, append = sb.appendBuffer.bind(sb);
            window.quotaThrown = 0;
            sb.appendBuffer = (data) => {
              if (window.quotaThrown < 2) { window.quotaThrown += 1; throw new DOMException('injected', 'QuotaExceededError'); }
              return append(data);
            };
        })()""")
        t3 = s["t"]
        s = await wait_for(cdp, session, lambda s: s["t"] > t3 + 2.5, "playback after QuotaExceededError")
        assert await cdp.eval(session, "window.quotaThrown") == 2
        assert s["state"] == "playing" and s["lastError"] is None, s
        assert s["quotaDrops"] == 0 or s["gapJumps"] >= 1, s  # a dropped fragment's gap was jumped

        # 5. the server drops the connection: the player re-attaches and misses nothing
        t2 = s["t"]
        for conn in list(state.sockets):
            conn.request.transport.abort()
        s = await wait_for(cdp, session, lambda s: s["t"] > t2 + 1.5 and s["state"] == "playing"
                           and s["fragments"] > 0 and len(state.sockets) == 1, "playback after a reconnect")
        assert s["session"] == sess.id and s["gaps"] == 0, s

        # 6. stop
        await cdp.eval(session, "document.getElementById('stop').click()")
        s = await wait_for(cdp, session, lambda s: s["state"] == "ended", "the stream to end")
        assert s["endReason"] == "stopped" and s["error"] is None, s
        assert s["frames"] > 16, s
        errors = [c for c in cdp.console if c.startswith(("error", "exception"))]
        assert not errors, errors


async def test_browser_plays_the_generation_engine():
    """The real pipeline in the real browser: tiny DiT -> TAEHV -> RIFE 2x (when the weights are there)
    -> H.264 fMP4 -> MSE. Playback advances at the doubled frame rate and survives a prompt switch."""
    import torch

    from rife_data import WEIGHTS
    from streamgen.engine.core import Engine, EngineSettings, Pipeline
    from streamgen.server.sources import EngineFactory
    from streamgen.models.rife import load_rife
    from streamgen.pipeline import build

    p = build("tiny", decoder="taehv")
    model, text, dec = p.model, p.text_encoder, p.decoder
    rife = load_rife(WEIGHTS) if WEIGHTS.is_file() else None
    factor = 2 if rife is not None else 1
    engine = Engine(Pipeline(model=model, text_encoder=text, decoder=dec, rife=rife),
                    EngineSettings(local_frames=6, sink_frames=0))
    factory = EngineFactory("tiny", engine, width=128, height=128)
    app = build_app(ServerConfig(model="tiny", max_lead_s=2.0, encode_threads=2), factory)
    async with served_page(app) as (cdp, session, port, _):
        url = f"http://127.0.0.1:{port}/?path=mse&autostart=1&prompt={quote('a red fox')}&interpolate={factor}"
        await cdp.call("Page.navigate", {"url": url}, session)
        s = await wait_for(cdp, session, lambda s: s["t"] > 1.0 and s["frames"] > 16, "engine playback to start")
        assert s["state"] == "playing" and s["lastError"] is None and s["error"] is None, s
        assert await cdp.eval(session, "window.streamgen.stats.fps") == 16 * factor  # ready.fps, after RIFE
        await cdp.eval(session, f"""(() => {{
            document.getElementById('prompt').value = {json.dumps('a blue whale')};
            document.getElementById('apply').click(); }})()""")
        t1 = s["t"]
        s = await wait_for(cdp, session, lambda s: s["t"] > t1 + 1.0, "engine playback after the switch")
        assert s["error"] is None and s["gaps"] == 0, s
        assert engine.stats["errors"] == 0 and engine.stats["chunks"] >= 3
