"""`streamgen generate` end to end with the built-in tiny model, and its argument errors."""

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from rife_data import WEIGHTS as RIFE_WEIGHTS
from streamgen.cli import main
from streamgen.sampling.stream import frames_for_chunks


def _probe(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        return s.codec_context.name, s.codec_context.pix_fmt, s.average_rate, frames


def test_tiny_writes_playable_mp4(tmp_path, capsys):
    out = tmp_path / "out.mp4"
    rc = main(["generate", "--model", "tiny", "--prompt", "a red fox in the snow", "--chunks", "3",
               "--width", "64", "--height", "48", "--fps", "24", "--seed", "7",
               "--prompt-at", "2:a blue whale", "--out", str(out)])
    assert rc == 0
    codec, pix_fmt, rate, frames = _probe(out)
    assert codec == "h264" and pix_fmt == "yuv420p"
    assert rate == Fraction(24)
    assert len(frames) == frames_for_chunks(3, 3) == 33  # 1 + 4 * (9 - 1)
    assert frames[0].shape == (48, 64, 3)
    err = capsys.readouterr().err
    assert err.count("frames/s") >= 3 and "chunk 3/3" in err and "a blue whale" in err


def test_tiny_wan_decoder_with_image_start(tmp_path):
    from PIL import Image

    img = tmp_path / "start.png"
    rgb = np.zeros((40, 40, 3), dtype=np.uint8)
    rgb[:, :20] = (255, 0, 0)
    Image.fromarray(rgb).save(img)
    out = tmp_path / "img.mp4"
    rc = main(["generate", "--model", "tiny", "--prompt", "x", "--chunks", "2", "--frames-per-chunk", "1",
               "--width", "32", "--height", "32", "--image", str(img), "--decoder", "wan", "--out", str(out)])
    assert rc == 0
    _, _, rate, frames = _probe(out)
    assert rate == Fraction(16)
    assert len(frames) == frames_for_chunks(2, 1, image=True) == 9  # image latent + 2 chunks of 1
    assert frames[0].shape == (32, 32, 3)


def test_tiny_full_bidirectional_unipc_cfg(tmp_path, capsys):
    out = tmp_path / "full.mp4"
    rc = main(["generate", "--model", "tiny-full", "--prompt", "a fox", "--chunks", "2", "--steps", "3",
               "--width", "32", "--height", "32", "--out", str(out)])
    assert rc == 0
    _, _, _, frames = _probe(out)
    assert len(frames) == frames_for_chunks(2, 3)
    assert "cfg 3" in capsys.readouterr().err
    _rc(["--model", "tiny-full", "--prompt", "p", "--out", str(out), "--prompt-at", "1:q"], capsys, "streaming model")
    # the distilled few-step loop (LightX2V's 4-step models) on a bidirectional model: no CFG pass
    rc = main(["generate", "--model", "tiny-full", "--prompt", "a fox", "--chunks", "2", "--sampler", "self-forcing",
               "--width", "32", "--height", "32", "--out", str(out)])
    assert rc == 0
    assert len(_probe(out)[3]) == frames_for_chunks(2, 3)
    assert "cfg 3" not in capsys.readouterr().err


def _fails(argv, capsys, *needles):
    with pytest.raises(SystemExit) as e:
        main(["generate", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


def _rc(argv, capsys, *needles):
    rc = main(["generate", *argv])
    assert rc == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err


def test_bad_arguments_name_the_problem(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty hub cache
    out = str(tmp_path / "o.mp4")
    base = ["--prompt", "p", "--out", out]
    _fails(base + ["--width", "100"], capsys, "--width", "multiple of 16", "96", "112")
    _fails(base + ["--height", "abc"], capsys, "--height", "multiple of 16")
    _fails(base + ["--model", "sora"], capsys, "--model", "tiny", "self-forcing-1.3b", "wan2.1-t2v-1.3b")
    _fails(base + ["--chunks", "0"], capsys, "--chunks", ">= 1")
    _fails(base + ["--prompt-at", "two:x"], capsys, "--prompt-at", "CHUNK:TEXT")
    _fails(base + ["--decoder", "vqgan"], capsys, "--decoder", "wan", "taehv")
    _fails(["--out", out], capsys, "--prompt")
    _rc(base + ["--model", "self-forcing-1.3b"], capsys, "--checkpoint", "gdhe17/Self-Forcing",
        "streamgen download self-forcing-1.3b", "--checkpoint PATH")
    missing = str(tmp_path / "nope" / "model.pt")
    _rc(base + ["--model", "self-forcing-1.3b", "--checkpoint", missing], capsys, missing)
    _rc(base + ["--chunks", "4", "--prompt-at", "4:later"], capsys, "--prompt-at", "0..3")
    _rc(base + ["--sampler", "self-forcing", "--guidance", "5"], capsys, "--guidance")
    _rc(["--prompt", "p", "--out", str(tmp_path / "no" / "dir" / "o.mp4")], capsys, "--out", "does not exist")
    _rc(base + ["--image", str(tmp_path / "missing.png")], capsys, "--image", "missing.png")
    _rc(base + ["--frames-per-chunk", "4", "--local-frames", "3", "--width", "32", "--height", "32"], capsys,
        "frames_per_chunk=4", "local_frames")


def test_build_leaves_the_global_rng_alone():
    import torch

    from streamgen import pipeline

    def build(decoder):
        p = pipeline.build("tiny", decoder=decoder)
        return {**p.model.state_dict(), **{f"dec.{k}": v for k, v in p.decoder.state_dict().items()}}

    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    first = {d: build(d) for d in ("taehv", "wan")}
    assert torch.equal(torch.rand(4), want)  # the caller's random stream continues as if nothing ran
    torch.rand(100)  # a different global RNG state: the built-in weights stay the same
    for d, sd in first.items():
        again = build(d)
        assert all(torch.equal(again[k], v) for k, v in sd.items()), d


@pytest.mark.parametrize("factor", [2, 4])
def test_interpolate_multiplies_frames_and_fps(tmp_path, capsys, factor):
    out = tmp_path / f"x{factor}.mp4"
    rc = main(["generate", "--prompt", "a red fox", "--chunks", "2", "--width", "64", "--height", "48",
               "--fps", "12", "--prompt-at", "1:a blue whale", "--interpolate", str(factor),
               "--rife", str(RIFE_WEIGHTS), "--out", str(out)])
    assert rc == 0
    _, _, rate, frames = _probe(out)
    assert rate == Fraction(12 * factor)
    assert len(frames) == factor * frames_for_chunks(2, 3) == factor * 21
    assert frames[0].shape == (48, 64, 3)
    assert f"RIFE {factor}x" in capsys.readouterr().err


def test_interpolate_argument_errors(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "o.mp4")
    base = ["--prompt", "p", "--out", out]
    _fails(base + ["--interpolate", "3"], capsys, "--interpolate", "1, 2, 4")
    missing = str(tmp_path / "nope" / "flownet.pkl")
    _rc(base + ["--interpolate", "2", "--rife", missing], capsys, "--rife", missing)
    monkeypatch.setenv("STREAMGEN_RIFE_WEIGHTS", missing)  # the default comes from here first
    _rc(base + ["--interpolate", "2"], capsys, "--rife", missing)
    bad = tmp_path / "bad.pkl"
    import torch

    torch.save({"not.rife": torch.zeros(1)}, bad)
    _rc(base + ["--interpolate", "2", "--rife", str(bad)], capsys, "--rife", "not a RIFE", "not.rife")


def test_offloaded_dit_writes_the_same_video(tmp_path, capsys):
    """--offload streams the DiT blocks from host memory; the video is bit-identical to resident."""
    out = {}
    for name, extra in (("resident", []), ("offload", ["--offload", "1"])):
        path = tmp_path / f"{name}.mp4"
        assert main(["generate", "--model", "tiny", "--prompt", "a fox", "--chunks", "2", "--out", str(path)] + extra) == 0
        with av.open(str(path)) as c:
            out[name] = [f.to_ndarray() for f in c.decode(video=0)]
    assert len(out["offload"]) == len(out["resident"]) == 21
    for a, b in zip(out["offload"], out["resident"]):
        np.testing.assert_array_equal(a, b)
    _rc(["--model", "tiny", "--prompt", "p", "--out", str(tmp_path / "x.mp4"), "--offload", "1",
         "--compile"], capsys, "--offload", "--compile")


def test_quantized_dit_stays_close_to_full_precision(tmp_path):
    """--quant int8-weight: the same stream within quantization noise (8-bit video, mean abs diff)."""
    out = {}
    for name, extra in (("fp32", []), ("int8", ["--quant", "int8-weight"])):
        path = tmp_path / f"{name}.mp4"
        assert main(["generate", "--model", "tiny", "--prompt", "a fox", "--chunks", "2", "--out", str(path)] + extra) == 0
        with av.open(str(path)) as c:
            out[name] = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.float32)
    assert out["int8"].shape == out["fp32"].shape
    diff = np.abs(out["int8"] - out["fp32"]).mean()
    assert 0 < diff < 8.0, diff  # changed (really quantized), by noise (a wrong scale gives ~50+)
