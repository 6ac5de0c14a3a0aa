"""Hub references (ORG/NAME[@REV][:FILE]) in weight options, resolved offline from a hub cache folder
built here in the standard layout (models--ORG--NAME/{refs,snapshots,blobs}), and RIFE from its
release zip."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import av
import pytest

from clips import flat_frames, write_h264
from rife_data import WEIGHTS
from streamgen import hub
from streamgen.cli import main
from streamgen.pipeline import UsageError, rife_path

COMMIT, OLD = "a" * 40, "b" * 40


def add_repo(cache: Path, repo: str, files: dict[str, bytes | Path], *, commit: str = COMMIT,
             ref: str | None = "main") -> Path:
    """A repo snapshot the way huggingface_hub writes it: content in blobs/, symlinks in snapshots/."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    for i, (name, data) in enumerate(files.items()):
        blob = repo_dir / "blobs" / f"{commit[:8]}{i:04d}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, Path):
            shutil.copy(data, blob)
        else:
            blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch):
    c = tmp_path / "hub"
    c.mkdir()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    monkeypatch.chdir(tmp_path)  # relative names are not found by accident
    return c


def test_parse():
    assert hub.parse("gdhe17/Self-Forcing") == hub.HubRef("gdhe17/Self-Forcing")
    assert hub.parse("Wan-AI/Wan2.1-T2V-1.3B@v1.0:google/umt5-xxl") == \
        hub.HubRef("Wan-AI/Wan2.1-T2V-1.3B", "v1.0", "google/umt5-xxl")
    assert hub.parse("gdhe17/Self-Forcing:checkpoints/self_forcing_dmd.pt").file == "checkpoints/self_forcing_dmd.pt"
    for not_a_ref in ("/abs/file.pt", "./rel/x", "~/x/y", "file.pt", "a/b/c", "a--b/c", "o/r:../../etc/passwd"):
        assert hub.parse(not_a_ref) is None, not_a_ref


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub.cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c"


def test_resolves_snapshots_files_and_revisions(cache):
    snap = add_repo(cache, "gdhe17/Self-Forcing", {"checkpoints/self_forcing_dmd.pt": b"new"})
    add_repo(cache, "gdhe17/Self-Forcing", {"checkpoints/self_forcing_dmd.pt": b"old"}, commit=OLD, ref="v0")
    got = hub.resolve("--checkpoint", "gdhe17/Self-Forcing:checkpoints/self_forcing_dmd.pt")
    assert Path(got) == snap / "checkpoints" / "self_forcing_dmd.pt" and Path(got).read_bytes() == b"new"
    assert Path(hub.resolve("--checkpoint", "gdhe17/Self-Forcing")) == snap
    assert Path(hub.resolve("--x", "gdhe17/Self-Forcing@v0:checkpoints/self_forcing_dmd.pt")).read_bytes() == b"old"
    assert Path(hub.resolve("--x", f"gdhe17/Self-Forcing@{OLD}:checkpoints/self_forcing_dmd.pt")).read_bytes() == b"old"
    # a path that exists wins over a hub reference of the same spelling
    local = Path("gdhe17") / "Self-Forcing"
    local.mkdir(parents=True)
    assert hub.resolve("--checkpoint", "gdhe17/Self-Forcing") == "gdhe17/Self-Forcing"


@pytest.mark.parametrize("spec,needles", [
    ("Wan-AI/Wan2.1-T2V-1.3B", ["not in the Hugging Face cache", "hf download Wan-AI/Wan2.1-T2V-1.3B"]),
    ("gdhe17/Self-Forcing:checkpoints/nope.pt", ["checkpoints/nope.pt of gdhe17/Self-Forcing is not in the cache",
                                                 "hf download gdhe17/Self-Forcing checkpoints/nope.pt"]),
    ("gdhe17/Self-Forcing@dev", ["revision dev", "cached refs: main", "--revision dev"]),
])
def test_absent_reference_says_where_it_looked_and_how_to_download(cache, spec, needles):
    add_repo(cache, "gdhe17/Self-Forcing", {"checkpoints/self_forcing_dmd.pt": b"x"})
    with pytest.raises(UsageError) as e:
        hub.resolve("--checkpoint", spec)
    msg = str(e.value)
    assert msg.startswith(f"--checkpoint {spec}: no such file, and ") and "\n" not in msg
    assert str(cache) in msg
    for n in needles:
        assert n in msg, msg


def test_a_missing_blob_is_a_missing_file(cache):
    snap = add_repo(cache, "org/repo", {"w.safetensors": b"x"})
    os.remove((snap / "w.safetensors").resolve())  # an interrupted download leaves the symlink dangling
    with pytest.raises(UsageError, match="w.safetensors of org/repo is not in the cache"):
        hub.resolve("--vae", "org/repo:w.safetensors")


def test_generate_reads_hub_references_for_every_weight_option(cache, capsys):
    """--checkpoint/--vae/--text-encoder go through the cache: the corrupt file is reported at its cached path."""
    snap = add_repo(cache, "Wan-AI/Wan2.1-T2V-1.3B", {"diffusion_pytorch_model.safetensors": b"junk" * 10,
                                                      "Wan2.1_VAE.pth": b"junk", "config.json": b"{}"})
    repo = "Wan-AI/Wan2.1-T2V-1.3B"
    rc = main(["generate", "--model", "self-forcing-1.3b", "--checkpoint", repo, "--vae", repo,
               "--text-encoder", repo, "--prompt", "a fox", "--out", "o.mp4", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("streamgen generate: error: --checkpoint: ") and str(snap) in err and "corrupt" in err, err
    rc = main(["generate", "--model", "self-forcing-1.3b", "--checkpoint", "gdhe17/Self-Forcing:x.pt", "--vae", repo,
               "--text-encoder", repo, "--prompt", "a fox", "--out", "o.mp4"])
    err = capsys.readouterr().err
    assert rc == 2 and "--checkpoint gdhe17/Self-Forcing:x.pt: no such file" in err and "hf download" in err, err


def _release_zip(path: Path) -> Path:
    """Practical-RIFE's release layout: flownet.pkl with the model code in a folder of the archive."""
    with zipfile.ZipFile(path, "w") as z:
        z.write(WEIGHTS, "train_log/flownet.pkl")
        z.writestr("train_log/IFNet_HDv3.py", "# model code, not read\n")
    return path


def test_rife_from_its_release_zip_in_the_cache(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("STREAMGEN_RIFE_WEIGHTS", raising=False)
    assert rife_path("auto", required=False) is None  # nothing anywhere: interpolation is off, not an error
    with pytest.raises(UsageError, match="streamgen download rife"):
        rife_path("auto", required=True)
    snap = add_repo(cache, "hzwer/RIFE", {"RIFEv4.26_0921.zip": _release_zip(tmp_path / "r.zip")})
    assert Path(rife_path("auto", required=True)) == snap / "RIFEv4.26_0921.zip"  # found without being named
    assert Path(rife_path("hzwer/RIFE:RIFEv4.26_0921.zip", required=True)) == snap / "RIFEv4.26_0921.zip"
    src = tmp_path / "clip.mp4"
    write_h264(src, flat_frames(3, 48, 64, 60))
    assert main(["interpolate", str(src), "--out", str(tmp_path / "o.mp4"), "--device", "cpu"]) == 0, \
        capsys.readouterr().err
    with av.open(str(tmp_path / "o.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 5  # 2 * (3 - 1) + 1


def test_a_zip_without_the_weights_is_named(tmp_path, capsys):
    bad = tmp_path / "other.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("README.txt", "no weights here")
    rc = main(["interpolate", "in.mp4", "--out", str(tmp_path / "o.mp4"), "--rife", str(bad)])
    err = capsys.readouterr().err
    # the input is checked first; give it a real one
    assert rc == 2 and "in.mp4" in err
    src = tmp_path / "clip.mp4"
    write_h264(src, flat_frames(1, 32, 32, 0))
    rc = main(["interpolate", str(src), "--out", str(tmp_path / "o.mp4"), "--rife", str(bad), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "other.zip: expected one RIFE weights file (flownet.pkl)" in err, err


def test_a_wan_repo_root_as_vae_reads_the_vae_not_the_dit(tmp_path):
    """Wan2.1-T2V-1.3B's root holds the DiT as diffusion_pytorch_model.safetensors beside Wan2.1_VAE.pth."""
    from streamgen.models.checkpoints import CheckpointError
    from streamgen.models.wan_vae import load_wan_vae

    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"dit" * 10)
    (tmp_path / "Wan2.1_VAE.pth").write_bytes(b"vae" * 10)
    with pytest.raises(CheckpointError, match=r"Wan2\.1_VAE\.pth: corrupt"):
        load_wan_vae(tmp_path)


def test_the_cache_layout_is_the_one_huggingface_hub_reads(cache):
    """The real huggingface_hub (local_files_only: no network) finds in the cache built here exactly what
    streamgen.hub resolves: the test cache is the standard layout, and hub.find agrees with the library."""
    from huggingface_hub import hf_hub_download, snapshot_download

    snap = add_repo(cache, "gdhe17/Self-Forcing", {"checkpoints/self_forcing_dmd.pt": b"new", "README.md": b"r"})
    add_repo(cache, "gdhe17/Self-Forcing", {"checkpoints/self_forcing_dmd.pt": b"old"}, commit=OLD, ref="v0")
    for rev in (None, "v0", OLD):
        spec = "gdhe17/Self-Forcing" + (f"@{rev}" if rev else "") + ":checkpoints/self_forcing_dmd.pt"
        theirs = hf_hub_download("gdhe17/Self-Forcing", "checkpoints/self_forcing_dmd.pt", revision=rev,
                                 cache_dir=cache, local_files_only=True)
        assert Path(hub.resolve("--checkpoint", spec)) == Path(theirs), spec
    assert Path(hub.resolve("--checkpoint", "gdhe17/Self-Forcing")) == snap == \
        Path(snapshot_download("gdhe17/Self-Forcing", cache_dir=cache, local_files_only=True))


def test_download_with_hf_hub_offline_fails_in_one_line_without_network(tmp_path):
    """HF_HUB_OFFLINE=1 is huggingface_hub's own switch: `streamgen download` of files not in the cache
    then fails at once, in one line (exit 1), and one whose files are cached needs no network at all."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    r = subprocess.run([sys.executable, "-m", "streamgen", "download", "rife"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and err[-1].startswith("streamgen download: error: hzwer/RIFE: "), r.stderr
    assert "HF_HUB_OFFLINE=1 forbids downloads" in err[-1] and "Traceback" not in r.stderr
    add_repo(tmp_path / "hub", "hzwer/RIFE", {"RIFEv4.26_0921.zip": b"zip"})
    r = subprocess.run([sys.executable, "-m", "streamgen", "download", "rife"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "already in" in r.stderr and r.stdout.startswith("ready: rife"), r.stderr


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_a_local_copy_of_a_preset_repo_as_model(cache, tmp_path, capsys):
    """--model DIR: a folder made by `hf download REPO --local-dir DIR` is the preset whose DiT files it
    holds (Wan2.1 1.3B and 14B told apart by config.json's dim); its files become the defaults of the
    weight options not given; anything else is one line naming --model."""
    from streamgen.pipeline import local_model

    wan = {"Wan2.1_VAE.pth": b"v", "models_t5_umt5-xxl-enc-bf16.pth": b"t", "google/umt5-xxl/spiece.model": b"s"}
    d13 = _folder(tmp_path / "w13", {"diffusion_pytorch_model.safetensors": b"d", "config.json": b'{"dim": 1536}', **wan})
    name, paths = local_model(str(d13))
    assert name == "wan2.1-t2v-1.3b"
    assert paths == {"checkpoint": str(d13), "vae": str(d13 / "Wan2.1_VAE.pth"),
                     "text_encoder": str(d13 / "models_t5_umt5-xxl-enc-bf16.pth")}
    d14 = _folder(tmp_path / "w14", {f"diffusion_pytorch_model-0000{i}-of-00006.safetensors": b"d" for i in range(1, 7)}
                  | {"config.json": b'{"dim": 5120}'} | wan)
    assert local_model(str(d14))[0] == "wan2.1-t2v-14b"
    sf = _folder(tmp_path / "sf", {"checkpoints/self_forcing_dmd.pt": b"x"})
    assert local_model(str(sf)) == ("self-forcing-1.3b", {"checkpoint": str(sf / "checkpoints/self_forcing_dmd.pt")})
    lx = _folder(tmp_path / "lx", {"wan2.1_t2v_14b_lightx2v_4step.safetensors": b"x", "README.md": b"#"})
    assert local_model(str(lx))[0] == "lightx2v-t2v-14b"
    # no config.json: the diffusers layout fits both sizes
    both = _folder(tmp_path / "both", {"diffusion_pytorch_model.safetensors": b"d", "config.json": b"not json"})
    with pytest.raises(UsageError, match=r"--model .*both: its files fit presets .*wan2\.1-t2v-1\.3b.*wan2\.1-t2v-14b"):
        local_model(str(both))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"--model .*empty: no preset's DiT files in this folder"):
        local_model(str(tmp_path / "empty"))
    # through the CLI: the folder's (corrupt) DiT is what --checkpoint reads; serve says it streams other models
    rc = main(["generate", "--model", str(sf), "--vae", str(d13 / "Wan2.1_VAE.pth"), "--text-encoder", str(d13),
               "--prompt", "a fox", "--out", "o.mp4", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--checkpoint" in err and "self_forcing_dmd.pt" in err, err
    rc = main(["serve", "--model", str(d13), "--port", "65000"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "holds wan2.1-t2v-1.3b, a whole-clip model" in err, err
    with pytest.raises(SystemExit) as e:  # argparse's own error: one line, status 2
        main(["generate", "--model", str(d13 / "Wan2.1_VAE.pth"), "--prompt", "a"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "is a file; --model takes a preset" in err, err
