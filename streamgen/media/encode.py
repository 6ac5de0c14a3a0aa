"""Live fragmented-MP4 (fMP4) H.264 encoder: one moof+mdat fragment per chunk, emitted at once.

Contract
--------
``FMP4Encoder(width, height, fps)`` owns one libx264 encoder (PyAV) that stays open for the
whole stream. ``init_segment`` (ftyp+moov, with the avcC built from the encoder's SPS/PPS) is
available right after construction; ``codec`` is the RFC 6381 string (``avc1.PPCCLL``) and
``mime`` the full MSE type. ``encode_chunk(frames)`` takes uint8 RGB frames ``(T, H, W, 3)``
and returns exactly one :class:`Fragment` holding every one of those T frames; nothing of a
chunk is held back until the next one (zero-latency tuning, no B-frames, no lookahead: libx264
returns one packet per input frame, which is checked). The first frame of every chunk is an
IDR frame, so each fragment is independently decodable after the init segment; scene-cut
keyframes are disabled. Fragments concatenated after the init segment are a valid MP4.

Threading: ``encode_chunk`` is meant to run in a worker thread (never on the event loop). One
encoder belongs to one stream; calls are serialised by a lock. The RGB->YUV conversion happens
once per frame inside the calling thread and the ``VideoFrame`` objects never leave it.

Timing: the media timescale is 90000 when a frame lasts a whole number of ticks at that rate,
otherwise ``fps.numerator * m``. ``Fragment.pts`` / ``duration`` are seconds (floats) and
``Fragment.base_time`` / ``duration_ticks`` the exact tick values written into tfdt/trun.
"""

from __future__ import annotations

import math
import struct
import threading
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = ["Fragment", "FMP4Encoder", "Mp4Writer", "X264_PRESETS", "x264_options", "codec_string", "split_annexb"]

X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


def x264_options(preset: str = "veryfast", *, crf: int = 23, bitrate: int | None = None) -> dict[str, str]:
    """The libx264 settings of every H.264 stream streamgen writes (live fragments and files alike):
    no B-frames and no lookahead (every frame comes out as soon as it goes in, and the stream signals
    zero reorder frames, so decoders hold nothing back), no scene-cut keyframes (the caller places
    IDRs), constant quality ``crf`` or, with ``bitrate`` (bits/s), ABR with a one-second VBV buffer."""
    if preset not in X264_PRESETS:
        raise ValueError(f"preset must be one of {', '.join(X264_PRESETS)}, got {preset!r}")
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be in 0..51, got {crf}")
    params = "keyint=infinite:min-keyint=1:scenecut=0:bframes=0:rc-lookahead=0:sync-lookahead=0"
    opts = {"preset": preset, "tune": "zerolatency", "forced-idr": "1"}
    if bitrate:
        params += f":vbv-maxrate={int(bitrate) // 1000}:vbv-bufsize={int(bitrate) // 1000}"
    else:
        opts["crf"] = str(crf)
    opts["x264-params"] = params
    return opts


@dataclass(frozen=True)
class Fragment:
    """One chunk as a self-contained fMP4 fragment (moof + mdat)."""

    seq: int  # 0-based chunk index; the moof's mfhd sequence_number is seq + 1
    data: bytes  # moof + mdat
    pts: float  # seconds, presentation time of the first frame
    duration: float  # seconds
    frames: int
    keyframe: bool  # first sample is an IDR frame
    base_time: int = 0  # tfdt baseMediaDecodeTime, in timescale ticks
    duration_ticks: int = 0
    timescale: int = 90000


# ---------------------------------------------------------------------------------------------
# H.264 bitstream helpers

_NAL_SPS, _NAL_PPS, _NAL_AUD, _NAL_IDR = 7, 8, 9, 5


def split_annexb(buf: bytes) -> list[bytes]:
    """Split an Annex B byte stream (00 00 01 / 00 00 00 01 start codes) into NAL units."""
    nals: list[bytes] = []
    i = buf.find(b"\x00\x00\x01")
    if i < 0:
        raise ValueError("not an Annex B stream: no 00 00 01 start code found")
    start = i + 3
    while True:
        j = buf.find(b"\x00\x00\x01", start)
        nal = buf[start:j if j >= 0 else len(buf)].rstrip(b"\x00")  # zeros belong to start codes
        if nal:
            nals.append(nal)
        if j < 0:
            return nals
        start = j + 3


def codec_string(sps: bytes) -> str:
    """RFC 6381 codec string ``avc1.PPCCLL`` from an SPS NAL (header byte included)."""
    if len(sps) < 4 or sps[0] & 0x1F != _NAL_SPS:
        raise ValueError("codec_string needs an SPS NAL unit (type 7) of at least 4 bytes")
    return "avc1.%02X%02X%02X" % (sps[1], sps[2], sps[3])


# ---------------------------------------------------------------------------------------------
# ISO BMFF box writer

def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *payload)


_MATRIX = struct.pack(">9I", 0x00010000, 0, 0, 0, 0x00010000, 0, 0, 0, 0x40000000)
_TRACK_ID = 1
_SAMPLE_SYNC = 0x02000000  # sample_depends_on = 2 (depends on no other sample)
_SAMPLE_NON_SYNC = 0x01000000 | 0x00010000  # depends on others, sample_is_non_sync_sample


def _avcc(sps: bytes, pps: bytes) -> bytes:
    out = struct.pack(">BBBBB", 1, sps[1], sps[2], sps[3], 0xFF)  # lengthSizeMinusOne = 3
    out += struct.pack(">BH", 0xE0 | 1, len(sps)) + sps
    out += struct.pack(">BH", 1, len(pps)) + pps
    if sps[1] in (100, 110, 122, 144):  # High profiles carry chroma format and bit depths
        out += bytes([0xFC | 1, 0xF8 | 0, 0xF8 | 0, 0])  # 4:2:0, 8-bit luma/chroma, no SPS ext
    return _box(b"avcC", out)


def _init_segment(width: int, height: int, timescale: int, sps: bytes, pps: bytes) -> bytes:
    ftyp = _box(b"ftyp", b"iso5", struct.pack(">I", 512), b"iso5", b"iso6", b"avc1", b"mp41")
    mvhd = _full_box(
        b"mvhd", 0, 0,
        struct.pack(">IIII", 0, 0, timescale, 0),
        struct.pack(">IH", 0x00010000, 0x0100), bytes(10), _MATRIX, bytes(24),
        struct.pack(">I", _TRACK_ID + 1),
    )
    tkhd = _full_box(
        b"tkhd", 0, 0x3,  # track enabled, in movie
        struct.pack(">IIIII", 0, 0, _TRACK_ID, 0, 0), bytes(8),
        struct.pack(">hhhH", 0, 0, 0, 0), _MATRIX,
        struct.pack(">II", width << 16, height << 16),
    )
    mdhd = _full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, timescale, 0, 0x55C4, 0))  # 'und'
    hdlr = _full_box(b"hdlr", 0, 0, struct.pack(">I4s", 0, b"vide"), bytes(12), b"VideoHandler\x00")
    vmhd = _full_box(b"vmhd", 0, 1, bytes(8))
    dinf = _box(b"dinf", _full_box(b"dref", 0, 0, struct.pack(">I", 1), _full_box(b"url ", 0, 1)))
    avc1 = _box(
        b"avc1",
        bytes(6), struct.pack(">H", 1),  # reserved, data_reference_index
        bytes(16), struct.pack(">HH", width, height),
        struct.pack(">II", 0x00480000, 0x00480000), bytes(4), struct.pack(">H", 1),
        bytes(32), struct.pack(">Hh", 0x18, -1),
        _avcc(sps, pps),
    )
    stbl = _box(
        b"stbl",
        _full_box(b"stsd", 0, 0, struct.pack(">I", 1), avc1),
        _full_box(b"stts", 0, 0, struct.pack(">I", 0)),
        _full_box(b"stsc", 0, 0, struct.pack(">I", 0)),
        _full_box(b"stsz", 0, 0, struct.pack(">II", 0, 0)),
        _full_box(b"stco", 0, 0, struct.pack(">I", 0)),
    )
    trak = _box(b"trak", tkhd, _box(b"mdia", mdhd, hdlr, _box(b"minf", vmhd, dinf, stbl)))
    mvex = _box(b"mvex", _full_box(b"trex", 0, 0, struct.pack(">IIIII", _TRACK_ID, 1, 0, 0, 0)))
    return ftyp + _box(b"moov", mvhd, trak, mvex)


def _fragment_boxes(sequence_number: int, base_time: int, samples: list[tuple[int, int, int]], mdat_payload: bytes) -> bytes:
    """moof + mdat. ``samples`` = [(duration_ticks, size_bytes, flags)] in decode order."""

    def moof(data_offset: int) -> bytes:
        trun_rows = b"".join(struct.pack(">III", d, s, f) for d, s, f in samples)
        trun = _full_box(b"trun", 0, 0x000701,  # data-offset, sample duration/size/flags present
                         struct.pack(">Ii", len(samples), data_offset), trun_rows)
        tfhd = _full_box(b"tfhd", 0, 0x020000, struct.pack(">I", _TRACK_ID))  # default-base-is-moof
        tfdt = _full_box(b"tfdt", 1, 0, struct.pack(">Q", base_time))
        return _box(b"moof", _full_box(b"mfhd", 0, 0, struct.pack(">I", sequence_number)),
                    _box(b"traf", tfhd, tfdt, trun))

    size = len(moof(0))  # the size does not depend on the offset value
    return moof(size + 8) + _box(b"mdat", mdat_payload)


# ---------------------------------------------------------------------------------------------

def _timescale_for(fps: Fraction) -> tuple[int, int]:
    """(timescale, ticks per frame), both integers, frame duration exact."""
    if (90000 * fps.denominator) % fps.numerator == 0:
        return 90000, 90000 * fps.denominator // fps.numerator
    m = max(1, math.ceil(10000 / fps.numerator))
    return fps.numerator * m, fps.denominator * m


class FMP4Encoder:
    """H.264 live encoder producing an init segment and one fMP4 fragment per chunk.

    ``preset``: libx264 speed preset ("ultrafast" gives Constrained Baseline, "veryfast" High).
    ``crf`` sets constant quality; ``bitrate`` (bits/s), when given, switches to ABR with a VBV
    buffer of one second. ``threads`` = 0 lets x264 choose (sliced threads: no added latency).
    """

    def __init__(
        self,
        width: int,
        height: int,
        fps: float | Fraction | int,
        *,
        preset: str = "veryfast",
        crf: int = 23,
        bitrate: int | None = None,
        threads: int = 0,
    ):
        import av

        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"width and height must be positive and even for yuv420p, got {width}x{height}")
        self.fps = Fraction(fps).limit_denominator(1001) if not isinstance(fps, Fraction) else fps
        if self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.width, self.height = width, height
        self.timescale, self.frame_ticks = _timescale_for(self.fps)

        cc = av.CodecContext.create("libx264", "w")
        cc.width, cc.height, cc.pix_fmt = width, height, "yuv420p"
        cc.time_base = Fraction(1, self.timescale)
        cc.framerate = self.fps
        cc.flags |= av.codec.context.Flags.global_header  # SPS/PPS in extradata, not in band
        cc.thread_count = threads
        if bitrate:
            cc.bit_rate = int(bitrate)
        cc.options = x264_options(preset, crf=crf, bitrate=bitrate)
        cc.open()
        self._cc = cc

        nals = split_annexb(bytes(cc.extradata or b""))
        sps = [n for n in nals if n[0] & 0x1F == _NAL_SPS]
        pps = [n for n in nals if n[0] & 0x1F == _NAL_PPS]
        if not sps or not pps:
            raise RuntimeError("libx264 did not export SPS/PPS in extradata (global_header flag ignored?)")
        self._sps, self._pps = sps[0], pps[0]
        self.codec = codec_string(self._sps)
        self.mime = f'video/mp4; codecs="{self.codec}"'
        self.init_segment = _init_segment(width, height, self.timescale, self._sps, self._pps)

        self._lock = threading.Lock()
        self._seq = 0
        self._next_frame = 0  # absolute index of the next frame (pts in frame units)

    def _to_avcc(self, packet_bytes: bytes) -> tuple[bytes, bool]:
        out = []
        idr = False
        for nal in split_annexb(packet_bytes):
            t = nal[0] & 0x1F
            if t in (_NAL_SPS, _NAL_PPS, _NAL_AUD):  # parameter sets live in avcC
                continue
            idr |= t == _NAL_IDR
            out.append(struct.pack(">I", len(nal)) + nal)
        return b"".join(out), idr

    def encode_chunk(self, frames: np.ndarray) -> Fragment:
        """Encode uint8 RGB frames (T, H, W, 3) into one fragment; its first frame is an IDR."""
        import av

        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 \
                or frames.shape[1:] != (self.height, self.width, 3) or frames.shape[0] < 1:
            got = (getattr(frames, "shape", None), getattr(frames, "dtype", type(frames).__name__))
            raise ValueError(
                f"frames must be uint8 numpy (T>=1, {self.height}, {self.width}, 3) RGB; got shape/dtype {got}")
        with self._lock:
            if self._cc is None:
                raise RuntimeError("encoder is closed")
            t0 = self._next_frame
            samples: list[tuple[int, int, int]] = []
            payload: list[bytes] = []
            first_idr = False
            for i in range(frames.shape[0]):
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
                vf = vf.reformat(format="yuv420p")
                vf.pts = (t0 + i) * self.frame_ticks
                vf.time_base = Fraction(1, self.timescale)
                vf.pict_type = av.video.frame.PictureType.I if i == 0 else av.video.frame.PictureType.NONE
                packets = self._cc.encode(vf)
                if len(packets) != 1:
                    raise RuntimeError(
                        f"libx264 returned {len(packets)} packets for frame {t0 + i} (expected exactly 1): "
                        "the encoder is buffering frames, so fragments could not be emitted per chunk")
                data, idr = self._to_avcc(bytes(packets[0]))
                if i == 0:
                    first_idr = idr
                    if not idr:
                        raise RuntimeError("libx264 did not produce an IDR frame at the start of the chunk")
                samples.append((self.frame_ticks, len(data), _SAMPLE_SYNC if idr else _SAMPLE_NON_SYNC))
                payload.append(data)
            seq = self._seq
            base = t0 * self.frame_ticks
            data = _fragment_boxes(seq + 1, base, samples, b"".join(payload))
            self._seq += 1
            self._next_frame += frames.shape[0]
        dur = frames.shape[0] * self.frame_ticks
        return Fragment(
            seq=seq, data=data, pts=base / self.timescale, duration=dur / self.timescale,
            frames=int(frames.shape[0]), keyframe=first_idr, base_time=base, duration_ticks=dur,
            timescale=self.timescale,
        )

    def close(self) -> None:
        """Release the codec. Later ``encode_chunk`` calls raise."""
        with self._lock:
            self._cc = None


class Mp4Writer:
    """An MP4 file of H.264 (libx264 with :func:`x264_options`, ``pix_fmt`` yuv420p, which needs even
    sizes; yuv444p takes any) from uint8 RGB frames ``(T, H, W, 3)``; frame n has pts n / fps. Use as a context manager; ``frames`` counts frames written."""

    def __init__(self, path: str, width: int, height: int, fps: float | Fraction, *, crf: int = 18,
                 preset: str = "medium", pix_fmt: str = "yuv420p"):
        import av

        self.fps = Fraction(fps).limit_denominator(1001)
        self.container = av.open(path, mode="w")
        try:
            self.stream = self.container.add_stream("libx264", rate=self.fps)
            self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, pix_fmt
            self.stream.time_base = 1 / self.fps
            self.stream.options = x264_options(preset, crf=crf)
        except BaseException:
            self.container.close()
            raise
        self.frames = 0

    def write(self, frames: np.ndarray) -> None:
        import av

        for rgb in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            vf.pts = self.frames
            self.container.mux(self.stream.encode(vf))
            self.frames += 1

    def close(self) -> None:
        if self.container is not None:
            self.container.mux(self.stream.encode(None))
            self.container.close()
            self.container = None

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
