"""One stream over N GPUs against one GPU: Ulysses and ring sequence parallelism and the block pipeline (issue 17).

    torchrun --nproc-per-node 2 bench/parallel.py --json $OUT/parallel2.json      # 1.3B + 14B, 832x480, bf16, NCCL
    torchrun --nproc-per-node 4 bench/parallel.py --modes ulysses,ring,pipeline \\
        --presets wan2.1-t2v-1.3b,wan2.1-t2v-14b --json $OUT/parallel4.json
    torchrun --standalone --nproc-per-node 2 bench/parallel.py --smoke            # dry run: CPU, gloo, tiny, fp32

Every rank builds the same model (random weights made in place, seed 0, as bench/common.py's ``random_wan``;
a float64 fingerprint of the weights is compared across the ranks, and rank 0's are broadcast if they differ)
and the same 512-token random prompt, and for each ``--modes`` entry wraps it (``SequenceParallelWan(model,
mode="ulysses"|"ring")``, ``PipelineParallelWan(model)``) and runs the same ``SessionState`` with the same seed
(SPMD). A combination that does not fit (Ulysses: heads and a chunk's tokens divisible by N; ring: a frame's tokens
divisible by N; pipeline: at least one block a rank) is skipped with one line. Then rank 0 runs the bare model alone
(the "one rank" row: the speed-up's base and the numerics' reference), in the same process, the other ranks
waiting; ``--no-check`` leaves it out, and a CUDA out-of-memory there drops that row and the checks only.
``--smoke`` (the dry run): configs ``tiny`` (2N heads of 32, at least 3 blocks: every mode fits) and ``tiny-3h``
(3 heads: Ulysses skipped at N = 2), float32, 64x64, on the CPU with gloo, the same code path otherwise.

What is timed, per row: ``--warmup`` streams, then ``--reps`` timed streams of ``--chunks``
``SessionState.next_chunk()`` calls (4 self-forcing steps + the cache pass at t=0 per chunk of ``--fpc`` latent
frames, no decoder), with the attention window the server uses (``--window 12:3``: 12 latent frames, 3 of them
sinks; it rolls from the fifth chunk), a new session per stream, the ranks released together by a barrier. Wall: the
first ``next_chunk`` to the final synchronize, on rank 0 (every forward ends in a collective, the all-gather or the
last stage's broadcast, so the ranks finish together); per chunk: CUDA events on rank 0 (host clock on the CPU).
Generated fps = 4 video frames per latent frame / wall (not RIFE-doubled), median of the reps. First chunk = open
-> first chunk (session construction, cache and prompt K/V included), warm, median. Peak memory per rank:
``torch.cuda.max_memory_allocated`` over the timed streams (weights included), gathered to rank 0; on the CPU the
process's peak RSS (``ru_maxrss``: since the start, not per row). "cache GiB": one rank's ``WanCache.nbytes``.

Numerics: the clean latents of the first 2 chunks of the last timed stream against the one-rank row's (same seed,
so the same noise): max |diff| and rel = ||split - one|| / ||one||; the check passes if rel <= ``--tol`` (bf16:
2e-2, fp32: 1e-5) and every rank's latents equal rank 0's bit for bit (SPMD: every rank samples from the same
gathered flow). The script exits 1 if a check fails or a row errors (a skip is not a failure). The bf16 bound is a
guess (GEMMs over 1/N of the tokens may round differently), not yet measured: the first GPU run calibrates it.

Honest notes: both wrappers keep the full weights on every rank (the pipeline runs only its blocks), so the peak
memory splits only the KV cache and activations. Ring runs its own float32 matmul-softmax kernel (no flash), so its
row times that kernel as much as the split. The one-rank row runs with the other ranks idle, on rank 0's GPU. An
error raised on one rank only (a CUDA OOM in a split row, say) leaves the others in a collective until
``--timeout-min``. The CPU smoke's times (two ranks on two cores, one thread each) say nothing about GPUs. So far
only the dry run has run (tests/test_bench_parallel.py); the CUDA/NCCL path has not.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Clock, random_model  # noqa: E402
from streamgen.models.wan import WanConfig, WanModel  # noqa: E402
from streamgen.ops.attention import BACKENDS, use_backend  # noqa: E402
from streamgen.parallel.pipeline import PipelineParallelWan  # noqa: E402
from streamgen.parallel.sequence import SequenceParallelWan  # noqa: E402
from streamgen.sampling.stream import SessionState, StreamConfig  # noqa: E402

MODES = ("ulysses", "ring", "pipeline")
ONE = "one rank"
CHECK_CHUNKS = 2  # chunks of each stream whose latents are compared
TOL = {"bf16": 2e-2, "fp32": 1e-5}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SMOKE_PRESETS = ("tiny", "tiny-3h")
T0 = time.perf_counter()


def model_config(name: str, world: int) -> WanConfig:
    """A named Wan preset, or a smoke config: ``tiny`` with 2N heads of 32 (every mode fits), ``tiny-3h`` with 3
    heads (Ulysses skipped where N does not divide 3); at least 3 blocks and one a rank."""
    if name not in SMOKE_PRESETS:
        return WanConfig.preset(name)
    heads = 2 * world if name == "tiny" else 3
    return WanConfig.preset("tiny", num_heads=heads, dim=32 * heads, num_layers=max(3, world))


@torch.no_grad()
def same_weights_everywhere(model: WanModel) -> bool:
    """True if every rank's weights have rank 0's float64 fingerprint; else rank 0's are broadcast (returns False)."""
    p0 = next(model.parameters())
    fp = torch.zeros(1, dtype=torch.float64, device=p0.device)
    for p in model.parameters():
        fp += p.double().sum()
    fps = [torch.empty_like(fp) for _ in range(dist.get_world_size())]
    dist.all_gather(fps, fp)
    if all(torch.equal(f, fps[0]) for f in fps):
        return True
    for p in model.parameters():
        dist.broadcast(p.data, 0)
    return False


def misfit(mode: str, cfg: WanConfig, world: int, latent_hw: tuple[int, int], fpc: int) -> str | None:
    """Why ``mode`` cannot split this model over ``world`` ranks at this size (one line), or None."""
    _, ph, pw = cfg.patch_size
    tpf = (latent_hw[0] // ph) * (latent_hw[1] // pw)
    if mode == "ulysses":
        if cfg.num_heads % world:
            return f"num_heads={cfg.num_heads} is not divisible by {world} ranks (Ulysses splits the heads)"
        if fpc * tpf % world:
            return f"a chunk's {fpc * tpf} tokens are not divisible by {world} ranks"
    if mode == "ring" and tpf % world:
        return f"a frame's {tpf} tokens are not divisible by {world} ranks (ring splits each frame's tokens)"
    if mode == "pipeline" and cfg.num_layers < world:
        return f"{cfg.num_layers} blocks cannot give each of {world} ranks one (pipeline)"
    return None


def wrap(model: WanModel, mode: str):
    if mode == "pipeline":
        return PipelineParallelWan(model)
    return SequenceParallelWan(model, mode=mode)


def peak_bytes(clock: Clock) -> int:
    if clock.cuda:
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@torch.no_grad()
def stream(model, ctx: torch.Tensor, args, clock: Clock, together: bool) -> dict:
    """One stream of ``args.chunks`` chunks in a new session; ``together``: all ranks start it at once."""
    clock.sync()
    if together:
        dist.barrier()
    t_open = time.perf_counter()
    local, sink = args.window_frames
    cfg = StreamConfig(frames_per_chunk=args.fpc, num_steps=args.steps, local_frames=local, sink_frames=sink,
                       seed=args.seed)
    sess = SessionState(model, ctx, height=args.height, width=args.width, config=cfg,
                        total_frames=None if local else args.chunks * args.fpc)
    clock.sync()
    t0 = time.perf_counter()
    marks, lat, first_s = [clock.mark()], [], 0.0
    for i in range(args.chunks):
        chunk = sess.next_chunk()
        if i < CHECK_CHUNKS:
            lat.append(chunk.latents.clone())
        marks.append(clock.mark())
        if i == 0:
            clock.sync()
            first_s = time.perf_counter() - t_open
    clock.sync()
    wall = time.perf_counter() - t0
    out = {"wall_s": wall, "first_chunk_s": first_s, "chunk_ms": [clock.ms(a, b) for a, b in zip(marks, marks[1:])],
           "cache_bytes": sess.cache.nbytes, "latents": lat}
    del sess
    return out


def measure(model, ctx: torch.Tensor, args, clock: Clock, together: bool) -> dict:
    """Warm-up streams, then the timed ones: this rank's summary (and the last stream's first latents)."""
    for _ in range(args.warmup):
        stream(model, ctx, args, clock, together)
    gc.collect()
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    reps = [stream(model, ctx, args, clock, together) for _ in range(args.reps)]
    frames = 4 * args.chunks * args.fpc
    fps = [frames / r["wall_s"] for r in reps]
    return {
        "fps": statistics.median(fps), "fps_all": [round(x, 3) for x in fps],
        "wall_median_s": statistics.median(r["wall_s"] for r in reps),
        "first_chunk_s": statistics.median(r["first_chunk_s"] for r in reps),
        "chunk_ms_median": statistics.median(ms for r in reps for ms in r["chunk_ms"]),
        "chunk0_ms_median": statistics.median(r["chunk_ms"][0] for r in reps),
        "last_chunk_ms": [round(x, 2) for x in reps[-1]["chunk_ms"]],
        "peak_bytes": peak_bytes(clock), "cache_bytes": reps[-1]["cache_bytes"],
        "latents": reps[-1]["latents"],
    }


def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    x, y = torch.cat(a, dim=2).double(), torch.cat(b, dim=2).double()
    return {"max_abs": float((x - y).abs().max()), "rel": float((x - y).norm() / y.norm()),
            "equal": bool(torch.equal(x, y)), "finite": bool(torch.isfinite(x).all())}


def gib(n: float) -> float:
    return round(n / 2**30, 4)


def split_row(preset: str, mode: str, model: WanModel, ctx: torch.Tensor, args, clock: Clock) -> tuple[dict, list]:
    """One mode over all ranks (every rank calls it): the row (complete on rank 0) and rank 0's latents."""
    world, rank = dist.get_world_size(), dist.get_rank()
    row: dict = {"preset": preset, "mode": mode, "ranks": world}
    t0 = time.perf_counter()
    mine, err = None, None
    try:
        mine = measure(wrap(model, mode), ctx, args, clock, together=True)
    except Exception as exc:  # noqa: BLE001 - reported; raised on every rank alike, or the collectives hang
        traceback.print_exc()
        err = f"{type(exc).__name__}: {exc}"[:300]
    errs = [None] * world
    dist.all_gather_object(errs, err)
    if any(errs):
        row["error"] = next(e for e in errs if e)
        return row, []
    lat = mine.pop("latents")
    x = torch.cat(lat, dim=2).contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    summaries = [None] * world
    dist.all_gather_object(summaries, {k: mine[k] for k in ("peak_bytes", "cache_bytes", "wall_median_s")})
    row.update({k: v for k, v in mine.items() if k not in ("peak_bytes", "cache_bytes")})
    row["peak_gib"] = [gib(s["peak_bytes"]) for s in summaries]
    row["cache_gib"] = [gib(s["cache_bytes"]) for s in summaries]
    row["cache_bytes"] = [s["cache_bytes"] for s in summaries]
    row["wall_median_s_per_rank"] = [round(s["wall_median_s"], 4) for s in summaries]
    row["ranks_max_abs"] = max(float((p - parts[0]).abs().max()) for p in parts)
    row["row_s"] = round(time.perf_counter() - t0, 1)
    if rank == 0:
        print(f"# {preset} {mode} x{world}: {row['fps']:.2f} fps, {row['row_s']} s", flush=True)
    return row, lat


def one_rank_row(preset: str, model: WanModel, ctx: torch.Tensor, args, clock: Clock) -> tuple[dict, list]:
    """The bare model on rank 0 alone (only rank 0 calls it)."""
    row: dict = {"preset": preset, "mode": ONE, "ranks": 1}
    t0 = time.perf_counter()
    mine = None
    try:  # rank 0 alone: an error here leaves no collective hanging, so every error is caught
        mine = measure(model, ctx, args, clock, together=False)
    except torch.cuda.OutOfMemoryError as exc:
        row["skipped"] = f"out of memory on one GPU (no one-rank row, no check): {str(exc)[:120]}"
    except Exception as exc:  # noqa: BLE001 - reported
        traceback.print_exc()
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    if mine is None:
        gc.collect()
        if clock.cuda:
            torch.cuda.empty_cache()
        return row, []
    lat = mine.pop("latents")
    row.update({k: v for k, v in mine.items() if k not in ("peak_bytes", "cache_bytes")})
    row["peak_gib"], row["cache_gib"] = [gib(mine["peak_bytes"])], [gib(mine["cache_bytes"])]
    row["cache_bytes"] = [mine["cache_bytes"]]
    row["row_s"] = round(time.perf_counter() - t0, 1)
    print(f"# {preset} {ONE}: {row['fps']:.2f} fps, {row['row_s']} s", flush=True)
    return row, lat


def run_preset(preset: str, args, clock: Clock, device: torch.device, dtype: torch.dtype) -> list[dict]:
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = model_config(preset, world)
    latent_hw = (args.height // 8, args.width // 8)
    model = use_backend(random_model(cfg, device, dtype, seed=0), args.attn)
    same = same_weights_everywhere(model)
    if rank == 0 and not same:
        print(f"# {preset}: the ranks' random weights differed; rank 0's were broadcast", flush=True)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=device,
                      generator=torch.Generator(device=device).manual_seed(1)).to(dtype)
    info = {"weights_gib": gib(sum(p.numel() * p.element_size() for p in model.parameters())),
            "heads": cfg.num_heads, "blocks": cfg.num_layers, "dim": cfg.dim, "same_random_weights": same}
    rows, lats = [], {}
    for mode in args.mode_list:
        why = misfit(mode, cfg, world, latent_hw, args.fpc)
        if why:
            if rank == 0:
                print(f"skip {preset} {mode} x{world}: {why}", flush=True)
            rows.append({"preset": preset, "mode": mode, "ranks": world, "skipped": why})
            continue
        row, lat = split_row(preset, mode, model, ctx, args, clock)
        rows.append(row)
        lats[mode] = lat
        gc.collect()
        if clock.cuda:
            torch.cuda.empty_cache()
    base = None
    if args.check:
        if rank == 0:
            base, base_lat = one_rank_row(preset, model, ctx, args, clock)
            rows.insert(0, base)
        dist.barrier()
    if rank == 0:
        for row in rows:
            row.update(info, dtype=args.dtype)
            if row["mode"] == ONE or "fps" not in row:
                continue
            if base is not None and "fps" in base:
                row["speedup_vs_one"] = row["fps"] / base["fps"]
                c = compare(lats[row["mode"]], base_lat)
                c["tol"] = args.tol
                c["ok"] = c["finite"] and c["rel"] <= args.tol and row["ranks_max_abs"] == 0.0
                row["check"] = c
    del model
    gc.collect()
    if clock.cuda:
        torch.cuda.empty_cache()
    return rows


def failures(rows: list[dict]) -> list[dict]:
    """The rows that make the run fail: an error, or a check over the tolerance (skips and unchecked rows do not)."""
    return [r for r in rows if "error" in r or not r.get("check", {}).get("ok", True)]


def cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else "-"


def table(rows: list[dict], args, info: dict) -> str:
    win = "no window" if not args.window_frames[0] else f"window {args.window_frames[0]}:{args.window_frames[1]}"
    lines = [f"{args.width}x{args.height}, {win}, {args.chunks}x{args.fpc} latent frames, "
             f"{args.steps}+1 forwards/chunk, {args.dtype}, {info['ranks']} ranks ({info['backend']}), "
             f"{info['devices'][0]}, torch {torch.__version__}, tol rel {args.tol:g}",
             "",
             "| preset | mode | ranks | fps | vs 1 rank | open->1st chunk s | ms/chunk | peak GiB per rank "
             "| cache GiB per rank | max abs | rel | check |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | --- |"]
    for r in rows:
        head = f"| {r['preset']} | {r['mode']} | {r['ranks']} |"
        if "skipped" in r or "error" in r:
            what = f"skipped: {r['skipped']}" if "skipped" in r else f"ERROR {r['error'][:120]}"
            lines.append(f"{head} {what} | | | | | | | | |")
            continue
        c = r.get("check")
        if r["mode"] == ONE:
            verdict, ma, rel = "reference", "-", "-"
        elif c is None:
            verdict, ma, rel = "not checked", "-", "-"
        else:
            verdict = ("ok" if c["ok"] else "FAIL") + (", bitwise" if c["equal"] else "")
            ma, rel = f"{c['max_abs']:.3g}", f"{c['rel']:.3g}"
        peak = " / ".join(f"{x:.2f}" for x in r["peak_gib"])
        cache = " / ".join(f"{x:.3f}" for x in r["cache_gib"])
        lines.append(f"{head} {r['fps']:.2f} | {cell(r, 'speedup_vs_one', '.2f')} | {r['first_chunk_s']:.3f} | "
                     f"{r['chunk_ms_median']:.1f} | {peak} | {cache} | {ma} | {rel} | {verdict} |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES), help="comma list of ulysses, ring, pipeline")
    p.add_argument("--presets", default=None, help="comma list of Wan presets (default: 1.3B and 14B; --smoke: "
                   + ", ".join(SMOKE_PRESETS) + ")")
    p.add_argument("--width", type=int, default=None, help="pixels (default 832; --smoke 64)")
    p.add_argument("--height", type=int, default=None, help="pixels (default 480; --smoke 64)")
    p.add_argument("--chunks", type=int, default=8, help="chunks a stream")
    p.add_argument("--fpc", type=int, default=3, help="latent frames a chunk")
    p.add_argument("--steps", type=int, default=4, help="self-forcing steps a chunk (plus the cache pass)")
    p.add_argument("--window", default="12:3", help="attention window L:S in latent frames (0: none, the whole stream)")
    p.add_argument("--reps", type=int, default=3, help="timed streams a row")
    p.add_argument("--warmup", type=int, default=1, help="untimed streams a row first")
    p.add_argument("--seed", type=int, default=0, help="the sessions' noise seed")
    p.add_argument("--attn", choices=BACKENDS, default="auto", help="attention backend of the bare model and Ulysses")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default cuda where there is one")
    p.add_argument("--tol", type=float, default=None, help="largest rel error a check passes (bf16 2e-2, fp32 1e-5)")
    p.add_argument("--no-check", dest="check", action="store_false", help="no one-rank row, no numerics")
    p.add_argument("--timeout-min", type=float, default=20.0,
                   help="collective timeout: the other ranks wait this long for rank 0's one-rank row")
    p.add_argument("--smoke", action="store_true", help="dry run: tiny configs, fp32, 64x64, CPU, gloo")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if "RANK" not in os.environ:
        p.error("launch with torchrun (RANK, WORLD_SIZE, MASTER_ADDR unset), e.g. "
                "torchrun --standalone --nproc-per-node 2 bench/parallel.py --smoke")
    smoke = args.smoke
    args.presets = args.presets or ",".join(SMOKE_PRESETS if smoke else ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b"))
    args.preset_list = [x for x in args.presets.split(",") if x]
    args.width = args.width or (64 if smoke else 832)
    args.height = args.height or (64 if smoke else 480)
    args.device = args.device or ("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.tol = TOL[args.dtype] if args.tol is None else args.tol
    args.mode_list = [m for m in args.modes.split(",") if m]
    for m in args.mode_list:
        if m not in MODES:
            p.error(f"--modes: {m!r} is not one of {', '.join(MODES)}")
    for name in args.preset_list:
        if name not in SMOKE_PRESETS:
            try:
                WanConfig.preset(name)
            except ValueError as exc:
                p.error(str(exc))
    w = [int(x) for x in args.window.split(":")] if args.window not in ("", "0") else [0, 0]
    if len(w) != 2:
        p.error("--window: L:S or 0")
    args.window_frames = (w[0] or None, w[1] if w[0] else None)
    for name, v in (("width", args.width), ("height", args.height)):
        if v % 16:
            p.error(f"--{name} {v}: must be a multiple of 16")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cuda = args.device == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:  # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=args.timeout_min), device_id=device if cuda else None)
    world, rank = dist.get_world_size(), dist.get_rank()
    clock = Clock(device)
    dtype = DTYPES[args.dtype]
    names = [None] * world
    dist.all_gather_object(names, torch.cuda.get_device_name(device) if cuda else "cpu")
    info = {"ranks": world, "backend": backend, "devices": names, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:], "dtype": args.dtype, "tol": args.tol,
            "size": f"{args.width}x{args.height}", "window": args.window, "chunks": args.chunks, "fpc": args.fpc,
            "steps": args.steps, "reps": args.reps, "warmup": args.warmup, "attn": args.attn}
    if rank == 0:
        print(json.dumps(info), flush=True)
    results: dict = {"info": info, "rows": []}
    try:
        for preset in args.preset_list:
            rows = run_preset(preset, args, clock, device, dtype)
            if rank == 0:
                for r in rows:
                    print(json.dumps(r, default=str), flush=True)
                results["rows"] += rows
                if args.json:
                    Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        failed = failures(results["rows"])
        if rank == 0:
            print()
            print(table(results["rows"], args, info))
            print(f"total {time.perf_counter() - T0:.0f} s"
                  + (f"; {len(failed)} row(s) failed (error, or a check over rel {args.tol:g})" if failed else ""))
        status = torch.tensor([len(failed)], dtype=torch.int64, device=device)
        dist.broadcast(status, 0)  # every rank exits with rank 0's verdict
        return 1 if int(status) else 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
