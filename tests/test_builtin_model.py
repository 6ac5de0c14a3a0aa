"""The built-in trained "shapes" model (streamgen/weights/shapes.safetensors) and its training code.

Behavioural checks on the shipped weights: they load, the VAE reconstructs a streamed clip, and a
generated stream follows the prompt (background colour; object colour, which the shipped weights
do not learn yet: see streamgen/weights/README.md).
"""

import os

import av
import pytest
import torch

from streamgen.cli import main
from streamgen.training import shapes
from streamgen.training.dit import flow_forward, stream_frames
from streamgen.training.vae import psnr
from streamgen.weights import builtin_path, load_builtin


@pytest.fixture(scope="module")
def shapes_model():
    from streamgen.pipeline import build

    p = build("shapes")
    model, text, dec, vae = p.model, p.text_encoder, p.decoder, p.vae
    assert dec is vae
    return model, text, vae


@pytest.fixture(scope="module")
def streams(shapes_model):
    """Two 2-chunk streams (21 frames each) of contrasting prompts, preset sampler (self-forcing, 4 steps)."""
    model, text, vae = shapes_model
    prompts = ("a red circle moving right on a black background", "a blue square moving left on a white background")
    return {p: stream_frames(model, vae, text, p, chunks=2, seed=0) for p in prompts}


def test_shipped_weights_load_and_fit_the_package():
    path = builtin_path("shapes")
    assert os.path.getsize(path) < 8e6
    model, vae, info = load_builtin("shapes")
    cfg = model.cfg
    assert (cfg.text_dim, cfg.frames_per_chunk, cfg.local_frames, cfg.sink_frames) == (64, 3, 12, 3)
    assert vae.cfg.z_dim == 16 and vae.cfg.latents_std != shapes_default_std()
    assert info["dit"]["steps"] > 0 and "card" in info
    assert not any(p.requires_grad for p in model.parameters())


def shapes_default_std():
    from streamgen.models.wan_vae import WAN21_LATENTS_STD

    return WAN21_LATENTS_STD


def test_missing_weights_file_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_builtin.py"):
        load_builtin(str(tmp_path / "none.safetensors"))


def test_vae_reconstructs_a_streamed_clip(shapes_model):
    _, _, vae = shapes_model
    b = shapes.sample_batch(2, 128, torch.Generator().manual_seed(11))
    video = shapes.render(b, torch.tensor([0, 40]), 1 + 4 * 8)  # 9 latent frames
    with torch.no_grad():
        z = vae.encode(video)
        state = vae.new_state()
        rec = torch.cat([vae.decode_chunk(z[:, :, i : i + 3], state) for i in range(0, 9, 3)], dim=2)
    assert rec.shape == video.shape
    assert psnr(rec, video) > 18.0
    assert psnr(rec[:, :, -12:], video[:, :, -12:]) > 18.0  # the third chunk, decoded from carried caches


def test_stream_background_follows_the_prompt(streams):
    dark, light = (shapes.analyse(f[1:]) for f in streams.values())  # frame 0 is the VAE's image frame
    assert max(dark["background"]) < 0.2 and min(light["background"]) > 0.7
    assert shapes.nearest_colour(dark["background"], shapes.BACKGROUNDS) == "black"
    assert shapes.nearest_colour(light["background"], shapes.BACKGROUNDS) == "white"


@pytest.mark.xfail(reason="the shipped weights are undertrained: the VAE encoder does not separate object colours "
                          "yet (streamgen/weights/README.md)", strict=True)
def test_stream_object_colour_follows_the_prompt(streams):
    red, blue = (shapes.analyse(f[1:]) for f in streams.values())
    for st in (red, blue):
        assert st["area"] > 0.002, "no object drawn"
    assert red["object"][0] > red["object"][2] + 0.2
    assert blue["object"][2] > blue["object"][0] + 0.2


def test_generate_cli_shapes(tmp_path, capsys):
    out = tmp_path / "shapes.mp4"
    rc = main(["generate", "--model", "shapes", "--prompt", "a yellow circle moving left on a gray background",
               "--chunks", "1", "--out", str(out)])
    assert rc == 0
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (128, 128, 3)
    assert "shapes 128x128" in capsys.readouterr().err
    assert main(["generate", "--model", "shapes", "--prompt", "x", "--decoder", "taehv", "--out", str(out)]) == 2
    assert "ships its own wan decoder only" in capsys.readouterr().err


def test_rendered_clip_is_measured_as_captioned():
    want = {"colour": "orange", "shape": "triangle", "motion": "up", "background": "blue"}
    b = shapes.sample_batch(1, 128, torch.Generator().manual_seed(2), attributes=[want])
    assert b.captions == ["a orange triangle moving up on a blue background"]
    assert shapes.parse_caption(b.captions[0]) == want
    video = shapes.render(b, 100, 17)
    u8 = video[0].add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 3, 0)  # (T, H, W, 3)
    st = shapes.analyse(u8)
    assert shapes.nearest_colour(st["object"]) == "orange"
    assert shapes.nearest_colour(st["background"], shapes.BACKGROUNDS) == "blue"
    assert shapes.motion_of(st) == "up"


def test_flow_forward_is_the_block_causal_forward_and_relative_in_time():
    from streamgen.models.wan import WanConfig, WanModel

    torch.manual_seed(0)
    model = WanModel(WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=16)).eval()
    x, t, ctx = torch.randn(2, 16, 6, 4, 4), torch.rand(2, 6) * 1000, torch.randn(2, 5, 16)
    pos = torch.arange(6).expand(2, -1)
    with torch.no_grad():
        ref = model(x, t, ctx, frames_per_block=3)
        torch.testing.assert_close(flow_forward(model, x, t, ctx, pos, 3), ref, rtol=1e-5, atol=1e-5)
        # RoPE is relative: shifting every frame position changes nothing
        torch.testing.assert_close(flow_forward(model, x, t, ctx, pos + 40, 3), ref, rtol=1e-4, atol=1e-4)
        # a gap between the first block and the rest (the sink layout) does change the result
        gap = torch.cat([pos[:, :3], pos[:, 3:] + 40], dim=1)
        assert not torch.allclose(flow_forward(model, x, t, ctx, gap, 3), ref, atol=1e-3)
