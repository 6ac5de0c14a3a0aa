"""TAEHV tiny decoder: streaming == whole-video decode; taew2_1-style checkpoints load."""

import pytest
import torch

from streamgen.models.taehv import TAEHV, MemBlock, TAEHVConfig, TGrow, convert_taehv_state_dict, load_taehv

CFG = TAEHVConfig.preset("tiny")


def _naive_whole_video(dec, z):
    """TAEHV's parallel decode in plain layer order: (B,C,T,h,w) latents -> (B,3,4T-3,H,W) in [0,1]."""
    b, _, t = z.shape[:3]
    x = z.transpose(1, 2).flatten(0, 1)
    with torch.no_grad():
        for layer in dec.decoder:
            if isinstance(layer, MemBlock):
                xs = x.reshape(b, t, *x.shape[1:])
                past = torch.cat([torch.zeros_like(xs[:, :1]), xs[:, :-1]], dim=1).flatten(0, 1)
                x = layer(x, past)
            else:
                x = layer(x)
                t = x.shape[0] // b
    x = x.reshape(b, t, *x.shape[1:]).transpose(1, 2)
    return x[:, :, CFG.frames_to_trim :].clamp(0, 1)


@pytest.fixture(scope="module")
def dec():
    return TAEHV(CFG).init_random_(0).eval()


def test_streaming_equals_whole_video(dec):
    torch.manual_seed(0)
    z = torch.randn(2, CFG.latent_channels, 7, 4, 6)
    whole = dec.decode_video(z)
    assert whole.shape == (2, 3, 1 + 4 * 6, 32, 48)
    assert -1 <= whole.min() < whole.max() <= 1 and whole.std() > 0.1  # not saturated / constant
    torch.testing.assert_close(whole, _naive_whole_video(dec, z) * 2 - 1, rtol=0, atol=1e-5)
    for split in ([1, 3, 3], [3, 3, 1], [1] * 7, [2, 5], [7]):
        state = dec.new_state()
        outs, start = [], 0
        for i, f in enumerate(split):
            out = dec.decode_chunk(z[:, :, start : start + f], state)
            assert out.shape[2] == dec.output_frames(f, first=i == 0) == (1 + 4 * (f - 1) if i == 0 else 4 * f)
            outs.append(out)
            start += f
        torch.testing.assert_close(torch.cat(outs, dim=2), whole, rtol=0, atol=1e-5)

    # batch items are independent streams of the same shape
    torch.testing.assert_close(dec.decode_video(z[1:]), whole[1:], rtol=0, atol=1e-5)
    # reset() reuses the memory for a new stream
    state = dec.new_state()
    dec.decode_chunk(torch.randn_like(z[:, :, :2]), state)
    state.reset()
    again = torch.cat([dec.decode_chunk(z[:, :, :3], state), dec.decode_chunk(z[:, :, 3:], state)], dim=2)
    torch.testing.assert_close(again, whole, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="one stream of fixed"):
        dec.decode_chunk(z[:1, :, :1], state)


def test_memory_carries_information(dec):
    """Changing an earlier chunk changes the next chunk's output (the memory is really used)."""
    torch.manual_seed(1)
    z = torch.randn(1, CFG.latent_channels, 4, 4, 4)
    z2 = z.clone()
    z2[:, :, :2] += 1.0
    outs = []
    for lat in (z, z2):
        state = dec.new_state()
        dec.decode_chunk(lat[:, :, :2], state)
        outs.append(dec.decode_chunk(lat[:, :, 2:], state))
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def _checkpoint_like(model: TAEHV) -> dict:
    """A taew2_1.pth-style dict: decoder.N.* keys, an encoder, and a stride-2-shaped weight at the stride-1 TGrow."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    idx = next(i for i, m in enumerate(model.decoder) if isinstance(m, TGrow) and m.stride == 1)
    w = sd[f"decoder.{idx}.conv.weight"]
    sd[f"decoder.{idx}.conv.weight"] = torch.cat([torch.randn_like(w), w])  # last-timestep channels are the real ones
    sd["encoder.0.weight"] = torch.zeros(64, 3, 3, 3)
    return sd, idx


def test_checkpoint_layout(dec, tmp_path):
    keys = dec.state_dict().keys()
    # the published layout: Clamp at 0, conv at 1, MemBlocks at 3-5, TGrow at 7/13/19, final conv at 22
    assert isinstance(dec.decoder[3], MemBlock) and isinstance(dec.decoder[19], TGrow)
    assert {"decoder.1.weight", "decoder.3.conv.0.weight", "decoder.3.conv.4.bias", "decoder.7.conv.weight",
            "decoder.8.weight", "decoder.22.bias"} <= set(keys)  # fmt: skip
    assert "decoder.8.bias" not in keys  # stage convs have no bias

    sd, idx = _checkpoint_like(dec)
    path = tmp_path / "taew2_1.pth"
    torch.save(sd, path)
    loaded = load_taehv(tmp_path, CFG, dtype=torch.float32)
    assert torch.equal(loaded.decoder[idx].conv.weight, dec.decoder[idx].conv.weight)
    z = torch.randn(1, CFG.latent_channels, 2, 2, 2)
    torch.testing.assert_close(loaded.decode_video(z), dec.decode_video(z))

    bad = dict(sd)
    bad.pop("decoder.3.conv.0.weight")
    with pytest.raises(ValueError, match=r"missing keys \(1\): decoder.3.conv.0.weight"):
        convert_taehv_state_dict(bad, CFG)
    with pytest.raises(ValueError, match="shape mismatches"):
        convert_taehv_state_dict(sd, TAEHVConfig.preset("taew2.1"))
    with pytest.raises(ValueError, match="not a TAEHV checkpoint"):
        convert_taehv_state_dict({"x.weight": torch.zeros(1)}, CFG)
    with pytest.raises(FileNotFoundError, match="TAEHV checkpoint not found"):
        load_taehv(tmp_path / "missing.pth", CFG)


def test_full_size_shapes():
    with torch.device("meta"):
        m = TAEHV(TAEHVConfig.preset("taew2.1"))
    assert m.decoder[1].weight.shape == (256, 16, 3, 3)
    assert m.decoder[22].weight.shape == (3, 64, 3, 3)
    assert TAEHVConfig().frames_to_trim == 3 and TAEHVConfig().space_factor == 8
