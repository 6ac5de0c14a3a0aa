"""Regenerate clients/web/test/fixtures/: a small real fMP4 stream from streamgen's encoder.

    .venv/bin/python clients/web/test/make_fixture.py

Writes init.bin (ftyp+moov), frag0.bin.. (moof+mdat, one per chunk, as the server sends them)
and fixture.json: what the encoder says about each fragment (timescale, base time, frame count,
codec string), which fmp4.test.mjs checks the JavaScript parser against.
"""

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from streamgen.server.sources import TestPatternSource  # noqa: E402
from streamgen.media.encode import FMP4Encoder  # noqa: E402

OUT = Path(__file__).resolve().parent / "fixtures"


async def _chunks(src, n):
    return [await src.next_chunk() for _ in range(n)]


def main() -> None:
    import asyncio

    w, h, fps = 96, 64, 16
    src = TestPatternSource(w, h, fps, 4, "a red fox")
    chunks = asyncio.run(_chunks(src, 3))
    enc = FMP4Encoder(w, h, fps, preset="veryfast")
    OUT.mkdir(exist_ok=True)
    (OUT / "init.bin").write_bytes(enc.init_segment)
    meta = {"width": w, "height": h, "fps": fps, "codec": enc.codec, "mime": enc.mime,
            "timescale": enc.timescale, "fragments": []}
    for i, frames in enumerate(chunks):
        f = enc.encode_chunk(np.ascontiguousarray(frames))
        (OUT / f"frag{i}.bin").write_bytes(f.data)
        meta["fragments"].append({"file": f"frag{i}.bin", "seq": f.seq, "base_time": f.base_time,
                                  "duration_ticks": f.duration_ticks, "frames": f.frames, "pts": f.pts,
                                  "duration": f.duration, "keyframe": f.keyframe})
    (OUT / "fixture.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {OUT}: {len(chunks)} fragments, codec {enc.codec}")


if __name__ == "__main__":
    main()
