"""Every Wan checkpoint layout loads to the same model; broken files fail with useful errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from streamgen.models.checkpoints import (
    CheckpointError,
    check_keys,
    infer_wan_config,
    inspect_wan_checkpoint,
    load_wan_model,
    load_wan_state_dict,
    native_to_diffusers,
    read_state_dict,
)
from streamgen.models.wan import WanConfig, WanModel

CFG = WanConfig.preset("tiny")


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return WanModel(CFG).eval()


@pytest.fixture(scope="module")
def sd(ref):
    return {k: v.clone().contiguous() for k, v in ref.state_dict().items()}


def _assert_same(model, sd):
    got = model.state_dict()
    assert list(got) == list(sd)
    for k, v in sd.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k


def _assert_same_output(model, ref):
    x = torch.randn(1, 16, 2, 4, 4)
    t = torch.tensor([300.0])
    ctx = torch.randn(1, 16, CFG.text_dim)
    with torch.no_grad():
        assert torch.allclose(model(x, t, ctx), ref(x, t, ctx), rtol=1e-5, atol=1e-6)


def test_original_single_file(tmp_path, sd, ref):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(sd, path)
    info = inspect_wan_checkpoint(path)
    assert info.format.startswith("original Wan2.1 (safetensors, 1 file")
    info.close()
    model = load_wan_model(path, CFG)
    _assert_same(model, sd)
    _assert_same_output(model, ref)
    # config inferred from shapes (tiny preset matched, so num_heads comes out right)
    model2 = load_wan_model(tmp_path)  # the directory works too
    assert model2.cfg == CFG
    _assert_same(model2, sd)


def _save_sharded(tmp_path, sd, n=3, stem="diffusion_pytorch_model"):
    keys = list(sd)
    weight_map = {}
    for i in range(n):
        name = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::n]}
        save_file(part, tmp_path / name)
        weight_map.update({k: name for k in part})
    index = tmp_path / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_original_sharded_with_index(tmp_path, sd, ref):
    index = _save_sharded(tmp_path, sd)
    for path in (index, tmp_path):
        model = load_wan_model(path)
        _assert_same(model, sd)
    assert "3 shards" in inspect_wan_checkpoint(index).format
    _assert_same_output(model, ref)


def test_diffusers_layout(tmp_path, sd, ref):
    (tmp_path / "transformer").mkdir()
    _save_sharded(tmp_path / "transformer", native_to_diffusers(sd), n=2)
    info = inspect_wan_checkpoint(tmp_path)  # a pipeline root: transformer/ is found
    assert info.format.startswith("diffusers WanTransformer3DModel")
    info.close()
    model = load_wan_model(tmp_path)
    _assert_same(model, sd)
    _assert_same_output(model, ref)


def test_diffusers_file_saved_by_diffusers(tmp_path, sd):
    from diffusers import WanTransformer3DModel

    dm = WanTransformer3DModel(
        num_attention_heads=CFG.num_heads,
        attention_head_dim=CFG.head_dim,
        text_dim=CFG.text_dim,
        ffn_dim=CFG.ffn_dim,
        num_layers=CFG.num_layers,
    )
    dm.load_state_dict(native_to_diffusers(sd))
    dm.save_pretrained(tmp_path / "transformer")
    _assert_same(load_wan_model(tmp_path / "transformer"), sd)


def test_self_forcing_and_causvid_pt(tmp_path, sd):
    ema = {f"model.{k}": v for k, v in sd.items()}
    other = {f"model.{k}": torch.zeros_like(v) for k, v in sd.items()}
    sf = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": other, "generator_ema": ema, "critic": {"x": torch.zeros(1)}}, sf)
    info = inspect_wan_checkpoint(sf)
    assert "Self-Forcing/CausVid" in info.format and "generator_ema" in info.format and "'model.'" in info.format
    _assert_same(load_wan_model(sf), sd)
    non_ema = load_wan_model(sf, state_key="generator")
    assert all(not v.any() for v in non_ema.state_dict().values())
    with pytest.raises(CheckpointError, match="state_key='nope'"):
        load_wan_model(sf, state_key="nope")

    cv = tmp_path / "causvid.pt"
    torch.save({"generator": ema}, cv)
    _assert_same(load_wan_model(cv), sd)


def test_prefixes(tmp_path, sd):
    comfy = tmp_path / "comfy.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, comfy)
    assert "model.diffusion_model." in inspect_wan_checkpoint(comfy).format
    _assert_same(load_wan_model(comfy), sd)

    def fsdp(k):
        return "model._fsdp_wrapped_module." + k.replace("blocks.", "blocks._fsdp_wrapped_module.", 1)

    path = tmp_path / "fsdp.pt"
    torch.save({"generator": {fsdp(k): v for k, v in sd.items()}}, path)
    assert any("_fsdp_wrapped_module" in k for k in torch.load(path)["generator"])
    assert "_fsdp_wrapped_module" in inspect_wan_checkpoint(path).format
    _assert_same(load_wan_model(path), sd)


def _quantize(sd, qdtype):
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2:
            amax = v.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)
            if qdtype == torch.int8:
                scale = amax / 127
                q = (v / scale).round().clamp(-128, 127).to(torch.int8)
            else:
                scale = amax / 448
                q = (v / scale).to(qdtype)
            out[k] = q
            out[k + "_scale"] = scale.float()
        else:
            out[k] = v.to(torch.bfloat16)
    return out


@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn])
def test_lightx2v_quantized(tmp_path, sd, qdtype):
    q = _quantize(sd, qdtype)
    path = tmp_path / "wan_int8.safetensors"
    save_file(q, path)
    info = inspect_wan_checkpoint(path)
    assert info.quantized == str(qdtype).replace("torch.", "") and "LightX2V" in info.format
    info.close()
    model = load_wan_model(path)  # default: dequantize to bfloat16
    got = model.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    k = "blocks.1.ffn.0.weight"
    expect = (q[k].float() * q[k + "_scale"]).to(torch.bfloat16)
    assert torch.equal(got[k], expect)
    assert ((got[k].float() - sd[k]).norm() / sd[k].norm()) < 0.05
    sd32, _, _ = load_wan_state_dict(path, dtype=torch.float32)
    assert torch.equal(sd32[k], q[k].float() * q[k + "_scale"])


def test_dtype_and_device_target(tmp_path, sd):
    path = tmp_path / "m.safetensors"
    save_file(sd, path)
    model = load_wan_model(path, device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())


def test_infer_config_for_real_sizes():
    for name in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b"):
        cfg = WanConfig.preset(name)
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in WanModel(cfg).state_dict().items()}
        assert infer_wan_config(shapes) == cfg


# ----------------------------------------------------------------------------- failures


def test_partial_checkpoint_names_missing_keys(tmp_path, sd):
    part = {k: v for k, v in sd.items() if not k.startswith("blocks.2.")}
    path = tmp_path / "partial.safetensors"
    save_file(part, path)
    with pytest.raises(CheckpointError) as e:
        load_wan_model(path, CFG)
    msg = str(e.value)
    n_missing = sum(k.startswith("blocks.2.") for k in sd)
    assert "original Wan2.1" in msg and f"missing keys ({n_missing})" in msg
    assert "blocks.2.self_attn.q.weight" in msg or "blocks.2." in msg


def test_unexpected_and_mismatched(tmp_path, sd):
    bad = dict(sd)
    bad["blocks.0.cross_attn.k_img.weight"] = torch.zeros(CFG.dim, CFG.dim)
    bad["blocks.1.ffn.0.weight"] = torch.zeros(CFG.ffn_dim + 8, CFG.dim)
    path = tmp_path / "bad.safetensors"
    i2v_key = "blocks.0.attn2.add_k_proj.weight"  # diffusers name of an image-to-video weight
    save_file(native_to_diffusers({k: v for k, v in bad.items() if "k_img" not in k}) | {i2v_key: bad["blocks.0.cross_attn.k_img.weight"]}, path)
    with pytest.raises(CheckpointError) as e:
        load_wan_model(path, CFG)
    msg = str(e.value)
    assert "diffusers WanTransformer3DModel" in msg
    assert "unexpected keys (1): blocks.0.attn2.add_k_proj.weight" in msg
    assert "shape mismatches (1): blocks.1.ffn.0.weight: checkpoint (392, 128) vs model (384, 128)" in msg


def test_wrong_config(tmp_path, sd):
    path = tmp_path / "m.safetensors"
    save_file(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_wan_model(path, WanConfig.preset("tiny", num_layers=4, ffn_dim=256))
    msg = str(e.value)
    assert "missing keys" in msg and "blocks.3." in msg and "shape mismatches (9)" in msg


def test_corrupt_and_truncated_files(tmp_path, sd):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01 definitely not safetensors" * 10)
    with pytest.raises(CheckpointError, match="junk.safetensors.*corrupt or not a safetensors file"):
        load_wan_model(junk)

    good = tmp_path / "good.safetensors"
    save_file(sd, good)
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_wan_model(cut)

    pt = tmp_path / "junk.pt"
    pt.write_bytes(b"garbage" * 100)
    with pytest.raises(CheckpointError, match="junk.pt: corrupt or not a torch checkpoint") as e:
        load_wan_model(pt)
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value) and e.value.__cause__ is None
    torch.save(sd, pt)
    pt.write_bytes(pt.read_bytes()[:-100])  # a cut-off download
    with pytest.raises(CheckpointError, match="junk.pt: corrupt or not a torch checkpoint .*damaged") as e:
        load_wan_model(pt)
    import numpy as np

    torch.save({"w": np.zeros(3)}, pt)  # pickles a Python object: named, no advice to unpickle it
    with pytest.raises(CheckpointError, match="junk.pt: the checkpoint pickles a Python object .*numpy") as e:
        load_wan_model(pt)
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)

    with pytest.raises(CheckpointError, match="no such file"):
        load_wan_model(tmp_path / "nope.safetensors")


def test_missing_shard_and_bad_index(tmp_path, sd):
    index = _save_sharded(tmp_path, sd, n=2)
    (tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard diffusion_pytorch_model-00002-of-00002.safetensors .* missing"):
        load_wan_model(index)
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        load_wan_model(index)


def test_pt_without_state_dict(tmp_path):
    path = tmp_path / "opt.pt"
    torch.save({"optimizer": {"lr": 1.0}, "step": 3}, path)
    with pytest.raises(CheckpointError, match="none of"):
        load_wan_model(path)


def test_quantized_weight_without_scale(tmp_path, sd):
    q = _quantize(sd, torch.int8)
    del q["blocks.0.ffn.0.weight_scale"]
    path = tmp_path / "q.safetensors"
    save_file(q, path)
    with pytest.raises(CheckpointError, match="blocks.0.ffn.0.weight is torch.int8 without a"):
        load_wan_model(path)


def test_shared_loader_helpers(tmp_path):
    """read_state_dict / check_keys, used by the VAE, TAEHV, RIFE and umT5 loaders."""
    sd = {"a.weight": torch.arange(6.0).view(2, 3), "b.bias": torch.ones(2)}
    legacy = tmp_path / "legacy.pth"  # the pre-zip torch.save format cannot be memory-mapped
    torch.save({"state_dict": sd}, legacy, _use_new_zipfile_serialization=False)
    (tmp_path / "sub").mkdir()
    save_file(sd, tmp_path / "sub" / "w.safetensors")
    for path, names in ((legacy, ()), (tmp_path, ("nope.pth", "sub/w.safetensors"))):
        got = read_state_dict(path, what="Thing", names=names)
        assert list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    with pytest.raises(FileNotFoundError, match=r"no Thing weights in folder .*: expected one of x.pth, y.pth"):
        read_state_dict(tmp_path, what="Thing", names=("x.pth", "y.pth"))
    with pytest.raises(FileNotFoundError, match=r"Thing checkpoint not found: .*gone.pth \(pass thing.pth\)"):
        read_state_dict(tmp_path / "gone.pth", what="Thing", hint="pass thing.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="bad.safetensors: corrupt or not a safetensors file"):
        read_state_dict(tmp_path / "bad.safetensors", what="Thing")

    expected = {f"k{i:02d}": (2, 2) for i in range(12)}
    got = {f"k{i:02d}": torch.zeros(2, 2) for i in range(1, 12)} | {"k05": torch.zeros(3, 2), "extra": torch.zeros(1)}
    check_keys(expected, {k: torch.zeros(2, 2) for k in expected}, what="fine")
    with pytest.raises(CheckpointError) as e:
        check_keys(expected, got, what="Thing does not match:", unexpected=["raw.key"], notes=["  (a hint)"])
    assert str(e.value).splitlines() == [
        "Thing does not match:",
        "  missing keys (1): k00",
        "  unexpected keys (2): extra, raw.key",
        "  shape mismatches (1): k05: checkpoint (3, 2) vs model (2, 2)",
        "  (a hint)",
    ]
    with pytest.raises(CheckpointError, match=r"missing keys \(12\): k00, .*, k07, \.\.\. \(\+4 more\)"):
        check_keys(expected, {}, what="empty")
