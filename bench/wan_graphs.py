"""DiT stream alone: eager vs compiled blocks vs CUDA graphs of the whole chunk step (streamgen.ops.graphs).

    PYTHONPATH=. python3 bench/wan_graphs.py --json $OUT/graphs.json              # 1.3B, 832x480, H100/H200
    PYTHONPATH=. python3 bench/wan_graphs.py --device cpu --preset tiny --height 64 --width 64 \\
        --variants eager,graphs --emulate --no-fp32-check                        # CPU smoke run

What is timed: streams of ``SessionState.next_chunk()`` (4 self-forcing steps + the cache pass at t=0,
no decoder), ``--chunks`` chunks of ``--fpc`` latent frames, random bf16 weights (bench/common.py), one
512-token prompt, seed 0, no attention window (the cache holds the whole stream, as bench/wan_stream.py).
Every session is new (construction + prompt K/V outside the stream time); with graphs it takes the
pooled cache of the previous one. Per stream: wall from the first ``next_chunk`` to the final
synchronize (one more synchronize after chunk 0 gives the open -> first chunk time, construction
included); per chunk: CUDA events. Generated fps = 4 * latent frames / wall (video frames, not RIFE-doubled).

Sessions per variant: "cold" ones first (eager: 1, process-cold for the first variant; compiled: 1,
compiling; graphs: 2, the first runs every layout eager, the second captures), then ``--reps`` timed
ones: median and min. Numerics: the timed streams' latents against the eager variant's (same seed, so
the same noise), max |diff| and ||a-b||/||b||; ``--fp32-check`` also runs 2 chunks of an fp32 copy of
the model (eager) and compares the bf16 eager and graph latents with it. ``--window L:S`` adds rows (``--window-variants``)
for a windowed stream (``local_frames=L, sink_frames=S``), where the slot layouts repeat within one session.
``--attn cudnn`` puts SDPA's cuDNN kernel first for the whole run (flash, efficient after it).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Clock, random_wan  # noqa: E402
from streamgen.ops.attention import use_backend  # noqa: E402
from streamgen.ops.compile import compile_blocks, uncompile_blocks  # noqa: E402
from streamgen.ops.graphs import ChunkGraphs, EmulatedGraph  # noqa: E402
from streamgen.sampling.stream import SessionState, StreamConfig  # noqa: E402

T0 = time.perf_counter()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def stream(model, ctx, args, clock: Clock, graphs: ChunkGraphs | None, window=None) -> dict:
    sync = clock.sync
    sync()
    t_open = time.perf_counter()
    cfg = StreamConfig(frames_per_chunk=args.fpc, num_steps=args.steps, seed=0)
    if window:
        cfg.local_frames, cfg.sink_frames = window
        sess = SessionState(model, ctx, height=args.height, width=args.width, config=cfg)
        n_chunks = args.window_chunks
    else:
        sess = SessionState(model, ctx, height=args.height, width=args.width, config=cfg,
                            total_frames=args.chunks * args.fpc)
        n_chunks = args.chunks
    attached = graphs.attach(sess) if graphs is not None else False
    sync()
    t0 = time.perf_counter()
    marks = [clock.mark()]
    lat = []
    first_s = None
    for i in range(n_chunks):
        lat.append(sess.next_chunk().latents)
        marks.append(clock.mark())
        if i == 0:
            sync()
            first_s = time.perf_counter() - t_open
    sync()
    wall = time.perf_counter() - t0
    chunk_ms = [clock.ms(a, b) for a, b in zip(marks, marks[1:])]
    del sess
    gc.collect()
    frames = 4 * n_chunks * args.fpc
    return {"wall_s": wall, "fps": frames / wall, "first_chunk_s": first_s, "chunk_ms": chunk_ms,
            "attached": attached, "latents": lat}


def run_variant(name: str, model, ctx, args, clock: Clock, window=None) -> dict:
    use_graphs = "graphs" in name
    factory = EmulatedGraph if args.emulate else None
    graphs = ChunkGraphs(model, graph_factory=factory) if use_graphs else None
    n_cold = 2 if use_graphs else 1
    if window and use_graphs:
        n_cold = 1  # the layouts repeat inside one windowed session: it warms up and captures
    cold = [stream(model, ctx, args, clock, graphs, window) for _ in range(n_cold)]
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    reps = [stream(model, ctx, args, clock, graphs, window) for _ in range(args.reps)]
    fps = [r["fps"] for r in reps]
    walls = [r["wall_s"] for r in reps]
    skip = args.steady_skip if window else 0
    steady = [ms for r in reps for ms in r["chunk_ms"][skip:]]
    res = {
        "variant": name + (f" window {window[0]}:{window[1]}" if window else ""),
        "fps_median": statistics.median(fps), "fps_min": min(fps), "fps_max": max(fps), "fps_all": fps,
        "wall_median_s": statistics.median(walls),
        "chunk_ms_median": statistics.median(steady),
        "chunk0_ms_median": statistics.median(r["chunk_ms"][0] for r in reps),
        "open_to_first_chunk_s_median": statistics.median(r["first_chunk_s"] for r in reps),
        "cold_first_chunk_s": [c["first_chunk_s"] for c in cold],
        "cold_wall_s": [c["wall_s"] for c in cold],
        "cold_chunk_ms": [[round(x, 1) for x in c["chunk_ms"]] for c in cold],
        "rep_chunk_ms": [round(x, 1) for x in reps[-1]["chunk_ms"]],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if clock.cuda else float("nan"),
        "latents": reps[-1]["latents"],
    }
    if graphs is not None:
        res["graphs"] = {"attached": reps[-1]["attached"], "enabled": graphs.enabled, "eager": graphs.stats.eager,
                         "captures": graphs.stats.captures, "replays": graphs.stats.replays,
                         "pooled": graphs.stats.pooled}
    del graphs
    gc.collect()
    return res


def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    n = min(len(a), len(b))
    x, y = torch.cat(a[:n], dim=2).float(), torch.cat(b[:n], dim=2).float()
    return {"rel_err": rel_err(x, y), "max_abs": float((x - y).abs().max()), "equal_bytes": bool(torch.equal(x, y)),
            "finite": bool(torch.isfinite(x).all())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--chunks", type=int, default=7)
    p.add_argument("--fpc", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--variants", default="eager,graphs,compile,compile+graphs")
    p.add_argument("--window", default="", help="L:S: also eager and graphs rows on a windowed stream")
    p.add_argument("--window-variants", default="eager,graphs", help="variants run on the windowed stream")
    p.add_argument("--window-chunks", type=int, default=10)
    p.add_argument("--attn", choices=("sdpa", "cudnn"), default="sdpa",
                   help="sdpa: SDPA's own kernel order; cudnn: cuDNN first (SDPA priority order), then flash, efficient")
    p.add_argument("--steady-skip", type=int, default=4, help="windowed rows: chunks per stream not in the median")
    p.add_argument("--emulate", action="store_true", help="EmulatedGraph instead of CUDA graphs (CPU smoke run)")
    p.add_argument("--no-fp32-check", dest="fp32_check", action="store_false")
    p.add_argument("--deadline", type=float, default=1e9, help="skip what is left after this many seconds")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    clock = Clock(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    info = {"attn": args.attn, "torch": torch.__version__, "device": torch.cuda.get_device_name(0) if clock.cuda else "cpu",
            "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:]}
    print(json.dumps(info), flush=True)
    torch.manual_seed(0)
    model = use_backend(random_wan(args.preset, device, dtype))
    ctx = torch.randn(1, 512, model.cfg.text_dim, device=device, dtype=dtype,
                      generator=torch.Generator(device=device).manual_seed(1))
    results: dict = {"info": info, "runs": [], "numerics": {}}
    lat: dict[str, list] = {}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))

    jobs = [(v, None) for v in args.variants.split(",") if v]
    if args.window:
        w = tuple(int(x) for x in args.window.split(":"))
        jobs += [(v, w) for v in args.window_variants.split(",") if v]
    if args.attn == "cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        sdpa_kernel(order, set_priority=True).__enter__()  # for the whole process
    compiled = False
    for name, window in jobs:
        if time.perf_counter() - T0 > args.deadline:
            print(f"skipped {name} (deadline)", flush=True)
            continue
        want_compile = "compile" in name
        if want_compile != compiled:
            if want_compile:
                compile_blocks(model)
            else:
                uncompile_blocks(model)
            compiled = want_compile
        t0 = time.perf_counter()
        try:
            r = run_variant(name, model, ctx, args, clock, window)
        except Exception as exc:  # noqa: BLE001 - reported
            traceback.print_exc()
            r = {"variant": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
        r["variant_s"] = time.perf_counter() - t0
        if "latents" in r:
            lat[r["variant"]] = r.pop("latents")
        results["runs"].append(r)
        print(json.dumps(r, default=str), flush=True)
        save()

    for k, v in lat.items():
        base = "eager" + (k[k.index(" window"):] if " window" in k else "")
        if base in lat and k != base:
            results["numerics"][f"{k} vs {base}"] = compare(v, lat[base])
        same = k.replace("compile+graphs", "compile").replace("graphs", "eager")  # the same variant without graphs
        if "graphs" in k and same != base and same in lat:
            results["numerics"][f"{k} vs {same}"] = compare(v, lat[same])

    if args.fp32_check and time.perf_counter() - T0 < args.deadline and "eager" in lat:
        try:
            uncompile_blocks(model)
            m32 = copy.deepcopy(model).float()
            a32 = copy.copy(args)
            a32.chunks = 2
            ref = stream(m32, ctx.float(), a32, clock, None)["latents"]
            for k in ("eager", "graphs", "compile", "compile+graphs"):
                if k in lat:
                    results["numerics"][f"{k} vs fp32 eager (2 chunks)"] = compare(lat[k][:2], ref)
            del m32, ref
        except Exception as exc:  # noqa: BLE001 - reported
            traceback.print_exc()
            results["numerics"]["fp32"] = f"error: {type(exc).__name__}: {exc}"[:300]
    save()

    print(f"\n{args.preset} stream {args.width}x{args.height}, {args.chunks}x{args.fpc} latent frames, "
          f"{args.steps}+1 forwards/chunk, {str(dtype)[6:]}, attn {args.attn}, {info['device']}, torch {torch.__version__}")
    print(f"{'variant':<24}{'fps med':>8}{'min':>7}{'ms/chunk':>9}{'open->1st s':>12}{'cold 1st s':>20}"
          f"{'peak GiB':>9}  graphs")
    for r in results["runs"]:
        if "error" in r:
            print(f"{r['variant']:<24} ERROR {r['error'][:100]}")
            continue
        cold = "/".join(f"{x:.2f}" for x in r["cold_first_chunk_s"])
        g = r.get("graphs")
        gs = f"cap {g['captures']} rep {g['replays']} eager {g['eager']} on={g['enabled']}" if g else ""
        print(f"{r['variant']:<24}{r['fps_median']:>8.2f}{r['fps_min']:>7.2f}{r['chunk_ms_median']:>9.1f}"
              f"{r['open_to_first_chunk_s_median']:>12.3f}{cold:>20}{r['peak_gib']:>9.2f}  {gs}")
    for k, v in results["numerics"].items():
        print(f"{k:<44} {v if isinstance(v, str) else json.dumps({a: (round(b, 6) if isinstance(b, float) else b) for a, b in v.items()})}")
    print(f"total {time.perf_counter() - T0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
