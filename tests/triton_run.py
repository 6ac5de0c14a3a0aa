"""Runs a case of tests/triton_interp.py in a fresh process under Triton's interpreter and returns its JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def interpreted(case: str, timeout: float = 900) -> dict:
    import triton  # noqa: F401 - the test extra installs it (pip install -e '.[test]'); without it the tests must fail

    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_interp.py"), case], env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)
