"""Streaming frame interpolation (RIFE) between the decoder and the encoder, and `streamgen interpolate`.

Contract::

    interp = Interpolator(model, factor=2, scene_threshold=0.15)
    state = interp.new_state()                 # one per stream
    out = interp.process(frames, state)        # frames (T, 3, H, W) in [0, 1] -> (factor*T, 3, H, W)
    state.cut()                                # next chunk starts a new scene (e.g. prompt switch)

Timing convention (exact, no look-ahead): input frame n has time n / fps. For each input frame n the
output holds the ``factor - 1`` in-betweens from frame n-1 to frame n (at n - 1 + k/factor,
k = 1..factor-1) followed by frame n itself, so chunk after chunk the output has exactly
``factor * T`` frames and output frame m = factor*n + j shows the scene at input time
``n - 1 + (j + 1) / factor``. Played at ``factor * fps`` (output pts m / (factor*fps)) that is a
constant lag of ``(factor - 1) / (factor * fps)`` seconds (31.25 ms at 16 fps, 2x) and no other
timing error; an encoder that wants the input frames on their original timestamps subtracts that
lag. The very first frame of a stream has no predecessor: it is held (repeated ``factor`` times).
``source_time(m, factor)`` gives the input time of output frame m as an exact Fraction.

`streamgen interpolate` (a file tool, not a stream) does not keep that lag: it drops the held first
frames, so N input frames become ``factor * (N - 1) + 1`` output frames, output frame m shows input
time ``m / factor`` exactly (input frame k keeps its timestamp k / fps, at output index factor*k) and
the file ends on the last input frame. Audio (and subtitle) streams are copied through unchanged.

The last input frame of a chunk is kept (on the model's device, fp32) in the state, so the pair that
straddles a chunk boundary is interpolated like any other: chunked output equals whole-sequence output.
All pairs of a chunk (times all ``factor - 1`` timesteps) go through the model in one batched forward
(or ``max_batch``-sized pieces); nothing waits on the host.

Scene cuts: a pair whose colour histograms differ by more than ``scene_threshold`` (``scene_scores``:
total-variation distance of per-channel histograms of 64x64 thumbnails, in [0, 1]; default 0.15;
None disables the check), the pair after
``state.cut()``, and any pair listed in ``process(..., cuts=...)`` get no warped in-betweens:
``cut_mode="copy"`` holds the previous frame until the cut lands exactly on the new frame's time,
``cut_mode="blend"`` cross-fades linearly.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import torch

    from streamgen.models.rife import IFNet

log = logging.getLogger(__name__)

CUT_MODES = ("copy", "blend")
DEFAULT_SCENE_THRESHOLD = 0.15
WEIGHTS_ENV = "STREAMGEN_RIFE_WEIGHTS"


def source_time(out_index: int, factor: int) -> Fraction:
    """Input-frame time shown by output frame ``out_index`` of a stream (see module docstring)."""
    return max(Fraction(0), Fraction(out_index + 1, factor) - 1)


@dataclass
class InterpolationState:
    """Per-stream state: the previous chunk's last frame and exact frame counters."""

    prev: "torch.Tensor | None" = None  # (3, H, W) fp32 on the model's device, allocated once, then overwritten
    frames_in: int = 0
    frames_out: int = 0
    cut_pending: bool = False
    forced_cuts: list[int] = field(default_factory=list)  # input indices n whose pair (n-1, n) was forced a cut

    def cut(self) -> None:
        """Mark the boundary before the next chunk's first frame as a scene cut."""
        self.cut_pending = True


class Interpolator:
    """RIFE ``factor``x frame interpolation of a frame stream, chunk by chunk (see module docstring).

    model: an ``IFNet`` (any dtype/device; compute happens on its device) or None when factor == 1.
    scene_threshold: float in [0, 1] or None. max_batch: split the batched forward into pieces of at
    most this many in-betweens (bounds memory; None = one forward). scale: RIFE's flow resolution
    (1.0; 0.5 for 4K).
    """

    def __init__(self, model: "IFNet | None", factor: int = 2, scene_threshold: float | None = DEFAULT_SCENE_THRESHOLD,
                 *, cut_mode: str = "copy", max_batch: int | None = None, scale: float = 1.0):
        if factor not in (1, 2, 4):
            raise ValueError(f"factor must be 1, 2 or 4, got {factor!r}")
        if factor > 1 and model is None:
            raise ValueError(f"factor {factor} needs a RIFE model (streamgen.models.rife.load_rife)")
        if cut_mode not in CUT_MODES:
            raise ValueError(f"cut_mode must be one of {CUT_MODES}, got {cut_mode!r}")
        if scene_threshold is not None and not 0.0 <= scene_threshold <= 1.0:
            raise ValueError(f"scene_threshold must be in [0, 1] or None, got {scene_threshold!r}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 or None, got {max_batch!r}")
        self.model, self.factor, self.scene_threshold = model, factor, scene_threshold
        self.cut_mode, self.max_batch, self.scale = cut_mode, max_batch, scale
        self.timesteps = [k / factor for k in range(1, factor)]
        self._t_cache: dict = {}  # device -> (K,) timesteps tensor, made once per device

    def new_state(self) -> InterpolationState:
        return InterpolationState()

    def process(self, frames: "torch.Tensor", state: InterpolationState, *, cuts: Iterable[int] = ()) -> "torch.Tensor":
        """(T, 3, H, W) float in [0, 1] -> (factor*T, 3, H, W), same dtype and device as ``frames``.

        cuts: indices i within this chunk whose pair (frame i-1, frame i) is a scene cut (i = 0 is
        the pair with the previous chunk's last frame, same as ``state.cut()``).
        """
        import torch

        if frames.ndim != 4 or frames.shape[1] != 3 or not frames.is_floating_point():
            raise ValueError(f"frames must be float (T, 3, H, W) in [0, 1], got {frames.dtype} {tuple(frames.shape)}")
        t_in = frames.shape[0]
        if state.prev is not None and state.prev.shape[-2:] != frames.shape[-2:]:
            raise ValueError(f"frame size changed mid-stream: {tuple(state.prev.shape[-2:])} -> "
                             f"{tuple(frames.shape[-2:])}; start a new state")
        forced = sorted({int(i) for i in cuts})
        if any(i < 0 or i >= t_in for i in forced):
            raise ValueError(f"cuts must be indices in [0, {t_in}), got {forced}")
        if state.cut_pending and 0 not in forced:
            forced.insert(0, 0)
        if t_in == 0:
            return frames[:0].repeat(self.factor, 1, 1, 1)
        if self.factor == 1:
            self._advance(state, frames, forced)
            return frames

        dev = self.model.device
        x = frames.to(device=dev, dtype=torch.float32)
        first = state.prev is None
        seq = torch.cat([x[:1] if first else state.prev[None], x])  # (T+1, 3, H, W)
        with torch.no_grad():  # not inference_mode: callers may modify the output in place
            mids = self._interpolate(seq)  # (T, K, 3, H, W)
            cut = self._cut_mask(seq, forced, first)  # (T,) bool on dev, or None
            if cut is not None:
                mids = torch.where(cut.view(-1, 1, 1, 1, 1), self._fallback(seq), mids)
            out = torch.cat([mids.clamp_(0, 1), x[:, None]], 1).flatten(0, 1)  # (T*factor, 3, H, W)
        self._advance(state, frames, forced)
        if first:
            state.prev = x[-1].clone()
        else:
            state.prev.copy_(x[-1])
        return out.to(device=frames.device, dtype=frames.dtype)

    # ---- internals ----------------------------------------------------------------------------

    def _advance(self, state: InterpolationState, frames: "torch.Tensor", forced: list[int]) -> None:
        state.forced_cuts.extend(state.frames_in + i for i in forced)
        state.frames_in += frames.shape[0]
        state.frames_out += self.factor * frames.shape[0]
        state.cut_pending = False

    def _interpolate(self, seq: "torch.Tensor") -> "torch.Tensor":
        import torch

        n_pairs, k, dev = seq.shape[0] - 1, len(self.timesteps), seq.device
        if dev not in self._t_cache:
            self._t_cache[dev] = torch.tensor(self.timesteps, dtype=torch.float32).to(dev)
        ts = self._t_cache[dev]
        if self.max_batch is None or n_pairs * k <= self.max_batch:
            return self.model.interpolate_sequence(seq, ts, scale=self.scale)
        i0 = torch.arange(n_pairs, device=dev).view(-1, 1).expand(-1, k).reshape(-1)  # (T*K,)
        t = ts.repeat(n_pairs)
        pieces = []
        for s in range(0, n_pairs * k, self.max_batch):
            sl = slice(s, s + self.max_batch)
            # frames this piece touches, re-indexed so each is encoded once per piece
            lo, hi = s // k, (min(s + self.max_batch, n_pairs * k) - 1) // k + 1
            pieces.append(self.model.interpolate_pairs(seq[lo:hi + 1], i0[sl] - lo, i0[sl] - lo + 1, t[sl],
                                                       scale=self.scale))
        return torch.cat(pieces).unflatten(0, (n_pairs, k))

    def _cut_mask(self, seq: "torch.Tensor", forced: list[int], first: bool) -> "torch.Tensor | None":
        import torch

        n_pairs = seq.shape[0] - 1
        cut = None
        if self.scene_threshold is not None:
            cut = scene_scores(seq) > self.scene_threshold
        if forced or first:
            hard = torch.zeros(n_pairs, dtype=torch.bool, device=seq.device)
            for i in forced + [0] * first:
                hard[i] = True  # a fill on the device: no host-to-device copy, no sync
            cut = hard if cut is None else cut | hard
        return cut

    def _fallback(self, seq: "torch.Tensor") -> "torch.Tensor":
        """(T, K, 3, H, W) in-betweens without motion: hold frame n-1 (copy) or cross-fade (blend)."""
        import torch

        a, b = seq[:-1, None], seq[1:, None]
        if self.cut_mode == "copy":
            return a.expand(-1, len(self.timesteps), -1, -1, -1)
        t = self._t_cache[seq.device].view(1, -1, 1, 1, 1)
        return torch.lerp(a, b, t)


def scene_scores(seq: "torch.Tensor", bins: int = 16) -> "torch.Tensor":
    """(T+1, 3, H, W) in [0, 1] -> (T,) colour-histogram distance of consecutive frames, in [0, 1].

    Per-channel ``bins``-bin histograms of 64x64 area-averaged thumbnails; the score is the total
    variation distance (half the L1 difference), averaged over R, G, B. Motion barely moves it
    (a 60 px pan of a 450x300 photo scores <= 0.09), unrelated photos score 0.18-0.76 (median ~0.5).
    """
    import torch
    import torch.nn.functional as F

    thumbs = F.adaptive_avg_pool2d(seq.float(), (64, 64)).flatten(2)  # (T+1, 3, 4096)
    q = (thumbs * bins).long().clamp_(0, bins - 1)
    hist = torch.zeros(*q.shape[:2], bins, device=seq.device).scatter_add_(2, q, torch.ones_like(thumbs))
    hist /= q.shape[-1]
    return (hist[1:] - hist[:-1]).abs().sum(-1).mean(-1) / 2


# ---- weights lookup -----------------------------------------------------------------------------

RIFE_DOWNLOAD = "streamgen download rife"  # puts pipeline.RIFE_SOURCE into the local Hugging Face cache


def default_weights_path() -> Path | None:
    """$STREAMGEN_RIFE_WEIGHTS, else weights/rife-v4.26/flownet.pkl under the working directory, else
    ``pipeline.RIFE_SOURCE`` (Practical-RIFE v4.26's release zip) in the local Hugging Face cache."""
    from streamgen import hub
    from streamgen.pipeline import RIFE_SOURCE

    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env)
    cand = Path("weights/rife-v4.26/flownet.pkl")
    if cand.is_file():
        return cand
    return hub.find(hub.parse(RIFE_SOURCE.ref))[0]


# ---- `streamgen interpolate` --------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    from streamgen.pipeline import dtype_name, positive

    p.add_argument("input", help="input video file (constant frame rate)")
    p.add_argument("--out", "-o", required=True, help="output .mp4 (H.264; audio streams are copied through)")
    p.add_argument("--factor", type=int, default=2, choices=(1, 2, 4), help="frame-rate multiplier (default 2)")
    p.add_argument("--rife", "--weights", dest="rife", default="auto", metavar="WEIGHTS",
                   help="RIFE v4.25/v4.26 flownet.pkl, a .zip holding it or a hub reference, as for serve/generate "
                        f"(default 'auto': ${WEIGHTS_ENV}, weights/rife-v4.26/flownet.pkl or the v4.26 zip in the "
                        f"Hugging Face cache: {RIFE_DOWNLOAD})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", type=dtype_name,
                   help="conv precision: auto, float32/fp32, bfloat16/bf16, float16/fp16 (default float16 on cuda, "
                        "float32 on cpu)")
    p.add_argument("--chunk", type=positive, default=12, help="input frames per batched forward (default 12)")
    p.add_argument("--scene-threshold", type=float, default=DEFAULT_SCENE_THRESHOLD,
                   help=f"colour-histogram distance above which a pair is a cut (default {DEFAULT_SCENE_THRESHOLD}; "
                        "negative disables)")
    p.add_argument("--cut-mode", default="copy", choices=CUT_MODES, help="what a cut gets instead of warping")
    p.add_argument("--scale", type=float, default=1.0, help="RIFE flow scale (0.5 for 4K input)")
    p.add_argument("--crf", type=int, default=18, help="x264 CRF of the output (default 18)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the final line (no progress bar)")


def open_video(path: str):
    """``av.open(path)`` of a file with a video stream; anything else is a one-line UsageError."""
    import av

    from streamgen.pipeline import UsageError

    if not os.path.exists(path):
        raise UsageError(f"input {path}: no such file")
    if not os.path.isfile(path):
        raise UsageError(f"input {path}: not a file")
    try:
        src = av.open(path)
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise UsageError(f"input {path}: not a video file ffmpeg can read ({getattr(e, 'strerror', None) or e})") from None
    if not src.streams.video:
        kinds = ", ".join(sorted({s.type for s in src.streams})) or "none"
        src.close()
        raise UsageError(f"input {path}: has no video stream (streams: {kinds})")
    return src


def run(args: argparse.Namespace) -> int:
    import time

    import av
    import numpy as np
    import torch
    from tqdm import tqdm

    from streamgen.media.encode import Mp4Writer
    from streamgen.media.frames import from_uint8, to_uint8
    from streamgen.pipeline import UsageError, check_output, load_rife_model, pick_device, pick_dtype, rife_path

    device = pick_device(args.device)
    dtype = torch.float16 if args.dtype == "auto" and device.type == "cuda" else pick_dtype(args.dtype, device)
    if not 0 <= args.crf <= 51:
        raise UsageError(f"--crf {args.crf}: allowed 0..51")
    check_output("--out", args.out)
    weights = rife_path(args.rife, required=True) if args.factor > 1 else None
    with open_video(args.input) as src:
        vin = src.streams.video[0]
        rate = vin.average_rate or vin.guessed_rate
        if not rate:
            raise UsageError(f"input {args.input}: cannot tell the frame rate of the video stream")
        out_rate = Fraction(rate) * args.factor
        model = load_rife_model(weights, device, dtype) if weights is not None else None
        threshold = None if args.scene_threshold < 0 else args.scene_threshold
        interp = Interpolator(model, args.factor, threshold, cut_mode=args.cut_mode, scale=args.scale)
        state = interp.new_state()
        t0 = time.perf_counter()
        try:
            w, h = vin.codec_context.width, vin.codec_context.height
            pix_fmt = "yuv420p" if w % 2 == 0 and h % 2 == 0 else "yuv444p"  # 4:2:0 needs even sizes; no crop
            if pix_fmt != "yuv420p":
                log.info("%dx%d is odd: writing H.264 4:4:4 (yuv444p) to keep every pixel", w, h)
            with contextlib.ExitStack() as stack, Mp4Writer(args.out, w, h, out_rate, crf=args.crf,
                                                             pix_fmt=pix_fmt) as dst:
                copied = _copy_streams(src, vin, dst.container)
                # The streaming Interpolator holds the first frame (factor - 1) extra times (its lag
                # convention); a file drops those, so output frame m shows input time m / factor.
                hold = args.factor - 1
                bar = tqdm(total=vin.frames or None, unit="frame", desc="interpolate", file=sys.stderr,
                           disable=True if args.quiet else None)  # None: off when stderr is not a terminal
                stack.callback(bar.close)

                def emit(batch: list[np.ndarray]) -> None:
                    nonlocal hold
                    y = to_uint8(interp.process(from_uint8(np.stack(batch), device), state)).cpu().numpy()
                    dst.write(y[hold:])
                    hold = 0
                    bar.update(len(batch))

                batch: list[np.ndarray] = []
                try:
                    for packet in src.demux(vin, *(src.streams[i] for i in copied)):
                        if packet.stream.index != vin.index:
                            if packet.dts is not None:  # not the demuxer's end-of-stream marker
                                packet.stream = copied[packet.stream.index]
                                dst.container.mux(packet)
                            continue
                        for frame in packet.decode():
                            batch.append(frame.to_ndarray(format="rgb24"))
                            if len(batch) == args.chunk:
                                emit(batch)
                                batch = []
                except av.FFmpegError as e:
                    raise UsageError(f"input {args.input}: cannot decode video frame {state.frames_in + len(batch)} "
                                     f"({e.strerror or e})") from None
                if batch:
                    emit(batch)
                if state.frames_in == 0:
                    raise UsageError(f"input {args.input}: the video stream holds no frames")
                written = dst.frames
        except BaseException:
            with contextlib.suppress(OSError):  # no half-written output is left behind
                os.remove(args.out)
            raise
    dt = time.perf_counter() - t0
    log.info("%d -> %d frames (%s fps -> %s fps), %d scene cuts forced, %.1f s (%.1f output frames/s)",
             state.frames_in, written, float(rate), float(out_rate), len(state.forced_cuts), dt, written / max(dt, 1e-9))
    extra = f", {len(copied)} other stream(s) copied" if copied else ""
    print(f"wrote {args.out}: {written} frames at {float(out_rate):g} fps from {state.frames_in} "
          f"in {dt:.1f} s{extra}")
    return 0


def _copy_streams(src, vin, out) -> dict:
    """Add to ``out`` a copy of each audio / subtitle stream of ``src`` that MP4 can hold (packets
    are copied, not re-encoded); returns {input stream index: output stream}. A stream MP4 cannot
    hold is left out with a warning."""
    import av

    copied = {}
    for s in src.streams:
        if s.index == vin.index or s.type not in ("audio", "subtitle"):
            continue
        try:
            copied[s.index] = out.add_stream_from_template(s)
        except (av.FFmpegError, ValueError) as e:
            log.warning("stream %d (%s %s) cannot go into MP4, left out: %s", s.index, s.type,
                        s.codec_context.name if s.codec_context else "?", e)
    return copied
