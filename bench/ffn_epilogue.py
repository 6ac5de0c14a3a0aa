"""The Wan FFN's first GEMM with its tanh GELU in the GEMM epilogue (``streamgen.ops.fused``) against
Linear then GELU, eager and compiled, at the DiT's shapes; and the whole FFN (both linears) each way.

Rows (ms, median of ``--reps`` CUDA-event timings after warm-up; err = max |out - fp32| / max |fp32|):
  linear+gelu eager      F.linear, then F.gelu(approximate="tanh"): two kernels (GEMM, bias+GELU pointwise)
  linear+gelu compiled   torch.compile of the same: Inductor's GEMM + one fused pointwise kernel
  epilogue               torch._addmm_activation(bias, x, W.T, use_gelu=True): one cuBLASLt kernel
  ffn compiled           torch.compile(Sequential(Linear, GELU, Linear)), as compile_blocks runs it
  ffn epilogue compiled  torch.compile(GeluEpilogueFFN) of the same weights

  PYTHONPATH=. python bench/ffn_epilogue.py [--shapes 1.3b,1.3b-x4,14b] [--reps 20]
  PYTHONPATH=. python bench/ffn_epilogue.py --smoke     # CPU: the rows run (no fusion there), tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import Clock, median_ms  # noqa: E402
from streamgen.ops.fused import GeluEpilogueFFN, probe  # noqa: E402

# name: (tokens M, dim K, ffn_dim N): one 832x480 chunk of 3 latent frames = 4680 tokens; 81 frames = 32760
SHAPES = {
    "1.3b": (4680, 1536, 8960),
    "1.3b-x4": (4 * 4680, 1536, 8960),
    "14b-chunk": (4680, 5120, 13824),
    "14b": (32760, 5120, 13824),
    "tiny": (96, 64, 128),
}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def run_shape(name: str, dev: torch.device, dtype: torch.dtype, reps: int, compile_ok: bool) -> list[dict]:
    m, k, n = SHAPES[name]
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, generator=g).to(dtype)
    ffn = nn.Sequential(nn.Linear(k, n), nn.GELU(approximate="tanh"), nn.Linear(n, k)).to(dev)
    with torch.no_grad():
        for p in ffn.parameters():
            p.copy_(torch.randn(p.shape, device=dev, generator=g) * (p.shape[-1] ** -0.5 if p.ndim > 1 else 0.02))
    ffn = ffn.to(dtype).eval().requires_grad_(False)
    lin = ffn[0]
    with torch.no_grad():
        h_ref = F.gelu(F.linear(x.float(), lin.weight.float(), lin.bias.float()), approximate="tanh")
        y_ref = F.linear(h_ref, ffn[2].weight.float(), ffn[2].bias.float())
    fused_ffn = GeluEpilogueFFN(*ffn)
    clock = Clock(dev)

    def lin_gelu():
        return F.gelu(F.linear(x, lin.weight, lin.bias), approximate="tanh")

    def epilogue():
        return torch._addmm_activation(lin.bias, x, lin.weight.t(), use_gelu=True)

    cases = [("linear+gelu eager", lin_gelu, h_ref), ("epilogue", epilogue, h_ref)]
    if compile_ok:
        c_lin_gelu = torch.compile(lin_gelu, dynamic=False)
        c_ffn = torch.compile(ffn, dynamic=False)
        c_fused = torch.compile(fused_ffn, dynamic=False)
        cases[1:1] = [("linear+gelu compiled", c_lin_gelu, h_ref)]
        cases += [("ffn compiled", lambda: c_ffn(x), y_ref), ("ffn epilogue compiled", lambda: c_fused(x), y_ref)]
    else:
        cases += [("ffn eager", lambda: ffn(x), y_ref), ("ffn epilogue eager", lambda: fused_ffn(x), y_ref)]
    rows = []
    flops = 2.0 * m * k * n
    with torch.no_grad():
        for label, fn, ref in cases:
            try:
                err = rel(fn(), ref)
                ms = median_ms(fn, clock, 3, reps)[0]
            except Exception as e:  # noqa: BLE001 - a row that cannot run says why
                rows.append({"shape": name, "case": label, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
                continue
            f = flops * (2 if label.startswith("ffn") else 1)
            rows.append({"shape": name, "M": m, "K": k, "N": n, "case": label, "ms": round(ms, 4),
                         "tflops": round(f / ms / 1e9, 1), "err": float(f"{err:.3g}")})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1.3b,1.3b-x4,14b-chunk,14b")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--smoke", action="store_true", help="CPU, float32, the tiny shape: checks the script runs")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    names = [s for s in args.shapes.split(",") if s]
    bad = [s for s in names if s not in SHAPES]
    if bad:
        print(f"--shapes: unknown {bad}; choose from {sorted(SHAPES)}", file=sys.stderr)
        return 2
    if args.reps < 1:
        print("--reps must be >= 1", file=sys.stderr)
        return 2
    if args.smoke:
        dev, dtype, names = torch.device("cpu"), torch.float32, ["tiny"]
    elif not torch.cuda.is_available():
        print("bench/ffn_epilogue.py needs CUDA (or --smoke)", file=sys.stderr)
        return 2
    else:
        dev, dtype = torch.device("cuda"), {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    why = probe(str(dev), dtype)
    print(f"epilogue probe: {'ok' if why is None else why}")
    rows = []
    for name in names:
        rows += run_shape(name, dev, dtype, args.reps, not args.no_compile and not args.smoke)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                       "torch": torch.__version__, "dtype": str(dtype), "rows": rows}, f, indent=1)
    print(f"{'shape':10} {'case':24} {'ms':>9} {'TFLOP/s':>8} {'err':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:10} {r['case']:24} {r['error']}")
        else:
            print(f"{r['shape']:10} {r['case']:24} {r['ms']:9.4f} {r['tflops']:8.1f} {r['err']:9.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
