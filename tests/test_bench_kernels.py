"""bench/attn_kernels.py, bench/overlap.py and vs_diffusers' kernel classes on the CPU: the scripts run, their
numerics checks have teeth, and the profile's kernel classes name real kernels right."""

from __future__ import annotations

import json

import torch

from bench_scripts import load_bench


def test_attn_kernels_tiny_rows_and_fastest(tmp_path, capsys):
    bench = load_bench("attn_kernels")
    out = tmp_path / "attn.json"
    assert bench.main(["--device", "cpu", "--shapes", "tiny", "--reps", "2", "--warmup", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {(r["shape"], r["backend"]): r for r in data["rows"]}
    assert {s for s, _ in rows} == set(bench.TINY) and {b for _, b in rows} == set(bench.BACKENDS)
    for shape in bench.TINY:
        ok = rows[(shape, "sdpa")]
        assert ok["status"] == "ok" and ok["ms"] > 0 and ok["rel_vs_fp32"] < 1e-5, ok
        assert rows[(shape, "cudnn")]["status"] == "unavailable" and rows[(shape, "cudnn")]["why"]
        fa4 = rows[(shape, "fa4")]
        assert fa4["status"] == "unavailable" and ("flash_attn" in fa4["why"] or "cuda" in fa4["why"].lower()), fa4
        fp8 = rows[(shape, "fp8")]  # the CPU runs it only under Triton's interpreter (tests/test_fp8_attention.py)
        assert fp8["status"] == "unavailable" and "GPU kernel" in fp8["why"], fp8
    table = capsys.readouterr().out
    fastest = min((r for r in data["rows"] if r["shape"] == "tiny-self" and r["status"] == "ok"), key=lambda r: r["ms"])
    assert f"| {fastest['backend']} |" in next(ln for ln in table.splitlines() if ln.startswith("| tiny-self"))


def test_attn_kernels_a_wrong_kernel_fails_the_run(monkeypatch, capsys):
    bench = load_bench("attn_kernels")
    real = bench.backend_fn

    def swapped(name):
        fn = real(name)
        return (lambda q, k, v: fn(q, v, k)) if name == "sdpa" else fn  # k and v swapped: a wrong attention

    monkeypatch.setattr(bench, "backend_fn", swapped)
    assert bench.main(["--device", "cpu", "--shapes", "tiny", "--backends", "sdpa,flash", "--reps", "1"]) == 1
    out = capsys.readouterr().out
    assert "numerics off: tiny-self sdpa" in out and "numerics off: tiny-self flash" not in out


def test_attn_kernels_bad_options_name_the_option(capsys):
    bench = load_bench("attn_kernels")
    for argv, word in ((["--shapes", "nope"], "--shapes"), (["--backends", "magic"], "--backends"),
                       (["--backends", "fp8@12"], "expected BMxBNwWsS")):
        try:
            bench.main(["--device", "cpu", *argv])
        except SystemExit as exc:
            assert exc.code == 2
        else:
            raise AssertionError(argv)
        assert word in capsys.readouterr().err


def test_kernel_kinds_of_real_kernel_names():
    from bench.common import kernel_kind as kind
    # names as torch.profiler reported them on the H200 (bench/BENCHMARKS.md, the 14B kernel shares)
    assert kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1") == "attention"
    assert kind("kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_object") == "attention"
    assert kind("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>") == "attention"
    assert kind("nvjet_sm90_tst_256x152_64x4_1x2_h_bz_coopA_bias_TNT") == "gemm"
    assert kind("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128") == "gemm"
    assert kind("triton_red_fused__scaled_dot_product_cudnn_attention__to_copy_add_mean_mul_pow_rsqrt_stack") == "other"
    assert kind("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl<Binary>>") == "other"


def test_overlap_smoke(tmp_path):
    bench = load_bench("overlap")
    out = tmp_path / "overlap.json"
    torch.manual_seed(0)
    assert bench.main(["--smoke", "--profile", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    prof = data["profile"]  # on the CPU no CUDA kernels: the kinds are there, at zero
    assert prof["chunks"] == 1 and prof["wall_ms_per_chunk"] > 0
    assert {k: prof[f"{k}_ms_per_chunk"] for k in ("attention", "gemm", "other")} == {"attention": 0.0, "gemm": 0.0,
                                                                                      "other": 0.0}
    assert [r["decoder"] for r in rows] == ["wan", "taehv"]
    for r in rows:
        assert r["same_bytes"] is True and min(r[f"{k}_fps"] for k in ("dit", "decode", "serial", "overlap")) > 0
        assert abs(r["ideal"] / (r["serial_s"] / max(r["dit_s"], r["decode_s"])) - 1) < 0.01  # rounded times
