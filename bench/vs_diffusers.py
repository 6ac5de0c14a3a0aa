"""Our Wan DiT against diffusers' ``WanTransformer3DModel`` in one process: one bidirectional forward (issue 12).

On one H200, one device call (14B, 832x480, 21 latent = 81 video frames = 32760 tokens; 199 s there on 2026-12-01,
the 1.3B 74 s; results in bench/BENCHMARKS.md): carry only ``.wheels/diffusers-0.42.1-py3-none-any.whl``, command:

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \\
        --find-links .wheels diffusers==0.42.1 && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 \\
        python3 bench/vs_diffusers.py --json $OUT/vs_diffusers_14b.json 2>&1 | tee $OUT/vs_diffusers_14b.log

    ... python3 bench/vs_diffusers.py --preset wan2.1-t2v-1.3b --json $OUT/vs_diffusers_13b.json   # the 1.3B
    ... --variants ours,ours+fp8 / --variants ours+compile,ours+fp8+compile   # if one call runs out of time
    PYTHONPATH=. python bench/vs_diffusers.py --smoke        # dry run here: tiny config, fp32, 64x64, CPU (~5-15 s)

Wheels: the GPU image (KINDS.md's package list) has every runtime need of diffusers 0.42.1 (Requires-Dist: filelock,
huggingface-hub >=1.32,<3 (1.33.0 there), numpy, regex, requests, safetensors >=0.8, Pillow; importlib_metadata only
below Python 3.8), so the call needs one wheel, diffusers-0.42.1-py3-none-any.whl (6.4 MB, pure Python, the
version the venv's tests use; checked here: installed that way with huggingface-hub 1.33.0, the smoke passes).
``.wheels/`` is git-ignored: a fresh checkout gets it with
``python -m pip download --no-deps --only-binary=:all: -d .wheels diffusers==0.42.1``.

Models. diffusers is built on the meta device with the config matching ``WanConfig.preset(--preset)`` (the kwargs
tests/test_wan.py builds it with), then every parameter is made on the device and filled in place with random values
(matrices N(0, 1/fan_in), biases N(0, 0.02), norm weights N(1, 0.1), as bench/common.py's ``random_model``), in
``--dtype`` except the parameters diffusers' ``_keep_in_fp32_modules`` names (time embedder, scale-shift tables,
norms), which stay float32 as ``from_pretrained(torch_dtype=bfloat16)`` leaves them; the RoPE tables (buffers, not
weights) are built afresh on the device, as its ``__init__`` makes them. No host copy, no float32 copy. Ours gets THE
SAME tensors through the project's key map (``checkpoints.diffusers_to_native`` + ``load_state_dict(strict=True,
assign=True)``): both models share one copy of the weights (14B bf16: 28.6 GB), so they compute the same function.
diffusers runs with its default attention processor (``WanAttnProcessor``, dispatch backend "native": PyTorch SDPA),
ours with its default (PyTorch SDPA); ``--attn cudnn`` puts SDPA's cuDNN kernel first for both; ``--attn fa4`` runs
ours on flash-attn-4 (``ops.attention.use_backend(model, "flash")``; exit 2 where ``flash_attn.cute`` does not import)
and leaves diffusers on its default. ``--profile ROWS`` adds one profiled call to those full rows: GPU kernel time by
kind (``bench.common.kernel_kind``: attention, GEMM, other) and the five longest kernels, in the row's ``profile``.

Inputs: random latents (1, 16, F, H/8, W/8) in ``--dtype``, t = 757, a random 512-token context of ``text_dim``
(512 = text_len: no padding difference). What is timed, per row: one full ``forward`` under ``torch.no_grad``: a
first call (its wall time is reported as ``first_s``: compilation for compiled rows), ``--warmup - 1`` more
untimed calls, then ``--reps`` calls each bracketed by CUDA events (host clock after a sync on the CPU); the
median is ``ms``, ``vs_diffusers`` = ms / diffusers' ms (goal: <= 0.80 bf16, <= 0.55 fp8). Memory (CUDA):
``peak_gib`` = max allocated over the timed calls (everything resident: both models' shared weights, fp8 copies,
the KV cache of the chunk rows once built), ``work_gib`` = that peak minus what was allocated before them (the
forward's own activations and workspace), ``weights_gib`` = the model's own parameters and buffers.

Rows, in this order (free what is not needed in between):
  fp32 ref          an fp32 copy of ours, run once (no TF32), where it fits: its weights (14B: 57 GB) plus an
                    activation estimate against ``torch.cuda.mem_get_info``; else one line says it is skipped
  diffusers         the reference of every "vs diffusers" number
  ours              eager                              ours+compile  ``compile_blocks`` (``--compile-backend``)
  ours+fp8          ``quantize(ours, "fp8")`` in place, after diffusers is freed (its bf16 block weights go with
                    it), only where ``quant.fp8_support`` says the fast path runs (else the row says skipped)
  ours+fp8+compile  both
Numerics per row, printed: relative L2 ||a - b|| / ||b|| and max |a - b| against diffusers' output and against the
fp32 reference. The run exits 1 if a row errors, or a bf16/fp32 variant is further than ``--tol`` (bf16 2e-2, fp32
1e-4) from diffusers, or an fp8 one further than ``--fp8-tol`` (1e-1). A compile that fails falls back to eager
with a log line (streamgen.ops.compile) and the row says so; that is not a failure.

Chunk rows (``--chunk-frames 3``, 0 = none): the streaming step of the same models, no diffusers counterpart: a
cache of F latent frames, the prompt set and the first F - 3 frames committed by eager ours (the clip's last chunk:
18 cached frames before it at 81 frames), then per variant ``--chunk-steps`` denoising ``forward_chunk`` calls of 3
frames + the cache pass (t=0, ``update_cache=True``) at the same place, timed as one unit (``chunk_ms``; the
sampler's arithmetic and the decoder left out); ``video_fps`` = 4 * 3 / chunk time. Numerics: the first
denoising output against eager ours' on the same cache.

Honest notes: random weights, so the numbers say nothing about image quality; speed does not depend on the
values. The bf16 tolerance is not yet calibrated on the GPU: diffusers keeps the residual stream in bf16 between
sub-layers, ours in float32, so the two differ by more than either's kernel noise, and the gap grows with depth.
Measured on the CPU (48 tokens, these random weights): 1.3B (30 layers) ours vs diffusers 1.25e-2, diffusers vs
fp32 1.23e-2, ours vs fp32 3.3e-3; 14B widths with 4 / 12 layers 6.3e-3 / 9.1e-3, which extrapolates to ~1.4-1.7e-2
at 40 layers: 2e-2 holds, with little margin (rel_vs_fp32 says which side drifts). Both models share storage,
which changes nothing in their arithmetic. The 14B fp32 reference is expected to fit an H200 (28.6 GB resident +
57 GB + a ~21 GB activation estimate); the first GPU run will say. ``--smoke`` times a tiny model on the CPU
(aot_eager compile, fp8 rows skipped): its times mean nothing; it checks the path, and that the weight map makes
both agree (fp32).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import statistics
import sys
import time
import traceback
import weakref
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Clock, fill_random_, kernel_times  # noqa: E402
from streamgen.models.checkpoints import diffusers_to_native  # noqa: E402
from streamgen.models.wan import WanCache, WanConfig, WanModel  # noqa: E402
from streamgen.ops.attention import use_backend  # noqa: E402
from streamgen.ops.compile import compile_blocks, uncompile_blocks  # noqa: E402
from streamgen.ops.fused import fuse_ffn_gelu, fuse_norm_rope  # noqa: E402
from streamgen.ops.quant import fp8_support, quantize, weight_bytes  # noqa: E402

T0 = time.perf_counter()
VARIANTS = ("ours", "ours+compile", "ours+fp8", "ours+fp8+compile")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TOL = {"bf16": 2e-2, "fp32": 1e-4}
FP8_TOL = 1e-1
GOAL = {False: 0.80, True: 0.55}  # ours / diffusers time, bf16 and fp8 (issue 12)
GIB = 2**30
log = logging.getLogger("bench.vs_diffusers")


# ----------------------------------------------------------------------------- models


def diffusers_kwargs(cfg: WanConfig) -> dict:
    """``WanTransformer3DModel`` constructor arguments of the same network as ``WanModel(cfg)``."""
    return dict(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
                qk_norm="rms_norm_across_heads" if cfg.qk_norm else None, eps=cfg.eps)


def build_diffusers(cfg: WanConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """diffusers' Wan DiT with random weights made in place on ``device`` (see the module docstring)."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    with torch.device("meta"):
        model = WanTransformer3DModel(**diffusers_kwargs(cfg))
    keep = tuple(getattr(WanTransformer3DModel, "_keep_in_fp32_modules", None) or ())
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for mod_name, mod in model.named_modules():
            for pname, p in list(mod._parameters.items()):
                if p is None:
                    continue
                full = f"{mod_name}.{pname}" if mod_name else pname
                dt = torch.float32 if any(k in full.split(".") for k in keep) else dtype
                new = torch.empty(p.shape, dtype=dt, device=device)
                fill_random_(full, new, g)
                mod._parameters[pname] = nn.Parameter(new, requires_grad=False)
        rope = model.rope
        with torch.device(device):
            model.rope = WanRotaryPosEmbed(rope.attention_head_dim, rope.patch_size, rope.max_seq_len)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"diffusers model: tensors not materialized: {left[:5]}")
    return model.eval()


def ours_from_diffusers(dm: nn.Module, cfg: WanConfig) -> WanModel:
    """Our model holding diffusers' very tensors, through the project's diffusers -> native key map."""
    with torch.device("meta"):
        model = WanModel(cfg)
    model.load_state_dict(diffusers_to_native(dm.state_dict()), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def fp32_copy(model: WanModel) -> WanModel:
    with torch.device("meta"):
        m32 = WanModel(model.cfg)
    m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, strict=True, assign=True)
    return m32.eval().requires_grad_(False)


def fp32_fits(model: WanModel, tokens: int, device: torch.device) -> tuple[bool, str]:
    """Whether an fp32 copy and one forward fit beside what is resident: the copy's bytes plus an activation
    estimate (1.5 x tokens x (2 ffn_dim + 16 dim) x 4 B: the FFN's hidden pair and ~16 residual-wide temporaries)."""
    cfg = model.cfg
    n = sum(p.numel() for p in model.parameters())
    need = 4 * n + int(1.5 * tokens * (2 * cfg.ffn_dim + 16 * cfg.dim) * 4)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    ok = need < 0.92 * free
    return ok, f"needs ~{need / GIB:.1f} GiB ({4 * n / GIB:.1f} weights), {free / GIB:.1f} GiB free"


@contextlib.contextmanager
def full_fp32():
    """No TF32 in matmuls or convolutions (restored after)."""
    mm, conv = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = mm, conv


# ----------------------------------------------------------------------------- timing and numerics


def compare(out: torch.Tensor | None, ref: torch.Tensor | None) -> tuple[float | None, float | None]:
    """(||out - ref|| / ||ref||, max |out - ref|) in float64, or (None, None) without a reference."""
    if out is None or ref is None:
        return None, None
    a, b = out.double(), ref.double()
    return float((a - b).norm() / b.norm()), float((a - b).abs().max())


def timed(fn: Callable[[], torch.Tensor], clock: Clock, warmup: int, reps: int) -> dict:
    """First call (host wall), ``warmup - 1`` more, then ``reps`` timed calls; the last output is returned."""
    cuda = clock.cuda
    clock.sync()
    t0 = time.perf_counter()
    out = fn()
    clock.sync()
    first_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        out = fn()
    clock.sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    ms = []
    for _ in range(reps):
        del out
        a = clock.mark()
        out = fn()
        b = clock.mark()
        clock.sync()
        ms.append(clock.ms(a, b))
    res = {"ms": statistics.median(ms), "ms_all": [round(v, 3) for v in ms], "first_s": round(first_s, 3)}
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        res.update(peak_gib=round(peak / GIB, 3), work_gib=round((peak - base) / GIB, 3))
    res["out"] = out
    return res


def compiled_state(model: WanModel, wrapped: bool) -> tuple[bool, str]:
    """(all blocks still compiled?, note) after the first calls of a compiled row."""
    if not wrapped:
        return False, "torch.compile unavailable: ran eager"
    eager = [i for i, b in enumerate(model.blocks)
             if b.__dict__.get("forward") is b.__dict__.get("_streamgen_eager_forward")]
    if eager:
        return False, f"compile fell back to eager in {len(eager)}/{len(model.blocks)} blocks (see the log line)"
    return True, ""


def kernel_shares(fn: Callable[[], torch.Tensor]) -> dict:
    """GPU kernel time of one ``fn()`` call by kind (torch.profiler; ``bench.common.kernel_kind``): attention, GEMM,
    other (pointwise, norms, copies, Triton kernels), in ms, and the five longest kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kinds, per_name = kernel_times(prof)
    total = sum(kinds.values())
    out = {f"{k}_ms": round(v, 1) for k, v in kinds.items()}
    out["kernel_ms"] = round(total, 1)
    out.update({f"{k}_share": round(v / total, 3) if total else None for k, v in kinds.items()})
    out["top"] = [[n[:90], round(v[0], 1)] for n, v in sorted(per_name.items(), key=lambda kv: -kv[1][0])[:5]]
    return out


class Chunk:
    """One streaming chunk at the end of the clip, on a cache primed once by eager ours (see the docstring)."""

    def __init__(self, model: WanModel, ctx: torch.Tensor, args, device: torch.device, dtype: torch.dtype):
        cfg, f = model.cfg, args.chunk_frames
        h, w = args.height // 8, args.width // 8
        self.start = args.frames - f
        g = torch.Generator(device=device).manual_seed(2)
        self.cache: WanCache | None = model.new_cache(1, (h, w), max_frames=args.frames)
        model.set_prompt(self.cache, ctx)
        past = torch.randn(1, cfg.in_dim, self.start, h, w, generator=g, device=device).to(dtype)
        for s in range(0, self.start, f):
            model.forward_chunk(past[:, :, s:s + f], 0.0, self.cache, start_frame=s, update_cache=True)
        self.x = torch.randn(1, cfg.in_dim, f, h, w, generator=g, device=device).to(dtype)
        steps = max(1, args.chunk_steps)
        self.ts = [torch.full((1,), 1000.0 * (steps - i) / steps, device=device) for i in range(steps)]
        self.t0 = torch.zeros(1, device=device)
        self.frames = f

    def unit(self, model: WanModel) -> torch.Tensor:
        first = None
        for t in self.ts:
            out = model.forward_chunk(self.x, t, self.cache, start_frame=self.start)
            first = out if first is None else first
        model.forward_chunk(self.x, self.t0, self.cache, start_frame=self.start, update_cache=True)
        return first


# ----------------------------------------------------------------------------- rows


class Runner:
    def __init__(self, args, device: torch.device, dtype: torch.dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.clock = Clock(device)
        self.rows: list[dict] = []
        self.ref: torch.Tensor | None = None  # diffusers' output
        self.ref32: torch.Tensor | None = None
        self.chunk: Chunk | None = None
        self.chunk_ref: torch.Tensor | None = None
        self.diffusers_ms: float | None = None

    def emit(self, row: dict) -> dict:
        row = {k: v for k, v in row.items() if k != "out"}
        self.rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        return row

    def full_row(self, name: str, fn: Callable[[], torch.Tensor], model: nn.Module, *, fp8: bool = False,
                 wrapped: bool = True) -> torch.Tensor | None:
        a = self.args
        row: dict = {"row": name, "kind": "full", "preset": a.preset, "dtype": a.dtype, "fp8": fp8,
                     "tokens": a.tokens, "weights_gib": round(weight_bytes(model) / GIB, 3)}
        try:
            res = timed(fn, self.clock, a.warmup, a.reps)
        except Exception as exc:  # noqa: BLE001 - reported, and fails the run
            traceback.print_exc()
            self.emit({**row, "status": "error", "error": f"{type(exc).__name__}: {exc}"[:400]})
            return None
        out = res["out"]
        if name in self.args.profile_rows and self.clock.cuda:
            try:
                res["profile"] = kernel_shares(fn)
                print(f"profile {name}: " + json.dumps(res["profile"]), flush=True)
            except Exception as exc:  # noqa: BLE001 - informative only
                print(f"profile {name}: failed ({type(exc).__name__}: {exc})", flush=True)
        rel_d, max_d = compare(out, self.ref)
        rel_32, max_32 = compare(out, self.ref32)
        row.update(res)
        row.update(status="ok", rel_vs_diffusers=rel_d, max_abs_vs_diffusers=max_d, rel_vs_fp32=rel_32,
                   max_abs_vs_fp32=max_32, finite=bool(torch.isfinite(out).all()))
        if self.diffusers_ms:
            row["vs_diffusers"] = round(res["ms"] / self.diffusers_ms, 4)
        if name != "diffusers":
            tol = a.fp8_tol if fp8 or a.attn == "fp8" else a.tol
            row["tol"] = tol
            row["check"] = bool(row["finite"] and rel_d is not None and rel_d <= tol)
            row["goal"] = GOAL[fp8]
        if name.endswith("compile"):
            row["compiled"], note = compiled_state(model, wrapped)
            if note:
                row["note"] = note
        self.emit(row)
        return out

    def chunk_row(self, name: str, model: WanModel, *, fp8: bool = False, wrapped: bool = True) -> None:
        a = self.args
        row: dict = {"row": name, "kind": "chunk", "preset": a.preset, "dtype": a.dtype, "fp8": fp8,
                     "chunk_frames": a.chunk_frames, "cached_frames": a.frames - a.chunk_frames,
                     "calls": max(1, a.chunk_steps) + 1}
        try:
            res = timed(lambda: self.chunk.unit(model), self.clock, a.warmup, a.reps)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            self.emit({**row, "status": "error", "error": f"{type(exc).__name__}: {exc}"[:400]})
            return
        out = res.pop("out")
        rel, mx = compare(out, self.chunk_ref)
        ms = res.pop("ms")
        row.update(chunk_ms=ms, call_ms=round(ms / row["calls"], 3), video_fps=round(4 * a.chunk_frames / ms * 1e3, 2),
                   **res, status="ok", rel_vs_eager=rel, max_abs_vs_eager=mx, finite=bool(torch.isfinite(out).all()))
        row["tol"] = a.fp8_tol if fp8 or a.attn == "fp8" else a.tol
        row["check"] = bool(row["finite"] and rel <= row["tol"])
        if name.endswith("compile"):
            row["compiled"], note = compiled_state(model, wrapped)
            if note:
                row["note"] = note
        self.emit(row)

    def skip(self, name: str, why: str, kinds=("full", "chunk")) -> None:
        print(f"skipped {name}: {why}", flush=True)
        for kind in kinds:
            if kind == "chunk" and not self.args.chunk_frames:
                continue
            self.emit({"row": name, "kind": kind, "preset": self.args.preset, "status": "skipped", "why": why})

    def ours_rows(self, name: str, model: WanModel, x, t, ctx, *, fp8: bool) -> None:
        wrapped = True
        if name.endswith("compile"):
            torch._dynamo.reset()
            wrapped = compile_blocks(model, backend=self.args.compile_backend)
        try:
            self.full_row(name, lambda: model(x, t, ctx), model, fp8=fp8, wrapped=wrapped)
            if self.chunk is not None:
                self.chunk_row(name, model, fp8=fp8, wrapped=wrapped)
            elif self.args.chunk_frames:
                self.emit({"row": name, "kind": "chunk", "preset": self.args.preset, "status": "error",
                           "error": "no primed cache (see the chunk setup error above)"})
        finally:
            if name.endswith("compile"):
                uncompile_blocks(model)
                torch._dynamo.reset()


def run(args, device: torch.device, dtype: torch.dtype, info: dict) -> list[dict]:
    cfg = WanConfig.preset(args.preset)
    r = Runner(args, device, dtype)
    t_build = time.perf_counter()
    dm = build_diffusers(cfg, device, dtype, seed=0)
    ours = ours_from_diffusers(dm, cfg)
    if args.attn == "fa4":
        use_backend(ours, "flash")
    if args.attn == "fp8":
        use_backend(ours, "fp8")
    if args.gelu_epilogue:
        info["gelu_epilogue_blocks"] = fuse_ffn_gelu(ours)
    if args.norm_rope:
        info["norm_rope_blocks"] = fuse_norm_rope(ours)
    info["build_s"] = round(time.perf_counter() - t_build, 2)
    info["params_b"] = round(sum(p.numel() for p in ours.parameters()) / 1e9, 4)
    info["rope_dtype"] = str(dm.rope.freqs_cos.dtype)
    print(f"built diffusers + ours (one shared copy of {info['params_b']} B parameters) in {info['build_s']} s",
          flush=True)
    h, w = args.height // 8, args.width // 8
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, cfg.in_dim, args.frames, h, w, generator=g, device=device).to(dtype)
    t = torch.full((1,), 757.0, device=device)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g, device=device).to(dtype)

    # fp32 reference first: the fewest tensors are resident now
    if args.fp32_ref == "off":
        print("fp32 reference: off (--fp32-ref off)", flush=True)
    else:
        fits, why = fp32_fits(ours, args.tokens, device)
        if not fits and args.fp32_ref == "auto":
            print(f"fp32 reference: skipped, does not fit ({why}); rel_vs_fp32 stays empty", flush=True)
        else:
            print(f"fp32 reference: running ({why})", flush=True)
            try:
                m32 = fp32_copy(ours)
                t0 = time.perf_counter()
                with full_fp32():
                    r.ref32 = m32(x.float(), t, ctx.float())
                r.clock.sync()
                print(f"fp32 reference: {time.perf_counter() - t0:.1f} s", flush=True)
            except torch.cuda.OutOfMemoryError as exc:
                print(f"fp32 reference: skipped, out of memory ({str(exc).splitlines()[0][:160]})", flush=True)
            finally:
                m32 = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    r.ref = r.full_row("diffusers", lambda: dm(x, t, ctx, return_dict=False)[0], dm)
    if r.ref is None:
        return r.rows
    r.diffusers_ms = next(row["ms"] for row in r.rows if row["row"] == "diffusers")
    if args.chunk_frames:  # the cache primed and the chunk reference taken by eager ours, before any variant
        try:
            r.chunk = Chunk(ours, ctx, args, device, dtype)
            r.chunk_ref = r.chunk.unit(ours)
        except Exception:  # noqa: BLE001 - the chunk rows then say error
            traceback.print_exc()
            r.chunk = None
    for name in ("ours", "ours+compile"):
        if name in args.variant_list:
            r.ours_rows(name, ours, x, t, ctx, fp8=False)

    fp8_names = [v for v in args.variant_list if "fp8" in v]
    if fp8_names:
        gone = weakref.ref(dm)
        del dm  # its bf16 block weights go once quantize() replaces ours' linears
        gc.collect()
        print(f"diffusers model freed: {gone() is None}", flush=True)
        sup = fp8_support(device)
        if not sup.ok:
            for name in fp8_names:
                r.skip(name, f"fp8 fast path unsupported: {sup.reason}")
        else:
            try:
                t0 = time.perf_counter()
                quantize(ours, "fp8")
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                info["quantize_s"] = round(time.perf_counter() - t0, 2)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                for name in fp8_names:
                    r.emit({"row": name, "kind": "full", "preset": args.preset, "status": "error",
                            "error": f"quantize: {type(exc).__name__}: {exc}"[:400]})
                return r.rows
            for name in fp8_names:
                r.ours_rows(name, ours, x, t, ctx, fp8=True)
    return r.rows


# ----------------------------------------------------------------------------- report


def failures(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "error" or r.get("check") is False]


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(rows: list[dict], info: dict) -> str:
    head = (f"Wan {info['preset']} {info['size']}, {info['frames']} latent frames ({info['tokens']} tokens), "
            f"{info['dtype']}, attn {info['attn']}, {info['device']}, torch {info['torch']}, "
            f"diffusers {info['diffusers']}")
    out = [head, "", "| row | ms | vs diffusers | goal | first s | peak GiB | work GiB | weights GiB "
           "| rel vs diffusers | max abs | rel vs fp32 | check |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if r["kind"] != "full":
            continue
        if r["status"] != "ok":
            out.append(f"| {r['row']} | {r['status']}: {(r.get('why') or r.get('error', ''))[:90]} |" + " |" * 10)
            continue
        ratio = r.get("vs_diffusers")
        goal = "-" if "goal" not in r else f"<= {r['goal']:.2f} " + ("met" if ratio <= r["goal"] else "not met")
        check = "-" if "check" not in r else ("ok" if r["check"] else f"FAIL > {r['tol']:g}")
        note = f" ({r['note']})" if r.get("note") else ""
        out.append(f"| {r['row']}{note} | {r['ms']:.1f} | {_f(ratio, '.3f')} | {goal} | {r['first_s']:.1f} "
                   f"| {_f(r.get('peak_gib'), '.1f')} | {_f(r.get('work_gib'), '.1f')} | {r['weights_gib']:.2f} "
                   f"| {_f(r['rel_vs_diffusers'], '.2e')} | {_f(r['max_abs_vs_diffusers'], '.2e')} "
                   f"| {_f(r['rel_vs_fp32'], '.2e')} | {check} |")
    chunks = [r for r in rows if r["kind"] == "chunk"]
    if chunks:
        c0 = next((r for r in chunks if r["status"] == "ok"), chunks[0])
        out += ["", f"streaming chunk: {c0.get('chunk_frames')} frames after {c0.get('cached_frames')} cached, "
                f"{c0.get('calls', '?')} forward_chunk calls (denoise steps + cache pass)", "",
                "| row | chunk ms | ms / call | video fps | peak GiB | rel vs eager | check |",
                "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in chunks:
            if r["status"] != "ok":
                out.append(f"| {r['row']} | {r['status']}: {(r.get('why') or r.get('error', ''))[:90]} |" + " |" * 5)
                continue
            check = "ok" if r["check"] else f"FAIL > {r['tol']:g}"
            note = f" ({r['note']})" if r.get("note") else ""
            out.append(f"| {r['row']}{note} | {r['chunk_ms']:.1f} | {r['call_ms']:.1f} | {r['video_fps']:.2f} "
                       f"| {_f(r.get('peak_gib'), '.1f')} | {r['rel_vs_eager']:.2e} | {check} |")
    return "\n".join(out)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="Wan preset (default wan2.1-t2v-14b; --smoke: tiny)")
    p.add_argument("--frames", type=int, default=None, help="latent frames (default 21 = 81 video frames; --smoke 6)")
    p.add_argument("--height", type=int, default=None, help="pixels (default 480; --smoke 64)")
    p.add_argument("--width", type=int, default=None, help="pixels (default 832; --smoke 64)")
    p.add_argument("--reps", type=int, default=3, help="timed calls a row (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls a row first (at least 1)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default cuda where there is one")
    p.add_argument("--attn", choices=("sdpa", "cudnn", "fa4", "fp8"), default="sdpa",
                   help="cudnn: SDPA's cuDNN kernel first, both; fa4: ours on flash-attn-4, diffusers on its default; "
                        "fp8: ours with the self-attention on streamgen.ops.fp8_attention (rows checked at --fp8-tol)")
    p.add_argument("--norm-rope", action="store_true", help="ours with the q/k RMSNorm + RoPE as one kernel (ops.fused)")
    p.add_argument("--gelu-epilogue", action="store_true",
                   help="ours with the FFN GELU in its first GEMM's epilogue (streamgen.ops.fused; bf16 rows)")
    p.add_argument("--profile", default="", help="comma list of rows to profile one full call of (kernel shares)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; --smoke aot_eager)")
    p.add_argument("--fp32-ref", choices=("auto", "on", "off"), default="auto", help="auto: where it fits")
    p.add_argument("--chunk-frames", type=int, default=3, help="latent frames of the streaming chunk rows (0: none)")
    p.add_argument("--chunk-steps", type=int, default=4, help="denoising calls a chunk (plus the cache pass)")
    p.add_argument("--tol", type=float, default=None, help="largest rel error vs diffusers (bf16 2e-2, fp32 1e-4)")
    p.add_argument("--fp8-tol", type=float, default=FP8_TOL, help="the same for the fp8 rows")
    p.add_argument("--smoke", action="store_true", help="dry run: tiny config, fp32, 64x64, 6 frames, CPU")
    p.add_argument("--json", default=None, help="write info and all rows to this file")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.preset = args.preset or ("tiny" if smoke else "wan2.1-t2v-14b")
    args.frames = args.frames or (6 if smoke else 21)
    args.height = args.height or (64 if smoke else 480)
    args.width = args.width or (64 if smoke else 832)
    args.device = args.device or ("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.tol = TOL[args.dtype] if args.tol is None else args.tol
    args.compile_backend = args.compile_backend or ("aot_eager" if smoke else "inductor")
    args.warmup = max(1, args.warmup)
    args.reps = max(1, args.reps)
    args.variant_list = [v for v in args.variants.split(",") if v]
    for v in args.variant_list:
        if v not in VARIANTS:
            p.error(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
    args.profile_rows = [v for v in args.profile.split(",") if v]
    for v in args.profile_rows:
        if v not in ("diffusers", *VARIANTS):
            p.error(f"--profile: {v!r} is not one of diffusers, {', '.join(VARIANTS)}")
    try:
        cfg = WanConfig.preset(args.preset)
    except ValueError as exc:
        p.error(str(exc))
    for name, v in (("width", args.width), ("height", args.height)):
        if v % (8 * cfg.patch_size[1]):
            p.error(f"--{name} {v}: must be a multiple of {8 * cfg.patch_size[1]}")
    if not 0 <= args.chunk_frames < args.frames:
        p.error(f"--chunk-frames {args.chunk_frames}: needs 0 <= it < --frames {args.frames} (cached frames first)")
    args.tokens = args.frames * (args.height // 8 // cfg.patch_size[1]) * (args.width // 8 // cfg.patch_size[2])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("streamgen").setLevel(logging.INFO)
    try:
        import diffusers
    except ImportError as exc:
        print(f"diffusers is not importable ({exc}); on the GPU machine install it from .wheels (see the docstring)")
        return 2
    diffusers.utils.logging.set_verbosity_error()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = DTYPES[args.dtype]
    torch.set_grad_enabled(False)
    cuda = device.type == "cuda"
    info = {"preset": args.preset, "size": f"{args.width}x{args.height}", "frames": args.frames, "tokens": args.tokens,
            "dtype": args.dtype, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "attn": args.attn,
            "compile_backend": args.compile_backend, "reps": args.reps, "warmup": args.warmup, "tol": args.tol,
            "fp8_tol": args.fp8_tol, "variants": args.variant_list, "chunk_frames": args.chunk_frames,
            "chunk_steps": args.chunk_steps, "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:]}
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        info["diffusers_attn_backend"] = str(_AttentionBackendRegistry.get_active_backend()[0])
    except Exception:  # noqa: BLE001 - a private API: informative only
        info["diffusers_attn_backend"] = "unknown"
    if args.attn == "fa4":
        from streamgen.ops.attention import detect

        found = detect()
        if not (found.flash_attn or "").startswith("flash_attn.cute"):
            print(f"--attn fa4: flash-attn-4 (flash_attn.cute) is not importable here (found: {found.flash_attn})",
                  file=sys.stderr)
            return 2
        info["ours_attn"] = f"{found.flash_attn} {found.flash_attn_version}"
    if args.attn == "fp8":
        from streamgen.ops.attention import fp8_probe

        why = fp8_probe(device)
        if why is not None:
            print(f"--attn fp8: {why}", file=sys.stderr)
            return 2
        info["ours_attn"] = "streamgen.ops.fp8_attention (self-attention), SDPA (cross)"
    if args.attn == "cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
        sdpa_kernel(order, set_priority=True).__enter__()  # for the whole process, both models
    print(json.dumps({"info": info}, default=str), flush=True)
    try:
        rows = run(args, device, dtype, info)
    except Exception as exc:  # noqa: BLE001 - building the models failed: one error row
        traceback.print_exc()
        rows = [{"row": "setup", "kind": "full", "status": "error", "error": f"{type(exc).__name__}: {exc}"[:400]}]
        print(json.dumps(rows[0]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=1, default=str))
    failed = failures(rows)
    print()
    print(table(rows, info))
    print(f"\ntotal {time.perf_counter() - T0:.0f} s"
          + (f"; {len(failed)} row(s) failed: {', '.join(r['kind'] + ' ' + r['row'] for r in failed)} "
             f"(an error, or rel vs the reference over its tol)" if failed else "; every check passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
