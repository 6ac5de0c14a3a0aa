"""The wheel is a working install: the browser player, the protocol schema, the built-in weights and every
module are in it, and after `pip install .` (not editable) into a fresh venv (its dependencies resolved
by pip, nothing of this checkout's .venv visible), the installed `streamgen serve` serves the player page."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLAYER = sorted(p.name for p in (ROOT / "clients" / "web").iterdir()
                if p.is_file() and (p.suffix in (".js", ".html", ".css") or p.stem == "favicon"))


def _source_copy(dest: Path) -> Path:
    """What `pip install .` builds from, copied (a build writes build/ and *.egg-info beside its
    sources; the checkout stays untouched)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "node_modules")
    shutil.copytree(ROOT / "streamgen", dest / "streamgen", ignore=ignore)
    shutil.copytree(ROOT / "clients" / "web", dest / "clients" / "web", ignore=ignore)
    shutil.copytree(ROOT / "protocol", dest / "protocol", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of the source tree (built with this venv's setuptools)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp / "src")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (whl,) = (tmp / "dist").glob("streamgen-*.whl")
    return whl


def test_wheel_holds_the_player_the_weights_and_every_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert PLAYER and {"index.html", "player.js", "protocol.js", "player.css"} <= set(PLAYER)
    missing = [f"streamgen/web/{n}" for n in PLAYER if f"streamgen/web/{n}" not in names]
    assert not missing, missing
    assert not [n for n in names if n.startswith("streamgen/web/test/")], "node tests are not package data"
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "streamgen").rglob("*.py")}
    assert not modules - names, f"modules missing from the wheel (add the package to pyproject.toml): " \
                                f"{sorted(modules - names)}"
    for w in (ROOT / "streamgen" / "weights").glob("*.safetensors"):
        assert f"streamgen/weights/{w.name}" in names
    assert {"streamgen/spec/schema.json", "streamgen/spec/README.md"} <= names
    assert not [n for n in names if n.startswith("streamgen/spec/vectors/")], "golden vectors are test data"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A new venv (no --system-site-packages: nothing of this checkout's .venv is visible) in which
    `pip install SOURCE` (not editable: pyproject's build-system in an isolated build environment, then
    the wheel) resolves and installs every declared dependency from pip's own configured sources, the
    ones scripts/setup.sh installed .venv from. torch is pinned to the
    version of the running torch, as setup.sh pins it (a free choice downloads GBs of CUDA builds).
    ``--retries 0``: an unreachable index is skipped at once (offline, pip's other configured
    sources answer) instead of retried for minutes."""
    import torch

    tmp = tmp_path_factory.mktemp("fresh")
    src, venv = _source_copy(tmp / "src"), tmp / "venv"
    r = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-compile", "--retries", "0", "--timeout", "20",
                        str(src), torch_pin], capture_output=True, text=True, env=env, timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    yield venv, env
    shutil.rmtree(venv, ignore_errors=True)  # ~1 GB: not left for pytest's kept temp folders


def test_fresh_venv_install_serves_the_player(fresh_venv, tmp_path):
    venv, env = fresh_venv
    py = venv / "bin" / "python"
    # 1. the venv sees only what pip installed into it, and this package from its wheel
    r = subprocess.run([str(py), "-c", "import torch, prometheus_client, streamgen.server.state as s, "
                        "streamgen.protocol as P; print(s.__file__); print(s.WEB_ROOT); print(torch.__file__); "
                        "print(P.schema_path()); print(P.load_schema() == P.schema_json())"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    module, web_root, torch_file, schema, same = r.stdout.split()
    site = next((venv / "lib").glob("python3.*/site-packages"))
    for p in (module, torch_file, schema):
        assert Path(p).is_relative_to(site), p
    assert Path(web_root) == site / "streamgen" / "web"
    assert Path(schema) == site / "streamgen" / "spec" / "schema.json" and same == "True"
    assert not Path(torch_file).is_relative_to(ROOT), "the fresh venv imports this checkout's torch"
    # 2. the installed console script serves the page, player.js and /metrics from any folder
    port = _free_port()
    proc = subprocess.Popen([str(venv / "bin" / "streamgen"), "serve", "--model", "testpattern", "--port", str(port)],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, page = time.monotonic() + 60, None
        while page is None:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
            except OSError:
                assert time.monotonic() < deadline, "serve did not answer within 60 s"
                time.sleep(0.2)
        installed = site / "streamgen" / "web"
        assert page == (installed / "index.html").read_text() and "player.js" in page
        js = urllib.request.urlopen(f"http://127.0.0.1:{port}/player.js", timeout=5)
        assert js.headers["Content-Type"].startswith("text/javascript")
        assert js.read() == (installed / "player.js").read_bytes() == (ROOT / "clients" / "web" / "player.js").read_bytes()
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "# TYPE streamgen_chunk_seconds histogram" in metrics
    finally:
        proc.terminate()
        proc.wait(10)
