"""Regenerate the golden vectors: ``python protocol/vectors/make_vectors.py``.

Bytes come from the plain ``msgpack`` library (maps written in canonical key order by hand), not
from streamgen's encoder, so the vectors check the implementations instead of echoing them.
The committed files are the reference; rerun only when adding vectors on purpose.
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import msgpack

HERE = Path(__file__).resolve().parent


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def to_json(obj):
    if isinstance(obj, bytes):
        return {"$bin": base64.b64encode(obj).decode()}
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_json(v) for v in obj]
    return obj


VECTORS: list[dict] = []


def valid(name: str, direction: str, message: dict, description: str) -> None:
    VECTORS.append(dict(name=name, description=description, direction=direction, valid=True,
                        message=message, data=pack(message)))


def invalid(name: str, direction: str, data: bytes | dict, code: str, field: str | None, description: str,
            limits: dict | None = None) -> None:
    message = data if isinstance(data, dict) else None
    v = dict(name=name, description=description, direction=direction, valid=False, message=message,
             data=pack(data) if isinstance(data, dict) else data, error={"code": code, "field": field})
    if limits:
        v["limits"] = limits
    VECTORS.append(v)


PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGP4z8DwHwAFAAH/iZk9HQAAAABJRU5ErkJggg==")
MIME = 'video/mp4; codecs="avc1.42C01E"'

# ------------------------------------------------------------------ valid, client -> server
valid("start_minimal", "client", {"type": "start", "v": 1, "prompt": "a red fox running through snow"},
      "start with only the prompt (encoders always write v)")
valid("start_full", "client", {
    "type": "start", "v": 1, "prompt": "a lighthouse at dusk, waves crashing", "model": "wan2.1-t2v-1.3b",
    "width": 832, "height": 480, "fps": 16, "seed": 4294967295, "chunks": 300, "interpolate": 2,
    "image": PNG_1PX}, "start with every field: uint16 width, uint32 seed, bin8 image")
valid("start_unicode", "client", {"type": "start", "v": 1, "prompt": "一只狐狸在雪地里奔跑 🦊", "seed": 0},
      "UTF-8 prompt (str8: 35 bytes), seed 0 as positive fixint")
valid("start_long_prompt", "client", {"type": "start", "v": 1, "prompt": "slow pan over a misty forest, " * 10,
                                      "chunks": 1, "interpolate": 4},
      "300-byte prompt (str16)")
valid("prompt", "client", {"type": "prompt", "prompt": "the fox jumps into a river"}, "switch the prompt")
valid("pause", "client", {"type": "pause"}, "pause (fixmap with one key)")
valid("resume", "client", {"type": "resume"}, "resume")
valid("stop", "client", {"type": "stop"}, "stop")
valid("ack_seq", "client", {"type": "ack", "seq": 0}, "ack without playhead")
valid("ack_playhead", "client", {"type": "ack", "seq": 70000, "playhead": 4375.0},
      "ack with uint32 seq and an integral playhead written as float64")
valid("attach", "client", {"type": "attach", "v": 1, "session": "s_3f9a-77", "from_seq": 17},
      "rejoin session s_3f9a-77 from fragment 17")

# ------------------------------------------------------------------ valid, server -> client
valid("ready", "server", {"type": "ready", "v": 1, "session": "s_3f9a-77", "mime": MIME,
                          "width": 832, "height": 480, "fps": 32}, "session is ready")
valid("init", "server", {"type": "init", "data": b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso6"},
      "init segment (bin8)")
valid("fragment_first", "server", {"type": "fragment", "seq": 0, "data": bytes(range(256)) * 2, "pts": 0.0,
                                   "duration": 0.75, "frames": 24, "keyframe": True},
      "first fragment: bin16 data, pts 0.0 as float64")
valid("fragment_big", "server", {"type": "fragment", "seq": 4294967296, "data": bytes(70000), "pts": 12.3456789,
                                 "duration": 0.1875, "frames": 3, "keyframe": False},
      "bin32 data, uint64 seq")
valid("status", "server", {"type": "status", "state": "generating", "gen_fps": 17.25, "lead_s": 1.5},
      "status with the required fields")
valid("status_full", "server", {"type": "status", "state": "paused", "gen_fps": 0.0, "lead_s": -0.125,
                                "chunk": 12, "queue": 1, "dropped": 300},
      "status with the optional known fields, negative lead")
valid("status_extra", "server", {"type": "status", "state": "generating", "gen_fps": 16.0, "lead_s": 2.0,
                                 "step_ms": 61.5, "offset": -1, "delta": -200, "tiny": -33, "big": -40000,
                                 "name": "gpu0", "ok": True, "list": [1, "a"],
                                 "nested": {"k": 2}},
      "status keeps unknown keys in order: float, negative fixint, int16, int8, int32, str, bool, array, map")
valid("status_map16", "server", dict({"type": "status", "state": "generating", "gen_fps": 1.0, "lead_s": 0.5},
                                     **{f"x{i:02d}": i for i in range(12)}),
      "16 keys: map16 header")
valid("end", "server", {"type": "end", "reason": "done"}, "session finished")
valid("error", "server", {"type": "error", "code": "bad_field",
                          "message": "start.width: must be a multiple of 16 in 64..2048, got 100",
                          "fatal": False, "field": "width", "ref": "start"}, "non-fatal error with field and ref")
valid("error_fatal", "server", {"type": "error", "code": "internal", "message": "", "fatal": True},
      "fatal error without field/ref, empty message")

# ------------------------------------------------------------------ invalid frames
invalid("bad_never_used_byte", "client", b"\xc1", "bad_message", None, "0xc1 is never used in msgpack")
invalid("bad_truncated", "client", pack({"type": "prompt", "prompt": "abc"})[:-1], "bad_message", None,
        "truncated map")
invalid("bad_not_a_map", "client", pack([1, 2]), "bad_message", None, "an array instead of a map")
invalid("bad_trailing_bytes", "client", pack({"type": "stop"}) + b"\x00", "bad_message", None,
        "two values in one frame")
invalid("bad_duplicate_key", "client", b"\x82\xa4type\xa4stop\xa4type\xa5pause", "bad_message", None,
        "the key type appears twice")
invalid("bad_int_key", "client", b"\x82\xa4type\xa4stop\x01\x02", "bad_message", None, "an integer map key")
invalid("bad_invalid_utf8", "client", b"\x82\xa4type\xa6prompt\xa6prompt\xa2\xff\xfe", "bad_message", None,
        "a str that is not UTF-8")
invalid("missing_type", "client", {"prompt": "x"}, "bad_field", "type", "no type")
invalid("type_not_str", "client", {"type": 7}, "bad_field", "type", "type is an int")
invalid("unknown_type", "client", {"type": "dance"}, "unknown_type", "type", "unknown type")
invalid("wrong_direction", "client", {"type": "ready", "v": 1, "session": "a", "mime": MIME, "width": 64,
                                      "height": 64, "fps": 16},
        "unknown_type", "type", "a server message received by the server")
invalid("wrong_direction_server", "server", {"type": "stop"}, "unknown_type", "type",
        "a client message received by the client")
invalid("start_missing_prompt", "client", {"type": "start", "v": 1}, "bad_field", "prompt", "prompt is required")
invalid("start_prompt_nil", "client", {"type": "start", "v": 1, "prompt": None}, "bad_field", "prompt",
        "nil is absent")
invalid("start_prompt_int", "client", {"type": "start", "prompt": 5}, "bad_field", "prompt", "prompt is an int")
invalid("start_prompt_bin", "client", {"type": "start", "prompt": b"a fox"}, "bad_field", "prompt",
        "prompt as bin instead of str")
invalid("start_prompt_ext", "client", b"\x82\xa4type\xa5start\xa6prompt\xd4\x05\x00", "bad_field", "prompt",
        "prompt is an ext value")
invalid("start_prompt_empty", "client", {"type": "start", "prompt": ""}, "bad_field", "prompt", "empty prompt")
invalid("start_prompt_too_long", "client", {"type": "start", "prompt": "狐狸"}, "too_large", "prompt",
        "6 UTF-8 bytes over a 5-byte limit (2 characters)", limits={"max_prompt_bytes": 5})
invalid("start_width_not_multiple", "client", {"type": "start", "prompt": "x", "width": 100}, "bad_field", "width",
        "width not a multiple of 16")
invalid("start_width_too_big", "client", {"type": "start", "prompt": "x", "width": 4096}, "bad_field", "width",
        "width above 2048")
invalid("start_height_small", "client", {"type": "start", "prompt": "x", "height": 48}, "bad_field", "height",
        "height below 64")
invalid("start_height_float", "client", {"type": "start", "prompt": "x", "height": 480.5}, "bad_field", "height",
        "height is not integral")
invalid("start_width_bool", "client", {"type": "start", "prompt": "x", "width": True}, "bad_field", "width",
        "true is not an integer")
invalid("start_fps_zero", "client", {"type": "start", "prompt": "x", "fps": 0}, "bad_field", "fps", "fps 0")
invalid("start_seed_negative", "client", {"type": "start", "prompt": "x", "seed": -1}, "bad_field", "seed",
        "negative seed")
invalid("start_seed_too_big", "client", {"type": "start", "prompt": "x", "seed": 2**32}, "bad_field", "seed",
        "seed above 2^32-1")
invalid("start_seed_uint64", "client", {"type": "start", "prompt": "x", "seed": 2**64 - 1}, "bad_field", "seed",
        "seed 2^64-1 (not exact in a JS number)")
invalid("start_chunks_zero", "client", {"type": "start", "prompt": "x", "chunks": 0}, "bad_field", "chunks",
        "chunks 0")
invalid("start_interpolate_3", "client", {"type": "start", "prompt": "x", "interpolate": 3}, "bad_field",
        "interpolate", "interpolate must be 1, 2 or 4")
invalid("start_image_str", "client", {"type": "start", "prompt": "x", "image": "aGVsbG8="}, "bad_field", "image",
        "image as base64 text instead of bin")
invalid("start_image_too_large", "client", {"type": "start", "prompt": "x", "image": PNG_1PX}, "too_large",
        "image", "image over the image limit", limits={"max_image_bytes": 64})
invalid("start_first_bad_field_wins", "client", {"type": "start", "prompt": "x", "fps": 500, "width": 3},
        "bad_field", "width", "two bad fields: width comes first in canonical order")
invalid("message_too_large", "client", {"type": "prompt", "prompt": "a fox in the snow"}, "too_large", None,
        "frame over the message limit", limits={"max_message_bytes": 16})
invalid("start_v2", "client", {"type": "start", "v": 2, "prompt": "x"}, "unsupported_version", "v",
        "unsupported protocol version (fatal)")
invalid("start_v_str", "client", {"type": "start", "v": "1", "prompt": "x"}, "bad_field", "v", "v as a string")
invalid("ack_missing_seq", "client", {"type": "ack"}, "bad_field", "seq", "ack without seq")
invalid("ack_negative_seq", "client", {"type": "ack", "seq": -3}, "bad_field", "seq", "negative seq")
invalid("ack_playhead_nan", "client", b"\x83\xa4type\xa3ack\xa3seq\x01\xa8playhead\xcb" + struct.pack(">d", float("nan")),
        "bad_field", "playhead", "NaN playhead")
invalid("ack_playhead_negative", "client", {"type": "ack", "seq": 1, "playhead": -0.5}, "bad_field", "playhead",
        "negative playhead")
invalid("attach_bad_session", "client", {"type": "attach", "session": "../etc", "from_seq": 0}, "bad_field",
        "session", "session with characters outside [A-Za-z0-9_-]")
invalid("attach_missing_from_seq", "client", {"type": "attach", "session": "abc"}, "bad_field", "from_seq",
        "attach without from_seq")
invalid("fragment_missing_data", "server", {"type": "fragment", "seq": 0, "pts": 0.0, "duration": 1.0,
                                            "frames": 1, "keyframe": True}, "bad_field", "data", "no data")
invalid("fragment_data_str", "server", {"type": "fragment", "seq": 0, "data": "moof", "pts": 0.0,
                                        "duration": 1.0, "frames": 1, "keyframe": True}, "bad_field", "data",
        "data as str instead of bin")
invalid("fragment_keyframe_int", "server", {"type": "fragment", "seq": 0, "data": b"x", "pts": 0.0,
                                            "duration": 1.0, "frames": 1, "keyframe": 1}, "bad_field", "keyframe",
        "keyframe must be a bool")
invalid("fragment_seq_float", "server", {"type": "fragment", "seq": 1.5, "data": b"x", "pts": 0.0,
                                         "duration": 1.0, "frames": 1, "keyframe": True}, "bad_field", "seq",
        "non-integral seq")
invalid("error_missing_fatal", "server", {"type": "error", "code": "internal", "message": "boom"}, "bad_field",
        "fatal", "error without fatal")
invalid("ready_v2", "server", {"type": "ready", "v": 2, "session": "a", "mime": MIME, "width": 64, "height": 64,
                               "fps": 16}, "unsupported_version", "v", "server speaks a newer version")


# ------------------------------------------------------------------ state-machine sequences
# Each step: {"recv": map} (a frame packed with plain msgpack, fed to receive) or {"send": map}
# (a message passed to send); "expect": "ok" (a message comes back), "ignored" (receive returns
# nothing) or {"code", "field"} (ProtocolError); "phase" after the step when given.
OK, IGN = "ok", "ignored"


def err(code: str, field: str | None = "type") -> dict:
    return {"code": code, "field": field}


READY = {"type": "ready", "v": 1, "session": "abc", "mime": MIME, "width": 64, "height": 64, "fps": 16}


def frag(seq: int) -> dict:
    return {"type": "fragment", "seq": seq, "data": bytes([seq]), "pts": seq * 0.5, "duration": 0.5, "frames": 8,
            "keyframe": True}


def error(code: str, ref: str | None = None, fatal: bool = False) -> dict:
    m = {"type": "error", "code": code, "message": f"{code} for the test", "fatal": fatal}
    if ref:
        m["ref"] = ref
    return m


START = {"type": "start", "v": 1, "prompt": "a fox"}
SEQUENCES = {
    "server_full_session": ("server", "a whole session, then another one on the same connection", [
        ({"recv": START}, OK, "starting"),
        ({"send": {"type": "status", "state": "queued", "gen_fps": 0.0, "lead_s": 0.0}}, OK, "starting"),
        ({"send": READY}, OK, "active"),
        ({"send": {"type": "init", "data": b"init"}}, OK, "active"),
        ({"send": frag(0)}, OK, None),
        ({"recv": {"type": "ack", "seq": 0, "playhead": 0.25}}, OK, None),
        ({"recv": {"type": "ack", "seq": 5}}, err("bad_field", "seq"), "active"),
        ({"send": frag(1)}, OK, None),
        ({"recv": {"type": "prompt", "prompt": "a bear"}}, OK, None),
        ({"recv": {"type": "pause"}}, OK, None),
        ({"recv": {"type": "resume"}}, OK, None),
        ({"recv": {"type": "stop"}}, OK, "active"),
        ({"recv": {"type": "stop"}}, IGN, None),
        ({"recv": {"type": "prompt", "prompt": "late"}}, err("out_of_order"), None),
        ({"recv": {"type": "ack", "seq": 1}}, OK, None),
        ({"send": frag(2)}, OK, None),
        ({"send": {"type": "end", "reason": "stopped"}}, OK, "idle"),
        ({"recv": {"type": "ack", "seq": 2}}, IGN, "idle"),
        ({"recv": {"type": "pause"}}, IGN, "idle"),
        ({"recv": START}, OK, "starting"),
    ]),
    "server_rejections": ("server", "out-of-order input, a refused start, a duplicate start, a fatal error", [
        ({"recv": {"type": "prompt", "prompt": "x"}}, err("out_of_order"), "idle"),
        ({"recv": {"type": "ack", "seq": 0}}, err("out_of_order"), "idle"),
        ({"recv": {"type": "stop"}}, err("out_of_order"), "idle"),
        ({"recv": {"type": "start", "prompt": "x", "width": 100}}, err("bad_field", "width"), "idle"),
        ({"send": error("bad_field", "start")}, OK, "idle"),
        ({"recv": START}, OK, "starting"),
        ({"recv": START}, err("out_of_order"), "starting"),
        ({"recv": {"type": "attach", "session": "!", "from_seq": -1}}, err("out_of_order"), "starting"),
        ({"send": error("out_of_order", "start")}, OK, "starting"),
        ({"send": error("busy", "start")}, OK, "idle"),
        ({"recv": {"type": "attach", "session": "abc", "from_seq": 3}}, OK, "starting"),
        ({"send": error("internal", fatal=True)}, OK, "closed"),
        ({"recv": {"type": "stop"}}, IGN, "closed"),
    ]),
    "server_send_order": ("server", "the server's own order is checked on send", [
        ({"recv": START}, OK, "starting"),
        ({"send": {"type": "init", "data": b"i"}}, err("out_of_order"), "starting"),
        ({"send": frag(0)}, err("out_of_order"), "starting"),
        ({"send": READY}, OK, "active"),
        ({"send": frag(0)}, err("out_of_order"), "active"),
        ({"send": {"type": "init", "data": b"i"}}, OK, None),
        ({"send": {"type": "init", "data": b"i"}}, err("out_of_order"), None),
        ({"send": frag(0)}, OK, None),
        ({"send": frag(2)}, OK, None),
        ({"send": frag(2)}, err("out_of_order", "seq"), None),
        ({"send": READY}, err("out_of_order"), "active"),
        ({"send": {"type": "end", "reason": "done"}}, OK, "idle"),
        ({"send": {"type": "status", "state": "x", "gen_fps": 0.0, "lead_s": 0.0}}, err("out_of_order"), "idle"),
    ]),
    "client_session": ("client", "the client's order, pipelining, acks, stop", [
        ({"send": {"type": "ack", "seq": 0}}, err("out_of_order"), "idle"),
        ({"send": START}, OK, "starting"),
        ({"send": {"type": "prompt", "prompt": "pipelined"}}, OK, "starting"),
        ({"recv": {"type": "status", "state": "queued", "gen_fps": 0.0, "lead_s": 0.0}}, OK, "starting"),
        ({"recv": READY}, OK, "active"),
        ({"recv": frag(0)}, err("out_of_order"), "active"),
        ({"recv": {"type": "init", "data": b"i"}}, OK, None),
        ({"recv": frag(0)}, OK, None),
        ({"send": {"type": "ack", "seq": 1}}, err("bad_field", "seq"), None),
        ({"send": {"type": "ack", "seq": 0, "playhead": 0.1}}, OK, None),
        ({"recv": frag(0)}, err("out_of_order", "seq"), None),
        ({"recv": {"type": "init", "data": b"i"}}, err("out_of_order"), None),
        ({"send": {"type": "stop"}}, OK, "active"),
        ({"send": {"type": "prompt", "prompt": "late"}}, err("out_of_order"), None),
        ({"send": {"type": "stop"}}, err("out_of_order"), None),
        ({"send": {"type": "ack", "seq": 0}}, OK, None),
        ({"recv": frag(1)}, OK, None),
        ({"send": {"type": "ack", "seq": 1}}, OK, None),
        ({"recv": {"type": "end", "reason": "stopped"}}, OK, "idle"),
        ({"recv": {"type": "status", "state": "x", "gen_fps": 0.0, "lead_s": 0.0}}, err("out_of_order"), "idle"),
        ({"recv": {"type": "stop"}}, err("unknown_type"), "idle"),
    ]),
    "client_attach": ("client", "attach: ready must name the session, fragments start at from_seq", [
        ({"send": {"type": "attach", "v": 1, "session": "abc", "from_seq": 5}}, OK, "starting"),
        ({"recv": dict(READY, session="other")}, err("bad_field", "session"), "starting"),
        ({"recv": READY}, OK, "active"),
        ({"recv": {"type": "init", "data": b"i"}}, OK, None),
        ({"recv": frag(4)}, err("out_of_order", "seq"), None),
        ({"recv": frag(6)}, OK, None),
        ({"recv": {"type": "end", "reason": "done"}}, OK, "idle"),
    ]),
    "client_rejections": ("client", "refused starts return to idle; a fatal error closes", [
        ({"send": START}, OK, "starting"),
        ({"recv": error("bad_field", "start")}, OK, "idle"),
        ({"send": START}, OK, "starting"),
        ({"recv": error("out_of_order", "start")}, OK, "starting"),
        ({"recv": error("bad_field", "prompt")}, OK, "starting"),
        ({"recv": error("busy", "start")}, OK, "idle"),
        ({"send": START}, OK, "starting"),
        ({"recv": error("internal", fatal=True)}, OK, "closed"),
        ({"recv": READY}, IGN, "closed"),
        ({"send": {"type": "stop"}}, err("out_of_order"), "closed"),
    ]),
}


def write_sequences() -> None:
    d = HERE / "sequences"
    d.mkdir(exist_ok=True)
    for old in d.glob("*.json"):
        old.unlink()
    for name, (side, description, steps) in SEQUENCES.items():
        rows = []
        for op, expect, phase in steps:
            row = {k: to_json(v) for k, v in op.items()}
            row["expect"] = expect
            if phase:
                row["phase"] = phase
            rows.append(row)
        doc = {"description": description, "side": side, "steps": rows}
        (d / f"{name}.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


def main() -> None:
    for old in list(HERE.glob("*.msgpack")) + list(HERE.glob("*.json")):
        old.unlink()
    names = set()
    for v in VECTORS:
        assert v["name"] not in names, v["name"]
        names.add(v["name"])
        (HERE / f"{v['name']}.msgpack").write_bytes(v["data"])
        doc = {"description": v["description"], "direction": v["direction"], "valid": v["valid"],
               "message": to_json(v["message"]), "bytes_file": f"{v['name']}.msgpack"}
        if "limits" in v:
            doc["limits"] = v["limits"]
        if not v["valid"]:
            doc["error"] = v["error"]
        (HERE / f"{v['name']}.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    write_sequences()
    print(f"{len(VECTORS)} vectors and {len(SEQUENCES)} sequences written to {HERE}")


if __name__ == "__main__":
    main()
