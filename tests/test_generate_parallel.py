"""`streamgen generate --parallel MODE` under a real torchrun launch (2 gloo ranks on the CPU): the
file rank 0 writes holds the frames of the same command run in one process, a prompt switch included."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import av
import numpy as np
import pytest

ARGS = ["--model", "tiny", "--prompt", "a red fox", "--prompt-at", "2:a blue whale", "--chunks", "4", "-q",
        "--crf", "0",  # lossless: the file holds the decoder's frames
        "--decoder-dtype", "float32"]  # (a bfloat16 decoder would round the ring's ~3e-7 differences into levels)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    out = tmp_path_factory.mktemp("alone") / "alone.mp4"
    subprocess.run([sys.executable, "-m", "streamgen", "generate", *ARGS, "--out", str(out)], check=True,
                   timeout=300, capture_output=True)
    return out


@pytest.mark.parametrize("mode", ["ulysses", "ring", "pipeline"])
def test_a_stream_split_over_two_ranks_writes_the_one_process_file(tmp_path, alone, mode):
    out = tmp_path / f"{mode}.mp4"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(_port()), "-m", "streamgen", "generate", *ARGS, "--parallel", mode, "--out", str(out)],
                       timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("wrote ") == 1, r.stderr[-2000:]  # rank 0 only
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # the other rank wrote nothing
    a, b = _frames(alone), _frames(out)
    assert a.shape == b.shape and a.shape[0] == 45, (a.shape, b.shape)
    if mode == "ring":  # the ring's merged softmax differs from one rank in float rounding (~3e-7)
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= 4 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    else:  # every op the same on the same inputs: the same file, byte for byte
        assert out.read_bytes() == alone.read_bytes()


def test_parallel_without_torchrun_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "streamgen", "generate", *ARGS, "--parallel", "ulysses", "--out",
                        str(tmp_path / "x.mp4")], timeout=120, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--parallel ulysses: run under torchrun" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("flag", [["--compile"], ["--cuda-graphs"], ["--offload", "1"]])
def test_parallel_refuses_what_the_split_model_cannot_run(tmp_path, flag):
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()))
    r = subprocess.run([sys.executable, "-m", "streamgen", "generate", *ARGS, "--parallel", "pipeline", *flag,
                        "--out", str(tmp_path / "x.mp4")], timeout=120, capture_output=True, text=True, env=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--parallel and {flag[0]} cannot be combined" in lines[0], r.stderr
