"""Engine workers on a local Ray cluster (streamgen.parallel.ray_pool): two workers on the tiny model,
sessions placed by free cache memory, affinity, a prompt switch's `switched`, a worker's death ending only
its sessions, the engine queue's positions across Ray, and the health check taking a replaced worker back.
Ray comes with the test extra (streamgen[test]; for users it is the optional streamgen[ray])."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest


def test_importing_the_pool_and_building_the_server_imports_no_ray():
    # the modules, and a whole normal server (engine, factory, app) built by `serve` without --ray
    code = ("import sys, socket\n"
            "import streamgen.parallel.ray_pool, streamgen.parallel.ray_sources\n"
            "from streamgen.cli import build_parser\n"
            "from streamgen.server import serve\n"
            "from streamgen.server.app import build_app\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
            "args = build_parser().parse_args(['serve', '--model', 'tiny', '--port', str(port)])\n"
            "cfg, factory, executor = serve._build(args)\n"
            "build_app(cfg, factory, executor=executor)\n"
            "factory.engine.close()\n"
            "assert 'ray' not in sys.modules, 'ray imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


import ray  # noqa: E402 - after the test above, which must run without it

from streamgen.parallel.ray_pool import RayEnginePool, WorkerLost  # noqa: E402

W = H = 64


def _need_bytes() -> int:
    from streamgen.engine.core import Engine, EngineSettings, GenRequest
    from streamgen.pipeline import build

    eng = Engine(build("tiny"), EngineSettings(local_frames=6, sink_frames=0))
    return eng.cache_bytes(GenRequest("x", W, H))


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


async def test_placement_affinity_and_a_lost_worker(cluster):
    # each worker's pool holds 2 sessions of 64x64 (plus alignment slack)
    settings = {"local_frames": 6, "sink_frames": 0, "cache_memory": 2 * _need_bytes() + 4096}
    pool = RayEnginePool(2, preset="tiny", settings=settings)
    try:
        # 1. placement by free cache memory: the second session goes where more is free
        assert await pool.open("a", "a red ball", W, H, seed=1) == 0
        assert await pool.open("b", "a red ball", W, H, seed=1) == 1
        a0, b0 = (await pool.next_chunk("a")).frames, (await pool.next_chunk("b")).frames
        assert a0.dtype == np.uint8 and a0.shape[1:] == (H, W, 3)
        assert np.array_equal(a0, b0)  # same request on two workers: the same bytes
        assert await pool.open("c", "a blue cube", W, H, seed=2) == 0  # both 1 session: lowest index
        # 2. affinity: the session stays on its worker (where an attach goes) and goes on from there
        assert pool.worker_of("a") == 0 and pool.worker_of("b") == 1
        a1 = (await pool.next_chunk("a")).frames
        b1 = (await pool.next_chunk("b")).frames
        assert np.array_equal(a1, b1) and a1.shape[0] > a0.shape[0]  # both went on to their second chunk
        # a prompt switch: the engine's `switched` comes back with the chunk it took effect at
        pool.control("b", "prompt", "a green tree")
        assert (await pool.next_chunk("b")).switched and not (await pool.next_chunk("b")).switched
        # 3. worker 0 dies: its sessions end with a clear error, b goes on, new sessions avoid it
        ray.kill(pool.workers[0].actor)
        with pytest.raises(WorkerLost, match="session a: engine worker 0 was lost"):
            await pool.next_chunk("a")
        with pytest.raises(WorkerLost, match="session c: engine worker 0 was lost"):
            await pool.next_chunk("c")
        for _ in range(2):
            assert (await pool.next_chunk("b")).frames.shape[1:] == (H, W, 3)
        assert await pool.open("d", "a green tree", W, H) == 1
        assert not pool.workers[0].alive
        # 4. worker 1 is full (b, d): a start waits in its engine's queue, reported by on_queued, and is
        # admitted when a session there closes
        positions = []
        e = asyncio.ensure_future(pool.open("e", "a white cloud", W, H, on_queued=positions.append))
        for _ in range(50):
            if positions:
                break
            await asyncio.sleep(0.1)
        assert positions == [1] and not e.done()
        await pool.close("d")
        assert await e == 1 and (await pool.next_chunk("e")).frames.shape[1:] == (H, W, 3)
        # 5. the health check replaces the dead worker; once it answers it takes new sessions again
        await pool.check_health()
        await asyncio.wait_for(pool.workers[0].rejoin, 60)
        assert pool.workers[0].alive and pool.stats[0]["up"]
        assert await pool.open("f", "a red ball", W, H, seed=1) == 0
        assert np.array_equal((await pool.next_chunk("f")).frames, a0)  # a fresh engine: the same first chunk
    finally:
        pool.shutdown()


def test_bad_worker_count_is_one_clear_error(cluster):
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        RayEnginePool(0)
