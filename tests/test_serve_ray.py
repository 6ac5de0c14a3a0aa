"""`streamgen serve --ray`: the same front with its engines as Ray actors (streamgen.parallel.ray_sources).

One real server process (a local Ray it starts itself, two workers on the tiny model, CPU) and Python
clients: two sessions land on different workers and stream decodable fragments, a prompt switch reaches
its client (status.prompt_seq), a reconnect attaches to the same session, killing one worker's process
ends only its session (an error line naming the worker) while the other streams on, and the worker
comes back (a new actor) and takes the next session. Option misuse is one line, without starting Ray.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import av
import pytest

from streamgen import protocol as P
from streamgen.cli import main
from streamgen.client import StreamClient
from test_toy_browser import free_port, streamgen_serve

SIZE = ["--model", "tiny", "--width", "64", "--height", "64"]


def _run(argv, capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--ray-workers", "2"], "--ray-workers applies to --ray"),
    (["--ray", "--model", "testpattern"], "--ray: --model testpattern draws its frames on the front"),
    (["--ray", "--ray-workers", "0"], "--ray-workers"),
])
def test_ray_option_misuse_is_one_line(argv, needle, capsys):
    rc, err = _run(["serve", "--port", str(free_port()), *argv], capsys)
    assert rc == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_ray_missing_is_one_line():
    code = ("import sys; sys.modules['ray'] = None; from streamgen.cli import main; "
            f"sys.exit(main(['serve', '--port', '{free_port()}', '--ray', '--model', 'tiny']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1] == "streamgen serve: error: --ray needs Ray: pip install 'streamgen[ray]'"
    assert "Traceback" not in p.stderr


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _by_worker(text: str, name: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(rf'^streamgen_{name}\{{worker="(\d+)"\}} (\S+)$', text, re.M)}


def _pids(text: str) -> dict[str, int]:
    return {m[2]: int(m[1]) for m in re.finditer(r'^streamgen_engine_worker_info\{node="[^"]*",pid="(\d+)",'
                                                 r'worker="(\d+)"\} 1\.0$', text, re.M)}


async def _until(cond, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        got = await cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        await asyncio.sleep(every)


class Viewer:
    """One client session, consumed in a task: every message kept."""

    def __init__(self, port: int, prompt: str):
        self.c = StreamClient(f"ws://127.0.0.1:{port}", reconnect_delay=0.1)
        self.prompt = prompt
        self.msgs: list = []
        self.task: asyncio.Task | None = None

    async def start(self) -> "Viewer":
        await self.c.connect()

        async def consume():
            async for m in self.c.start(self.prompt, events=True):
                self.msgs.append(m)

        self.task = asyncio.create_task(consume())
        return self

    def frags(self) -> list[P.Fragment]:
        return [m for m in self.msgs if isinstance(m, P.Fragment)]

    def decoded_frames(self) -> int:
        data = self.c.init_segment + b"".join(f.data for f in self.frags())
        with av.open(io.BytesIO(data), "r", format="mp4") as f:
            return sum(1 for _ in f.decode(video=0))


async def test_serve_ray_two_workers_prompt_attach_and_a_lost_worker():
    port = free_port()
    with streamgen_serve(port, "--ray", "--ray-workers", "2", *SIZE, timeout=120) as (proc, health):
        assert '"model": "tiny"' in health
        metrics = lambda: asyncio.to_thread(_metrics, port)  # noqa: E731
        a = await Viewer(port, "a red ball").start()
        await _until(lambda: asyncio.sleep(0, a.c.session), 30, "session a's ready")
        b = await Viewer(port, "a blue cube").start()
        try:
            await _until(lambda: asyncio.sleep(0, len(a.frags()) >= 2 and len(b.frags()) >= 2), 30,
                         "two fragments on each session")
            # 1. the two sessions are on different workers; /metrics sums them and shows each
            async def spread():
                text = await metrics()
                return text if _by_worker(text, "engine_worker_sessions") == {"0": 1, "1": 1} else None
            text = await _until(spread, 10, "one session per worker in /metrics")
            assert "streamgen_engine_pool_sessions 2.0" in text and "streamgen_engine_workers_up 2.0" in text
            assert all(v > 0 for v in _by_worker(text, "engine_worker_frames").values())
            pids = _pids(text)
            assert len(set(pids.values())) == 2, text

            # 2. a prompt switch reaches the client: status.prompt_seq names a fragment made after it
            switched_after = a.frags()[-1].seq
            await a.c.set_prompt("a green tree")
            await _until(lambda: asyncio.sleep(0, any(isinstance(m, P.Status) and m.extra.get("prompt_seq", -1)
                                                      > switched_after for m in a.msgs)), 20, "prompt_seq")

            # 3. a reconnect attaches to the same session (on the same worker) and goes on without gaps
            sid, before = a.c.session, len(a.frags())
            await a.c._ws.close()
            await _until(lambda: asyncio.sleep(0, a.c.reconnects == 1 and len(a.frags()) >= before + 2), 20,
                         "fragments after the reconnect")
            assert a.c.session == sid and a.c.gaps == 0
            seqs = [f.seq for f in a.frags()]
            assert seqs == list(range(len(seqs)))

            # every fragment of both sessions decodes
            for v in (a, b):
                assert v.decoded_frames() == sum(f.frames for f in v.frags()) > 0

            # 4. worker 0's process dies: its session ends with one clear error, the other streams on
            os.kill(pids["0"], signal.SIGKILL)
            await _until(lambda: asyncio.sleep(0, a.task.done() or b.task.done()), 20, "the lost session's end")
            lost, kept = (a, b) if a.task.done() else (b, a)
            errors = [m for m in lost.msgs if isinstance(m, P.Error)]
            assert lost.c.end_reason == "error" and len(errors) == 1, lost.msgs[-3:]
            assert errors[0].code == "generation_failed" and "engine worker 0 was lost" in errors[0].message
            n = len(kept.frags())
            await _until(lambda: asyncio.sleep(0, len(kept.frags()) >= n + 2), 20, "the other session going on")
            assert not kept.task.done() and not [m for m in kept.msgs if isinstance(m, P.Error)]

            # 5. the health check replaces the worker; once back, it takes the next session
            async def back():
                text = await metrics()
                up, pid = _by_worker(text, "engine_worker_up").get("0"), _pids(text).get("0")
                return text if up == 1 and pid not in (None, pids["0"]) else None
            await _until(back, 45, "worker 0 back with a new actor")
            c = await Viewer(port, "a yellow sun").start()
            try:
                await _until(lambda: asyncio.sleep(0, len(c.frags()) >= 1), 30, "a fragment from the new worker")

                async def placed():
                    return _by_worker(await metrics(), "engine_worker_sessions") == {"0": 1, "1": 1}
                await _until(placed, 10, "the new session on worker 0 in /metrics")
            finally:
                await c.c.close()
        finally:
            for v in (a, b):
                await v.c.close()
                if v.task is not None:
                    v.task.cancel()
