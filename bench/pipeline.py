"""The whole engine on the GPU: what a viewer of one stream gets, generated and output frames per second.

    PYTHONPATH=. python bench/pipeline.py --json $OUT/pipeline.json
    PYTHONPATH=. python bench/pipeline.py --variants wan --profile 4 --json $OUT/pipeline.json   # + trace summary

One engine per variant (``streamgen.engine.core.Engine``, the busy loop the server uses): Wan2.1 1.3B
block-causal DiT (random bf16 weights; 4 Self-Forcing steps + cache pass per chunk of 3 latent
frames, attention window 12 frames with 3 sink frames), the decoder (Wan VAE fp16, its default
decode path, or TAEHV fp16; ``+bf16``: bf16, the dtype `streamgen serve` loads it in), RIFE v4.26
``--interpolate``x (random weights, fp16, channels_last), uint8 conversion and the pinned host copy,
at 832x480. The H.264 encode runs on the server's CPU
threads (not timed here; see bench/BENCHMARKS.md).

Per variant: session 0 is the cold one (a fresh engine thread: kernel loading, cuDNN autotuning,
compilation); then ``--samples`` warm sessions of ``--chunks`` chunks each, every one opened after the
previous one ended. Per session: "1st chunk" = ``open()`` -> the first chunk on the host; steady state =
wall time per ``await handle.get()`` after the first ``--warmup`` chunks. "gen fps" = decoded frames / s
(before RIFE), "out fps" = output frames / s (gen x ``--interpolate``; real time at 16 fps generated
is out fps >= 32). Rows give min / median over the warm sessions. ``torch.backends.cudnn.benchmark``
is set for every variant (off unless the variant says ``+bench``), so no variant inherits another's.
``--profile N``: one more warm session of N steady chunks under torch.profiler; prints pinned host
allocations (cudaHostAlloc / cudaMallocHost) per chunk, D2H copy time, the uint8 conversion's GPU
time, and the GPU's idle time between kernels. Needs no av/diffusers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import random_wan  # noqa: E402
from streamgen.engine.core import Engine, EngineSettings, GenRequest, Pipeline  # noqa: E402
from streamgen.models.rife import IFNet, RIFEConfig  # noqa: E402
from streamgen.models.taehv import TAEHV, TAEHVConfig  # noqa: E402
from streamgen.models.text import load_text_encoder  # noqa: E402
from streamgen.models.wan import WanConfig, WanModel  # noqa: E402
from streamgen.models.wan_vae import WanVAE, WanVAEConfig  # noqa: E402
from streamgen.ops.attention import use_backend  # noqa: E402
from streamgen.ops.compile import compile_blocks  # noqa: E402
from streamgen.ops.fused import fuse_ffn_gelu  # noqa: E402
from streamgen.sampling.stream import SessionState  # noqa: E402


def build(decoder: str, compile_dit: bool, dev: torch.device, smoke: bool = False, ref: bool = False,
          bf16_decoder: bool = False, graphs: bool = False, quant: str | None = None, gelu: bool = False,
          attention: str = "auto", norm_rope: bool = False):
    """smoke: tiny configs in float32, to check the script on a CPU; ref: the Wan VAE's reference decode path;
    bf16_decoder: the decoder in bf16 (as `streamgen serve` loads it: the model dtype) instead of fp16;
    graphs: each session's chunk step replayed as CUDA graphs (``serve --cuda-graphs``); quant: "fp8" or
    "int8-weight" linears (``serve --quant``), applied before compiling, as streamgen.pipeline.build does;
    gelu: the FFN's GELU in its first GEMM's epilogue (streamgen.ops.fused). attention: ``use_backend``'s
    (auto: flash-attn where installed, else SDPA, as streamgen.pipeline.build; fp8: ops.fp8_attention);
    norm_rope: the q/k RMSNorm + RoPE as one kernel (ops.fused.fuse_norm_rope)."""
    torch.manual_seed(0)
    dt, ht = (torch.float32, torch.float32) if smoke else (torch.bfloat16, torch.float16)
    if smoke:
        model = WanModel(WanConfig.preset("tiny")).to(dev, dt).eval().requires_grad_(False)
    else:  # random weights made in place on the GPU (no fp32 host copy of 1.3B parameters)
        model = random_wan("wan2.1-t2v-1.3b", dev, dt).requires_grad_(False)
    if quant is not None:
        from streamgen.ops.quant import quantize

        model = quantize(model, quant)
    model = use_backend(model, attention)
    if gelu:
        fuse_ffn_gelu(model)
    if norm_rope:
        from streamgen.ops.fused import fuse_norm_rope

        fuse_norm_rope(model)
    compiled = compile_blocks(model) if compile_dit else False
    chunk_graphs = None
    if graphs:
        from streamgen.ops.graphs import ChunkGraphs

        chunk_graphs = ChunkGraphs(model)
    if decoder == "wan":
        dec_dt = torch.bfloat16 if bf16_decoder and not smoke else ht
        dec = WanVAE(WanVAEConfig.preset("tiny" if smoke else "wan2.1")).to(dev, dec_dt).eval().requires_grad_(False)
        dec.decode_impl = "reference" if ref else "auto"  # auto: the fast path on CUDA
    else:
        dec_dt = torch.bfloat16 if bf16_decoder and not smoke else ht
        dec = TAEHV(TAEHVConfig.preset("tiny" if smoke else "taew2.1")).init_random_(seed=1).to(dev, dec_dt).eval()
    rife = IFNet(RIFEConfig.preset("tiny" if smoke else "v4.26")).to(dev, ht).eval().requires_grad_(False)
    rife = rife.to(memory_format=torch.channels_last)
    text = load_text_encoder(None, dim=model.cfg.text_dim, device=dev, dtype=dt)
    return Pipeline(model=model, text_encoder=text, decoder=dec, rife=rife, device=dev, dtype=dt, graphs=chunk_graphs,
                    compiled=compiled)


def build_variant(variant: str, dev: torch.device, smoke: bool = False):
    """``DECODER[+compile][+graphs][+fp8][+ref][+bf16][+gelu][+fp8attn][+normrope]`` -> (pipeline, the options)."""
    decoder, *opts = variant.split("+")
    return build(decoder, "compile" in opts, dev, smoke, ref="ref" in opts, bf16_decoder="bf16" in opts,
                 graphs="graphs" in opts, quant="fp8" if "fp8" in opts else None, gelu="gelu" in opts,
                 attention="fp8" if "fp8attn" in opts else "auto", norm_rope="normrope" in opts), opts


async def run_stream(pipeline: Pipeline, args) -> dict:
    """Session 0 (cold), then ``args.samples`` warm sessions, one after the other on one engine."""
    engine = Engine(pipeline, EngineSettings(local_frames=12, sink_frames=3, max_ahead=1)).start()  # throughput: one ahead
    sessions = []
    try:
        for k in range(args.samples + 1 + (1 if args.profile else 0)):
            profiling = args.profile and k == args.samples + 1
            n = args.warmup + args.profile if profiling else args.chunks
            t_open = time.perf_counter()
            h = await engine.open(GenRequest(f"a red fox running through snow {k}", args.width, args.height,
                                             seed=k, chunks=n, interpolate=args.interpolate))
            times, frames, first, prof = [], [], None, None
            t_prev = t_open
            for i in range(n):
                if profiling and i == args.warmup:
                    prof = start_profile()
                out = await h.get()
                t = time.perf_counter()
                if first is None:
                    first = t - t_open
                if i >= args.warmup:
                    times.append(t - t_prev)
                    frames.append(out.shape[0])
                t_prev = t
            h.cancel()
            if profiling:
                prof.stop()
                sessions.append({"profile": summarize_profile(prof, len(times))})
                continue
            wall = sum(times)
            sessions.append({"first_chunk_s": first, "chunk_s": times, "out_frames": sum(frames),
                             "wall_s": wall, "out_fps": sum(frames) / wall,
                             "gen_fps": sum(frames) / args.interpolate / wall})
    finally:
        engine.close()
    warm = [s for s in sessions[1:] if "profile" not in s]
    r = {"cold_first_chunk_s": sessions[0]["first_chunk_s"], "sessions": sessions,
         "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0}
    for key in ("first_chunk_s", "gen_fps", "out_fps"):
        vals = [s[key] for s in warm]
        r[key + "_min"], r[key + "_median"], r[key + "_max"] = min(vals), statistics.median(vals), max(vals)
    r["chunk_s_median"] = statistics.median(t for s in warm for t in s["chunk_s"])
    prof = [s["profile"] for s in sessions if "profile" in s]
    if prof:
        r["profile"] = prof[0]
    return r


def start_profile():
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=acts)
    prof.start()
    return prof


def summarize_profile(prof, chunks: int) -> dict:
    """Counts and times from a torch.profiler trace of ``chunks`` steady-state chunks."""
    from torch.autograd import DeviceType

    events = prof.events()
    out: dict = {"chunks": chunks}
    host_alloc = [e for e in events if e.name in ("cudaHostAlloc", "cudaMallocHost", "cudaHostRegister")]
    out["pinned_allocs"] = len(host_alloc)
    out["pinned_alloc_ms"] = sum(e.cpu_time_total for e in host_alloc) / 1e3
    dev = [e for e in events if e.device_type == DeviceType.CUDA]
    d2h = [e for e in dev if "DtoH" in e.name or "Device -> Pinned" in e.name]
    out["d2h_copies"] = len(d2h)
    out["d2h_ms"] = sum(e.time_range.elapsed_us() for e in d2h) / 1e3
    syncs = [e for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")]
    out["host_syncs"] = len(syncs)
    spans = sorted((e.time_range.start, e.time_range.end) for e in dev)
    if spans:
        busy, gaps, (s0, e0) = 0.0, [], spans[0]
        first = s0
        for s1, e1 in spans[1:]:
            if s1 > e0:
                busy += e0 - s0
                gaps.append(s1 - e0)
                s0, e0 = s1, e1
            else:
                e0 = max(e0, e1)
        busy += e0 - s0
        window = e0 - first
        out["gpu_window_ms"] = window / 1e3
        out["gpu_busy_ms"] = busy / 1e3
        out["gpu_idle_ms"] = (window - busy) / 1e3
        out["gpu_idle_pct"] = 100 * (window - busy) / window
        out["gaps_over_1ms"] = sum(1 for g in gaps if g > 1e3)
        out["largest_gap_ms"] = max(gaps, default=0.0) / 1e3
    return out  # the uint8 conversion's kernels carry no names of their own: uint8_cost() times them


def uint8_cost(frames: int, width: int, height: int) -> dict:
    """GPU ms of unit_frames + to_uint8 on one chunk's frames, and whether the result is the torch path's."""
    from streamgen.media import frames as fr

    x = torch.rand(1, 3, frames, height, width, device="cuda", dtype=torch.float16) * 2 - 1
    x = x.contiguous(memory_format=torch.channels_last_3d)  # the decoder's layout

    def once(fused: bool):
        u = fr.unit_frames(x)
        return fr.to_uint8(u) if fused else fr._to_uint8_torch(u)

    out = {}
    for fused in (False, True):
        once(fused)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(10):
            once(fused)
        b.record()
        b.synchronize()
        out["fused_ms" if fused else "torch_ms"] = a.elapsed_time(b) / 10
    out["bytes_equal"] = bool(torch.equal(once(True).contiguous(), once(False).contiguous()))
    out["fused_path"] = fr.uint8_fused_available(x.device)
    return out


async def run_latency(pipeline: Pipeline, width: int, height: int, samples: int) -> dict:
    """The server's engine settings (on-demand chunks, window 12:3): the first chunk of a cold engine,
    then per warm session open -> first chunk, and, with the consumer taking chunks at real time,
    prompt change -> the first chunk made under the new prompt (both as the engine delivers them;
    the H.264 encode, the network and the player come on top)."""
    engine = Engine(pipeline, EngineSettings(local_frames=12, sink_frames=3)).start()
    out = {"open_first_chunk_s": [], "prompt_to_chunk_s": [], "prompt_mid_chunk_to_chunk_s": []}
    try:
        for k in range(samples + 1):
            t0 = time.perf_counter()
            h = await engine.open(GenRequest(f"a red fox {k}", width, height, seed=k, interpolate=2))
            frames = await h.get()
            dt = time.perf_counter() - t0
            if k == 0:
                out["cold_first_chunk_s"] = dt
            else:
                out["open_first_chunk_s"].append(dt)
            chunk_s = frames.shape[0] / (2 * pipeline.fps)
            for i in range(3):  # play at real time: the next chunk is asked for when this one is shown
                await asyncio.sleep(chunk_s)
                await h.get()
            t1 = time.perf_counter()
            h.set_prompt(f"a blue whale {k}")
            while True:
                await h.get()
                if h.last_switched:
                    break
            if k > 0:
                out["prompt_to_chunk_s"].append(time.perf_counter() - t1)
            # a prompt typed while a chunk is being made (0.2 s into it): that chunk is abandoned
            await asyncio.sleep(chunk_s)
            pending = asyncio.ensure_future(h.get())
            await asyncio.sleep(0.2)
            t2 = time.perf_counter()
            h.set_prompt(f"a green parrot {k}")
            await pending
            while not h.last_switched:
                await h.get()
            if k > 0:
                out["prompt_mid_chunk_to_chunk_s"].append(time.perf_counter() - t2)
            h.cancel()
        out["interrupted"] = engine.stats["interrupted"]
    finally:
        engine.close()
    for key in ("open_first_chunk_s", "prompt_to_chunk_s", "prompt_mid_chunk_to_chunk_s"):
        out[key + "_median"] = statistics.median(out[key])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="wan,taehv",
                    help="comma list of DECODER[+compile][+graphs][+fp8][+bench][+ref][+bf16][+seqrecache], DECODER in wan|taehv "
                         "(graphs: the chunk step as CUDA graphs; fp8: fp8 linears; bench: "
                         "cudnn.benchmark; ref: the Wan VAE's reference decode path instead of the fast one; bf16: the "
                         "decoder in bf16, as served, instead of fp16; seqrecache, with --latency: the prompt switch's "
                         "KV re-cache one forward per chunk instead of one forward)")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--samples", type=int, default=3, help="warm sessions per variant (after the cold one)")
    ap.add_argument("--interpolate", type=int, default=2, help="RIFE factor (1: none)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="one more warm session with N steady chunks under torch.profiler (summary printed)")
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny configs on the CPU (checks the script, times nothing real)")
    ap.add_argument("--latency", type=int, default=0, metavar="N",
                    help="instead: cold first chunk, then N warm sessions' open -> first chunk and prompt -> new chunk, "
                         "per variant (e.g. --variants wan,wan+seqrecache)")
    args = ap.parse_args(argv)
    dev = torch.device("cpu" if args.smoke else "cuda")
    if args.latency:
        rows = []
        for v in args.variants.split(","):
            opts = v.split("+")[1:]
            torch.backends.cudnn.benchmark = "bench" in opts
            # +seqrecache: the prompt switch re-caches chunk by chunk (one forward per chunk), not in one forward
            SessionState.one_forward_recache = "seqrecache" not in opts
            try:
                r = asyncio.run(run_latency(build_variant(v, dev, args.smoke)[0], args.width, args.height,
                                            args.latency))
            finally:
                SessionState.one_forward_recache = True
            r["variant"] = v
            rows.append(r)
            print(json.dumps(r), flush=True)
        if args.json:  # one variant: its dict, as before; several: {"rows": [...]}
            Path(args.json).write_text(json.dumps(rows[0] if len(rows) == 1 else {"rows": rows}, indent=1))
        print(f"\n{'variant':<22} {'cold 1st s':>10} {'open->1st s':>11} {'prompt->chunk s':>15}")
        for r in rows:
            print(f"{r['variant']:<22} {r['cold_first_chunk_s']:>10.2f} {r['open_first_chunk_s_median']:>11.3f} "
                  f"{r['prompt_to_chunk_s_median']:>15.3f}")
        return 0
    rows = []
    for v in args.variants.split(","):
        opts = v.split("+")[1:]
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        torch.backends.cudnn.benchmark = "bench" in opts  # every variant sets it: no order dependence
        pipe = None
        try:
            pipe = build_variant(v, dev, args.smoke)[0]
            r = asyncio.run(run_stream(pipe, args))
        except Exception as e:  # noqa: BLE001 - report and go on with the next variant
            r = {"error": f"{type(e).__name__}: {e}"[:300]}
        r["variant"] = v
        rows.append(r)
        print(json.dumps(r), flush=True)
        del pipe
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False
    u8 = None
    if dev.type == "cuda" and args.profile:
        u8 = uint8_cost(12 * args.interpolate, args.width, args.height)
        print(json.dumps({"uint8": u8}), flush=True)
    if args.json:
        name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "args": vars(args),
                                               "rows": rows, "uint8": u8}, indent=1))
    print(f"\n{args.samples} warm sessions x {args.chunks} chunks ({args.warmup} warm-up), {args.width}x{args.height}, "
          f"RIFE {args.interpolate}x; min / median")
    print(f"{'variant':<20} {'cold 1st s':>10} {'warm 1st s':>13} {'chunk s':>8} {'gen fps':>13} {'out fps':>13} {'GiB':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<20} ERROR {r['error']}")
            continue
        print(f"{r['variant']:<20} {r['cold_first_chunk_s']:>10.2f} {r['first_chunk_s_min']:>6.3f}/{r['first_chunk_s_median']:<6.3f}"
              f" {r['chunk_s_median']:>8.3f} {r['gen_fps_min']:>6.1f}/{r['gen_fps_median']:<6.1f}"
              f" {r['out_fps_min']:>6.1f}/{r['out_fps_median']:<6.1f} {r['peak_gib']:>6.2f}")
    for r in rows:
        p = r.get("profile")
        if p:
            print(f"profile {r['variant']}: {p['chunks']} chunks: pinned allocs {p['pinned_allocs']} ({p['pinned_alloc_ms']:.2f} ms), "
                  f"D2H {p['d2h_copies']} copies {p['d2h_ms']:.2f} ms, host syncs {p['host_syncs']}, GPU idle "
                  f"{p.get('gpu_idle_ms', 0):.1f} of {p.get('gpu_window_ms', 0):.0f} ms ({p.get('gpu_idle_pct', 0):.2f}%), "
                  f"gaps>1ms {p.get('gaps_over_1ms')}, largest {p.get('largest_gap_ms', 0):.2f} ms")
    if u8:
        print(f"uint8 per chunk ({12 * args.interpolate} frames): torch ops {u8['torch_ms']:.3f} ms, fused {u8['fused_ms']:.3f} ms "
              f"(fused kernel: {u8['fused_path']}), bytes equal: {u8['bytes_equal']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
