"""Attention kernels per shape: which one is fastest where the Wan DiT calls attention (issue 12).

    PYTHONPATH=. python3 bench/attn_kernels.py --json $OUT/attn.json              # H100/H200, bf16
    PYTHONPATH=. python3 bench/attn_kernels.py --device cpu --shapes tiny --reps 2  # CPU smoke run

Backends (each where it runs; a failing one is a row that says why):
  sdpa       ``F.scaled_dot_product_attention`` with PyTorch's own choice (on torch 2.11 / Hopper: cuDNN)
  cudnn      SDPA restricted to ``SDPBackend.CUDNN_ATTENTION``
  flash      SDPA restricted to ``SDPBackend.FLASH_ATTENTION`` (FlashAttention-2 inside PyTorch)
  efficient  SDPA restricted to ``SDPBackend.EFFICIENT_ATTENTION``
  fa4        flash-attn-4 (``flash_attn.cute.flash_attn_func``), only where it imports
  fp8        streamgen.ops.fp8_attention (Triton, fp8 Q·Kᵀ and P·V, the quantization included in the time);
             ``fp8@BMxBNwWsS`` a tile config (e.g. fp8@128x64w4s3); numerics tolerance 5e-2 instead of 2e-2

Shapes: the attention calls of one streaming chunk and of one full bidirectional forward at 832x480
(1560 tokens a latent frame), 1.3B (12 heads) and 14B (40 heads), head dim 128:
  *-chunk-first   3 frames of queries over their own 3 frames       (4680 x 4680)
  *-chunk-window  3 frames over a 12-frame window                   (4680 x 18720)
  *-chunk-last    3 frames over the whole 21-frame clip             (4680 x 32760)
  *-cross         3 frames over the 512 prompt tokens               (4680 x 512)
  *-full          one bidirectional forward over 21 frames          (32760 x 32760)
  1.3b-b4-window  four batched sessions of the window shape (issue 13)

What is timed: q, k, v random normal in ``(B, L, H, D)`` (the layout the model holds), ``--warmup`` calls, then
``--reps`` calls each between CUDA events; the median is ``ms``; TFLOP/s = 4 B H Lq Lk D / time. Numerics:
||out - ref|| / ||ref|| against SDPA's memory-efficient kernel in float32 on the same inputs (the math kernel
would hold Lq x Lk scores: 171 GB at the 14B full shape). The last line per shape names the fastest backend.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Clock, median_ms  # noqa: E402

FRAME = 1560  # tokens of one latent frame at 832x480 (60 x 104 / 2 / 2)
SHAPES = {  # name: (batch, q tokens, k tokens, heads, head dim)
    "1.3b-chunk-first": (1, 3 * FRAME, 3 * FRAME, 12, 128),
    "1.3b-chunk-window": (1, 3 * FRAME, 12 * FRAME, 12, 128),
    "1.3b-chunk-last": (1, 3 * FRAME, 21 * FRAME, 12, 128),
    "1.3b-cross": (1, 3 * FRAME, 512, 12, 128),
    "1.3b-full": (1, 21 * FRAME, 21 * FRAME, 12, 128),
    "1.3b-b4-window": (4, 3 * FRAME, 12 * FRAME, 12, 128),
    "14b-chunk-last": (1, 3 * FRAME, 21 * FRAME, 40, 128),
    "14b-cross": (1, 3 * FRAME, 512, 40, 128),
    "14b-full": (1, 21 * FRAME, 21 * FRAME, 40, 128),
}
TINY = {"tiny-self": (1, 96, 96, 2, 16), "tiny-cross": (1, 96, 32, 2, 16)}
BACKENDS = ("sdpa", "cudnn", "flash", "efficient", "fa4", "fp8")


def backend_fn(name: str):
    """A callable (q, k, v) -> out on (B, L, H, D) tensors, or raise with why it cannot run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    if name == "sdpa":
        return sdpa
    if name in ("cudnn", "flash", "efficient"):
        kind = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]

        def only(q, k, v):
            with sdpa_kernel([kind]):
                return sdpa(q, k, v)
        return only
    if name == "fp8" or name.startswith("fp8@"):
        from streamgen.ops.fp8_attention import fp8_attention

        config = parse_fp8_config(name[4:]) if name.startswith("fp8@") else None
        return lambda q, k, v: fp8_attention(q, k, v, config=config)
    if name == "fa4":
        from flash_attn.cute import flash_attn_func  # ImportError: the row says so

        def fa4(q, k, v):
            out = flash_attn_func(q, k, v)
            return out[0] if isinstance(out, tuple) else out
        return fa4
    raise ValueError(f"unknown backend {name!r}")


def parse_fp8_config(text: str) -> tuple[int, int, int, int]:
    """``128x64w4s3`` -> (BLOCK_M 128, BLOCK_N 64, 4 warps, 3 stages)."""
    import re

    m = re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)", text)
    if not m:
        raise ValueError(f"fp8 config {text!r}: expected BMxBNwWsS, e.g. 128x64w4s3")
    return tuple(int(x) for x in m.groups())


def is_fp8(backend: str) -> bool:
    return backend == "fp8" or backend.startswith("fp8@")


def reference(q, k, v) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.EFFICIENT_ATTENTION if q.is_cuda else SDPBackend.MATH
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                              v.float().transpose(1, 2)).transpose(1, 2)


def time_backend(fn, q, k, v, clock: Clock, warmup: int, reps: int) -> tuple[float, torch.Tensor]:
    return median_ms(lambda: fn(q, k, v), clock, warmup, reps)


def run_shape(name: str, shape: tuple, backends: list[str], args, device, dtype, clock: Clock) -> list[dict]:
    b, lq, lk, h, d = shape
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, generator=g, device=device).to(dtype) for n in (lq, lk, lk))
    ref = reference(q, k, v)
    flops = 4.0 * b * h * lq * lk * d
    rows = []
    for be in backends:
        row = {"shape": name, "batch": b, "lq": lq, "lk": lk, "heads": h, "head_dim": d, "backend": be}
        try:
            fn = backend_fn(be)
            ms, out = time_backend(fn, q, k, v, clock, args.warmup, args.reps)
            err = float((out.float() - ref).norm() / ref.norm())
            row.update(status="ok", ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1), rel_vs_fp32=err)
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run this shape is a row saying why
            if args.verbose:
                traceback.print_exc()
            row.update(status="unavailable", why=f"{type(exc).__name__}: {exc}".splitlines()[0][:160])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict], backends: list[str]) -> str:
    lines = ["| shape | B x Lq x Lk x H | " + " | ".join(f"{b} ms (TFLOP/s)" for b in backends) + " | fastest |",
             "| --- | --- |" + " ---: |" * len(backends) + " --- |"]
    by_shape: dict[str, dict] = {}
    for r in rows:
        by_shape.setdefault(r["shape"], {})[r["backend"]] = r
    for shape, rs in by_shape.items():
        any_r = next(iter(rs.values()))
        cells = []
        for be in backends:
            r = rs.get(be)
            cells.append(f"{r['ms']:.3f} ({r['tflops']:.0f})" if r and r["status"] == "ok" else "-")
        ok = [r for r in rs.values() if r["status"] == "ok"]
        best = min(ok, key=lambda r: r["ms"])["backend"] if ok else "-"
        dims = f"{any_r['batch']} x {any_r['lq']} x {any_r['lk']} x {any_r['heads']}"
        lines.append(f"| {shape} | {dims} | " + " | ".join(cells) + f" | {best} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="all", help="comma list of " + ", ".join(SHAPES) + "; 'all'; 'tiny' (CPU)")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--verbose", action="store_true", help="tracebacks of backends that cannot run")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    clock = Clock(device)
    if args.shapes == "tiny":
        shapes = TINY
    elif args.shapes == "all":
        shapes = SHAPES
    else:
        unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
        if unknown:
            p.error(f"--shapes: unknown {unknown}; choose from {', '.join(SHAPES)}, all, tiny")
        shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
    backends = [b for b in args.backends.split(",") if b]
    bad = [b for b in backends if b not in BACKENDS and not is_fp8(b)]
    if bad:
        p.error(f"--backends: unknown {bad}; choose from {', '.join(BACKENDS)}, fp8@BMxBNwWsS")
    for b in backends:
        if b.startswith("fp8@"):
            try:
                parse_fp8_config(b[4:])
            except ValueError as e:
                p.error(f"--backends: {e}")
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": str(dtype), "date": time.strftime("%Y-%m-%d %H:%M"),
            "reps": args.reps, "argv": sys.argv[1:]}
    print(json.dumps({"info": info}), flush=True)
    rows = []
    for name, shape in shapes.items():
        rows += run_shape(name, shape, backends, args, device, dtype, clock)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print()
    print(f"{info['device']}, torch {info['torch']}, {info['dtype']}, median of {args.reps}")
    print(table(rows, backends))
    def tol(r):
        return 5e-2 if is_fp8(r["backend"]) else 2e-2 if dtype != torch.float32 else 1e-4

    bad_rows = [r for r in rows if r["status"] == "ok" and not r["rel_vs_fp32"] < tol(r)]
    for r in bad_rows:
        print(f"numerics off: {r['shape']} {r['backend']} rel {r['rel_vs_fp32']:.2e}")
    return 1 if bad_rows else 0


if __name__ == "__main__":
    sys.exit(main())
