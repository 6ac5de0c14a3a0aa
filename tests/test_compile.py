"""compile_blocks: compiled blocks compute what eager blocks do (chunk path with the KV cache), and a
backend that fails falls back to eager with one warning instead of crashing."""

import logging

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
