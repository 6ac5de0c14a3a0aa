"""Every misuse of the command line ends in one line on stderr, `streamgen CMD: error: ...`, naming the
option or file, and exit status 2 (a runtime failure after the inputs were accepted: status 1); never
a traceback (streamgen/cli.py states the convention)."""

from __future__ import annotations

import socket

import av
import numpy as np
import pytest
import torch

from clips import flat_frames, write_h264
from streamgen.cli import build_parser, main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("misuse")
    (d / "text.txt").write_text("hello\n")
    (d / "random.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (d / "bad.pt").write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with av.open(str(d / "audio.m4a"), "w") as c:  # audio only
        s = c.add_stream("aac", rate=16000)
        for i in range(4):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, i * 1024
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    write_h264(d / "clip.mp4", flat_frames(3, 48, 64, 40))
    return d


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(argv, capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    return rc, capsys.readouterr().err


I, G = ["interpolate", "{d}/clip.mp4", "--out", "{d}/o.mp4"], ["generate", "--prompt", "a cat", "--out", "{d}/o.mp4"]
CASES = {
    # interpolate
    "interpolate missing input": (["interpolate", "{d}/nosuch.mp4", "--out", "{d}/o.mp4"], ["nosuch.mp4", "no such file"]),
    "interpolate text file": (["interpolate", "{d}/text.txt", "--out", "{d}/o.mp4"], ["text.txt", "not a video file"]),
    "interpolate random bytes": (["interpolate", "{d}/random.bin", "--out", "{d}/o.mp4"], ["random.bin", "not a video"]),
    "interpolate audio only": (["interpolate", "{d}/audio.m4a", "--out", "{d}/o.mp4"], ["audio.m4a", "no video stream",
                                                                                       "audio"]),
    "interpolate --out missing folder": (I[:3] + ["{d}/nodir/o.mp4"], ["--out", "nodir", "does not exist"]),
    "interpolate --out x.txt": (I[:3] + ["{d}/x.txt"], ["--out", "x.txt", ".mp4"]),
    "interpolate --out a folder": (I[:3] + ["{d}"], ["--out", "folder"]),
    "interpolate --weights missing": (I + ["--weights", "{d}/nosuch.pkl"], ["--rife", "nosuch.pkl", "no such file"]),
    "interpolate --weights corrupt": (I + ["--weights", "{d}/bad.pt"], ["--rife", "bad.pt", "corrupt"]),
    "interpolate --weights text": (I + ["--rife", "{d}/text.txt"], ["--rife", "text.txt", "corrupt"]),
    "interpolate --device cuda": (I + ["--device", "cuda"], ["--device cuda", "no CUDA device", "cpu"]),
    "interpolate --chunk 0": (I + ["--chunk", "0"], ["--chunk", ">= 1"]),
    "interpolate --dtype bogus": (I + ["--dtype", "fp99"], ["--dtype", "bf16", "float16"]),
    # generate
    "generate --out a.txt": (G[:4] + ["{d}/a.txt"], ["--out", "a.txt", ".mp4"]),
    "generate --out missing folder": (G[:4] + ["{d}/nodir/a.mp4"], ["--out", "does not exist"]),
    "generate --image not an image": (G + ["--image", "{d}/text.txt"], ["--image", "text.txt", "PNG or JPEG"]),
    "generate --chunks huge": (G + ["--chunks", "1000000000"], ["--chunks 1000000000", "allowed 1.."]),
    "generate --attention bogus": (G + ["--attention", "fa9"], ["--attention", "fa9", "fp8"]),
    "generate --chunks beyond memory, whole clip": (G + ["--model", "tiny-full", "--chunks", "1000000"],
                                                   ["--chunks 1000000", "GiB", "sampled at once", "at most --chunks"]),
    "generate --chunks beyond memory, no window": (G + ["--model", "tiny", "--local-frames", "0", "--chunks", "1000000"],
                                                  ["--chunks 1000000", "KV cache", "at most --chunks"]),
    "generate 4096x4096": (G + ["--width", "4096", "--height", "4096"], ["--width 4096 --height 4096", "<="]),
    "generate --width 8": (G + ["--width", "8"], ["--width", "e.g. 16 ", "multiple of 16"], ["16 or 16"]),
    "generate --prompt blank": (["generate", "--prompt", " ", "--out", "{d}/o.mp4"], ["--prompt", "empty"]),
    "generate --prompt empty": (["generate", "--prompt", "", "--out", "{d}/o.mp4"], ["--prompt", "empty"]),
    "generate --seed negative": (G + ["--seed", "-1"], ["--seed", "0..4294967295"]),
    "generate --sampler bogus": (G + ["--sampler", "ddim"], ["--sampler", "self-forcing", "euler", "unipc"]),
    "generate unknown option": (G + ["--bogus", "1"], ["unrecognized arguments: --bogus 1"]),
    "generate --checkpoint for a built-in": (G + ["--model", "tiny", "--checkpoint", "{d}/bad.pt"],
                                             ["--checkpoint", "built in", "self-forcing-1.3b"]),
    "generate corrupt --checkpoint": (G + ["--model", "self-forcing-1.3b", "--checkpoint", "{d}/bad.pt", "--vae",
                                           "{d}/bad.pt", "--text-encoder", "{d}/bad.pt"],
                                      ["--checkpoint", "bad.pt", "corrupt or not a torch checkpoint"]),
    "generate --dtype bogus": (G + ["--dtype", "half-ish"], ["--dtype", "fp16"]),
    # serve
    "serve --port 99999": (["serve", "--port", "99999"], ["--port", "1..65535"]),
    "serve port in use": (["serve", "--model", "testpattern", "--port", "{busy}"], ["--port {busy}", "in use"]),
    "serve --model nosuch": (["serve", "--model", "nosuch"], ["--model", "nosuch", "testpattern"]),
    "serve --token empty": (["serve", "--model", "testpattern", "--port", "{free}", "--token", ""], ["--token", "empty"]),
    "serve --rife with the test pattern": (["serve", "--model", "testpattern", "--port", "{free}", "--rife",
                                            "{d}/nosuch.pkl"], ["--rife", "testpattern", "no weight files"]),
    "serve --checkpoint with the test pattern": (["serve", "--model", "testpattern", "--port", "{free}", "--checkpoint",
                                                  "{d}/bad.pt"], ["--checkpoint", "testpattern"]),
    "serve --device cuda": (["serve", "--model", "tiny", "--port", "{free}", "--device", "cuda"],
                            ["--device cuda", "no CUDA device", "cpu"]),
    "serve --warmup-sizes not a size": (["serve", "--model", "tiny", "--port", "{free}", "--warmup-sizes", "big"],
                                        ["--warmup-sizes", "'big'", "WIDTHxHEIGHT"]),
    "serve --warmup-sizes 100x64": (["serve", "--model", "tiny", "--port", "{free}", "--warmup-sizes", "64x64,100x64"],
                                    ["--warmup-sizes 100x64", "multiple of 16"]),
    "serve unknown option": (["serve", "--model", "testpattern", "--bogus"], ["unrecognized arguments: --bogus"]),
    "serve --cache-memory 0": (["serve", "--model", "tiny", "--cache-memory", "0"], ["--cache-memory", "GiB (> 0)"]),
    "serve --cache-memory too small": (["serve", "--model", "tiny", "--port", "{free}", "--cache-memory", "0.0001"],
                                       ["--cache-memory 0.0001", "needs", "GiB of KV cache"]),
    "serve --cache-memory with the test pattern": (["serve", "--model", "testpattern", "--port", "{free}",
                                                    "--cache-memory", "1"], ["--cache-memory", "no engine"]),
    # download
    "download nosuch": (["download", "nosuch"], ["nosuch", "self-forcing-1.3b", "lightx2v-t2v-14b", "rife"]),
    # watch
    "watch ftp url": (["watch", "ftp://example.com/x", "--prompt", "a"], ["ftp://example.com/x", "ws://"]),
    "watch --out missing folder": (["watch", "ws://127.0.0.1:{free}", "--prompt", "a", "--out", "{d}/nodir/w.mp4"],
                                   ["--out", "nodir", "does not exist"]),
    "watch --image missing": (["watch", "ws://127.0.0.1:{free}", "--prompt", "a", "--image", "{d}/nosuch.png"],
                              ["--image", "nosuch.png", "No such file"]),
    "watch --switch malformed": (["watch", "ws://127.0.0.1:{free}", "--prompt", "a", "--switch", "x"], ["--switch x"]),
    # what every server refuses is refused before connecting (no server listens at {free})
    "watch --width 100": (["watch", "ws://127.0.0.1:{free}", "--prompt", "a", "--width", "100"],
                          ["--width", "multiple of 16", "100"]),
    "watch --seed negative": (["watch", "ws://127.0.0.1:{free}", "--prompt", "a", "--seed", "-1"], ["--seed", "0.."]),
    "watch --prompt empty": (["watch", "ws://127.0.0.1:{free}", "--prompt", ""], ["--prompt", "empty"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_misuse_is_one_line_with_status_2(name, files, request, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    argv, needles, *absent = CASES[name]
    fill = {"d": files}
    if any("{busy}" in a for a in argv):
        fill["busy"] = request.getfixturevalue("busy_port")
    fill["free"] = _free_port()
    argv = [a.format(**fill) for a in argv]
    rc, err = _run(argv, capsys)
    assert rc == 2, err
    assert err.startswith(f"streamgen {argv[0]}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "weights_only" not in err, err
    for n in needles:
        assert n.format(**fill) in err, (n, err)
    for n in absent[0] if absent else ():
        assert n not in err, (n, err)
    assert not (files / "o.mp4").exists(), "no output is left behind"


def test_watch_with_the_server_down_fails_in_one_line_and_leaves_no_file(tmp_path, capsys):
    out = tmp_path / "w.mp4"
    rc, err = _run(["watch", f"ws://127.0.0.1:{_free_port()}", "--prompt", "a", "--out", str(out), "--no-reconnect"],
                   capsys)
    assert rc == 1, err
    assert err.startswith("streamgen watch: error: cannot connect") and err.count("\n") == 1, err
    assert not out.exists()


def test_dtype_has_the_same_spellings_on_every_command():
    p = build_parser()
    for short, name in (("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16"), ("float16", "float16"),
                        ("auto", "auto")):
        assert p.parse_args(["generate", "--prompt", "a", "--out", "o.mp4", "--dtype", short]).dtype == name
        assert p.parse_args(["serve", "--dtype", short]).dtype == name
        assert p.parse_args(["interpolate", "in.mp4", "--out", "o.mp4", "--dtype", short]).dtype == name
    # one option name for the RIFE weights everywhere (--weights stays as interpolate's alias)
    assert p.parse_args(["interpolate", "in.mp4", "--out", "o.mp4", "--weights", "f.pkl"]).rife == "f.pkl"
    assert p.parse_args(["interpolate", "in.mp4", "--out", "o.mp4", "--rife", "f.pkl"]).rife == "f.pkl"


def test_interpolate_keeps_an_odd_size(tmp_path, capsys):
    """4:2:0 H.264 needs even sizes; an odd-sized input is written 4:4:4 at its own size, not cropped."""
    src, out = tmp_path / "odd.mp4", tmp_path / "out.mp4"
    write_h264(src, flat_frames(3, 17, 33, 60), pix_fmt="yuv444p")
    assert main(["interpolate", str(src), "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    with av.open(str(out)) as c:
        v = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(v)]
    assert (v.codec_context.width, v.codec_context.height) == (33, 17)
    assert len(frames) == 5 and frames[0].shape == (17, 33, 3)  # 2 * (3 - 1) + 1


def test_generate_quiet_prints_only_the_final_line_with_numbers(tmp_path, capsys):
    out = tmp_path / "o.mp4"
    assert main(["generate", "--model", "tiny", "--prompt", "a cat", "--chunks", "1", "--out", str(out), "-q"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"wrote {out}: ") and "frames/s" in err, err
    assert main(["generate", "--model", "tiny", "--prompt", "a cat", "--chunks", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err  # not a terminal: one line per chunk instead of a bar
    assert "chunk 1/2:" in err and "chunk 2/2:" in err and "\r" not in err, err


def test_real_text_encoder_without_transformers_says_what_to_install(files, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sentencepiece" else real(name, *a))
    bad = str(files / "bad.pt")
    rc, err = _run(["generate", "--model", "self-forcing-1.3b", "--checkpoint", bad, "--vae", bad, "--text-encoder", bad,
                    "--prompt", "a", "--out", str(files / "o.mp4")], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert "--text-encoder" in err and "sentencepiece" in err and "streamgen[wan]" in err, err


def _readme_commands(tool: str) -> list[list[str]]:
    """Every `tool ...` command line in the README's sh blocks (continuations joined, comments cut)."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    out = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while tool in words or f".venv/bin/{tool}" in words:  # `a && .venv/bin/streamgen serve ...`
                i = words.index(tool) if tool in words else words.index(f".venv/bin/{tool}")
                rest = words[i + 1:]
                end = rest.index("&&") if "&&" in rest else len(rest)
                out.append(rest[:end])
                words = rest[end:]
    return out


def test_every_streamgen_command_in_the_readme_parses(tmp_path, monkeypatch):
    """A README line copied into a shell gets past the command line (the `... --compile` line once did not).
    A `--model ./DIR` line is run where DIR exists (the folder the README's `hf download` made)."""
    cmds = _readme_commands("streamgen")
    assert len(cmds) >= 15, cmds
    monkeypatch.chdir(tmp_path)
    for argv in cmds:
        for a, b in zip(argv, argv[1:]):
            if a == "--model" and b.startswith("./"):
                (tmp_path / b).mkdir(parents=True, exist_ok=True)
    parser = build_parser()
    for argv in cmds:
        try:
            args, unknown = parser.parse_known_args(argv)
        except SystemExit:
            raise AssertionError(f"README: streamgen {' '.join(argv)} does not parse") from None
        assert not unknown, (argv, unknown)


def test_readme_hf_downloads_are_the_presets_files():
    """Each `hf download REPO FILE...` of the README names files a preset (or RIFE) lists, so the hand-made
    commands and `streamgen download` fetch the same things."""
    import fnmatch

    from streamgen.pipeline import MODELS, RIFE_SOURCE
    from streamgen import hub

    listed: dict[str, list[str]] = {}
    for src in [s for p in MODELS.values() for s in p.files] + [RIFE_SOURCE]:
        listed.setdefault(hub.parse(src.ref).repo, []).extend(src.patterns)
    cmds = [c for c in _readme_commands("hf") if c[:1] == ["download"]]
    assert len(cmds) >= 5, cmds
    for cmd in cmds:
        repo, files, skip = cmd[1], [], False
        for w in cmd[2:]:  # positional file names; options and their values skipped
            if skip or w.startswith("-"):
                skip = not skip and w in ("--exclude", "--include", "--revision")
                continue
            files.append(w)
        assert repo in listed, f"README: hf download {repo}: no preset takes files from it"
        for f in files:
            other_precision = repo == "lightx2v/Wan2.1-Distill-Models" and f in (  # the preset takes the BF16 file
                "wan2.1_t2v_14b_scaled_fp8_e4m3_lightx2v_4step.safetensors", "wan2.1_t2v_14b_int8_lightx2v_4step.safetensors")
            assert other_precision or any(fnmatch.fnmatch(f, pat) for pat in listed[repo]), (repo, f)
