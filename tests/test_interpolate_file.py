"""`streamgen interpolate` as a file tool on a real encoded clip: input frame k keeps its time k/fps,
the in-between of a known motion lands at index 2k+1 halfway along it, and audio is copied through."""

from __future__ import annotations

import av
import numpy as np
import pytest

from streamgen.cli import main

W, H, N, FPS, SIDE, STEP, X0 = 128, 96, 6, 8, 24, 8, 16


def square_x(t: float) -> float:
    """Left edge of the square at input time t (in frames)."""
    return X0 + STEP * t


def frame(k: int) -> np.ndarray:
    f = np.full((H, W, 3), 20, np.uint8)
    x, y = int(square_x(k)), (H - SIDE) // 2
    f[y:y + SIDE, x:x + SIDE] = (230, 200, 40)
    return f


def centroid_x(rgb: np.ndarray) -> float:
    bright = rgb.astype(np.float32).mean(-1) - 20  # background 20
    cols = bright.clip(0).sum(0)
    return float((cols * np.arange(W)).sum() / cols.sum())


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """N frames of a square moving STEP px per frame, and 0.75 s of a 440 Hz tone (AAC)."""
    path = tmp_path_factory.mktemp("clip") / "in.mp4"
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=FPS, options={"crf": "1"})
        v.width, v.height, v.pix_fmt = W, H, "yuv420p"
        a = c.add_stream("aac", rate=16000)
        t = np.arange(int(16000 * N / FPS)) / 16000
        tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for i in range(0, len(tone), 1024):
            af = av.AudioFrame.from_ndarray(tone[None, i:i + 1024], format="fltp", layout="mono")
            af.sample_rate, af.pts = 16000, i
            c.mux(a.encode(af))
        c.mux(a.encode(None))
        for k in range(N):
            c.mux(v.encode(av.VideoFrame.from_ndarray(frame(k), format="rgb24")))
        c.mux(v.encode(None))
    return path


@pytest.fixture(scope="module")
def doubled(clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "out.mp4"
    assert main(["interpolate", str(clip), "--out", str(out), "--factor", "2", "--device", "cpu", "--crf", "1",
                 "--chunk", "4"]) == 0  # chunk 4: the pair across a batch boundary is interpolated too
    return out


def test_input_frames_keep_their_time_and_in_betweens_sit_halfway(doubled):
    with av.open(str(doubled)) as c:
        v = c.streams.video[0]
        assert v.average_rate == 2 * FPS
        decoded = list(c.decode(v))
    assert len(decoded) == 2 * (N - 1) + 1
    assert [f.time for f in decoded] == pytest.approx([m / (2 * FPS) for m in range(len(decoded))])
    rgb = [f.to_ndarray(format="rgb24") for f in decoded]
    for m, img in enumerate(rgb):
        want = square_x(m / 2) + SIDE / 2 - 0.5  # output m shows input time m/2
        assert centroid_x(img) == pytest.approx(want, abs=1.0), (m, centroid_x(img), want)
    for k in range(N):  # the input frames themselves, unchanged but for the codec
        assert np.abs(rgb[2 * k].astype(int) - frame(k)).mean() < 3, k


def test_audio_is_copied_through(clip, doubled):
    def packets(path):
        with av.open(str(path)) as c:
            (a,) = c.streams.audio
            return a.codec_context.name, a.sample_rate, [bytes(p) for p in c.demux(a) if p.size]

    assert packets(doubled) == packets(clip)
