"""The wheel is a working install: the browser player, the built-in weights and every module are in it,
and `streamgen serve` from the installed copy (not this checkout) serves the player page."""

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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree (the build writes build/ and *.egg-info beside
    its sources; the checkout stays untouched)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "node_modules")
    shutil.copytree(ROOT / "streamgen", src / "streamgen", ignore=ignore)
    shutil.copytree(ROOT / "clients" / "web", src / "clients" / "web", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_installed_copy_serves_the_player(wheel, tmp_path):
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                        "--target", str(site), str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # the installed copy comes first on the path; cwd is not the checkout
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", "import streamgen.server.state as s; print(s.__file__); print(s.WEB_ROOT)"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    module, web_root = r.stdout.split()
    assert Path(module).is_relative_to(site), module
    assert Path(web_root) == site / "streamgen" / "web"
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamgen", "serve", "--model", "testpattern", "--port", str(port)],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, page = time.monotonic() + 30, None
        while page is None:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
            except OSError:
                assert time.monotonic() < deadline, "serve did not answer within 30 s"
                time.sleep(0.1)
        installed = site / "streamgen" / "web"
        assert page == (installed / "index.html").read_text() and "player.js" in page
        js = urllib.request.urlopen(f"http://127.0.0.1:{port}/player.js", timeout=5)
        assert js.headers["Content-Type"].startswith("text/javascript")
        assert js.read() == (installed / "player.js").read_bytes()
    finally:
        proc.terminate()
        proc.wait(10)
