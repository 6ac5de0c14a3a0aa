"""Streaming RIFE interpolator: exact counts and timing, chunk seams, scene cuts, CLI (CPU)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamgen.media.interpolate import Interpolator, scene_scores, source_time
from rife_data import PHOTO, WEIGHTS, load_photo, real_model
from rife_data import psnr as _psnr
from streamgen.models.rife import IFNet, RIFEConfig

SIZE = (64, 128)


def pan(photo: torch.Tensor, times, v=(8, 4), size=SIZE) -> torch.Tensor:
    """Frames of a pan at (v/2) px per input frame: frame at time tau is the crop shifted by tau*v
    full-res pixels, area-downsampled 2x; tau*v must be whole."""
    h, w = size
    out = []
    for tau in times:
        dx, dy = Fraction(tau) * v[0], Fraction(tau) * v[1]
        assert dx.denominator == dy.denominator == 1
        x0, y0 = 20 + int(dx), 20 + int(dy)
        out.append(F.avg_pool2d(photo[None, :, y0:y0 + 2 * h, x0:x0 + 2 * w], 2)[0])
    return torch.stack(out)


def psnr(a, b, border: int = 6) -> float:
    return _psnr(a, b, border)


@pytest.fixture(scope="module")
def model() -> IFNet:
    return real_model()


@pytest.fixture(scope="module")
def tiny() -> IFNet:
    torch.manual_seed(0)
    return IFNet(RIFEConfig.preset("tiny")).eval()


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    return load_photo()


def run_chunks(interp: Interpolator, frames: torch.Tensor, sizes, all_cuts=False) -> tuple[torch.Tensor, object]:
    state, outs, i = interp.new_state(), [], 0
    for n in sizes:
        out = interp.process(frames[i:i + n], state, cuts=range(n) if all_cuts else ())
        assert out.shape == (interp.factor * n, *frames.shape[1:])
        outs.append(out)
        i += n
    assert i == frames.shape[0]
    return torch.cat(outs), state


# ---- counts and timing --------------------------------------------------------------------------

def test_source_time_convention():
    assert [source_time(m, 2) for m in range(6)] == [0, 0, Fraction(1, 2), 1, Fraction(3, 2), 2]
    assert [source_time(m, 4) for m in range(8)] == [0, 0, 0, 0, Fraction(1, 4), Fraction(1, 2), Fraction(3, 4), 1]
    assert [source_time(m, 1) for m in range(3)] == [0, 1, 2]


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_counts_and_timestamps_exact_with_blend(tiny, factor):
    # cut_mode="blend" with every pair marked a cut is a linear cross-fade, so each output frame's
    # value is the ramp's value at its source time: checks counts and timing exactly.
    interp = Interpolator(tiny, factor, cut_mode="blend")
    values = torch.arange(23, dtype=torch.float32) / 32  # frame n is constant n/32
    frames = values.view(-1, 1, 1, 1).expand(-1, 3, 8, 12).contiguous()
    out, state = run_chunks(interp, frames, [1, 5, 12, 3, 2], all_cuts=True)
    assert out.shape[0] == factor * 23 == state.frames_out and state.frames_in == 23
    want = torch.tensor([float(source_time(m, factor)) / 32 for m in range(out.shape[0])])
    torch.testing.assert_close(out[:, 0, 0, 0], want, atol=1e-6, rtol=0)
    assert (out.amax(dim=(1, 2, 3)) == out.amin(dim=(1, 2, 3))).all()


def test_rife_output_is_at_its_source_time(model, photo):
    # 4x on a pan: output m must match the ground-truth frame at source_time(m), not a neighbour's
    interp = Interpolator(model, 4, scene_threshold=None)
    frames = pan(photo, range(4))
    out, _ = run_chunks(interp, frames, [2, 2])
    for m in range(4, 16):
        tau = source_time(m, 4)
        got = psnr(out[m], pan(photo, [tau])[0])
        others = [psnr(out[m], pan(photo, [tau + d])[0]) for d in (Fraction(-1, 4), Fraction(1, 4))]
        assert got > 28.0 and got > max(others) + 4.0, (m, tau, got, others)
    # the held first frame and the original frames pass through untouched
    for m in (0, 1, 2, 3, 7, 11, 15):
        torch.testing.assert_close(out[m], frames[max(0, (m - 3) // 4)], atol=0, rtol=0)


# ---- chunk seams --------------------------------------------------------------------------------

@pytest.mark.parametrize("factor", [2, 4])
def test_chunked_equals_whole_sequence(model, photo, factor):
    interp = Interpolator(model, factor)
    frames = pan(photo, range(7))
    whole, _ = run_chunks(interp, frames, [7])
    chunked, state = run_chunks(interp, frames, [3, 1, 2, 1])
    torch.testing.assert_close(chunked, whole, atol=2e-4, rtol=0)
    assert state.frames_out == factor * 7


def test_chunked_equals_whole_tiny_model_and_max_batch(tiny):
    torch.manual_seed(1)
    frames = torch.rand(10, 3, 24, 40)
    whole, _ = run_chunks(Interpolator(tiny, 4, None), frames, [10])
    pieces, _ = run_chunks(Interpolator(tiny, 4, None, max_batch=5), frames, [2, 7, 1])
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=0)


def test_dtype_device_preserved_and_factor_one_passthrough(tiny):
    frames = torch.rand(3, 3, 16, 16, dtype=torch.float16)
    out = Interpolator(tiny, 2).process(frames, Interpolator(tiny, 2).new_state())
    assert out.dtype == torch.float16 and out.shape == (6, 3, 16, 16)
    one = Interpolator(None, 1)
    st = one.new_state()
    assert one.process(frames, st) is frames and st.frames_out == 3


# ---- scene cuts ---------------------------------------------------------------------------------

def test_scene_scores_separate_motion_from_cuts(photo):
    from PIL import Image

    other = torch.from_numpy(np.array(Image.open(PHOTO).convert("L"))).float().div(255).expand(3, -1, -1)
    other = torch.flip(other, (1,)) * 0.6  # a different-looking frame of the same size
    moving = pan(photo, [0, 5, 10], v=(6, 2), size=(160, 256))  # 30 px steps at full res
    cut = torch.stack([moving[0], F.avg_pool2d(other[None, :, 20:340, 20:532], 2)[0]])
    s_move, s_cut = scene_scores(moving), scene_scores(cut)
    assert s_move.max() < 0.1 < 0.15 < s_cut.min(), (s_move, s_cut)


def test_cut_pairs_get_copies_not_ghosts(model, photo):
    a = pan(photo, range(4))
    b = 1.0 - torch.flip(a, (-1,))  # another "scene"
    frames = torch.cat([a, b])  # cut between input frames 3 and 4
    out, state = run_chunks(Interpolator(model, 2), frames, [8])
    torch.testing.assert_close(out[8], frames[3], atol=0, rtol=0)  # in-between before frame 4 holds frame 3
    assert psnr(out[6], pan(photo, [Fraction(5, 2)])[0]) > 28  # motion pairs are still interpolated
    assert state.forced_cuts == []  # the cut was detected, not forced

    blend = Interpolator(model, 2, cut_mode="blend")
    out_b, _ = run_chunks(blend, frames, [8])
    torch.testing.assert_close(out_b[8], (frames[3] + frames[4]) / 2, atol=1e-6, rtol=0)


def test_forced_cut_on_prompt_switch(model, photo):
    frames = pan(photo, range(6))
    interp = Interpolator(model, 2, scene_threshold=None)
    st = interp.new_state()
    interp.process(frames[:3], st)
    st.cut()
    out = interp.process(frames[3:], st)
    torch.testing.assert_close(out[0], frames[2], atol=0, rtol=0)  # held, no warp across the switch
    assert psnr(out[2], pan(photo, [Fraction(7, 2)])[0]) > 28  # the next pair is interpolated again
    out2 = interp.process(frames[:3], st, cuts=[2])
    torch.testing.assert_close(out2[4], frames[1], atol=0, rtol=0)
    assert st.forced_cuts == [3, 8] and st.frames_in == 9 and st.frames_out == 18


def test_errors_are_actionable(tiny):
    with pytest.raises(ValueError, match="factor must be 1, 2 or 4"):
        Interpolator(tiny, 3)
    with pytest.raises(ValueError, match="needs a RIFE model"):
        Interpolator(None, 2)
    interp = Interpolator(tiny, 2)
    st = interp.new_state()
    with pytest.raises(ValueError, match=r"\(T, 3, H, W\)"):
        interp.process(torch.rand(3, 16, 16), st)
    interp.process(torch.rand(2, 3, 16, 16), st)
    with pytest.raises(ValueError, match="frame size changed"):
        interp.process(torch.rand(2, 3, 16, 20), st)


# ---- CLI ----------------------------------------------------------------------------------------

def test_cli_doubles_the_frame_rate(tmp_path, photo, monkeypatch):
    import av
    from clips import write_h264
    from streamgen.cli import main

    src, dst = tmp_path / "in.mp4", tmp_path / "out.mp4"
    frames = (pan(photo, range(7)) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    write_h264(src, frames)
    monkeypatch.setenv("STREAMGEN_RIFE_WEIGHTS", str(WEIGHTS))
    assert main(["interpolate", str(src), "--factor", "2", "--out", str(dst), "--chunk", "3"]) == 0
    with av.open(str(dst)) as c:
        v = c.streams.video[0]
        assert v.average_rate == 16
        decoded = [f for f in c.decode(v)]
    assert len(decoded) == 13  # factor * (N - 1) + 1: input frame k at output index 2k
    assert [f.time for f in decoded] == pytest.approx([m / 16 for m in range(13)])
