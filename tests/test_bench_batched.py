"""bench/batched.py on the CPU with its tiny smoke configs: the runs, the per-step breakdown (host time of the DiT's
forwards per row and of each session's decode), and the options that cannot work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench_scripts import ROOT


def _run(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "batched.py"), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_smoke_breakdown_counts_rows(tmp_path):
    out = tmp_path / "batched.json"
    proc = _run("--smoke", "--variants", "taehv-bf16", "--sessions", "1,2", "--unbatched", "", "--chunks", "5",
                "--warmup", "1", "--breakdown", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {r["n"]: r for r in json.loads(out.read_text())["taehv-bf16"]["runs"]}
    assert set(runs) == {1, 2} and all(r["max_batch"] == 8 for r in runs.values())
    one, two = runs[1], runs[2]
    assert one["rows_per_forward"] == 1.0 and one["forward_ms_per_row"] == one["forward_ms"] > 0
    assert one["decode_ms_per_chunk"] > 0 and two["decode_ms_per_chunk"] > 0
    # two sessions in step: most forwards carry both rows, so a row costs about half a forward. The second session
    # may join a chunk late (the scheduler does not hold the first back): 5 chunks each, one apart, give 50 rows in
    # 30 forwards (1.67); fully in step, 2.0. (With 3 chunks one apart it was 1.5 exactly: a flaky bound.)
    assert two["rows_per_forward"] > 1.4
    assert 0.4 * two["forward_ms"] < two["forward_ms_per_row"] < 0.8 * two["forward_ms"], two
    assert proc.stdout.count("breakdown (whole run") == 2


def test_breakdown_is_cpu_only_and_names_the_option():
    proc = _run("--smoke", "--device", "cuda", "--breakdown", timeout=120)
    assert proc.returncode == 2 and "--breakdown" in proc.stderr and "Traceback" not in proc.stderr
