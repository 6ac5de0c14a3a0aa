"""streamgen.client against a small real websockets server that speaks the protocol through
streamgen.protocol.ServerConnection and sends real fMP4 (PyAV libx264) fragments.
(The real aiohttp server is tested end to end in test_server.py.)"""

import asyncio
import io
import struct
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from websockets.asyncio.server import serve
from websockets.datastructures import Headers
from websockets.http11 import Response

from streamgen import protocol as P
from streamgen.client import StreamClient, StreamError, stream_url

W = H = 64
FPS = 16
FPC = 8  # frames per chunk (= per fragment)


def make_fmp4(n_chunks: int) -> tuple[bytes, list[bytes]]:
    """(init segment, [moof+mdat per chunk]) of an H.264 fMP4 with a keyframe every FPC frames."""
    buf = io.BytesIO()
    out = av.open(buf, "w", format="mp4", options={"movflags": "frag_keyframe+empty_moov+default_base_moof"})
    st = out.add_stream("libx264", rate=FPS, options={"g": str(FPC), "keyint_min": str(FPC), "sc_threshold": "0",
                                                      "bf": "0", "tune": "zerolatency"})
    st.width, st.height, st.pix_fmt = W, H, "yuv420p"
    for i in range(n_chunks * FPC):
        img = np.full((H, W, 3), (i * 9) % 256, np.uint8)
        for pkt in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            out.mux(pkt)
    for pkt in st.encode():
        out.mux(pkt)
    out.close()
    data, pos, boxes = buf.getvalue(), 0, []
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        boxes.append((kind, data[pos:pos + size]))
        pos += size
    init = b"".join(b for k, b in boxes if k in (b"ftyp", b"moov"))
    frags, cur = [], b""
    for k, b in boxes:
        if k == b"moof":
            cur = b
        elif k == b"mdat":
            frags.append(cur + b)
    assert len(frags) == n_chunks
    return init, frags


INIT, FRAGS = make_fmp4(12)


class FakeServer:
    """Sessions outlive connections (for attach). ``drop_after``: abort the first connection right
    after sending that fragment. ``refuse``: answer every start with this error code."""

    def __init__(self, token=None, drop_after=None, refuse=None, interval=0.01):
        self.token, self.drop_after, self.refuse, self.interval = token, drop_after, refuse, interval
        self.received: list = []
        self.sessions: dict[str, dict] = {}
        self.connections = 0

    def check_token(self, conn, request):
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return Response(401, "Unauthorized", Headers(), b"token required\n")
        return None

    async def handler(self, ws):
        self.connections += 1
        first_connection = self.connections == 1
        conn = P.ServerConnection()
        producer = None

        async def produce(sess, from_seq):
            await ws.send(conn.send(P.Ready(session=sess["id"], mime='video/mp4; codecs="avc1.64000a"',
                                            width=W, height=H, fps=FPS)))
            await ws.send(conn.send(P.Init(data=INIT)))
            seq = from_seq
            while True:
                if seq < len(sess["frags"]):
                    f = sess["frags"][seq]
                    await ws.send(conn.send(f))
                    if first_connection and self.drop_after == seq:
                        ws.transport.abort()
                        return
                    seq += 1
                    continue
                if sess["done"]:
                    await ws.send(conn.send(P.End(reason=sess["done"])))
                    return
                await asyncio.sleep(self.interval)

        async def generate(sess, chunks):
            for i in range(chunks):
                if sess["stop"]:
                    break
                await asyncio.sleep(self.interval)
                sess["frags"].append(P.Fragment(seq=i, data=FRAGS[i], pts=i * FPC / FPS, duration=FPC / FPS,
                                                frames=FPC, keyframe=True))
                sess["prompts"].append(sess["prompt"])
            sess["done"] = "stopped" if sess["stop"] else "done"

        try:
            async for data in ws:
                try:
                    msg = conn.receive(data)
                except P.ProtocolError as e:
                    self.received.append(e)
                    await ws.send(conn.send(e.to_message()))
                    continue
                if msg is None:
                    continue
                self.received.append(msg)
                if isinstance(msg, P.Start):
                    if self.refuse:
                        await ws.send(conn.send(P.ProtocolError(self.refuse, "at the session limit", ref="start").to_message()))
                        continue
                    sid = f"s{len(self.sessions)}"
                    sess = dict(id=sid, frags=[], prompts=[], prompt=msg.prompt, stop=False, done=None)
                    self.sessions[sid] = sess
                    sess["task"] = asyncio.ensure_future(generate(sess, min(msg.chunks or len(FRAGS), len(FRAGS))))
                    await ws.send(conn.send(P.Status(state="queued", gen_fps=0.0, lead_s=0.0)))
                    producer = asyncio.ensure_future(produce(sess, 0))
                elif isinstance(msg, P.Attach):
                    sess = self.sessions.get(msg.session)
                    if sess is None:
                        await ws.send(conn.send(P.ProtocolError("unknown_session", "gone", field="session",
                                                                 ref="attach").to_message()))
                        continue
                    producer = asyncio.ensure_future(produce(sess, msg.from_seq))
                elif isinstance(msg, P.Prompt):
                    sess["prompt"] = msg.prompt
                elif isinstance(msg, P.Stop):
                    sess["stop"] = True
        finally:
            if producer is not None:
                producer.cancel()

    async def __aenter__(self):
        self.server = await serve(self.handler, "127.0.0.1", 0, process_request=self.check_token,
                                  max_size=P.DEFAULT_LIMITS.max_message_bytes, compression=None)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()
        for s in self.sessions.values():
            s["task"].cancel()

    def of(self, cls):
        return [m for m in self.received if isinstance(m, cls)]


def decode_frames(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data), "r", format="mp4") as f:
        return [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]


def test_stream_url():
    assert stream_url("http://h:1") == "ws://h:1/v1/stream"
    assert stream_url("https://h") == "wss://h/v1/stream"
    assert stream_url("ws://h:2/custom?x=1") == "ws://h:2/custom?x=1"
    assert stream_url("127.0.0.1:8765") == "ws://127.0.0.1:8765/v1/stream"
    with pytest.raises(ValueError, match="scheme"):
        stream_url("ftp://h")


async def test_start_prompt_switch_stop_and_acks():
    async with FakeServer() as srv:
        async with StreamClient(srv.url) as c:
            seqs = []
            async for frag in c.start(prompt="a red fox", seed=3):
                seqs.append(frag.seq)
                assert c.init_segment == INIT and c.ready.fps == FPS and frag.data == FRAGS[frag.seq]
                if frag.seq == 1:
                    await c.set_prompt("a blue whale")
                if frag.seq == 3:
                    c.stop()  # not awaited: still sent, in order
            assert c.end_reason == "stopped"
            assert seqs == list(range(len(seqs))) and 4 <= len(seqs) < len(FRAGS)
            assert c.time_to_first_fragment > 0 and c.stats().frames == FPC * len(seqs)
            assert c.session == "s0" and c.last_seq == seqs[-1]
            # the same connection can run another session
            got = [f.seq async for f in c.start(prompt="again", chunks=2)]
            assert got == [0, 1] and c.end_reason == "done"
    start = srv.of(P.Start)[0]
    assert (start.prompt, start.seed, start.v) == ("a red fox", 3, 1)
    assert srv.of(P.Prompt) == [P.Prompt(prompt="a blue whale")]
    assert len(srv.of(P.Stop)) == 1
    assert [a.seq for a in srv.of(P.Ack)][:4] == [0, 1, 2, 3]
    assert not srv.of(P.ProtocolError), srv.of(P.ProtocolError)
    assert "a blue whale" in srv.sessions["s0"]["prompts"]


async def test_events_mode_yields_every_message():
    async with FakeServer() as srv, StreamClient(srv.url) as c:
        kinds = [type(m).__name__ async for m in c.start(prompt="x", chunks=2, events=True)]
    assert kinds == ["Status", "Ready", "Init", "Fragment", "Fragment", "End"]


async def test_reconnect_resumes_with_attach_without_gaps_or_duplicates():
    async with FakeServer(drop_after=2) as srv, StreamClient(srv.url, reconnect_delay=0.01) as c:
        seqs = [f.seq async for f in c.start(prompt="x", chunks=6)]
        assert seqs == list(range(6))
        assert c.reconnects == 1 and c.end_reason == "done"
        assert c.stats().dropped == 0
    # fragment 2 was sent right before the abort: it arrived (attach from 3) or was lost with the socket (from 2)
    assert srv.of(P.Attach) in ([P.Attach(session="s0", from_seq=3)], [P.Attach(session="s0", from_seq=2)])
    assert srv.connections == 2


async def test_no_reconnect_raises():
    async with FakeServer(drop_after=0) as srv, StreamClient(srv.url, reconnect=False) as c:
        with pytest.raises(StreamError, match="reconnect is off"):
            async for _ in c.start(prompt="x", chunks=3):
                pass


async def test_refused_start_and_local_validation():
    async with FakeServer(refuse="busy") as srv, StreamClient(srv.url) as c:
        with pytest.raises(P.ProtocolError, match="multiple of 16") as e:
            c.start(prompt="x", width=100)
        assert e.value.field == "width"
        with pytest.raises(StreamError) as e:
            async for _ in c.start(prompt="x"):
                pass
        assert e.value.code == "busy"


async def test_token_is_sent_and_a_refusal_is_explained():
    async with FakeServer(token="s3cret") as srv:
        with pytest.raises(StreamError, match="token"):
            async with StreamClient(srv.url):
                pass
        async with StreamClient(srv.url, token="s3cret") as c:
            assert [f.seq async for f in c.start(prompt="x", chunks=1)] == [0]


async def test_watch_command_records_a_playable_fmp4(tmp_path: Path):
    out = tmp_path / "out.mp4"
    async with FakeServer() as srv:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamgen", "watch", srv.url, "--prompt", "a red fox", "--chunks", "5",
            "--out", str(out), "--switch", "1=a blue whale", "-q",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    text = stdout.decode()
    assert "latency (time to first fragment):" in text and " ms" in text and "fps:" in text, text
    assert "received 5 fragments, 40 frames" in text and "end: done" in text, text
    assert out.read_bytes() == INIT + b"".join(FRAGS[:5])
    frames = decode_frames(out.read_bytes())
    assert len(frames) == 5 * FPC
    assert srv.of(P.Prompt) == [P.Prompt(prompt="a blue whale")]


def test_client_imports_no_torch_or_av():
    code = ("import sys, streamgen.client; "
            "print(sorted(m for m in ('torch', 'av', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


async def test_standalone_script_records(tmp_path: Path):
    out = tmp_path / "rec.mp4"
    script = Path(__file__).resolve().parents[1] / "clients" / "python" / "streamgen_watch.py"
    async with FakeServer() as srv:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), srv.url, "--prompt", "x", "--chunks", "3", "--out", str(out),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    assert "first fragment after" in stderr.decode() and "3 fragments, 24 frames" in stderr.decode()
    assert len(decode_frames(out.read_bytes())) == 3 * FPC
