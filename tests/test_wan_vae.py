"""Wan VAE vs diffusers AutoencoderKLWan (tiny random config), both checkpoint layouts, chunked decode."""

import pytest
import torch

from streamgen.models.wan_vae import (
    WanVAE,
    WanVAEConfig,
    convert_wan_vae_state_dict,
    key_table,
    load_wan_vae,
    to_diffusers_state_dict,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

CFG = WanVAEConfig.preset("tiny")


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    m = AutoencoderKLWan(base_dim=CFG.base_dim, z_dim=CFG.z_dim).eval()
    with torch.no_grad():  # move norms/biases off their init values so every weight matters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def stats():
    shape = (1, CFG.z_dim, 1, 1, 1)
    return torch.tensor(CFG.latents_mean).view(shape), torch.tensor(CFG.latents_std).view(shape)


@pytest.fixture(scope="module")
def native_sd(ref):
    """Original Wan2.1_VAE.pth layout, checked against diffusers' own (independent) converter."""
    sd = convert_wan_vae_state_dict(ref.state_dict(), CFG)
    back = convert_wan_vae_to_diffusers(sd)
    want = ref.state_dict()
    assert set(back) == set(want)
    assert all(torch.equal(back[k], want[k]) for k in want)
    return sd


def _from(sd):
    vae = WanVAE(CFG).eval()
    vae.load_state_dict(convert_wan_vae_state_dict(sd, CFG), strict=True)
    return vae


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_decode_and_encode_match_diffusers(ref, native_sd, stats, layout):
    mean, std = stats
    vae = _from(ref.state_dict() if layout == "diffusers" else native_sd)
    torch.manual_seed(1)
    z = torch.randn(2, CFG.z_dim, 4, 4, 6)  # normalized (DiT-space) latents
    with torch.no_grad():
        want = ref.decode(z * std + mean).sample
    got = vae.decode(z)
    assert got.shape == (2, 3, 13, 32, 48) == want.shape
    assert rel(got, want) < 1e-4
    assert got.min() >= -1 and got.max() <= 1

    video = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    with torch.no_grad():
        want = (ref.encode(video).latent_dist.mode() - mean) / std
    got = vae.encode(video)
    assert got.shape == (1, CFG.z_dim, 3, 4, 6)
    assert rel(got, want) < 1e-4
    image = video[:, :, :1]  # image start: T=1 -> one latent frame
    with torch.no_grad():
        want = (ref.encode(image).latent_dist.mode() - mean) / std
    assert rel(vae.encode(image), want) < 1e-4


def test_chunked_decode_equals_whole_and_diffusers(ref, stats):
    mean, std = stats
    vae = _from(ref.state_dict())
    torch.manual_seed(2)
    z = torch.randn(1, CFG.z_dim, 7, 4, 4)
    whole = vae.decode(z)
    with torch.no_grad():
        per_frame_ref = ref.decode(z * std + mean).sample  # diffusers: one latent frame per call, feat_cache
    assert rel(whole, per_frame_ref) < 1e-4
    for split in ([1, 3, 3], [3, 3, 1], [1, 1, 1, 1, 1, 1, 1], [2, 5]):
        state = vae.new_state()
        outs, start = [], 0
        for i, f in enumerate(split):
            out = vae.decode_chunk(z[:, :, start : start + f], state)
            assert out.shape[2] == vae.output_frames(f, first=i == 0) == (1 + 4 * (f - 1) if i == 0 else 4 * f)
            outs.append(out)
            start += f
        chunked = torch.cat(outs, dim=2)
        assert chunked.shape == whole.shape
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
        assert rel(chunked, per_frame_ref) < 1e-4

    state = vae.new_state()
    split = torch.cat([vae.decode_chunk(z[:, :, :3], state, frames_per_pass=1),
                       vae.decode_chunk(z[:, :, 3:], state, frames_per_pass=3)], dim=2)  # fmt: skip
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-5)

    # reset() reuses the buffers for a new stream
    state = vae.new_state()
    vae.decode_chunk(torch.randn(1, CFG.z_dim, 3, 4, 4), state)
    n = len(state.buffers)
    state.reset()
    again = torch.cat([vae.decode_chunk(z[:, :, :3], state), vae.decode_chunk(z[:, :, 3:], state)], dim=2)
    assert len(state.buffers) == n
    torch.testing.assert_close(again, whole, rtol=0, atol=1e-5)


def test_state_rejects_other_shape():
    vae = WanVAE(CFG).eval()
    state = vae.new_state()
    vae.decode_chunk(torch.randn(1, CFG.z_dim, 1, 4, 4), state)
    with pytest.raises(ValueError, match="one stream of fixed"):
        vae.decode_chunk(torch.randn(1, CFG.z_dim, 1, 4, 6), state)


def test_key_maps_roundtrip_and_errors(ref, native_sd, tmp_path):
    table = key_table(CFG)
    assert len(set(table.values())) == len(table) == len(native_sd)
    dsd = to_diffusers_state_dict(native_sd, CFG)
    fresh = AutoencoderKLWan(base_dim=CFG.base_dim, z_dim=CFG.z_dim)
    fresh.load_state_dict(dsd, strict=True)  # diffusers accepts exactly our export

    bad = dict(native_sd)
    bad.pop("decoder.upsamples.3.time_conv.weight")
    bad["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \(1\): decoder.upsamples.3.time_conv.weight") as e:
        convert_wan_vae_state_dict(bad, CFG)
    assert "unexpected keys (1): decoder.extra.weight" in str(e.value)

    bad = dict(ref.state_dict())
    bad["decoder.conv_in.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"decoder.conv1.weight: checkpoint \(3, 3\)"):
        convert_wan_vae_state_dict(bad, CFG)
    with pytest.raises(ValueError, match="shape mismatches"):
        convert_wan_vae_state_dict(native_sd, WanVAEConfig.preset("tiny", base_dim=16))
    with pytest.raises(ValueError, match="not a Wan2.1 VAE state dict"):
        convert_wan_vae_state_dict({"foo.weight": torch.zeros(1)}, CFG)
    with pytest.raises(ValueError, match="unknown Wan VAE preset"):
        WanVAEConfig.preset("wan9")

    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(native_sd, path)
    vae = load_wan_vae(path, CFG)
    z = torch.randn(1, CFG.z_dim, 2, 2, 2)
    torch.testing.assert_close(vae.decode(z), _from(native_sd).decode(z))
    with pytest.raises(FileNotFoundError, match="Wan VAE checkpoint not found"):
        load_wan_vae(tmp_path / "nope.pth", CFG)
