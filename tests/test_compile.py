"""compile_blocks: compiled blocks compute what eager blocks do (chunk path with the KV cache), and a
backend that fails falls back to eager with one warning instead of crashing."""

import asyncio
import logging
from dataclasses import replace

import pytest
import torch

from streamgen.models.wan import WanConfig, WanModel
from streamgen.ops.compile import compile_blocks, uncompile_blocks


def _stream(model, n_chunks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = model.new_cache(1, (4, 4), max_frames=9)
    model.set_prompt(cache, torch.randn(1, 512, model.cfg.text_dim, generator=g))
    outs = []
    for c in range(n_chunks):
        x = torch.randn(1, 16, 3, 4, 4, generator=g)
        outs.append(model.forward_chunk(x, torch.full((1,), 500.0), cache, start_frame=3 * c, update_cache=False))
        model.forward_chunk(x, torch.zeros(1), cache, start_frame=3 * c, update_cache=True)
    return torch.stack(outs)


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return WanModel(WanConfig.preset("tiny")).eval()


def test_compiled_blocks_equal_eager(model):
    torch._dynamo.reset()
    ref = _stream(model)
    assert compile_blocks(model, backend="aot_eager")
    assert all("forward" in b.__dict__ for b in model.blocks)
    got = _stream(model)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    uncompile_blocks(model)
    assert not any("forward" in b.__dict__ for b in model.blocks)
    torch.testing.assert_close(_stream(model), ref, rtol=0, atol=0)


def test_failing_backend_falls_back_to_eager(model, caplog):
    torch._dynamo.reset()

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    ref = _stream(model)
    compile_blocks(model, backend=broken_backend)
    with caplog.at_level(logging.WARNING, logger="streamgen.ops.compile"):
        got = _stream(model)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    warnings = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert 1 <= len(warnings) <= len(model.blocks)
    assert not any("forward" in b.__dict__ and b.forward is not b._streamgen_eager_forward for b in model.blocks)


def test_bad_model_names_the_attribute():
    with pytest.raises(ValueError, match="model.layers"):
        compile_blocks(torch.nn.Linear(2, 2), blocks_attr="layers")


@pytest.mark.parametrize("warm_batches", [True, False])
async def test_the_warm_up_compiles_every_batch_size_before_a_viewer_joins(warm_batches):
    """Compiled blocks make one graph per batch size. With the engine's warm-up at batch sizes
    2..warmup_batch, two sessions batched after the warm-up compile nothing more; without it, the
    step where the second session joins the first compiles (that step's viewers wait for it)."""
    from torch._dynamo.testing import CompileCounter

    from streamgen.engine.core import Engine, EngineSettings, GenRequest, Pipeline
    from streamgen.pipeline import build

    torch._dynamo.reset()
    p = build("tiny", decoder="taehv")
    counter = CompileCounter()
    assert compile_blocks(p.model, backend=counter)
    pipe = Pipeline(model=p.model, text_encoder=p.text_encoder, decoder=p.decoder, compiled=True)
    warm = GenRequest("warm-up", 64, 64, seed=9, chunks=2)
    eng = Engine(pipe, EngineSettings(local_frames=6, sink_frames=0, max_batch=2, warmup=warm,
                                      warmup_batch=2 if warm_batches else 1)).start()
    try:
        a = await eng.open(GenRequest("a fox", 64, 64, seed=1))
        await a.get()
        await a.get()  # after the warm-up (the first open waits for it), alone
        compiled_before = counter.frame_count
        b = await eng.open(GenRequest("a whale", 64, 64, seed=2))
        rows0, forwards0 = eng.stats["rows"], eng.stats["forwards"]
        for _ in range(3):
            await asyncio.gather(a.get(), b.get())
        assert eng.stats["rows"] - rows0 > eng.stats["forwards"] - forwards0  # they did share forwards
        assert eng.pool.sessions == 2  # the warm-up's pool reservations were released
        a.cancel()
        b.cancel()
    finally:
        eng.close()
    if warm_batches:
        assert counter.frame_count == compiled_before, (compiled_before, counter.frame_count)
    else:  # the test can fail: this is what the warm-up prevents
        assert counter.frame_count > compiled_before, (compiled_before, counter.frame_count)


def test_the_batch_warm_up_stops_where_the_cache_pool_is_full(caplog):
    """A pool that holds 2 sessions: the warm-up batches 2, says where it stopped, and frees its slots."""
    from torch._dynamo.testing import CompileCounter

    from streamgen.engine.core import Engine, EngineSettings, GenRequest, Pipeline
    from streamgen.pipeline import build

    torch._dynamo.reset()
    p = build("tiny", decoder="taehv")
    assert compile_blocks(p.model, backend=CompileCounter())
    pipe = Pipeline(model=p.model, text_encoder=p.text_encoder, decoder=p.decoder, compiled=True)
    warm = GenRequest("warm-up", 64, 64, seed=9, chunks=2)
    settings = EngineSettings(local_frames=6, sink_frames=0, max_batch=4, warmup=warm)
    need = Engine(pipe, settings).cache_bytes(warm)
    caplog.set_level(logging.INFO, logger="streamgen.engine.core")
    eng = Engine(pipe, replace(settings, cache_memory=int(2.5 * need)))
    with torch.no_grad():  # as on the engine's thread
        eng._warmup(warm)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine warm-up")]
    assert any("batches up to 2 (the cache pool holds no 3 sessions of 64x64)" in m for m in said), said
    assert any("batch sizes 2..2 at 64x64" in m for m in said), said
    assert eng.pool.sessions == 0
