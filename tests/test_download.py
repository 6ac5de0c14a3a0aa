"""`streamgen download PRESET` fills the standard hub cache (huggingface_hub stubbed: no network),
`streamgen info` says which presets are ready, and a preset with no weight options given resolves
its own files from the cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from streamgen import download
from streamgen.cli import main

COMMIT = "c" * 40


def cache_file(cache: Path, repo: str, name: str, data: bytes = b"junk") -> None:
    """One file of a repo snapshot as huggingface_hub stores it (blob + symlink + refs/main)."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    blob = repo_dir / "blobs" / hashlib.sha256(name.encode()).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo_dir / "snapshots" / COMMIT / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    c = tmp_path / "hub"
    c.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    monkeypatch.delenv("STREAMGEN_RIFE_WEIGHTS", raising=False)
    monkeypatch.chdir(tmp_path)
    return c


@pytest.fixture
def fake_hub(cache, monkeypatch):
    """snapshot_download that 'downloads' one file per pattern ('*' -> 'x') into the cache."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, cache_dir=None, **kw):
        assert Path(cache_dir) == cache
        calls.append((repo_id, tuple(allow_patterns)))
        for pat in allow_patterns:
            cache_file(cache, repo_id, pat.replace("*", "x"))
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_download_fills_the_cache_then_the_preset_is_ready_and_resolves(cache, fake_hub, capsys):
    assert download.status("self-forcing-1.3b").startswith("missing")
    assert download.status("toy") == "built in"
    assert main(["download", "self-forcing-1.3b"]) == 0
    assert {repo for repo, _ in fake_hub} == {"gdhe17/Self-Forcing", "Wan-AI/Wan2.1-T2V-1.3B", "hzwer/RIFE"}
    assert ("gdhe17/Self-Forcing", ("checkpoints/self_forcing_dmd.pt",)) in fake_hub
    assert download.status("self-forcing-1.3b") == "ready" and download.status("rife") == "ready"
    n = len(fake_hub)
    assert main(["download", "self-forcing-1.3b"]) == 0 and len(fake_hub) == n  # nothing fetched twice
    capsys.readouterr()

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    rows = dict(line.split(None, 1) if not line.startswith("model ") else ("model " + line.split()[1],
                line.split(None, 2)[2]) for line in out.splitlines())
    assert rows["model self-forcing-1.3b"] == "ready" and rows["model toy"] == "built in"
    assert rows["model wan2.1-t2v-14b"].endswith("streamgen download wan2.1-t2v-14b")
    assert rows["rife"].endswith("RIFEv4.26_0921.zip")

    # no weight options: the preset's own files, from the cache (junk here, so reported as corrupt at that path)
    rc = main(["generate", "--model", "self-forcing-1.3b", "--prompt", "a fox", "--out", "o.mp4", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "--checkpoint: " in err and "models--gdhe17--Self-Forcing" in err and "corrupt" in err, err


def test_a_preset_whose_files_are_absent_names_the_download_command(cache, capsys):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rc = main(["serve", "--model", "self-forcing-1.3b", "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "--checkpoint gdhe17/Self-Forcing:checkpoints/self_forcing_dmd.pt: no such file" in err
    assert "download it with: streamgen download self-forcing-1.3b" in err, err


def test_download_failure_is_one_line(cache, monkeypatch, capsys):
    import huggingface_hub

    def offline(*a, **kw):
        raise OSError("outgoing traffic has been disabled\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert main(["download", "rife"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("streamgen download: error: hzwer/RIFE: OSError: outgoing traffic has been disabled")


def test_model_takes_a_presets_hub_repo():
    from streamgen.cli import build_parser

    p = build_parser()
    assert p.parse_args(["serve", "--model", "gdhe17/Self-Forcing"]).model == "self-forcing-1.3b"
    assert p.parse_args(["generate", "--model", "Wan-AI/Wan2.1-T2V-14B", "--prompt", "a", "--out", "o.mp4"]).model \
        == "wan2.1-t2v-14b"
    assert p.parse_args(["serve", "--model", "testpattern"]).model == "testpattern"
    with pytest.raises(SystemExit):  # a bidirectional model's repo is no streaming model: serve refuses it
        p.parse_args(["serve", "--model", "Wan-AI/Wan2.1-T2V-14B"])
