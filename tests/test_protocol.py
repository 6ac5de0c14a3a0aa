"""streamgen.protocol: validation details and the per-connection state machines (vectors are in
test_protocol_vectors.py)."""

import dataclasses
import struct
import subprocess
import sys
from dataclasses import replace

import msgpack
import pytest

from streamgen import protocol as P

READY = P.Ready(session="abc", mime='video/mp4; codecs="avc1.42C01E"', width=832, height=480, fps=16)


def frag(seq: int) -> P.Fragment:
    return P.Fragment(seq=seq, data=bytes([seq % 256]), pts=seq * 0.75, duration=0.75, frames=12, keyframe=True)


def raises(code: str, field=None):
    class Ctx:
        def __enter__(self):
            self.cm = pytest.raises(P.ProtocolError)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            out = self.cm.__exit__(*exc)
            assert (self.info.value.code, self.info.value.field) == (code, field), self.info.value
            return out

    return Ctx()


def test_sans_io_imports_no_asyncio_or_torch():
    code = "import sys, streamgen.protocol; print(sorted(m for m in ('asyncio', 'torch', 'websockets', 'aiohttp') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_dataclass_fields_follow_the_schema():
    for t, cls in P.MESSAGE_CLASSES.items():
        names = [f.name for f in P.SCHEMA[t]]
        own = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
        assert sorted(own) == sorted(names), t
    assert set(P.CLIENT_TYPES) | set(P.SERVER_TYPES) == set(P.SCHEMA)


def test_unknown_fields_ignored_nil_is_absent_and_status_keeps_extras():
    data = msgpack.packb({"type": "start", "prompt": "x", "future": [1, 2], "seed": None}, use_bin_type=True)
    assert P.decode(data, "client") == P.Start(prompt="x")
    data = msgpack.packb({"type": "status", "state": "generating", "gen_fps": 3, "lead_s": 0, "gpu": "h100",
                          "gone": None}, use_bin_type=True)
    st = P.decode(data, "server")
    assert st.gen_fps == 3.0 and isinstance(st.gen_fps, float)
    assert st.extra == {"gpu": "h100"}
    assert P.decode(P.encode(st), "server") == st


def test_lenient_numbers_and_canonical_floats():
    data = msgpack.packb({"type": "start", "prompt": "x", "width": 832.0}, use_bin_type=True)
    assert P.decode(data).width == 832 and isinstance(P.decode(data).width, int)
    ack = P.Ack(seq=1, playhead=2)  # an int playhead is written as float64
    assert P.encode(ack) == b"\x83\xa4type\xa3ack\xa3seq\x01\xa8playhead\xcb" + struct.pack(">d", 2.0)
    f32 = b"\x83\xa4type\xa3ack\xa3seq\x01\xa8playhead\xca" + struct.pack(">f", 0.5)
    assert P.decode(f32, "client").playhead == 0.5


def test_encode_validates_and_names_field_and_limit():
    with raises("bad_field", "height") as e:
        P.encode(P.Start(prompt="x", height=481))
    assert "16" in e.value.message and "481" in e.value.message
    with raises("too_large", "prompt") as e:
        P.encode(P.Prompt(prompt="é" * 2049))
    assert "4098" in e.value.message and "4096" in e.value.message
    with raises("bad_field", "interpolate"):
        P.encode(P.Start(prompt="x", interpolate=8))
    with raises("bad_field", "keyframe"):
        P.encode(P.Fragment(seq=0, data=b"x", pts=0.0, duration=0.1, frames=1, keyframe=None))
    with raises("bad_field", "gen_fps"):
        P.encode(P.Status(state="generating", gen_fps=float("inf"), lead_s=0.0))
    with raises("bad_field", "state"):
        P.encode(P.Status(state="x", gen_fps=1.0, lead_s=0.0, extra={"state": "y"}))


def test_configured_limits():
    limits = replace(P.DEFAULT_LIMITS, max_size=832, max_prompt_bytes=10, max_message_bytes=64)
    P.decode(P.encode(P.Start(prompt="x", width=832)), "client", limits)
    with raises("bad_field", "width") as e:
        P.decode(P.encode(P.Start(prompt="x", width=848)), "client", limits)
    assert "64..832" in e.value.message
    with raises("too_large", "prompt"):
        P.decode(P.encode(P.Prompt(prompt="x" * 11)), "client", limits)
    with raises("too_large", None):
        P.decode(P.encode(P.Start(prompt="x", image=bytes(100))), "client", limits)
    with raises("bad_message", None):
        P.decode("text frame", "client")  # type: ignore[arg-type]


def test_error_message_round_trip():
    err = P.ProtocolError("bad_field", "start.fps: must be in 1..120, got 0", field="fps", ref="start")
    msg = P.decode(P.encode(err.to_message()), "server")
    assert msg == P.Error(code="bad_field", message=err.message, fatal=False, field="fps", ref="start")


def run_session(c: P.ClientConnection, s: P.ServerConnection, n: int) -> None:
    s.receive(c.send(P.Start(prompt="a fox", chunks=n)))
    c.receive(s.send(P.Status(state="queued", gen_fps=0.0, lead_s=0.0)))
    c.receive(s.send(READY))
    c.receive(s.send(P.Init(data=b"ftyp")))
    for i in range(n):
        c.receive(s.send(frag(i)))
        assert s.receive(c.send(P.Ack(seq=i, playhead=i * 0.5))) == P.Ack(seq=i, playhead=i * 0.5)


def test_full_session_then_another_on_the_same_connection():
    c, s = P.ClientConnection(), P.ServerConnection()
    run_session(c, s, 3)
    assert (c.session, c.last_seq, s.last_seq) == ("abc", 2, 2)
    assert s.receive(c.send(P.Prompt(prompt="a bear"))) == P.Prompt(prompt="a bear")
    assert isinstance(s.receive(c.send(P.Pause())), P.Pause)
    assert isinstance(s.receive(c.send(P.Resume())), P.Resume)
    s.receive(c.send(P.Stop()))
    with raises("out_of_order", "type"):
        c.send(P.Prompt(prompt="late"))
    assert s.receive(P.encode(P.Stop())) is None, "a repeated stop is ignored"
    c.receive(s.send(P.End(reason="stopped")))
    assert c.phase is s.phase is P.Phase.IDLE
    for late in (P.Prompt(prompt="crossed"), P.Ack(seq=2), P.Pause(), P.Stop()):
        assert s.receive(P.encode(late)) is None, "messages crossing end are ignored"
    run_session(c, s, 2)


def test_out_of_order_messages_are_rejected_and_the_connection_stays_usable():
    s = P.ServerConnection()
    for m in (P.Prompt(prompt="x"), P.Pause(), P.Ack(seq=0), P.Stop()):
        with raises("out_of_order", "type") as e:
            s.receive(P.encode(m))
        assert e.value.ref == m.TYPE and not e.value.fatal
    s.receive(P.encode(P.Start(prompt="x")))
    with raises("out_of_order", "type") as e:
        s.receive(P.encode(P.Start(prompt="second")))
    assert "already starting" in e.value.message
    with raises("out_of_order", "type"):  # order is checked before fields
        s.receive(msgpack.packb({"type": "attach", "session": "!", "from_seq": -1}))
    with raises("bad_field", "seq"):
        s.receive(P.encode(P.Ack(seq=0)))  # nothing sent yet
    s.send(READY)
    s.send(P.Init(data=b"i"))
    s.send(frag(0))
    assert s.receive(P.encode(P.Ack(seq=0))).seq == 0
    with raises("bad_field", "seq"):
        s.receive(P.encode(P.Ack(seq=1)))
    assert s.phase is P.Phase.ACTIVE


def test_server_side_order_is_enforced_on_send():
    s = P.ServerConnection()
    with raises("out_of_order", "type"):
        s.send(READY)
    s.receive(P.encode(P.Start(prompt="x")))
    with raises("out_of_order", "type"):
        s.send(P.Init(data=b"i"))
    s.send(READY)
    with raises("out_of_order", "type"):
        s.send(frag(0))
    s.send(P.Init(data=b"i"))
    with raises("out_of_order", "type"):
        s.send(P.Init(data=b"i"))
    s.send(frag(0))
    s.send(frag(2))  # a gap (dropped fragment) is fine
    with raises("out_of_order", "seq"):
        s.send(frag(2))
    with pytest.raises(TypeError):
        s.send(P.Stop())


def test_rejected_start_returns_both_sides_to_idle():
    c, s = P.ClientConnection(), P.ServerConnection()
    with raises("bad_field", "width") as e:
        s.receive(msgpack.packb({"type": "start", "prompt": "x", "width": 100}))
    assert e.value.ref == "start" and s.phase is P.Phase.IDLE
    c.send(P.Start(prompt="x"))
    c.receive(s.send(e.value.to_message()))
    assert c.phase is P.Phase.IDLE
    # accepted by the protocol, refused by the application (busy)
    s.receive(c.send(P.Start(prompt="x")))
    busy = P.ProtocolError("busy", "server is at its session limit (4)", ref="start")
    c.receive(s.send(busy.to_message()))
    assert c.phase is s.phase is P.Phase.IDLE
    # a duplicate start's out_of_order does not cancel the pending start
    s.receive(c.send(P.Start(prompt="x")))
    with raises("out_of_order", "type") as e:
        s.receive(P.encode(P.Start(prompt="y")))
    c.receive(s.send(e.value.to_message()))
    assert c.phase is s.phase is P.Phase.STARTING
    c.receive(s.send(READY))
    assert c.phase is P.Phase.ACTIVE


def test_fatal_error_closes_both_sides():
    c, s = P.ClientConnection(), P.ServerConnection()
    with raises("unsupported_version", "v") as e:
        s.receive(msgpack.packb({"type": "start", "v": 9, "prompt": "x"}))
    assert e.value.fatal and "1" in e.value.message
    c.send(P.Start(prompt="x"))
    c.receive(s.send(e.value.to_message()))
    assert c.phase is s.phase is P.Phase.CLOSED
    assert s.receive(P.encode(P.Stop())) is None and c.receive(P.encode(READY)) is None
    with raises("out_of_order", "type"):
        c.send(P.Stop())


def test_client_checks_the_server():
    c = P.ClientConnection()
    with raises("out_of_order", "type"):
        c.receive(P.encode(READY))
    c.send(P.Start(prompt="x"))
    c.receive(P.encode(READY))
    with raises("out_of_order", "type"):
        c.receive(P.encode(frag(0)))  # before init
    c.receive(P.encode(P.Init(data=b"i")))
    c.receive(P.encode(frag(0)))
    with raises("out_of_order", "seq"):
        c.receive(P.encode(frag(0)))
    with raises("unknown_type", "type"):
        c.receive(P.encode(P.Stop()))


def test_attach_after_reconnect():
    old = P.ClientConnection()
    s1 = P.ServerConnection()
    run_session(old, s1, 4)
    c, s = P.ClientConnection(), P.ServerConnection()
    m = s.receive(c.attach(old.session, old.last_seq + 1))
    assert m == P.Attach(session="abc", from_seq=4)
    with raises("bad_field", "session"):
        c.receive(P.encode(replace(READY, session="xyz")))
    c.receive(s.send(READY))
    c.receive(s.send(P.Init(data=b"ftyp")))
    with raises("out_of_order", "seq"):
        c.receive(P.encode(frag(3)))
    c.receive(s.send(frag(4)))
    c.receive(s.send(P.End(reason="done")))
    assert c.phase is P.Phase.IDLE and c.last_seq == 4
