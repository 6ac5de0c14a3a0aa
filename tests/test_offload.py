"""Block offload on the CPU: the same code path as on CUDA (plain copies, no streams), compared
bit-for-bit with the resident model."""

import copy

import pytest
import torch
import torch.nn as nn

from streamgen.models.wan import WanConfig, WanModel
from streamgen.ops.offload import offload

B, H, W = 2, 4, 6


@pytest.fixture(scope="module")
def resident():
    torch.manual_seed(0)
    m = WanModel(WanConfig.preset("tiny", num_layers=5)).eval()
    with torch.no_grad():
        for b in m.blocks:
            b.norm3.weight.normal_(1.0, 0.3)
            b.self_attn.norm_q.weight.normal_(1.0, 0.3)
    return m


def _inputs(frames, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = WanConfig.preset("tiny")
    x = torch.randn(B, 16, frames, H, W, generator=g)
    t = torch.rand(B, frames, generator=g) * 1000
    ctx = torch.randn(B, 7, cfg.text_dim, generator=g)
    return x, t, ctx


def _slot_ptrs(handle):
    return {s.untyped_storage().data_ptr() for s in handle.slots}


def _assert_offloaded(model, handle):
    ptrs = _slot_ptrs(handle)
    for block in model.blocks:
        for p in block.parameters():
            assert p.untyped_storage().data_ptr() in ptrs
    assert len(handle.slots) == handle.prefetch + 1 == handle.stats()["num_slots"]


def _stream(model, caches, x, t, steps=2):
    """Interleave sessions chunk by chunk: `steps` tentative calls then one commit each."""
    outs = {i: [] for i in range(len(caches))}
    f = x.shape[2]
    for s in range(0, f, 2):
        for i, cache in enumerate(caches):
            xi = x[:, :, s : s + 2] + i
            for k in range(steps):
                outs[i].append(model.forward_chunk(xi * (k + 1), t[:, s : s + 2] * 0.5, cache, start_frame=s))
            outs[i].append(model.forward_chunk(xi, t[:, s : s + 2], cache, start_frame=s, update_cache=True))
    return outs


@pytest.mark.parametrize("prefetch", [0, 1, 2, 4])
def test_offloaded_equals_resident(resident, prefetch):
    x, t, ctx = _inputs(6)
    model = copy.deepcopy(resident)
    with torch.no_grad():
        ref_full = resident(x, t, ctx)
        ref_bc = resident(x, t, ctx, frames_per_block=2, local_frames=4, sink_frames=1)
        ref_caches = [resident.new_cache(B, (H, W), max_frames=6) for _ in range(2)]
        for i, c in enumerate(ref_caches):
            resident.set_prompt(c, ctx * (i + 1))
        ref_stream = _stream(resident, ref_caches, x, t)

    handle = offload(model, device="cpu", prefetch=prefetch)
    _assert_offloaded(model, handle)
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), ref_full)
        _assert_offloaded(model, handle)
        assert torch.equal(model(x, t, ctx, frames_per_block=2, local_frames=4, sink_frames=1), ref_bc)
        caches = [model.new_cache(B, (H, W), max_frames=6) for _ in range(2)]
        for i, c in enumerate(caches):
            model.set_prompt(c, ctx * (i + 1))
        out_stream = _stream(model, caches, x, t)
    for i in ref_stream:
        for a, b in zip(out_stream[i], ref_stream[i], strict=True):
            assert torch.equal(a, b)
    for c, rc in zip(caches, ref_caches):
        assert torch.equal(c.k, rc.k) and torch.equal(c.cross_v, rc.cross_v)
    _assert_offloaded(model, handle)

    st = handle.stats()
    n_blocks = len(model.blocks)
    assert st["bytes_per_block"] == [st["max_block_bytes"]] * n_blocks
    assert st["max_block_bytes"] >= sum(p.numel() * 4 for p in resident.blocks[0].parameters())
    assert st["gpu_bytes"] == st["slot_bytes"] + st["resident_bytes"]
    total = sum(p.numel() * 4 for p in resident.parameters())
    if prefetch == n_blocks - 1:  # every block has its own slot: copied once, then resident
        assert st["copies"] == n_blocks and st["gpu_bytes"] >= total
    else:  # every entry copies; with prefetch only the very first one is a miss
        assert st["gpu_bytes"] < total
        assert st["copies"] > 10 * n_blocks
        assert st["misses"] == (st["copies"] if prefetch == 0 else 1)
    # wrap-around: the block after the last one entered is already in the next slot
    assert prefetch == 0 or st["slot_blocks"][handle._next_slot] == (handle._current + 1) % n_blocks


def test_inference_mode_and_remove_restores(resident):
    x, t, ctx = _inputs(3, seed=3)
    model = copy.deepcopy(resident)
    with torch.no_grad():
        ref = resident(x, t, ctx)
    handle = offload(model, device="cpu", prefetch=1)
    with torch.inference_mode():
        assert torch.equal(model(x, t, ctx), ref)
    host = handle.host_state_dict()
    for k, v in resident.state_dict().items():
        assert torch.equal(host[k], v), k
    with pytest.raises(ValueError, match="already offloaded"):
        offload(model, device="cpu")

    handle.remove()
    ptrs = set()
    for p in model.parameters():
        ptrs.add(p.untyped_storage().data_ptr())
    assert len(ptrs) == len(list(model.parameters()))  # every tensor owns its storage again
    assert all(not m._forward_pre_hooks for m in model.modules())
    for k, v in resident.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), ref)
    with pytest.raises(RuntimeError, match="already removed"):
        handle.remove()
    handle2 = offload(model, device="cpu", prefetch=2)  # can offload again
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), ref)
    handle2.remove()


class _MixedBlock(nn.Module):
    def __init__(self, i):
        super().__init__()
        self.lin = nn.Linear(5, 5).double()
        self.scale = nn.Parameter(torch.full((3,), float(i + 1)))  # float32 after float64: alignment
        self.register_buffer("step", torch.tensor([i], dtype=torch.int16))
        self.register_buffer("flag", torch.tensor([True, False, i % 2 == 0]))

    def forward(self, x):
        y = self.lin(x.double()).float()
        return y * self.scale.sum() + self.step.float() + self.flag.float().sum()


class _Toy(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.inp = nn.Linear(5, 5)
        self.layers = nn.ModuleList(_MixedBlock(i) for i in range(n))

    def forward(self, x):
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("order", ["forward", "reversed", "random"])
def test_any_module_list_mixed_dtypes_and_buffers(order):
    torch.manual_seed(0)
    ref_model = _Toy(4)
    model = copy.deepcopy(ref_model)
    handle = offload(model, device="cpu", blocks_attr="layers", prefetch=1)
    x = torch.randn(3, 5)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), ref_model(x))
        # blocks called directly, in another order, still compute the right thing (only slower)
        idx = {"forward": [0, 1, 2, 3], "reversed": [3, 2, 1, 0], "random": [2, 2, 0, 3, 1, 0]}[order]
        for i in idx:
            assert torch.equal(model.layers[i](x), ref_model.layers[i](x))
    buf_ptrs = {b.untyped_storage().data_ptr() for layer in model.layers for b in layer.buffers()}
    assert buf_ptrs <= _slot_ptrs(handle)
    handle.remove()
    assert model.layers[2].step.dtype == torch.int16 and model.layers[2].flag.dtype == torch.bool
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_bad_arguments_name_the_argument():
    model = _Toy(3)
    with pytest.raises(ValueError, match="prefetch"):
        offload(model, device="cpu", blocks_attr="layers", prefetch=3)
    with pytest.raises(ValueError, match="prefetch"):
        offload(model, device="cpu", blocks_attr="layers", prefetch=-1)
    with pytest.raises(ValueError, match="prefetch"):
        offload(model, device="cpu", blocks_attr="layers", prefetch=1.0)
    with pytest.raises(ValueError, match="blocks_attr"):
        offload(model, device="cpu")  # no `blocks` attribute
    with pytest.raises(ValueError, match="blocks_attr"):
        offload(model, device="cpu", blocks_attr="inp")
    with pytest.raises(ValueError, match="device"):
        offload(model, device="bogus", blocks_attr="layers")
    with pytest.raises(ValueError, match="device"):
        offload(model, device="meta", blocks_attr="layers")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            offload(model, device="cuda", blocks_attr="layers")
    with pytest.raises(ValueError, match="pin"):
        offload(model, device="cpu", blocks_attr="layers", pin="yes")
    tied = _Toy(2)
    tied.layers[1].scale = tied.layers[0].scale
    with pytest.raises(ValueError, match="share a tensor"):
        offload(tied, device="cpu", blocks_attr="layers")
    assert not hasattr(model, "_streamgen_offload")  # failed calls leave the model untouched


def _run_all(model, x, t, ctx):
    with torch.no_grad():
        out = [model(x, t, ctx)]
        cache = model.new_cache(B, (H, W), max_frames=6)
        model.set_prompt(cache, ctx)
        out += _stream(model, [cache], x, t, steps=1)[0]
    return out


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.float64])
def test_disk_source_equals_resident(resident, tmp_path, file_dtype):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: v.to(file_dtype).contiguous() for k, v in resident.state_dict().items()}, str(path))
    x, t, ctx = _inputs(4, seed=5)
    ref = _run_all(resident, x, t, ctx)

    # blocks never materialized: built on meta, only the resident part loaded
    with torch.device("meta"):
        model = WanModel(resident.cfg).eval()
    outside = {k: v for k, v in resident.state_dict().items() if not k.startswith("blocks.")}
    model.load_state_dict(outside, strict=False, assign=True)
    handle = offload(model, device="cpu", prefetch=1, source="disk", path=path)
    st = handle.stats()
    assert st["source"] == "disk" and st["host_bytes"] == 2 * st["max_block_bytes"]
    _assert_offloaded(model, handle)
    for a, b in zip(_run_all(model, x, t, ctx), ref, strict=True):
        assert torch.equal(a, b)
    assert handle.stats()["misses"] == 1
    host = handle.host_state_dict()
    for k, v in resident.state_dict().items():
        assert torch.equal(host[k], v), k
    handle.remove()
    assert not any(p.is_meta for p in model.parameters())
    for a, b in zip(_run_all(model, x, t, ctx), ref, strict=True):
        assert torch.equal(a, b)


def test_disk_source_errors(resident, tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in resident.state_dict().items()}
    model = copy.deepcopy(resident)
    with pytest.raises(ValueError, match="path"):
        offload(model, device="cpu", source="disk")
    with pytest.raises(ValueError, match="path"):
        offload(model, device="cpu", path=tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="source"):
        offload(model, device="cpu", source="tape", path=tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        offload(model, device="cpu", source="disk", path=tmp_path / "nope.safetensors")
    broken = dict(sd)
    del broken["blocks.1.ffn.0.weight"]
    broken["blocks.2.self_attn.q.weight"] = torch.zeros(3, 3)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.0\.weight.*blocks\.2\.self_attn\.q\.weight: shape"):
        offload(model, device="cpu", source="disk", path=tmp_path / "broken.safetensors")
    with torch.device("meta"):
        meta_model = WanModel(resident.cfg)
    with pytest.raises(ValueError, match="meta"):
        offload(meta_model, device="cpu")
    assert not hasattr(model, "_streamgen_offload")


def test_resident_blocks_stay_on_the_device_and_the_rest_streams(resident):
    x, t, ctx = _inputs(4, seed=7)
    model = copy.deepcopy(resident)
    with torch.no_grad():
        ref = [resident(x, t, ctx) for _ in range(3)]
    handle = offload(model, device="cpu", prefetch=1, resident=[3, 1])
    st = handle.stats()
    assert st["streamed"] == [0, 2, 4] and st["resident_blocks"] == [1, 3] and st["blocks"] == 3
    ptrs = _slot_ptrs(handle)
    for i, block in enumerate(model.blocks):
        inside = {p.untyped_storage().data_ptr() in ptrs for p in block.parameters()}
        assert inside == ({False} if i in (1, 3) else {True}), i
    with torch.no_grad():
        for r in ref:
            assert torch.equal(model(x, t, ctx), r)
    st = handle.stats()
    assert st["copies"] == 3 * 3 + 1 and st["misses"] == 1  # 3 streamed blocks a forward, + the wrap prefetch
    assert st["resident_bytes"] > 2 * st["max_block_bytes"]  # the two resident blocks count as resident
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), ref[0])
    for bad in ([5], [-1], [0, 1, 2, 3, 4], ["a"]):
        with pytest.raises(ValueError, match="resident"):
            offload(copy.deepcopy(resident), device="cpu", resident=bad)
    with pytest.raises(ValueError, match="prefetch"):  # 2 streamed blocks: prefetch <= 1
        offload(copy.deepcopy(resident), device="cpu", prefetch=2, resident=[0, 1, 2])


@pytest.mark.parametrize("readers", [1, 3])
def test_disk_tier_reads_each_block_once_per_pass(resident, tmp_path, readers):
    """A thread pool reads blocks from the memory-mapped file into staging: every streamed block
    is read exactly once per forward (plus the prefetch that wraps into the next one)."""
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in resident.state_dict().items()}, str(path))
    x, t, ctx = _inputs(3, seed=9)
    with torch.no_grad():
        ref = resident(x, t, ctx)
    with torch.device("meta"):
        model = WanModel(resident.cfg).eval()
    outside = {k: v for k, v in resident.state_dict().items() if not k.startswith("blocks.")}
    model.load_state_dict(outside, strict=False, assign=True)
    prefetch, passes = 2, 4
    handle = offload(model, device="cpu", prefetch=prefetch, source="disk", path=path, readers=readers)
    st = handle.stats()
    assert st["readers"] == readers and st["host_bytes"] == (readers + 1) * st["max_block_bytes"]
    with torch.no_grad():
        for _ in range(passes):
            assert torch.equal(model(x, t, ctx), ref)
    handle.wait_reads()  # the prefetch into a next pass may still be reading
    st = handle.stats()
    n = len(model.blocks)
    assert st["reads"] == [passes + (1 if i < prefetch else 0) for i in range(n)]
    assert st["misses"] == 1 and st["copies"] == sum(st["reads"])
    handle.remove()
    with pytest.raises(ValueError, match="readers"):
        offload(copy.deepcopy(resident), device="cpu", source="disk", path=path, readers=0)
