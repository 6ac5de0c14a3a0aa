"""The CPU fast paths of `serve` and `generate`: the busy thread owns the intra-op threads
(engine.core.engine_threads) and the decoder runs in bfloat16 where the CPU has native bfloat16
(pipeline.pick_decoder_dtype), within tolerance of float32."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from streamgen.engine.core import Engine, EngineSettings, GenRequest, engine_threads
from streamgen.pipeline import build, pick_decoder_dtype


async def test_engine_threads_leave_the_caller_one_and_give_the_busy_thread_the_rest(caplog):
    caplog.set_level(logging.INFO, logger="streamgen.engine.core")
    n = torch.get_num_threads()
    with engine_threads("cuda") as none:  # not a CPU engine: nothing changes
        assert none is None and torch.get_num_threads() == n
    with engine_threads("cpu") as threads:
        assert threads == n and torch.get_num_threads() == 1
        engine = Engine(build("tiny", decoder="taehv"), EngineSettings(threads=threads)).start()
        try:
            h = await engine.open(GenRequest("a fox in the snow", 64, 64, chunks=1))
            assert (await h.get()).shape == (9, 64, 64, 3)
        finally:
            engine.close()
        assert torch.get_num_threads() == 1  # the busy thread's setting is its own
    assert torch.get_num_threads() == n
    said = [r.getMessage() for r in caplog.records if "intra-op" in r.getMessage()]
    assert said == [f"engine: the busy thread runs {n} intra-op CPU threads"], said


def test_decoder_dtype_auto_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, caplog):
    import streamgen.pipeline as pl

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(pl, "cpu_native_bf16", lambda: True)
    assert pick_decoder_dtype("auto", cpu, torch.float32) == torch.bfloat16
    assert pick_decoder_dtype("float32", cpu, torch.float32) == torch.float32  # asked for: kept
    assert pick_decoder_dtype("auto", cpu, torch.float16) == torch.float16  # a half model keeps its dtype
    assert pick_decoder_dtype("auto", cuda, torch.bfloat16) == torch.bfloat16
    monkeypatch.setattr(pl, "cpu_native_bf16", lambda: False)
    caplog.set_level(logging.INFO, logger="streamgen.pipeline")
    assert pick_decoder_dtype("auto", cpu, torch.float32) == torch.float32
    assert any("no native bfloat16" in r.getMessage() for r in caplog.records)
    assert build("tiny", decoder="taehv").decoder.decoder[1].weight.dtype == torch.float32


@pytest.mark.parametrize("name", ["toy", "tiny"])
def test_bf16_decoder_is_within_tolerance_of_float32(name):
    """The decoders the auto rule puts in bfloat16, against their float32 selves over a 3-chunk stream
    (the causal state carried across chunks): measured 53.7 dB for the toy's trained decoder and
    41.4 dB for the tiny preset's random one, which amplifies more (values in [-1, 1])."""
    pipe = build(name, decoder="taehv", decoder_dtype=torch.float32)
    ref, half = pipe.decoder, copy.deepcopy(pipe.decoder).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    lat = [torch.randn(1, 16, 3, 16, 16, generator=gen) for _ in range(3)]
    outs = []
    for dec in (ref, half):
        st = dec.new_state()
        outs.append(torch.cat([dec.decode_chunk(x, st) for x in lat], dim=2))
    a, b = outs
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (1, 3, 9 + 12 + 12, 128, 128)
    psnr = 10 * torch.log10(4.0 / (a - b).pow(2).mean())
    assert psnr > (45 if name == "toy" else 35), f"{name}: {psnr:.1f} dB"
    if name == "toy":  # the shipped decoder: no pixel off by more than ~13 of 255 levels (measured 0.057)
        assert (a - b).abs().max() < 0.1


def test_build_follows_the_rule():
    from streamgen.pipeline import cpu_native_bf16

    want = torch.bfloat16 if cpu_native_bf16() else torch.float32
    pipe = build("toy")
    assert pipe.dtype == torch.float32 and next(pipe.decoder.parameters()).dtype == want
    assert next(build("toy", decoder_dtype=torch.float32).decoder.parameters()).dtype == torch.float32


def test_serve_shortens_libgomp_spin_unless_the_user_set_it_or_torch_is_loaded():
    from streamgen.cli import SERVE_ENV, command_env

    assert command_env(["serve", "--port", "8765"], {}, False) == SERVE_ENV == {"GOMP_SPINCOUNT": "10000"}
    assert command_env(["-v", "serve"], {"PATH": "/bin"}, False) == SERVE_ENV
    assert command_env(["serve"], {"GOMP_SPINCOUNT": "300000"}, False) == {}  # the user's setting wins
    assert command_env(["serve"], {}, True) == {}  # too late: libgomp read its settings when torch loaded
    assert command_env(["generate", "--prompt", "serve"], {}, False) == {}
    assert command_env([], {}, False) == {}
