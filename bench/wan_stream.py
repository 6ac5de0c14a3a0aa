"""Wan2.1 block-causal streaming throughput and GPU correctness, per attention backend.

    PYTHONPATH=. python bench/wan_stream.py                      # 1.3B, 832x480, 7 chunks of 3 frames
    PYTHONPATH=. python bench/wan_stream.py --backends sdpa,cudnn,fa4 --check --json $OUT/wan.json
    PYTHONPATH=. python bench/wan_stream.py --backends cudnn,fa4 --compile cudnn,fa4 --profile cudnn

What one stream pays: ``SessionState.next_chunk()`` (4 denoising ``forward_chunk`` calls + 1 cache
pass at t=0) for ``--chunks`` chunks of ``--fpc`` latent frames, random bf16 weights, a fresh cache
per stream, no decoder. Every ``forward_chunk`` is bracketed with CUDA events (per-step GPU ms, which
grow with the number of cached keys); the stream's wall time is taken with a synchronize at the end,
so launch gaps count. Warm-up stream first, median over ``--reps`` streams. No CUDA graphs.

Backends (how attention runs; the cross-attention uses the same one):
  sdpa   PyTorch SDPA, its own kernel choice        cudnn  SDPA forced to the cuDNN kernel
  flash  SDPA forced to its flash kernel            fa4    flash-attn (``flash_attn.cute``), if importable

``--check``: bf16 chunked forward (each chunk at t, committed) against the full block-causal forward
on the same inputs, both against an fp32 copy of the model (full block-causal, SDPA); with fa4 also
fa4-vs-SDPA. ``--full``: time of one bidirectional forward over all frames (the ARCHITECTURE.md
diffusers reference: 1.3B, 81 frames, 0.621 s on an H100). Needs no av/diffusers.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamgen.models.wan import WanCache, WanConfig, WanModel  # noqa: E402
from streamgen.ops import attention as attn_ops  # noqa: E402
from streamgen.sampling.stream import StreamConfig, SessionState  # noqa: E402

BACKENDS = ("sdpa", "cudnn", "flash", "fa4")
DEVICE = "cuda"  # the benches time CUDA; a CPU smoke run may rebind it
_ORIG_ATTENTION = attn_ops.attention
_COMPILED = False  # set by compile_blocks: attention then runs eager, outside the compiled graphs
_DISABLED: dict = {}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@contextlib.contextmanager
def attention_backend(model: WanModel, name: str):
    """Route every attention call of ``model`` through one backend for the duration."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "fa4":
        if attn_ops._flash_fn()[0] is None:
            raise RuntimeError("flash-attn (flash_attn.cute / flash_attn_interface / flash_attn) is not importable")
        fn, ctx = functools.partial(_ORIG_ATTENTION, backend="flash"), contextlib.nullcontext()
    else:
        fn = functools.partial(_ORIG_ATTENTION, backend="sdpa")
        kernels = {"sdpa": None, "cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION]}[name]
        ctx = sdpa_kernel(kernels) if kernels else contextlib.nullcontext()
    if _COMPILED:
        fn = _DISABLED.setdefault(name, torch.compiler.disable(fn))  # one object per backend: one recompile
    before = model.attention
    model.attention = fn
    try:
        with ctx:
            yield
    finally:
        model.attention = before


class StepTimer:
    """Wraps model.forward_chunk: records CUDA events around each call (no syncs)."""

    def __init__(self, model: WanModel):
        self.model = model
        self.inner = model.forward_chunk
        self.events: list[tuple[bool, torch.cuda.Event, torch.cuda.Event]] = []
        model.forward_chunk = self  # instance attribute shadows the method

    def __call__(self, *args, update_cache: bool = False, **kw):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out = self.inner(*args, update_cache=update_cache, **kw)
        e.record()
        self.events.append((update_cache, s, e))
        return out

    def take(self) -> list[tuple[bool, float]]:
        torch.cuda.synchronize()
        out = [(u, s.elapsed_time(e)) for u, s, e in self.events]
        self.events.clear()
        return out

    def remove(self) -> None:
        del self.model.forward_chunk


def run_stream(model: WanModel, ctx: torch.Tensor, args, timer: StepTimer) -> dict:
    """One stream of args.chunks chunks; wall time from the first next_chunk to the final sync."""
    n_frames = args.chunks * args.fpc
    sess = SessionState(model, ctx, height=args.height, width=args.width,
                         config=StreamConfig(frames_per_chunk=args.fpc, num_steps=args.steps, seed=0),
                         total_frames=n_frames)
    torch.cuda.synchronize()
    timer.take()
    t0 = time.perf_counter()
    for _ in range(args.chunks):
        sess.next_chunk()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    steps = timer.take()
    return {"wall_s": wall, "steps": steps, "cache_bytes": sess.cache.nbytes}


def bench_backend(model: WanModel, ctx: torch.Tensor, name: str, args) -> dict:
    res: dict = {"backend": name}
    with attention_backend(model, name):
        timer = StepTimer(model)
        try:
            for _ in range(args.warmup):
                run_stream(model, ctx, args, timer)
            torch.cuda.reset_peak_memory_stats()
            runs = [run_stream(model, ctx, args, timer) for _ in range(args.reps)]
            res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        finally:
            timer.remove()
        walls = [r["wall_s"] for r in runs]
        wall = statistics.median_low(walls)
        n_lat = args.chunks * args.fpc
        best = runs[walls.index(wall)]
        per_call = best["steps"]
        calls_per_chunk = args.steps + 1
        # per chunk: GPU ms of denoise steps and of the cache pass
        chunk_ms = []
        for c in range(args.chunks):
            block = per_call[c * calls_per_chunk:(c + 1) * calls_per_chunk]
            chunk_ms.append({"denoise_ms": [round(ms, 2) for u, ms in block if not u],
                             "cache_ms": [round(ms, 2) for u, ms in block if u]})
        gpu_ms = sum(ms for _, ms in per_call)
        res.update({
            "wall_s": walls, "wall_median_s": wall, "gpu_sum_s": gpu_ms / 1e3,
            "latent_fps": n_lat / wall, "video_fps": 4 * n_lat / wall,
            "video_fps_81": (1 + 4 * (n_lat - 1)) / wall,
            "step_ms_mean": gpu_ms / len(per_call),
            "step_ms_first_chunk": statistics.mean(chunk_ms[0]["denoise_ms"]),
            "step_ms_last_chunk": statistics.mean(chunk_ms[-1]["denoise_ms"]),
            "chunks": chunk_ms, "cache_gib": best["cache_bytes"] / 2**30,
        })
        if args.full:
            x = torch.randn(1, 16, n_lat, args.height // 8, args.width // 8, device=DEVICE)
            t = torch.full((1,), 500.0, device=DEVICE)
            times = []
            with torch.no_grad():
                for i in range(args.reps + 1):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    model(x, t, ctx)
                    torch.cuda.synchronize()
                    if i:
                        times.append(time.perf_counter() - t0)
            res["full_bidir_forward_s"] = statistics.median(times)
    return res


@torch.no_grad()
def chunked_forward(model: WanModel, x, t, ctx, fpc: int) -> torch.Tensor:
    """Each chunk once at t, committed: equals the full block-causal forward at t."""
    b, _, f, h, w = x.shape
    cache = model.new_cache(b, (h, w), max_frames=f)
    model.set_prompt(cache, ctx)
    outs = [model.forward_chunk(x[:, :, s:s + fpc], t, cache, start_frame=s, update_cache=True)
            for s in range(0, f, fpc)]
    return torch.cat(outs, dim=2)


@torch.no_grad()
def correctness(model: WanModel, backends: list[str], args) -> dict:
    n_lat = args.chunks * args.fpc
    g = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(1, 16, n_lat, args.height // 8, args.width // 8, device=DEVICE, generator=g)
    ctx = torch.randn(1, 512, model.cfg.text_dim, device=DEVICE, generator=g)
    t = torch.full((1,), 757.0, device=DEVICE)
    out: dict = {}
    # fp32 reference first, then free it
    m32 = copy.deepcopy(model).float()
    with attention_backend(m32, "sdpa"):
        ref32 = m32(x, t, ctx, frames_per_block=args.fpc)
    del m32
    torch.cuda.empty_cache()
    out["ref32_finite"] = bool(torch.isfinite(ref32).all())
    chunked = {}
    for name in backends:
        try:
            with attention_backend(model, name):
                full = model(x, t, ctx, frames_per_block=args.fpc)
                ch = chunked_forward(model, x, t, ctx, args.fpc)
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        chunked[name] = ch
        out[name] = {
            "chunked_vs_full_bf16": rel_err(ch, full),
            "full_bf16_vs_fp32": rel_err(full, ref32),
            "chunked_bf16_vs_fp32": rel_err(ch, ref32),
            "finite": bool(torch.isfinite(ch).all()),
        }
    names = list(chunked)
    for i, a in enumerate(names):
        for b_ in names[i + 1:]:
            out[f"{a}_vs_{b_}_chunked"] = rel_err(chunked[a], chunked[b_])
    return out


def compile_blocks(model: WanModel, mode: str | None) -> None:
    """torch.compile every block's pointwise/linear work; attention stays eager (graph breaks), so
    attention_backend() keeps choosing the kernel. The per-layer lambda in forward_chunk is also seen by
    dynamo; it recompiles up to the recompile limit and then runs eager (harmless: it only calls
    the disabled ``WanCache._attend``)."""
    global _COMPILED
    _COMPILED = True
    WanCache._attend = torch.compiler.disable(WanCache._attend)
    for block in model.blocks:
        block.forward = torch.compile(block.forward, dynamic=False, mode=mode)


def profile_stream(model: WanModel, ctx: torch.Tensor, name: str, args, path: str | None) -> str:
    """One stream under torch.profiler; returns the top GPU kernels table."""
    from torch.profiler import ProfilerActivity, profile

    with attention_backend(model, name):
        timer = StepTimer(model)
        try:
            run_stream(model, ctx, args, timer)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run_stream(model, ctx, args, timer)
        finally:
            timer.remove()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    if path:
        Path(path).write_text(table)
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--chunks", type=int, default=7)
    p.add_argument("--fpc", type=int, default=3, help="latent frames per chunk")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--backends", default="sdpa,cudnn,flash,fa4")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--check", action="store_true")
    p.add_argument("--full", action="store_true", help="also time one bidirectional full forward")
    p.add_argument("--compile", default="", help="backends to run again with compiled blocks (after the eager runs)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: inductor default)")
    p.add_argument("--profile", default="", help="backend to profile one eager stream of (top kernels table)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    for b in backends + [b for b in (args.compile + "," + args.profile).split(",") if b]:
        if b not in BACKENDS:
            p.error(f"--backends: {b!r} not in {BACKENDS}")

    dev = torch.cuda.get_device_properties(0)
    info = {"device": dev.name, "torch": torch.__version__, "detected": repr(attn_ops.detect()),
            "args": vars(args)}
    print(json.dumps(info), flush=True)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = WanModel(WanConfig.preset(args.preset)).to(torch.bfloat16).eval()
    ctx = torch.randn(1, 512, model.cfg.text_dim, device=DEVICE, dtype=torch.bfloat16)
    info["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    results: dict = {"info": info, "runs": []}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    if args.check:
        t0 = time.perf_counter()
        try:
            results["check"] = correctness(model, backends, args)
        except Exception:  # noqa: BLE001 - reported
            results["check"] = {"error": traceback.format_exc()}
        results["check"]["seconds"] = time.perf_counter() - t0
        print("check:", json.dumps(results["check"]), flush=True)
        save()

    for name in backends:
        try:
            r = bench_backend(model, ctx, name, args)
        except Exception as exc:  # noqa: BLE001 - reported
            traceback.print_exc()
            r = {"backend": name, "error": f"{type(exc).__name__}: {exc}"[:500]}
        results["runs"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "chunks"}), flush=True)
        save()

    if args.profile:
        try:
            prof_path = str(Path(args.json).with_suffix(".profile.txt")) if args.json else None
            print(profile_stream(model, ctx, args.profile, args, prof_path), flush=True)
        except Exception:  # noqa: BLE001 - reported
            traceback.print_exc()

    compiled = [b for b in args.compile.split(",") if b]
    if compiled:
        compile_blocks(model, args.compile_mode)
    for name in compiled:
        t0 = time.perf_counter()
        label = f"{name}+compile" + (f"({args.compile_mode})" if args.compile_mode else "")
        try:
            r = bench_backend(model, ctx, name, args)
            r["backend"] = label
            r["compile_and_bench_s"] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - reported
            traceback.print_exc()
            r = {"backend": label, "error": f"{type(exc).__name__}: {exc}"[:500]}
        results["runs"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "chunks"}), flush=True)
        save()

    print(f"\nWan {args.preset} stream {args.width}x{args.height}, {args.chunks}x{args.fpc} latent frames, "
          f"{args.steps}+1 forwards/chunk, bf16, {dev.name}")
    print(f"{'backend':<16}{'wall s':>8}{'lat f/s':>9}{'video fps':>10}{'step ms':>9}{'1st/last':>14}"
          f"{'peak GiB':>9}{'full fwd s':>11}")
    for r in results["runs"]:
        if "error" in r:
            print(f"{r['backend']:<16} ERROR {r['error'][:90]}")
            continue
        fl = r.get("full_bidir_forward_s")
        print(f"{r['backend']:<16}{r['wall_median_s']:>8.3f}{r['latent_fps']:>9.2f}{r['video_fps']:>10.2f}"
              f"{r['step_ms_mean']:>9.1f}{r['step_ms_first_chunk']:>7.1f}/{r['step_ms_last_chunk']:<6.1f}"
              f"{r['peak_gib']:>9.2f}{(f'{fl:.3f}' if fl else '-'):>11}")
    if "check" in results:
        print("check:", json.dumps({k: v for k, v in results["check"].items()}))
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
