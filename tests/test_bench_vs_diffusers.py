"""bench/vs_diffusers.py --smoke on the CPU (~10-20 s on 2 cores): the diffusers row and ours, eager and compiled,
agree in fp32 (the same weights through the project's key map), the fp8 rows are one skip each, every row's JSON
fields; and that the comparison would catch a wrong weight map, and what fails a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bench_scripts import ROOT, load_bench

FP32_TOL = 1e-4
FULL_FIELDS = ("ms", "ms_all", "first_s", "weights_gib", "rel_vs_diffusers", "max_abs_vs_diffusers", "rel_vs_fp32",
               "max_abs_vs_fp32", "finite", "status", "tokens", "dtype")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("vs_diffusers") / "smoke.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "bench" / "vs_diffusers.py"), "--smoke", "--reps", "2", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    return proc, json.loads(out.read_text()) if out.is_file() else None


def _rows(data: dict) -> dict[tuple[str, str], dict]:
    return {(r["row"], r["kind"]): r for r in data["rows"]}


def test_smoke_rows_agree_in_fp32(smoke):
    proc, data = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = data["info"]
    assert info["preset"] == "tiny" and info["dtype"] == "fp32" and info["device"] == "cpu" and info["tol"] == FP32_TOL
    assert info["tokens"] == 6 * 4 * 4 and info["compile_backend"] == "aot_eager"
    rows = _rows(data)
    ref = rows[("diffusers", "full")]
    assert ref["status"] == "ok" and ref["ms"] > 0 and ref["rel_vs_diffusers"] is None
    assert ref["rel_vs_fp32"] < FP32_TOL  # diffusers in fp32 against our fp32 copy: the same function
    for name in ("ours", "ours+compile"):
        r = rows[(name, "full")]
        for k in FULL_FIELDS:
            assert k in r, (name, k)
        assert r["status"] == "ok" and r["check"] is True and r["finite"], r
        assert r["rel_vs_diffusers"] < FP32_TOL and r["max_abs_vs_diffusers"] < 1e-3, r
        assert r["rel_vs_fp32"] < 1e-6  # fp32 ours against its own fp32 copy
        assert r["vs_diffusers"] == pytest.approx(r["ms"] / ref["ms"], rel=1e-3)
        assert len(r["ms_all"]) == 2 and r["goal"] == 0.80 and r["tol"] == FP32_TOL
        c = rows[(name, "chunk")]
        assert c["status"] == "ok" and c["check"] is True and c["rel_vs_eager"] < FP32_TOL, c
        assert c["calls"] == 5 and c["chunk_frames"] == 3 and c["cached_frames"] == 3
        assert c["chunk_ms"] > 0 and c["call_ms"] == pytest.approx(c["chunk_ms"] / 5, rel=1e-2) and c["video_fps"] > 0
    assert rows[("ours+compile", "full")]["compiled"] is True  # aot_eager compiles on the CPU: no fallback
    assert "peak_gib" not in rows[("ours", "full")]  # CUDA only


def test_smoke_fp8_skipped_on_the_cpu_and_report(smoke):
    proc, data = smoke
    rows = _rows(data)
    for name in ("ours+fp8", "ours+fp8+compile"):
        for kind in ("full", "chunk"):
            r = rows[(name, kind)]
            assert r["status"] == "skipped" and "cpu" in r["why"], r
        assert proc.stdout.count(f"skipped {name}: ") == 1
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert "info" in lines[0]
    assert [(r["row"], r["kind"]) for r in lines[1:]] == [(r["row"], r["kind"]) for r in data["rows"]]
    assert "fp32 reference: running" in proc.stdout and "diffusers model freed: True" in proc.stdout
    table = proc.stdout[proc.stdout.index("| row | ms |"):]
    for name in ("diffusers", "ours", "ours+compile", "ours+fp8"):
        assert f"| {name} |" in table
    assert "every check passed" in proc.stdout


def test_a_wrong_weight_map_would_be_caught():
    """The check has teeth: the key map's output agrees with diffusers to ~1e-6, and the same weights with one
    pair of tensors swapped (block 0's q and k) are far outside the fp32 tolerance."""
    from streamgen.models.checkpoints import diffusers_to_native
    from streamgen.models.wan import WanConfig, WanModel

    bench = load_bench("vs_diffusers")
    cfg = WanConfig.preset("tiny")
    torch.set_grad_enabled(False)
    try:
        dm = bench.build_diffusers(cfg, torch.device("cpu"), torch.float32, seed=0)
        ours = bench.ours_from_diffusers(dm, cfg)
        assert ours.blocks[0].self_attn.q.weight.data_ptr() == dm.blocks[0].attn1.to_q.weight.data_ptr()  # shared
        g = torch.Generator().manual_seed(1)
        x, t = torch.randn(1, 16, 3, 8, 8, generator=g), torch.full((1,), 757.0)
        ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
        ref = dm(x, t, ctx, return_dict=False)[0]
        assert bench.compare(ours(x, t, ctx), ref)[0] < 1e-5
        sd = diffusers_to_native(dm.state_dict())
        q, k = "blocks.0.self_attn.q.weight", "blocks.0.self_attn.k.weight"
        sd[q], sd[k] = sd[k], sd[q]
        wrong = WanModel(cfg).eval()
        wrong.load_state_dict(sd, strict=True)
        assert bench.compare(wrong(x, t, ctx), ref)[0] > 100 * FP32_TOL
    finally:
        torch.set_grad_enabled(True)


def test_what_fails_a_run():
    bench = load_bench("vs_diffusers")
    ok = {"row": "ours", "kind": "full", "status": "ok", "check": True}
    rows = [ok, {"row": "diffusers", "kind": "full", "status": "ok"},
            {"row": "ours+fp8", "kind": "full", "status": "skipped", "why": "no fp8"}]
    assert bench.failures(rows) == []
    bad = {**ok, "check": False}
    err = {"row": "ours+compile", "kind": "chunk", "status": "error", "error": "boom"}
    assert bench.failures(rows + [bad, err]) == [bad, err]
