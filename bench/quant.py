"""Quantization (streamgen/ops/quant.py): per-linear matmul speed and the whole 1.3B chunk, bf16 vs fp8.

    PYTHONPATH=. python bench/quant.py --json $OUT/quant.json           # on the GPU machine
    PYTHONPATH=. python bench/quant.py --device cpu --tokens 64 --chunk-presets tiny --hw 4,6 --linear-presets tiny

Part 1, one linear layer at a time (every distinct (K, N) of the Wan blocks of each preset in
``--linear-presets``, M = ``--tokens`` rows, random bf16 data, bias on):
  bf16           F.linear in bf16 (cuBLAS)
  fp8 mm         torch._scaled_mm alone, row-wise scales, activations already quantized
  fp8 mm fast    the same with use_fast_accum=True (not used by Fp8Linear)
  act quant      the activation quantizer alone (the Triton kernel, triton_quantize_rows_fp8)
  Fp8Linear      the module's forward: quantizer + fp8 mm with fast accumulation (what the model runs)
  eager quant    the quantizer without torch.compile + fp8 mm (why the fast path needs it)
  int8-weight    Int8WeightLinear's forward (int8 -> bf16 weight at each call, bf16 matmul)
TFLOP/s = 2 M K N / time for every row (the quantizer's own time included where it runs).
Rel err = ||y - y_fp32|| / ||y_fp32|| against the float32 product of the bf16 inputs; fp8 rows
also against their float32 emulation (fp8_rowwise_reference: same quantized operands). "host us"
is the time the host needs to enqueue one call.
Each timed sample is ``--inner`` back-to-back calls between CUDA events (launch gaps amortized);
the median of ``--reps`` samples is reported.

Part 2, one block-causal ``forward_chunk`` of the 1.3B model (3 latent frames at 832x480 = 4680
tokens, at frame 6 of a cache holding 6 committed frames, a 512-token prompt, random bf16 weights),
bf16 vs ``quantize(model, "fp8")`` vs ``quantize(model, "int8-weight")``. Rel err is against the
bf16 output on the same cache ("same cache"), and after re-running the prompt and the 6 cached
frames through the quantized model ("own cache": the error a stream sees).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import random_wan, sync_free  # noqa: E402
from streamgen.models.wan import WanConfig  # noqa: E402
from streamgen.ops.offload import offload  # noqa: E402
from streamgen.ops.quant import (  # noqa: E402
    Fp8Linear,
    Int8WeightLinear,
    fp8_rowwise_reference,
    fp8_scaled_mm_linear,
    fp8_support,
    quantize,
    quantize_rows_fp8,
    weight_bytes,
)


def timed(fn, cuda: bool, reps: int, inner: int, warmup: int = 3) -> float:
    """Median ms per call of ``fn()`` (``inner`` calls per sample)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                fn()
            b.record()
            b.synchronize()
            samples.append(a.elapsed_time(b) / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(samples)


def host_us(fn, cuda: bool, n: int = 20) -> float:
    """Host time per call to enqueue ``fn()`` (no sync inside): when it reaches the GPU time, the
    op is launch-bound."""
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t0) / n * 1e6
    if cuda:
        torch.cuda.synchronize()
    return dt


def rel(y, ref) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def linear_shapes(preset: str) -> list[tuple[str, int, int]]:
    c = WanConfig.preset(preset)
    return [("q/k/v/o", c.dim, c.dim), ("ffn.0", c.dim, c.ffn_dim), ("ffn.2", c.ffn_dim, c.dim)]


def bench_linears(preset: str, args, device) -> list[dict]:
    cuda = device.type == "cuda"
    sup = fp8_support(device) if cuda else None
    quant_c = sup.quant if sup is not None and sup.ok else quantize_rows_fp8
    rows = []
    for name, k, n in linear_shapes(preset):
        g = torch.Generator(device=device).manual_seed(k * 7 + n)
        m = args.tokens
        x = torch.randn(m, k, generator=g, device=device).to(torch.bfloat16)
        lin = torch.nn.Linear(k, n, device=device)
        with torch.no_grad():
            lin.weight.normal_(0.0, k**-0.5, generator=g)
            lin.bias.normal_(0.0, 0.02, generator=g)
        lin = lin.to(torch.bfloat16)
        exact = F.linear(x.float(), lin.weight.float(), lin.bias.float())
        f8 = Fp8Linear.from_linear(lin)
        i8 = Int8WeightLinear.from_linear(lin)
        a, sa = quant_c(x)
        sb = f8.weight_scale.view(1, n)
        b16 = f8.bias.to(torch.bfloat16)
        flop = 2 * m * k * n

        def mm(fast=False):
            return torch._scaled_mm(a, f8.weight.t(), scale_a=sa, scale_b=sb, bias=b16,
                                    out_dtype=torch.bfloat16, use_fast_accum=fast)  # fmt: skip

        variants = {
            "bf16": lambda: F.linear(x, lin.weight, lin.bias),
            "fp8 mm": mm,
            "fp8 mm fast": lambda: mm(True),
            "act quant": lambda: quant_c(x),
            "Fp8Linear": lambda: f8(x),
            "eager quant": lambda: fp8_scaled_mm_linear(x, f8.weight, f8.weight_scale, f8.bias, fast_accum=True),
            "int8-weight": lambda: i8(x),
        }
        base = None
        for vname, fn in variants.items():
            try:
                with torch.no_grad():
                    ms = timed(fn, cuda, args.reps, args.inner)
                    hus = host_us(fn, cuda)
                    y = fn()
                err = rel(y, exact) if vname != "act quant" else rel(y[0].float() * y[1], x.float())
                emu = rel(y, fp8_rowwise_reference(x, f8.weight, f8.weight_scale, f8.bias)) if "fp8" in vname or vname == "Fp8Linear" else None
            except Exception as exc:  # noqa: BLE001 - report the rest
                print(f"[{preset} {name}] {vname}: {type(exc).__name__}: {exc}", flush=True)
                continue
            base = ms if vname == "bf16" else base
            row = {"preset": preset, "layer": name, "M": m, "K": k, "N": n, "variant": vname, "ms": ms,
                   "TFLOPs": flop / ms / 1e9, "speedup_vs_bf16": base / ms if base else float("nan"), "rel_err": err, "host_us": hus}
            if emu is not None:
                row["rel_err_vs_emulation"] = emu
            rows.append(row)
            print(f"[{preset} {name} {m}x{k}x{n}] {vname}: {ms * 1e3:.1f} us, {row['TFLOPs']:.0f} TFLOP/s, "
                  f"x{row['speedup_vs_bf16']:.2f}, host {hus:.0f} us/call, rel err {err:.2e}"
                  + (f" ({emu:.1e} vs its float32 emulation)" if emu is not None else ""), flush=True)
        del x, lin, f8, i8, a, exact
    return rows




def prime(model, cache, ctx, past) -> None:
    """The prompt and the committed past chunks, computed by ``model``, into ``cache``."""
    model.set_prompt(cache, ctx)
    cache.reset_self_attn(0)
    for s, xs in past:
        model.forward_chunk(xs, 0.0, cache, start_frame=s, update_cache=True)




CHUNK_VARIANTS = {
    "bf16": None,
    "fp8": dict(mode="fp8"),
    "fp8 exact accum": dict(mode="fp8", fast_accum=False),
    "fp8 FFN only": dict(mode="fp8", skip=("*.self_attn.*", "*.cross_attn.*")),
    "int8-weight": dict(mode="int8-weight"),
}


def graph_ms(step, args) -> tuple[float, torch.Tensor]:
    """Median ms of replaying ``step`` captured in a CUDA graph (no host launch cost), and its output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    ms = timed(graph.replay, True, args.reps, 1, args.warmup)
    out = out.clone()
    del graph
    return ms, out


def bench_chunk(preset: str, args, device) -> list[dict]:
    cuda = device.type == "cuda"
    model = random_wan(preset, device, torch.bfloat16 if cuda else torch.float32)
    bf16_bytes = weight_bytes(model)
    cfg = model.cfg
    h, w = args.hw
    f, ctx_frames = args.frames, args.context
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, cfg.in_dim, f, h, w, generator=g, device=device)
    t = torch.full((1,), 700.0, device=device)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g, device=device)
    past = [(s, torch.randn(1, cfg.in_dim, min(f, ctx_frames - s), h, w, generator=g, device=device))
            for s in range(0, ctx_frames, f)]  # fmt: skip
    cache = model.new_cache(1, (h, w), max_frames=ctx_frames + f)
    tokens = f * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    rows, ref = [], None
    inplace = preset in args.inplace_presets.split(",")  # too large for a second copy: bf16, then fp8 in place
    variants = {k: v for k, v in CHUNK_VARIANTS.items() if not inplace or k in ("bf16", "fp8")}
    for variant, kw in variants.items():
        t0 = time.perf_counter()
        m = model if kw is None else quantize(model if inplace else copy.deepcopy(model), **kw)
        t_quant = time.perf_counter() - t0
        if not inplace or kw is None:  # the bf16 model's cache: every variant sees the same inputs
            prime(model, cache, ctx, past)
        step = lambda: m.forward_chunk(x, t, cache, start_frame=ctx_frames)  # noqa: E731
        out = step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ms = timed(step, cuda, args.reps, 1, args.warmup)
        # the bf16 model stays resident beside a quantized copy: count only the variant's own bytes
        peak = (torch.cuda.max_memory_allocated() - (0 if kw is None or inplace else bf16_bytes)) / 2**30 if cuda else float("nan")
        hms = host_us(step, cuda, 5) / 1e3
        if kw is None:
            ref, err_same, err_own = out.float(), 0.0, 0.0
            own = out
        else:
            err_same = rel(out, ref)
            prime(m, cache, ctx, past)
            own = step()
            err_own = rel(own, ref)
        sf = sync_free(m, x, t, cache, ctx_frames) if cuda else "-"
        if cuda:
            try:
                gms, gout = graph_ms(step, args)
                graph = {"graph_ms": gms, "graph_max_abs_diff": (gout.float() - own.float()).abs().max().item()}
            except Exception as exc:  # noqa: BLE001
                graph = {"graph_error": f"{type(exc).__name__}: {exc}"[:300]}
                print(f"[{preset} chunk] {variant}: CUDA graph failed: {graph['graph_error']}", flush=True)
        row = {"preset": preset, "tokens": tokens, "context_frames": ctx_frames, "variant": variant, "ms": ms,
               "host_ms": hms, "peak_GiB": peak, "weights_GiB": weight_bytes(m) / 2**30, "rel_err_same_cache": err_same,
               "rel_err_own_cache": err_own, "quantize_s": t_quant, "sync_free": sf, **(graph if cuda else {})}  # fmt: skip
        if variant in ("bf16", "fp8") and not inplace:  # quantize, then offload: the order quant.py asks for
            handle = offload(m, device=device, prefetch=1)
            out_off = step()
            row["offload_p1_ms"] = timed(step, cuda, args.reps, 1, args.warmup)
            row["offload_p1_max_abs_diff"] = (out_off.float() - own.float()).abs().max().item()
            handle.remove()
            del handle
        rows.append(row)
        print(f"[{preset} chunk] {variant}: {ms:.2f} ms (host {hms:.1f} ms to enqueue), peak {peak:.2f} GiB, weights "
              f"{row['weights_GiB']:.2f} GiB, rel err {err_same:.2e} (same cache) {err_own:.2e} (own cache), "
              f"quantize() {t_quant:.1f} s, sync_free={sf}, CUDA graph {row.get('graph_ms', float('nan')):.2f} ms "
              f"(max |diff| {row.get('graph_max_abs_diff', float('nan')):.3g})"
              + (f", offload p=1 {row['offload_p1_ms']:.2f} ms (max |diff| {row['offload_p1_max_abs_diff']:.3g})"
                 if "offload_p1_ms" in row else ""), flush=True)  # fmt: skip
        if m is not model:
            del m, step
            if cuda:
                torch.cuda.empty_cache()
        elif inplace and kw is not None:
            del step
            if cuda:
                torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--linear-presets", default="wan2.1-t2v-1.3b,wan2.1-t2v-14b")
    ap.add_argument("--chunk-presets", default="wan2.1-t2v-1.3b")
    ap.add_argument("--inplace-presets", default="wan2.1-t2v-14b",
                    help="presets measured bf16 then fp8 quantized in place (no second copy)")
    ap.add_argument("--tokens", type=int, default=4680, help="rows M of the per-linear products")
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--context", type=int, default=6)
    ap.add_argument("--hw", default="60,104", help="latent h,w (60,104 = 480x832 video)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.hw = tuple(int(v) for v in args.hw.split(","))
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    info = {"torch": torch.__version__}
    if device.type == "cuda":
        t0 = time.perf_counter()
        sup = fp8_support(device)
        info.update(card=torch.cuda.get_device_name(), fp8_ok=sup.ok, reason=sup.reason, fused_bias=sup.fused_bias,
                    probe_s=time.perf_counter() - t0)
    print(info, flush=True)

    lin_rows, chunk_rows = [], []
    for preset in filter(None, args.linear_presets.split(",")):
        try:
            lin_rows += bench_linears(preset, args, device)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    for preset in filter(None, args.chunk_presets.split(",")):
        try:
            chunk_rows += bench_chunk(preset, args, device)
        except Exception:  # noqa: BLE001
            traceback.print_exc()

    print("\n| model | layer | M x K x N | variant | us | TFLOP/s | vs bf16 | host us | rel err | vs emulation |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in lin_rows:
        print(f"| {r['preset']} | {r['layer']} | {r['M']}x{r['K']}x{r['N']} | {r['variant']} | {r['ms'] * 1e3:.1f} "
              f"| {r['TFLOPs']:.0f} | {r['speedup_vs_bf16']:.2f} | {r['host_us']:.0f} | {r['rel_err']:.1e} "
              f"| {format(r['rel_err_vs_emulation'], '.1e') if 'rel_err_vs_emulation' in r else '-'} |")
    print("\n| model | variant | ms / chunk | vs bf16 | host ms | peak GiB | weights GiB | rel err (same cache) "
          "| rel err (own cache) | offload p=1 ms | CUDA graph ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = {r["preset"]: r["ms"] for r in chunk_rows if r["variant"] == "bf16"}
    for r in chunk_rows:
        print(f"| {r['preset']} | {r['variant']} | {r['ms']:.2f} | {base.get(r['preset'], float('nan')) / r['ms']:.2f} "
              f"| {r['host_ms']:.1f} | {r['peak_GiB']:.2f} | {r['weights_GiB']:.2f} | {r['rel_err_same_cache']:.1e} "
              f"| {r['rel_err_own_cache']:.1e} | {r.get('offload_p1_ms', float('nan')):.1f} "
              f"| {r.get('graph_ms', float('nan')):.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "linears": lin_rows, "chunks": chunk_rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
