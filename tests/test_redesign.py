"""The fixes of the redesign: the chunk limit reaches the engine, failures are logged once, server
settings are checked before it listens, the default `streamgen serve` streams, one module per job."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
from pathlib import Path

import aiohttp
import av
import io
import numpy as np
import pytest
import websockets

from streamgen import protocol as P
from streamgen.cli import main
from streamgen.engine.core import Engine, EngineSettings, GenRequest
from streamgen.pipeline import build
from streamgen.server.app import ServerConfig, build_app
from streamgen.server.sources import EngineFactory, TestPatternFactory
from test_server import Raw, _free_port, start_server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    return build("tiny")


async def test_windowless_engine_makes_exactly_the_chunks_asked_for(tiny):
    """No attention window: the cache is sized for start.chunks; 3 chunks, then end, nothing more made."""
    from aiohttp.test_utils import TestServer

    engine = Engine(tiny, EngineSettings(local_frames=None, sink_frames=0))
    server = TestServer(build_app(ServerConfig(model="tiny", max_lead_s=None),
                                  EngineFactory("tiny", engine, width=64, height=64)))
    await server.start_server()
    try:
        c = await Raw.open(f"ws://127.0.0.1:{server.port}/v1/stream")
        await c.send(P.Start(prompt="three", chunks=3))
        got = []
        assert (await c.until(P.End, collect=got)).reason == "done"
        frags = [m for m in got if isinstance(m, P.Fragment)]
        assert [f.seq for f in frags] == [0, 1, 2]
        await asyncio.sleep(0.3)  # a fourth chunk would have been made by now
        assert engine.stats["chunks"] == 3 and engine.stats["errors"] == 0
        await c.send(P.Start(prompt="endless"))  # without a window a stream must say how long it is
        err = await c.until(P.Error)
        assert (err.code, err.field) == ("bad_field", "chunks") and "attention window" in err.message
        await c.close()
    finally:
        await server.close()


async def test_engine_session_with_chunks_ends_with_eof(tiny):
    engine = Engine(tiny, EngineSettings(local_frames=None, sink_frames=0)).start()
    try:
        h = await engine.open(GenRequest("p", 32, 32, chunks=2))
        assert (await h.get()).shape == (9, 32, 32, 3)
        assert (await h.get()).shape == (12, 32, 32, 3)
        with pytest.raises(EOFError):
            await asyncio.wait_for(h.get(), 10)
        h.cancel()
    finally:
        engine.close()


class _Exploding:
    def __init__(self, inner):
        self.inner = inner

    def new_state(self):
        return self.inner.new_state()

    def decode_chunk(self, latents, state):
        raise RuntimeError("decoder exploded")


async def test_generation_failure_is_logged_once_at_error_with_the_session_id(tiny, caplog):
    from dataclasses import replace

    from aiohttp.test_utils import TestServer

    engine = Engine(replace(tiny, decoder=_Exploding(tiny.decoder)), EngineSettings(local_frames=6, sink_frames=0))
    server = TestServer(build_app(ServerConfig(model="tiny", max_lead_s=None),
                                  EngineFactory("tiny", engine, width=64, height=64)))
    await server.start_server()
    try:
        with caplog.at_level(logging.DEBUG):
            c = await Raw.open(f"ws://127.0.0.1:{server.port}/v1/stream")
            await c.send(P.Start(prompt="boom"))
            ready = await c.until(P.Ready)
            err = await c.until(P.Error)
            assert err.code == "generation_failed" and "decoder exploded" in err.message
            assert (await c.until(P.End)).reason == "error"
            await c.close()
    finally:
        await server.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert ready.session in errors[0].getMessage() and errors[0].exc_info is not None


async def test_a_sender_bug_is_logged_not_swallowed(caplog):
    """A subscriber whose send raises something other than a broken socket logs it at ERROR."""
    srv = await start_server(max_lead_s=None)
    try:
        c = await Raw.open(srv.url)
        await c.send(P.Start(prompt="x", chunks=50))
        await c.until(P.Fragment)
        (session,) = srv.state.registry.sessions.values()
        sub = session.subscribers[0]

        async def broken(msg):
            raise ValueError("a bug in the send path")

        sub._send = broken
        sub.wake()
        for _ in range(100):
            if sub.task.done():
                break
            await asyncio.sleep(0.02)
        assert sub.task.done()
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("sender" in r.getMessage() and session.id in r.getMessage() for r in errors), errors
        await c.close()
    finally:
        await srv.runner.cleanup()


@pytest.mark.parametrize("argv,needles", [
    (["--width", "100"], ["--width 100", "multiple of 16"]),
    (["--width", "1024", "--height", "1024"], ["width*height", "65536"]),
    (["--preset", "bogus"], ["--preset bogus", "ultrafast", "veryslow"]),
    (["--model", "testpattern", "--width", "32"], ["--width 32", "64..2048"]),
    (["--fps", "24"], ["--fps applies to --model testpattern"]),
    (["--local-frames", "3", "--sink-frames", "1"], ["--local-frames", "frames_per_chunk"]),
])
def test_serve_refuses_settings_it_could_never_serve(argv, needles, capsys):
    rc = main(["serve", "--port", str(_free_port()), *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("streamgen serve: error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err


def test_serve_port_out_of_range_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--port", "99999"])
    assert e.value.code == 2 and "1..65535" in capsys.readouterr().err


async def test_default_serve_streams_the_default_model():
    """The README's main command (`streamgen serve`, built-in default model) as a subprocess: a start
    gets H.264 fragments that decode to frames of the model's size."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamgen", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                try:
                    r = await http.get(f"http://127.0.0.1:{port}/healthz")
                    break
                except aiohttp.ClientConnectionError:
                    assert proc.poll() is None, proc.stdout.read().decode()
                    await asyncio.sleep(0.1)
            from streamgen.pipeline import DEFAULT_MODEL

            assert (await r.json())["model"] == DEFAULT_MODEL
        c = await Raw.open(f"ws://127.0.0.1:{port}/v1/stream")
        await c.send(P.Start(prompt="a red ball moving right", chunks=2))
        got = []
        ready = await c.until(P.Ready)
        init = await c.until(P.Init)
        assert (await c.until(P.End, timeout=120, collect=got)).reason == "done"
        frags = [m for m in got if isinstance(m, P.Fragment)]
        assert len(frags) == 2
        with av.open(io.BytesIO(init.data + b"".join(f.data for f in frags))) as cont:
            frames = [f.to_ndarray(format="rgb24") for f in cont.decode(video=0)]
        assert len(frames) == sum(f.frames for f in frags)
        assert frames[0].shape == (ready.height, ready.width, 3)
        await c.close()
    finally:
        proc.terminate()
        proc.wait(20)


async def test_static_files_never_leave_the_web_root(tmp_path):
    """The guard, not URL normalisation: a symlink in the web root that points outside is refused."""
    root = tmp_path / "web"
    root.mkdir()
    (root / "index.html").write_text("<video></video>")
    (root / "ok.js").write_text("export const ok = 1;")
    secret = tmp_path / "secret.js"
    secret.write_text("secret")
    (root / "leak.js").symlink_to(secret)
    srv = await start_server(web_root=root)
    try:
        async with aiohttp.ClientSession() as http:
            assert (await http.get(srv.http + "/ok.js")).status == 200
            r = await http.get(srv.http + "/leak.js")
            assert r.status == 404 and "secret" not in await r.text()
    finally:
        await srv.runner.cleanup()


def test_encoder_lock_serialises_concurrent_chunks():
    """Many threads encoding into one encoder: every chunk gets its own seq and its frames in one
    fragment, frame times never overlap, and the concatenation decodes to every frame once."""
    from streamgen.media.encode import FMP4Encoder

    enc = FMP4Encoder(64, 48, 16, preset="ultrafast")
    frags, errors = [], []
    barrier = threading.Barrier(6)

    def work(k):
        try:
            barrier.wait()
            for _ in range(4):
                frames = np.full((3, 48, 64, 3), 40 * k, np.uint8)
                frags.append(enc.encode_chunk(frames))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    frags.sort(key=lambda f: f.seq)
    assert [f.seq for f in frags] == list(range(24))
    assert [f.base_time for f in frags] == [i * frags[0].duration_ticks for i in range(24)]
    with av.open(io.BytesIO(enc.init_segment + b"".join(f.data for f in frags))) as c:
        assert sum(1 for _ in c.decode(video=0)) == 72


def test_each_job_lives_in_one_module():
    """git grep: the model registry, the uint8 conversion of frames, the x264 settings and the
    start limits are each defined in exactly one module of the package."""
    def where(pattern):
        out = subprocess.run(["git", "grep", "-l", "-E", pattern, "--", "streamgen"], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
        return sorted(out)

    assert where(r"^MODELS(: .*)? = ") == ["streamgen/pipeline.py"]
    assert where(r"to\(torch\.uint8\)") == ["streamgen/media/frames.py"]
    assert where(r"bframes=0") == ["streamgen/media/encode.py"]
    assert where(r"max_chunks: int = ") == ["streamgen/protocol.py"]
    assert where(r"^from streamgen\.ops|^    from streamgen\.ops|import streamgen\.ops") and \
        not [p for p in where(r"from streamgen\.ops|import streamgen\.ops") if p.startswith("streamgen/models/")]
