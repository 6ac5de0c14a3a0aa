"""RIFE IFNet v4.25/v4.26: checkpoint loading and numerics on a real photo with real weights (CPU)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from rife_data import WEIGHTS, load_photo, real_model
from rife_data import psnr as _psnr
from streamgen.models.rife import IFNet, RIFEConfig, convert_rife_state_dict, load_rife



def translated(photo: torch.Tensor, dx: int, dy: int, size=(160, 256), f: int = 2) -> torch.Tensor:
    """Crop shifted by (dx, dy) full-res pixels, area-downsampled by f: a (dx/f, dy/f) px translation."""
    h, w = size
    x0, y0 = 40 + dx, 30 + dy
    return F.avg_pool2d(photo[None, :, y0:y0 + h * f, x0:x0 + w * f], f)[0]


def psnr(a, b, border: int = 8) -> float:
    return _psnr(a, b, border)


@pytest.fixture(scope="module")
def model() -> IFNet:
    return real_model()


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    return load_photo()


# ---- loading ------------------------------------------------------------------------------------

def test_loads_real_checkpoint_and_drops_training_keys(caplog):
    with caplog.at_level(logging.INFO, logger="streamgen.models.rife"):
        m = load_rife(WEIGHTS)
    assert sum("training-only" in r.message for r in caplog.records) == 1
    assert not m.training and m.dtype == torch.float32
    n_params = sum(p.numel() for p in m.parameters())
    assert 5_000_000 < n_params < 7_000_000


def test_module_prefix_and_bad_checkpoints(tmp_path):
    sd = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    ref = load_rife(WEIGHTS)

    prefixed = tmp_path / "prefixed.pkl"
    torch.save({f"module.{k}": v for k, v in sd.items()}, prefixed)
    m = load_rife(prefixed)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))

    broken = dict(sd)
    del broken["block3.convblock.5.beta"]
    broken["block9.conv0.0.0.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pkl"
    torch.save(broken, bad)
    with pytest.raises(ValueError) as e:
        load_rife(bad)
    assert "block3.convblock.5.beta" in str(e.value) and "block9.conv0.0.0.weight" in str(e.value)

    with pytest.raises(FileNotFoundError, match="flownet.pkl"):
        load_rife(tmp_path / "nope.pkl")


def test_convert_strips_prefix_and_training_keys():
    sd = {"module.encode.cnn0.weight": torch.zeros(1), "teacher.conv0.0.0.weight": torch.zeros(1),
          "module.caltime.0.bias": torch.zeros(1)}
    assert list(convert_rife_state_dict(sd)) == ["encode.cnn0.weight"]


def test_state_dict_layout_matches_v426_names():
    keys = IFNet(RIFEConfig.preset("v4.26")).state_dict()
    assert tuple(keys["block0.conv0.0.0.weight"].shape) == (96, 15, 3, 3)
    assert tuple(keys["block1.conv0.0.0.weight"].shape) == (64, 28, 3, 3)
    assert tuple(keys["block4.lastconv.0.weight"].shape) == (32, 52, 4, 4)
    assert tuple(keys["encode.cnn3.weight"].shape) == (16, 4, 4, 4)
    assert len(keys) == 198 - 30 - 10  # the file's keys minus teacher.* (30) and caltime.* (10)


# ---- numerics on a real photo -------------------------------------------------------------------

def test_translation_middle_frame_beats_blend(model, photo):
    # frames at 0, 1/2, 1 of a (7, 5) px translation (hi-res (14, 10) px, area-downsampled 2x)
    a, mid, b = (translated(photo, 14 * k, 10 * k) for k in (0, 1, 2))
    with torch.inference_mode():
        out = model(a[None], b[None], 0.5)[0].clamp(0, 1)
    rife, blend = psnr(out, mid), psnr((a + b) / 2, mid)
    assert rife > 30.0, (rife, blend)
    assert rife > blend + 8.0, (rife, blend)


def test_arbitrary_timestep_follows_the_motion(model, photo):
    # (8, 4) px over one step; t = 1/4 and 3/4 are 2 px / 1 px sub-steps of it
    a, q1, q3, b = (translated(photo, 4 * k, 2 * k) for k in (0, 1, 3, 4))
    with torch.inference_mode():
        out = model(torch.stack([a, a]), torch.stack([b, b]), torch.tensor([0.25, 0.75])).clamp(0, 1)
    for got, want, wrong in ((out[0], q1, q3), (out[1], q3, q1)):
        assert psnr(got, want) > 30.0
        assert psnr(got, want) > psnr(got, wrong) + 5.0


def test_t0_and_t1_reproduce_the_inputs(model, photo):
    a, b = translated(photo, 0, 0), translated(photo, 12, 8)
    with torch.inference_mode():
        out = model(torch.stack([a, a]), torch.stack([b, b]), torch.tensor([0.0, 1.0]))
    assert psnr(out[0], a, border=0) > 40.0
    assert psnr(out[1], b, border=0) > 40.0


def test_any_size_is_padded_and_cropped(model, photo):
    a, b = translated(photo, 0, 0, size=(100, 150)), translated(photo, 6, 4, size=(100, 150))
    mid = translated(photo, 3, 2, size=(100, 150))
    with torch.inference_mode():
        out = model(a[None], b[None])
    assert out.shape == (1, 3, 100, 150) and out.dtype == torch.float32
    assert psnr(out[0].clamp(0, 1), mid) > psnr((a + b) / 2, mid) + 3.0


def test_sequence_batch_equals_single_pairs(model, photo):
    frames = torch.stack([translated(photo, 6 * k, 2 * k, size=(64, 128)) for k in range(4)])
    with torch.inference_mode():
        seq = model.interpolate_sequence(frames, [0.25, 0.5, 0.75])
        assert seq.shape == (3, 3, 3, 64, 128)
        for i in range(3):
            for j, t in enumerate((0.25, 0.5, 0.75)):
                single = model(frames[i:i + 1], frames[i + 1:i + 2], t)[0]
                torch.testing.assert_close(seq[i, j], single, atol=2e-4, rtol=0)


def test_bf16_convs_stay_close_to_fp32(model, photo):
    a, b = translated(photo, 0, 0, size=(64, 128)), translated(photo, 8, 4, size=(64, 128))
    m16 = load_rife(WEIGHTS, dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = model(a[None], b[None])
        out = m16(a[None].half(), b[None].half())  # input dtype is free; warps stay fp32
    assert out.dtype == torch.float32
    assert psnr(out, ref, border=0) > 35.0


def test_tiny_random_model_runs_without_weights():
    torch.manual_seed(0)
    m = IFNet(RIFEConfig.preset("tiny")).eval()
    x = torch.rand(5, 3, 40, 70)
    with torch.inference_mode():
        out = m.interpolate_sequence(x, [0.5])
    assert out.shape == (4, 1, 3, 40, 70) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="unknown RIFE preset"):
        RIFEConfig.preset("v9")
