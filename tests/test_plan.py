"""The GPU memory budget planner (streamgen/plan.py): every plan fits the budget it was given, sizes
are the ones the transforms build, an applied plan runs and computes what the resident model does,
and an infeasible budget is one line naming --gpu-memory-gb."""

from __future__ import annotations

import copy

import pytest
import torch

from streamgen.cli import main
from streamgen.models.wan import WanConfig, WanModel
from streamgen.ops.offload import offload
from streamgen.ops.quant import quantize
from streamgen.plan import GIB, make_plan, model_sizes

W14 = WanConfig.preset("wan2.1-t2v-14b")


def _check(plan, budget):
    assert plan.fits, plan.reason
    assert plan.total == sum(plan.parts.values()) <= budget
    n_res = len(plan.resident_blocks)
    assert n_res + plan.streamed_blocks == plan.layers
    assert len(set(plan.resident_blocks)) == n_res and all(0 <= i < plan.layers for i in plan.resident_blocks)
    slots = plan.weight_prefetch + 1 if plan.streamed_blocks else 0
    assert plan.parts["weights"] == (n_res + slots) * plan.block_bytes
    assert plan.h2d["weights"] == plan.forwards * plan.streamed_blocks * plan.block_bytes
    assert plan.h2d["kv"] == (plan.forwards * plan.layers * plan.kv_layer_bytes if plan.kv_offload else 0)


@pytest.mark.parametrize("quant", [None, "fp8"])
def test_14b_plans_fit_their_budgets_and_move_less_with_more_memory(quant):
    moved = []
    for gb in (6, 8, 12, 16, 24, 32, 48, 80):
        budget = int(gb * GIB)
        plan = make_plan(W14, width=832, height=480, budget_bytes=budget, weight_quant=quant, kv_quant=quant)
        _check(plan, budget)
        moved.append(plan.h2d_bytes)
        lines = plan.lines()
        assert "moved per chunk" in lines[-1] and f"budget {gb:.2f} GiB" in lines[0]
    assert moved == sorted(moved, reverse=True) and moved[-1] == 0 < moved[0]


def test_14b_in_8_gib_streams_weights_and_kv():
    plan = make_plan(W14, width=832, height=480, budget_bytes=8 * GIB, weight_quant="fp8", kv_quant="fp8")
    _check(plan, 8 * GIB)
    assert plan.tokens == 4680 and plan.forwards == 5 and plan.window_frames == 12
    assert 0 < len(plan.resident_blocks) < 40 and plan.weight_prefetch == 2 and plan.kv_offload
    gaps = [b - a for a, b in zip(plan.resident_blocks, plan.resident_blocks[1:])]
    assert max(gaps) - min(gaps) <= 1  # resident blocks spread over the depth
    bf16 = make_plan(W14, width=832, height=480, budget_bytes=8 * GIB)
    _check(bf16, 8 * GIB)
    assert plan.h2d_bytes < 0.5 * bf16.h2d_bytes  # fp8 weights + KV: less than half the bytes moved


def test_infeasible_budget_is_one_line_naming_the_option(capsys):
    plan = make_plan(W14, width=832, height=480, budget_bytes=GIB)
    assert not plan.fits and "--gpu-memory-gb 1:" in plan.reason and "\n" not in plan.reason
    assert main(["info", "--plan", "--gpu-memory-gb", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("streamgen info: error: --gpu-memory-gb 1:") and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as exc:
        main(["info", "--plan", "--gpu-memory-gb", "0"])
    assert exc.value.code == 2 and "--gpu-memory-gb" in capsys.readouterr().err
    assert main(["info", "--plan"]) == 2 and "--gpu-memory-gb" in capsys.readouterr().err
    assert main(["info", "--plan", "--gpu-memory-gb", "8", "--width", "100"]) == 2
    assert "--width 100" in capsys.readouterr().err


def test_info_plan_prints_the_plan(capsys):
    assert main(["info", "--plan", "--gpu-memory-gb", "8", "--quant", "fp8", "--kv-quant", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "wan2.1-t2v-14b at 832x480" in out and "blocks resident" in out and "host-to-device" in out


@pytest.mark.parametrize("quant", [None, "int8-weight"])
def test_sizes_are_the_transforms_sizes(quant):
    torch.manual_seed(0)
    cfg = WanConfig.preset("tiny")
    m = WanModel(cfg).eval()
    if quant:
        quantize(m, quant)
    sizes = model_sizes(cfg, torch.float32, quant)
    outside = sum(t.numel() * t.element_size() for n, t in m.state_dict().items() if not n.startswith("blocks."))
    h = offload(m, device="cpu", prefetch=1)
    assert sizes.block == h.stats()["max_block_bytes"] and sizes.outside == outside
    h.remove()


@pytest.mark.parametrize("tight", ["one block less", "half the cache less"])
def test_applied_plan_runs_within_its_layout_and_equals_resident(tight):
    """Tight budgets for the tiny model (fp32, 64x64 video): one block less than everything (some
    blocks resident, the rest streamed), or half the KV cache less too (all blocks and the KV cache
    streamed); the planned model's chunks == the resident model's, bit for bit."""
    torch.manual_seed(0)
    cfg = WanConfig.preset("tiny", num_layers=6, local_frames=6, sink_frames=1)
    ref = WanModel(cfg).eval()
    full = make_plan(cfg, width=64, height=64, budget_bytes=64 << 20, dtype=torch.float32, margin=0)
    assert full.h2d_bytes == 0
    less = full.block_bytes if tight == "one block less" else full.parts["kv"] // 2 + 3 * full.block_bytes
    budget = full.total - less
    plan = make_plan(cfg, width=64, height=64, budget_bytes=budget, dtype=torch.float32, margin=0)
    _check(plan, budget)
    assert plan.streamed_blocks > 0 and plan.h2d_bytes > 0
    if tight == "one block less":
        assert 0 < len(plan.resident_blocks) < cfg.num_layers and not plan.kv_offload
    else:
        assert plan.resident_blocks == [] and plan.kv_offload
    m = copy.deepcopy(ref)
    handles = plan.apply(m, device="cpu")
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, 5, cfg.text_dim, generator=g)
    xs = [torch.randn(1, 16, 3, 8, 8, generator=g) for _ in range(4)]

    def run(model):
        c = model.new_cache(1, (8, 8), local_frames=6, sink_frames=1)
        model.set_prompt(c, ctx)
        with torch.no_grad():
            return [model.forward_chunk(x, torch.full((1,), 700.0), c, update_cache=True) for x in xs], c

    want, _ = run(ref)
    got, cache = run(m)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    off = getattr(m, "_streamgen_offload")
    assert off.stats()["resident_blocks"] == plan.resident_blocks
    assert (cache._kv is not None and cache._kv.offload) == plan.kv_offload
    for h in reversed(handles):
        h.remove()
