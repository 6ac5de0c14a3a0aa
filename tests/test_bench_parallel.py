"""bench/parallel.py --smoke under torchrun, 2 gloo ranks on the CPU (~20-30 s on 2 cores): every mode's row, one
skipped combination as one line, the fp32 checks (Ulysses and ring within 1e-5 of one rank, the pipeline bit for
bit), the timing and memory fields per rank, each rank's cache a split of the one-rank cache; and the parts that
need no ranks: the fit rules, the comparison and what fails a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bench_scripts import ROOT, load_bench

FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel") / "smoke.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    # 5 chunks: the 12-frame window (4 chunks of 3) rolls at the fifth; one warm-up and one timed stream a row
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "bench" / "parallel.py"), "--smoke", "--chunks", "5", "--reps", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    return proc, json.loads(out.read_text()) if out.is_file() else None


def _rows(data: dict) -> dict[tuple[str, str], dict]:
    return {(r["preset"], r["mode"]): r for r in data["rows"]}


def test_smoke_rows_checks_and_fields(smoke):
    proc, data = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert data is not None
    info = data["info"]
    assert info["ranks"] == 2 and info["backend"] == "gloo" and info["dtype"] == "fp32" and info["tol"] == FP32_TOL
    rows = _rows(data)
    for preset in ("tiny", "tiny-3h"):
        one = rows[(preset, "one rank")]
        assert one["ranks"] == 1 and one["fps"] > 0 and len(one["peak_gib"]) == 1
        modes = ("ulysses", "ring", "pipeline") if preset == "tiny" else ("ring", "pipeline")
        for mode in modes:
            r = rows[(preset, mode)]
            assert "error" not in r and "skipped" not in r, r
            assert r["ranks"] == 2
            assert r["fps"] > 0 and r["first_chunk_s"] > 0 and r["chunk_ms_median"] > 0
            assert r["speedup_vs_one"] == pytest.approx(r["fps"] / one["fps"])
            assert len(r["peak_gib"]) == 2 and all(x > 0 for x in r["peak_gib"])  # per rank, gathered to rank 0
            assert len(r["last_chunk_ms"]) == 5
            assert r["ranks_max_abs"] == 0.0  # both ranks sampled the same latents
            c = r["check"]
            assert c["ok"] and c["finite"], (preset, mode, c)
            assert c["rel"] <= FP32_TOL and c["max_abs"] <= FP32_TOL, (preset, mode, c)
            if mode == "pipeline":
                assert c["max_abs"] == 0.0 and c["equal"]
        # the caches split over the ranks: pipeline by blocks (3 = 1 + 2), Ulysses by heads, ring by frame tokens
        (whole,) = one["cache_bytes"]
        p = rows[(preset, "pipeline")]["cache_bytes"]
        assert sum(p) == whole and p[0] < p[1]
        if preset == "tiny":
            assert rows[(preset, "ulysses")]["cache_bytes"] == [whole // 2] * 2
        ring = rows[(preset, "ring")]["cache_bytes"]
        assert ring[0] == ring[1] < whole


def test_smoke_skip_is_one_line_and_table_is_printed(smoke):
    proc, data = smoke
    skip = _rows(data)[("tiny-3h", "ulysses")]
    assert "num_heads=3 is not divisible by 2 ranks" in skip["skipped"] and "fps" not in skip
    lines = proc.stdout.splitlines()
    assert [x for x in lines if x.startswith("skip ")] == [f"skip tiny-3h ulysses x2: {skip['skipped']}"]
    assert "Traceback" not in proc.stdout + proc.stderr
    header = "| preset | mode | ranks | fps | vs 1 rank | open->1st chunk s | ms/chunk | peak GiB per rank |"
    assert header in proc.stdout
    table = [x for x in lines if x.startswith("| tiny")]
    assert len(table) == 8  # 2 presets x (one rank + 3 modes), the skip included
    assert sum("ok, bitwise" in x for x in table) == 3  # Ulysses (tiny) and the two pipelines


def test_misfit_rules():
    b = load_bench("parallel")
    from streamgen.models.wan import WanConfig

    c13, c14 = WanConfig.preset("wan2.1-t2v-1.3b"), WanConfig.preset("wan2.1-t2v-14b")
    hw = (480 // 8, 832 // 8)  # 1560 tokens a frame, 4680 a chunk of 3
    for mode in b.MODES:
        for n in (2, 4):
            assert b.misfit(mode, c13, n, hw, 3) is None and b.misfit(mode, c14, n, hw, 3) is None
    assert "num_heads=12 is not divisible by 8" in b.misfit("ulysses", c13, 8, hw, 3)
    assert b.misfit("ulysses", c14, 8, hw, 3) is None
    assert "1560 tokens are not divisible by 16" in b.misfit("ring", c13, 16, hw, 3)
    assert "30 blocks cannot give each of 32 ranks one" in b.misfit("pipeline", c13, 32, hw, 3)
    assert "a chunk's 9 tokens" in b.misfit("ulysses", WanConfig.preset("tiny", num_heads=2), 2, (6, 2), 3)


def test_compare_and_failures():
    b = load_bench("parallel")
    ref = [torch.ones(1, 16, 3, 4, 4), torch.full((1, 16, 3, 4, 4), 2.0)]
    same = b.compare([x.clone() for x in ref], ref)
    assert same["equal"] and same["max_abs"] == 0.0 and same["rel"] == 0.0
    off = b.compare([ref[0], ref[1] + 0.5], ref)
    assert not off["equal"] and off["max_abs"] == 0.5 and off["rel"] == pytest.approx(0.5 / 5**0.5, rel=1e-6)
    rows = [{"mode": "one rank"}, {"mode": "ring", "check": {"ok": True}}, {"mode": "ulysses", "skipped": "x"},
            {"mode": "pipeline", "fps": 1.0}]
    assert b.failures(rows) == []
    bad = [{"mode": "ring", "check": {"ok": False}}, {"mode": "pipeline", "error": "E"}]
    assert b.failures(rows + bad) == bad


def test_needs_torchrun(monkeypatch, capsys):
    b = load_bench("parallel")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as exc:
        b.parse(["--smoke"])
    assert exc.value.code == 2 and "launch with torchrun" in capsys.readouterr().err
