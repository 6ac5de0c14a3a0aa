import subprocess
import sys

from streamgen.cli import main


def test_info_reports_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "sdpa backends" in out and "flash-attn" in out
    assert "fp8 attention" in out and "FFN GELU epilogue" in out


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "streamgen", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "streamgen" in r.stdout


def test_no_command_prints_help_and_fails():
    assert main([]) == 2
