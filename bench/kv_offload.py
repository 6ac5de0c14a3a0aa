"""One streaming session within a GPU memory budget (issue 15): the planned layout (streamgen/plan.py:
resident blocks + streamed blocks, KV cache streamed layer by layer, FFN token slices) against the
PCIe bound, and 1.3B offloaded against resident.

    PYTHONPATH=. python bench/kv_offload.py --json $OUT/kv_offload.json          # the GPU run (H200/H100)
    PYTHONPATH=. python bench/kv_offload.py --device cpu --variants tiny-smoke   # CPU smoke run (seconds)

What is timed: ``SessionState.next_chunk()`` of one session (random weights, a random 512-token
prompt, no decoder), 3 latent frames a chunk at 832x480 (4680 tokens), 4 self-forcing steps + the
cache pass (5 forwards), a 12-frame window with 3 sink frames; ``--warmup`` chunks first, then
``--chunks`` chunks (the window rolls from chunk 4 on), each between CUDA events; the median is
reported. Peak = ``torch.cuda.max_memory_allocated`` over the timed chunks (weights, slots, caches,
activations; not the CUDA context), also ``max_memory_reserved``. "moved" = bytes copied host to
device per chunk, counted by the offload handle and the KV stores; "H2D GB/s" = one pinned block-
sized buffer copied alone (median of 10); "bound" = moved / that bandwidth, the PCIe floor of a
chunk; "x bound" = ms / bound (goal: <= 1.10), "x max(resident, bound)" = ms / the larger of the
resident time of the same weights and the bound (the floor when compute outweighs the copies). "plan" columns: the planner's estimate of the peak
and of the bytes moved, beside what was measured.

Variants (``--variants``, comma-separated):
  1.3b-resident, 1.3b-offload2 (blocks streamed, prefetch 2; KV resident), 1.3b-offload2-kv (KV
  streamed too), 14b-fp8-resident (compute reference), 14b-plan8 (bf16 in 8 GiB), 14b-fp8-plan8
  (fp8 weights + fp8 KV in 8 GiB), 14b-fp8-plan8-disk (the same, its streamed blocks read from a
  safetensors file by ``--readers`` threads: written just before, so from the page cache), 14b-resident
  (bf16 compute reference); tiny-smoke / tiny-plan / tiny-plan-disk (the tiny model at 64x64, any device).
A plan variant whose measured peak exceeds its budget is run once more, planned for the budget less
the overshoot ("-fit"; ``--no-fit`` to skip): the planner's activation estimate is unverified on a GPU.
The model of one preset is built once (random weights on the device, bf16), quantized in place
before its fp8 variants; each variant's transforms are removed after it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import random_wan  # noqa: E402
from streamgen.ops.kvcache import kv_cache  # noqa: E402
from streamgen.ops.offload import offload  # noqa: E402
from streamgen.ops.quant import quantize  # noqa: E402
from streamgen.plan import GIB, make_plan  # noqa: E402
from streamgen.sampling.stream import SessionState, StreamConfig  # noqa: E402

# name -> (Wan preset, weight quant, layout, width, height); layout: "resident", "offload:P", "offload-kv:P",
# "plan:GIB[:MARGIN_MIB]", "plan-disk:..." (the plan with its streamed blocks read from a safetensors file)
VARIANTS = {
    "1.3b-resident": ("wan2.1-t2v-1.3b", None, None, "resident", 832, 480),
    "1.3b-offload2": ("wan2.1-t2v-1.3b", None, None, "offload:2", 832, 480),
    "1.3b-offload2-kv": ("wan2.1-t2v-1.3b", None, None, "offload-kv:2", 832, 480),
    "14b-resident": ("wan2.1-t2v-14b", None, None, "resident", 832, 480),
    "14b-plan8": ("wan2.1-t2v-14b", None, None, "plan:8", 832, 480),
    "14b-fp8-resident": ("wan2.1-t2v-14b", "fp8", None, "resident", 832, 480),
    "14b-fp8-plan8": ("wan2.1-t2v-14b", "fp8", "fp8", "plan:8", 832, 480),
    "14b-fp8-plan8-disk": ("wan2.1-t2v-14b", "fp8", "fp8", "plan-disk:8", 832, 480),
    "tiny-smoke": ("tiny", None, None, "offload-kv:1", 64, 64),
    "tiny-plan": ("tiny", None, "fp8", "plan:0.004:0", 64, 64),  # 4 MiB, no margin: streams
    "tiny-plan-disk": ("tiny", None, "fp8", "plan-disk:0.004:0", 64, 64),
}
DEFAULT = ("1.3b-resident,1.3b-offload2,1.3b-offload2-kv,14b-resident,14b-plan8,14b-fp8-resident,14b-fp8-plan8,"
           "14b-fp8-plan8-disk")


def h2d_gbps(nbytes: int, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(12):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return nbytes / statistics.median(times[2:]) / 1e9


def apply_layout(model, layout: str, device, args, kv_quant, weight_quant, w, h):
    """-> (handles, plan or None)."""
    kind, _, arg = layout.partition(":")
    if kind == "resident":
        handles = [kv_cache(model, quant=kv_quant)] if kv_quant else []
        return handles, None
    if kind in ("offload", "offload-kv"):
        handles = [offload(model, device=device, prefetch=int(arg))]
        if kind == "offload-kv" or kv_quant:
            handles.append(kv_cache(model, offload=kind == "offload-kv", prefetch=1, quant=kv_quant))
        return handles, None
    if kind in ("plan", "plan-disk"):
        gib, _, margin = arg.partition(":")
        plan = make_plan(model.cfg, width=w, height=h, budget_bytes=int(float(gib) * GIB), model=args.preset_name,
                         window_frames=args.local_frames, steps=args.steps, dtype=args.dtype,
                         weight_quant=weight_quant, kv_quant=kv_quant, margin=int(margin) << 20 if margin else None)
        if not plan.fits:
            raise RuntimeError(plan.reason)
        if kind == "plan":
            return plan.apply(model, device=device), plan
        from safetensors.torch import save_file

        path = Path(args.disk_dir) / "kv_offload_model.safetensors"
        t0 = time.perf_counter()
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
        print(f"# wrote {path.stat().st_size / 1e9:.1f} GB to {path} in {time.perf_counter() - t0:.1f} s "
              "(it sits in the page cache: the reads below are page cache -> pinned staging)", flush=True)
        args.cleanup.append(path)
        return plan.apply(model, device=device, source="disk", path=path, readers=args.readers), plan
    raise ValueError(f"layout {layout!r}")


def moved_bytes(handles) -> int:
    n = 0
    for h in handles:
        if hasattr(h, "stats"):  # the FFN-slicing handle moves nothing
            st = h.stats()
            n += st.get("bytes_copied", 0) + st.get("bytes_in", 0)
    return n


def run_variant(model, name, spec, device, args, bw) -> dict:
    preset, wq, kq, layout, w, h = spec
    args.preset_name = preset
    t0 = time.perf_counter()
    handles, plan = apply_layout(model, layout, device, args, kq, wq, w, h)
    try:
        return _measure(model, name, spec, device, args, bw, handles, plan, time.perf_counter() - t0)
    finally:  # a failing variant leaves the model as it found it for the next one
        for hd in reversed(handles):
            hd.remove()


def _measure(model, name, spec, device, args, bw, handles, plan, setup_s) -> dict:
    preset, wq, kq, layout, w, h = spec
    cuda = device.type == "cuda"
    cfg = StreamConfig(num_steps=args.steps, local_frames=args.local_frames, sink_frames=args.sink_frames, seed=0)
    g = torch.Generator(device=device).manual_seed(1)
    ctx = torch.randn(1, min(512, model.cfg.text_len), model.cfg.text_dim, device=device, generator=g).to(args.dtype)
    session = SessionState(model, ctx, height=h, width=w, config=cfg, device=device, dtype=args.dtype)
    with torch.no_grad():
        for _ in range(args.warmup):
            session.next_chunk()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        before = moved_bytes(handles)
        times = []
        for _ in range(args.chunks):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                session.next_chunk()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                session.next_chunk()
                times.append((time.perf_counter() - t) * 1e3)
        moved = (moved_bytes(handles) - before) / args.chunks
    ms = statistics.median(times)
    row = {"variant": name, "preset": preset, "weight_quant": wq, "kv_quant": kq, "layout": layout, "size": f"{w}x{h}",
           "ms_per_chunk": ms, "ms_min": min(times), "moved_gb_per_chunk": moved / 1e9, "setup_s": setup_s,
           "peak_gib": torch.cuda.max_memory_allocated(device) / GIB if cuda else None,
           "reserved_gib": torch.cuda.max_memory_reserved(device) / GIB if cuda else None,
           "h2d_gbps": bw, "bound_ms": (moved / (bw * 1e9) * 1e3) if bw else None}
    row["x_bound"] = ms / row["bound_ms"] if row["bound_ms"] else None
    if plan is not None:
        row.update(plan_total_gib=plan.total / GIB, plan_moved_gb=plan.h2d_bytes / 1e9,
                   plan_resident_blocks=len(plan.resident_blocks), plan_streamed_blocks=plan.streamed_blocks,
                   plan_kv_offload=plan.kv_offload, plan_ffn_tokens=plan.ffn_tokens, plan_lines=plan.lines(bw or 53.0))
    del session
    return row


def fit_variant(name: str, row: dict, args):
    """A plan variant whose measured peak exceeded its budget -> (name, spec) of the same plan for
    the budget less the overshoot (and 0.1 GiB), or None (``--no-fit``, fitted, other variants)."""
    preset, wq, kq, layout, w, h = VARIANTS[name]
    kind, _, arg = layout.partition(":")
    if not args.fit or not kind.startswith("plan") or row.get("peak_gib") is None:
        return None
    gib, _, margin = arg.partition(":")
    over = row["peak_gib"] - float(gib)
    if over <= 0:
        return None
    fitted = float(gib) - over - 0.1
    if fitted <= 0:
        return None
    return f"{name}-fit", (preset, wq, kq, f"{kind}:{fitted:.2f}" + (f":{margin}" if margin else ""), w, h)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=DEFAULT, help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--local-frames", type=int, default=12)
    ap.add_argument("--sink-frames", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--no-fit", dest="fit", action="store_false",
                    help="do not re-plan a plan variant whose measured peak exceeded its budget")
    ap.add_argument("--readers", type=int, default=4, help="disk variants: reader threads (default 4)")
    ap.add_argument("--disk-dir", default=None, help="disk variants: where the model file goes (default: a temp dir)")
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {', '.join(bad)}; allowed: {', '.join(VARIANTS)}")
    device = torch.device(args.device)
    args.cleanup = []
    if args.disk_dir is None:
        import tempfile

        args.disk_dir = tempfile.mkdtemp(prefix="kv_offload_")
    args.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    rows, model, built = [], None, None
    bw = h2d_gbps(256 << 20, device)
    if bw:
        print(f"# pinned H2D, 256 MiB alone: {bw:.1f} GB/s", flush=True)
    def record(row: dict) -> None:  # one variant's row: temporary files gone, kept, printed
        for path in args.cleanup:
            path.unlink(missing_ok=True)
        args.cleanup.clear()
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "plan_lines"}), flush=True)
        for line in row.get("plan_lines", []):
            print("#", line, flush=True)

    for name in names:
        preset, wq = VARIANTS[name][0], VARIANTS[name][1]
        try:
            if built is None or built[0] != preset or (built[1] is not None and wq is None):
                model = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                model = random_wan(preset, device, args.dtype)
                built = (preset, None)
            if wq is not None and built[1] is None:
                quantize(model, wq)
                built = (preset, wq)
            row = run_variant(model, name, VARIANTS[name], device, args, bw)
        except Exception as exc:  # one variant failing must not lose the others' numbers
            traceback.print_exc()
            row = {"variant": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
        record(row)
        refit = fit_variant(name, row, args)
        if refit is not None:  # the estimate missed: plan again for the budget minus the overshoot
            fit_name, spec = refit
            print(f"# {name}: peak {row['peak_gib']:.2f} GiB over its budget; again as {fit_name} ({spec[3]})", flush=True)
            try:
                row = run_variant(model, fit_name, spec, device, args, bw)
            except Exception as exc:
                traceback.print_exc()
                row = {"variant": fit_name, "error": f"{type(exc).__name__}: {exc}"[:300]}
            record(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    ref = {(r["preset"], r["weight_quant"]): r["ms_per_chunk"] for r in rows
           if r.get("layout") == "resident" and "ms_per_chunk" in r}
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    print("\n| variant | ms / chunk | vs resident | peak GiB | reserved GiB | plan GiB | moved GB / chunk | plan GB "
          "| bound ms | x bound | x max(resident, bound) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | error: {r['error'][:80]} |")
            continue
        res = ref.get((r["preset"], r["weight_quant"]))
        vs = r["ms_per_chunk"] / res if res else None
        floor = max(res or 0.0, r["bound_ms"] or 0.0)
        xf = r["ms_per_chunk"] / floor if floor else None
        print(f"| {r['variant']} | {r['ms_per_chunk']:.1f} | {f(vs, '.2f')} | {f(r['peak_gib'], '.2f')} | "
              f"{f(r['reserved_gib'], '.2f')} | {f(r.get('plan_total_gib'), '.2f')} | {r['moved_gb_per_chunk']:.1f} | "
              f"{f(r.get('plan_moved_gb'), '.1f')} | {f(r['bound_ms'], '.0f')} | {f(r['x_bound'], '.2f')} | {f(xf, '.2f')} |")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
