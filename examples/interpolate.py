"""Stream-style RIFE interpolation: chunks in, factor x frames out, seamless across chunk boundaries.

    python examples/interpolate.py                     # a 16 fps pan of tests/data/coffee.jpg -> 32 fps
    python examples/interpolate.py --factor 4 --out pan_64fps.mp4 --weights path/to/flownet.pkl

It does what the engine does between the decoder and the encoder. It makes one InterpolationState
per stream and calls ``process`` once per decoded chunk. After a prompt switch it calls
``state.cut()``, so that the first pair of the new scene is not warped into a ghost. To convert a
video file, use the CLI instead: ``streamgen interpolate IN.mp4 --factor 2 --out OUT.mp4``.
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from streamgen.media.interpolate import Interpolator, default_weights_path, source_time
from streamgen.models.rife import load_rife

ROOT = Path(__file__).resolve().parents[1]


def decoded_chunks(n_chunks: int, chunk: int, size=(240, 416)):
    """Stand-in for the decoder: chunks (T, 3, H, W) in [0, 1] of a slow diagonal pan over a photo."""
    photo = torch.from_numpy(np.array(Image.open(ROOT / "tests/data/coffee.jpg").convert("RGB")))
    photo = photo.permute(2, 0, 1).float().div(255)[None]  # (1, 3, 400, 600)
    h, w = size
    for c in range(n_chunks):
        frames = []
        for i in range(c * chunk, (c + 1) * chunk):
            x0, y0 = 4 + 3 * i, 4 + i  # 3 px right, 1 px down per frame
            frames.append(photo[0, :, y0:y0 + h, x0:x0 + w])
        yield torch.stack(frames)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--factor", type=int, default=2, choices=(2, 4))
    p.add_argument("--weights", default=None, help="RIFE v4.25/v4.26 flownet.pkl")
    p.add_argument("--out", default="pan_interpolated.mp4")
    args = p.parse_args()

    weights = args.weights or default_weights_path()
    if weights is None:
        raise SystemExit("pass --weights path/to/flownet.pkl (RIFE v4.25/v4.26) or set STREAMGEN_RIFE_WEIGHTS")
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    model = load_rife(weights, device=device, dtype=dtype)
    if cuda:
        model = model.to(memory_format=torch.channels_last)

    fps = 16
    interp = Interpolator(model, factor=args.factor)
    state = interp.new_state()  # one per stream
    with av.open(args.out, "w") as out:
        stream = out.add_stream("libx264", rate=fps * args.factor)
        stream.width, stream.height, stream.pix_fmt = 416, 240, "yuv420p"
        for k, chunk in enumerate(decoded_chunks(n_chunks=4, chunk=12)):
            if k == 2:
                state.cut()  # e.g. the prompt changed here: hold, don't warp across the switch
            frames = interp.process(chunk.to(device), state)  # (factor*12, 3, H, W)
            m0 = state.frames_out - frames.shape[0]
            print(f"chunk {k}: {chunk.shape[0]} frames in, {frames.shape[0]} out; output frame {m0} shows "
                  f"input time {source_time(m0, args.factor)} (pts {Fraction(m0, fps * args.factor)} s)")
            rgb = frames.mul(255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
            for img in rgb:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode(None))
    print(f"wrote {args.out}: {state.frames_in} frames at {fps} fps -> {state.frames_out} at {fps * args.factor} fps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
