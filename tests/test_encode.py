"""Live fMP4 encoder: per-chunk fragments, decodability, keyframes, codec string, timestamps."""

from __future__ import annotations

import io
import struct
import threading
from fractions import Fraction

import av
import numpy as np
import pytest

from streamgen.media.encode import FMP4Encoder, codec_string, split_annexb

W, H = 160, 96


def _frames(t: int, offset: int = 0) -> np.ndarray:
    """Smooth moving gradient (compressible, so decode error is small)."""
    y, x = np.mgrid[0:H, 0:W]
    out = np.empty((t, H, W, 3), np.uint8)
    for i in range(t):
        k = offset + i
        out[i, ..., 0] = (x * 255 // W + 7 * k) % 256
        out[i, ..., 1] = (y * 255 // H + 3 * k) % 256
        out[i, ..., 2] = (40 * k) % 256
    return out


def _boxes(buf: bytes, start: int = 0, end: int | None = None) -> list[tuple[bytes, int, int]]:
    """Top-level boxes [(type, offset, size)] of buf[start:end]."""
    end = len(buf) if end is None else end
    out, i = [], start
    while i < end:
        size, kind = struct.unpack_from(">I4s", buf, i)
        assert size >= 8, f"bad box size {size} at {i}"
        out.append((kind, i, size))
        i += size
    assert i == end
    return out


def _find(buf: bytes, path: list[bytes], start: int = 0, end: int | None = None) -> tuple[int, int]:
    containers = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"mvex", b"moof", b"traf", b"dinf"}
    for kind, off, size in _boxes(buf, start, end):
        if kind == path[0]:
            if len(path) == 1:
                return off, size
            assert kind in containers
            return _find(buf, path[1:], off + 8, off + size)
    raise AssertionError(f"box {path[0]!r} not found")


def _decode(data: bytes) -> list[av.VideoFrame]:
    with av.open(io.BytesIO(data), format="mp4") as c:
        return list(c.decode(video=0))


@pytest.mark.parametrize("preset", ["ultrafast", "veryfast"])
def test_fragment_per_chunk_decodes_frame_exactly(preset):
    enc = FMP4Encoder(W, H, 16, preset=preset)
    chunks = [5, 4, 4, 1, 6]
    stream = enc.init_segment
    done = 0
    for seq, t in enumerate(chunks):
        frag = enc.encode_chunk(_frames(t, done))
        # 1. the fragment is complete right when encode_chunk returns: decodable with what we have
        stream += frag.data
        done += t
        decoded = _decode(stream)
        assert len(decoded) == done, f"after chunk {seq}: {len(decoded)} decoded frames, expected {done}"
        assert frag.seq == seq and frag.frames == t and frag.keyframe
        off, size = _find(frag.data, [b"moof", b"mfhd"])
        assert struct.unpack_from(">I", frag.data, off + 12)[0] == seq + 1
    frames = _decode(stream)
    assert [(f.width, f.height) for f in frames] == [(W, H)] * sum(chunks)
    starts = set(np.cumsum([0] + chunks[:-1]).tolist())
    assert [i for i, f in enumerate(frames) if f.key_frame] == sorted(starts)
    # 2. exact timestamps: frame i at i/fps
    assert [f.time for f in frames] == pytest.approx([i / 16 for i in range(sum(chunks))])
    # 3. pixels survive (smooth content, crf 23)
    ref = _frames(sum(chunks))
    for i in (0, 7, sum(chunks) - 1):
        err = np.abs(frames[i].to_ndarray(format="rgb24").astype(int) - ref[i].astype(int)).mean()
        assert err < 12, f"frame {i}: mean abs error {err}"


def test_timestamps_in_boxes_and_fragment_fields():
    enc = FMP4Encoder(W, H, Fraction(30000, 1001), preset="ultrafast")
    assert (enc.timescale * Fraction(1001, 30000)).denominator == 1  # exact frame duration
    t_total = 0
    for seq in range(3):
        frag = enc.encode_chunk(_frames(3, t_total))
        off, _ = _find(frag.data, [b"moof", b"traf", b"tfdt"])
        version = frag.data[off + 8]
        assert version == 1
        base = struct.unpack_from(">Q", frag.data, off + 12)[0]
        assert base == frag.base_time == t_total * enc.frame_ticks
        off, size = _find(frag.data, [b"moof", b"traf", b"trun"])
        count, data_offset = struct.unpack_from(">Ii", frag.data, off + 12)
        rows = [struct.unpack_from(">III", frag.data, off + 20 + 12 * i) for i in range(count)]
        assert count == 3 and all(r[0] == enc.frame_ticks for r in rows)
        assert rows[0][2] == 0x02000000 and all(r[2] & 0x00010000 for r in rows[1:])  # sync only first
        moof_off, moof_size = _find(frag.data, [b"moof"])
        mdat_off, mdat_size = _find(frag.data, [b"mdat"])
        assert data_offset == moof_size + 8 and mdat_off == moof_size
        assert sum(r[1] for r in rows) == mdat_size - 8
        assert frag.pts == pytest.approx(t_total * 1001 / 30000)
        assert frag.duration == pytest.approx(3 * 1001 / 30000)
        t_total += 3


def test_codec_string_matches_sps_and_avcc():
    for preset, profile in (("ultrafast", 0x42), ("veryfast", 0x64)):
        enc = FMP4Encoder(W, H, 24, preset=preset)
        sps = [n for n in split_annexb(bytes(enc._cc.extradata)) if n[0] & 0x1F == 7][0]
        assert enc.codec == codec_string(sps) == "avc1.%02X%02X%02X" % (sps[1], sps[2], sps[3])
        assert sps[1] == profile
        assert enc.mime == f'video/mp4; codecs="{enc.codec}"'
        off, size = _find(enc.init_segment, [b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd"])
        avcc = enc.init_segment.find(b"avcC", off, off + size)
        assert enc.init_segment[avcc + 5: avcc + 8] == sps[1:4]
        # ftyp first, then moov; mvex present (fragmented)
        assert [b[0] for b in _boxes(enc.init_segment)] == [b"ftyp", b"moov"]
        _find(enc.init_segment, [b"moov", b"mvex", b"trex"])


def test_samples_are_avcc_without_parameter_sets():
    enc = FMP4Encoder(W, H, 16, preset="ultrafast")
    frag = enc.encode_chunk(_frames(2))
    off, size = _find(frag.data, [b"mdat"])
    i, types = off + 8, []
    while i < off + size:
        n = struct.unpack_from(">I", frag.data, i)[0]
        types.append(frag.data[i + 4] & 0x1F)
        i += 4 + n
    assert i == off + size
    assert 5 in types and 7 not in types and 8 not in types


def test_encoder_in_worker_thread_and_bad_input():
    enc = FMP4Encoder(W, H, 16, preset="ultrafast")
    out = []
    th = threading.Thread(target=lambda: out.append(enc.encode_chunk(_frames(4))))
    th.start()
    th.join()
    assert out[0].frames == 4
    with pytest.raises(ValueError, match="uint8"):
        enc.encode_chunk(_frames(2).astype(np.float32))
    with pytest.raises(ValueError, match=f"{H}, {W}, 3"):
        enc.encode_chunk(np.zeros((2, H + 2, W, 3), np.uint8))
    with pytest.raises(ValueError, match="even"):
        FMP4Encoder(161, 96, 16)
    # the encoder is still usable after rejected input
    assert enc.encode_chunk(_frames(1)).seq == 1


@pytest.mark.parametrize("preset", ["ultrafast", "veryfast", "medium"])
def test_sps_signals_no_frame_reordering(preset):
    """Low latency: the SPS's VUI bitstream restriction says 0 reorder frames, so a browser decoder
    outputs each frame as soon as it is decoded."""
    from h264_sps import parse_sps

    sps = parse_sps(FMP4Encoder(W, H, 16, preset=preset)._sps)
    assert sps["vui"] == 1 and sps["bitstream_restriction"] == 1, sps
    assert sps["max_num_reorder_frames"] == 0, sps
