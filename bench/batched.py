"""Many sessions on one engine: N concurrent streams, batched into one forward per step.

    PYTHONPATH=. python bench/batched.py --json $OUT/batched.json                          # GPU: 1.3B, 832x480
    PYTHONPATH=. python bench/batched.py --model toy --sessions 1,2,4 --variants taehv-bf16  # CPU: the built-in model

One engine per variant (``streamgen.engine.core.Engine``, the busy loop the server uses), kept warm
across the N values (a throwaway warm-up session first: cuDNN autotuning and kernel loading are per
thread). For each N: N sessions are opened at once and each consumer awaits its chunks back to
back (unpaced: what the engine can make; ``max_ahead=1``, as ``generate`` runs). GPU: Wan2.1 1.3B
block-causal DiT with random weights (bf16, or its block linears in fp8 rowwise, ``ops.quant``), 4
Self-Forcing steps + cache pass per chunk of 3 latent frames, window 12 frames with 3 sinks, the Wan
VAE (fp16) or TAEHV (fp16) decoder, no RIFE; CPU (``--model toy``): the built-in default model at
its native size, float32, with its own decoder in the dtype `serve` picks (``--decoder-dtype``; the variant's
decoder and precision do not apply).

Reported per N: "1st chunk" = open -> first chunk on the host, the slowest of the N sessions (they
all start together); per-session generated fps = decoded frames / s after the first ``--warmup``
chunks (median over sessions); aggregate = all sessions' frames after their warm-up chunks over the
wall time from the earliest end of a warm-up chunk to the last chunk;
"rows/forward" = mean batch size of the DiT forwards; peak GPU memory of that run (allocator peak,
the pool included); ``max_batch=1`` rows run the same N one session per step (the old round robin)
for comparison. Needs no av/websockets/diffusers.
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

from streamgen.engine.core import Engine, EngineSettings, GenRequest, Pipeline, engine_threads  # noqa: E402

VARIANTS = ("taehv-bf16", "wan-bf16", "taehv-fp8", "wan-fp8")


def build(variant: str, dev: torch.device, model_name: str, smoke: bool,
          decoder_dtype: str = "auto") -> tuple[Pipeline, int, int]:
    """The pipeline of a variant (``DECODER-PREC[+compile]``), and the frame size to run it at."""
    base, *opts = variant.split("+")
    decoder, prec = base.split("-")
    if model_name == "toy":
        from streamgen.pipeline import MODELS
        from streamgen.pipeline import build as build_pipeline

        preset = MODELS["toy"]
        dec_dtype = "auto" if decoder_dtype == "auto" else getattr(torch, decoder_dtype)
        return build_pipeline(preset, device=dev, decoder_dtype=dec_dtype), preset.width, preset.height
    from bench.common import random_wan
    from streamgen.models.taehv import TAEHV, TAEHVConfig
    from streamgen.models.text import load_text_encoder
    from streamgen.models.wan import WanConfig, WanModel
    from streamgen.models.wan_vae import WanVAE, WanVAEConfig
    from streamgen.ops.attention import use_backend

    torch.manual_seed(0)
    dt, ht = (torch.float32, torch.float32) if smoke else (torch.bfloat16, torch.float16)
    if smoke:
        model = WanModel(WanConfig.preset("tiny")).to(dev, dt).eval()
    else:  # random weights made in place on the GPU
        model = random_wan("wan2.1-t2v-1.3b", dev, dt)
    model.requires_grad_(False)
    if prec == "fp8":
        from streamgen.ops.quant import quantize

        model = quantize(model, "fp8")
    model = use_backend(model, "fp8" if "fp8attn" in opts else "auto")
    if "gelu" in opts:  # the FFN GELU in its first GEMM's epilogue (streamgen.ops.fused)
        from streamgen.ops.fused import fuse_ffn_gelu

        fuse_ffn_gelu(model)
    if "normrope" in opts:  # the q/k RMSNorm + RoPE as one kernel (streamgen.ops.fused)
        from streamgen.ops.fused import fuse_norm_rope

        fuse_norm_rope(model)
    if "compile" in opts:  # as `serve --compile`: each block's forward compiled, static shapes (one per batch size)
        from streamgen.ops.compile import compile_blocks

        compile_blocks(model)
    if decoder == "wan":
        dec = WanVAE(WanVAEConfig.preset("tiny" if smoke else "wan2.1")).to(dev, ht).eval().requires_grad_(False)
    else:
        dec = TAEHV(TAEHVConfig.preset("tiny" if smoke else "taew2.1")).init_random_(seed=1).to(dev, ht).eval()
    text = load_text_encoder(None, dim=model.cfg.text_dim, device=dev, dtype=dt)
    size = (64, 64) if smoke else (832, 480)
    return Pipeline(model=model, text_encoder=text, decoder=dec, device=dev, dtype=dt), *size


def _peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_gib(dev: torch.device) -> float:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0


class Breakdown:
    """``--breakdown``: host time spent in the DiT's forwards and the decoder's chunks, wrapped around the pipeline's
    ``forward_chunk`` / ``forward_rows`` / ``decode_chunk`` (instance attributes, so only this pipeline). On the CPU
    that is their compute time; on CUDA it would be launch time, so the bench takes it on the CPU only."""

    def __init__(self, pipe: Pipeline):
        self.t = {"forward": 0.0, "decode": 0.0}
        self.calls = {"forward": 0, "rows": 0, "decode": 0}
        model = pipe.model
        for name in ("forward_chunk", "forward_rows"):
            self._wrap(model, name, "forward")
        self._wrap(pipe.decoder, "decode_chunk", "decode")

    def _wrap(self, obj, name: str, key: str) -> None:
        fn = getattr(obj, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t[key] += time.perf_counter() - t0
                self.calls[key] += 1
                if key == "forward":  # forward_rows(x, t, caches, ...): a row per cache batch entry
                    caches = k.get("caches", a[2] if len(a) > 2 else []) if name == "forward_rows" else None
                    self.calls["rows"] += sum(c.batch for c in caches) if caches is not None else a[0].shape[0]

        setattr(obj, name, timed)

    def reset(self) -> None:
        self.t = dict.fromkeys(self.t, 0.0)
        self.calls = dict.fromkeys(self.calls, 0)

    def result(self) -> dict:
        c, t = self.calls, self.t
        return {"forward_ms": 1e3 * t["forward"] / max(c["forward"], 1),
                "forward_ms_per_row": 1e3 * t["forward"] / max(c["rows"], 1),
                "decode_ms_per_chunk": 1e3 * t["decode"] / max(c["decode"], 1)}


async def run_n(engine: Engine, n: int, width: int, height: int, chunks: int, warmup: int, tag: int,
                breakdown: Breakdown | None = None) -> dict:
    """N sessions opened together, each taking ``chunks`` chunks as fast as it can."""
    dev = torch.device(engine.pipeline.device)
    _peak_reset(dev)
    if breakdown is not None:
        breakdown.reset()
    before = dict(engine.stats)
    t_open = time.perf_counter()
    handles = await asyncio.gather(*(engine.open(GenRequest(f"a red fox running through snow {tag}.{i}", width, height,
                                                            seed=tag * 100 + i, chunks=chunks)) for i in range(n)))

    async def consume(h):
        stamps, frames = [], []
        for _ in range(chunks):
            out = await h.get()
            stamps.append(time.perf_counter())
            frames.append(out.shape[0])
        h.cancel()
        return stamps, frames

    got = await asyncio.gather(*(consume(h) for h in handles))
    firsts = [s[0] - t_open for s, _ in got]
    per = [sum(f[warmup:]) / (s[-1] - s[warmup - 1]) for s, f in got]  # steady: after the warm-up chunks
    # aggregate: every session's steady frames over the span from the first steady start to the last chunk
    agg = sum(sum(f[warmup:]) for _, f in got) / (max(s[-1] for s, _ in got) - min(s[warmup - 1] for s, _ in got))
    fw = engine.stats["forwards"] - before["forwards"]
    extra = breakdown.result() if breakdown is not None else {}
    return {**extra, "n": n, "max_batch": engine.settings.max_batch, "first_chunk_s_max": max(firsts),
            "first_chunk_s_median": statistics.median(firsts), "gen_fps_per_session_median": statistics.median(per),
            "gen_fps_per_session_min": min(per), "gen_fps_aggregate": agg,
            "rows_per_forward": (engine.stats["rows"] - before["rows"]) / max(fw, 1), "peak_gib": _peak_gib(dev),
            "pool_gib_per_session": engine.cache_bytes(GenRequest("x", width, height)) / 2**30}


def summary(variant: str, max_batch: int, runs: list[dict]) -> None:
    """Median over rounds per N, and the aggregate against N=1's median."""
    by_n: dict[int, list[dict]] = {}
    for r in runs:
        by_n.setdefault(r["n"], []).append(r)
    base = statistics.median(r["gen_fps_aggregate"] for r in by_n[min(by_n)])
    for n, rs in sorted(by_n.items()):
        agg = [r["gen_fps_aggregate"] for r in rs]
        per = statistics.median(r["gen_fps_per_session_median"] for r in rs)
        print(f"{variant} max_batch={max_batch} N={n}, median of {len(rs)} rounds: per-session {per:.1f} fps, aggregate "
              f"{statistics.median(agg):.1f} fps ({min(agg):.1f}..{max(agg):.1f}), {statistics.median(agg) / base:.2f}x "
              f"N={min(by_n)}", flush=True)


async def run_variant(variant: str, args, dev: torch.device, out: dict, save) -> None:
    t0 = time.perf_counter()
    pipe, width, height = build(variant, dev, args.model, args.smoke, args.decoder_dtype)
    breakdown = Breakdown(pipe) if args.breakdown else None
    rows = out.setdefault(variant, {"width": width, "height": height, "runs": []})["runs"]
    per_session = None
    for max_batch in args.max_batch:
        if max_batch == 1 and variant not in args.unbatched_variants:
            continue
        settings = EngineSettings(local_frames=12, sink_frames=3, max_ahead=1, max_batch=max_batch,
                                  warmup=GenRequest("warm-up", width, height, seed=99), threads=args.threads)
        if args.model == "toy":  # the built-in model's own window and schedule
            from streamgen.pipeline import MODELS

            p = MODELS["toy"]
            settings.num_steps, settings.shift = p.steps, p.shift
            settings.local_frames, settings.sink_frames = p.local_frames, p.sink_frames
        if per_session is None:
            per_session = Engine(pipe, settings).cache_bytes(GenRequest("x", width, height))
        # the pool holds exactly the largest N's caches, so the peak shows what N sessions need
        settings.cache_memory = max(args.sessions) * (per_session + 4096)
        ns = [n for n in args.sessions if max_batch > 1 or n in args.unbatched]
        if not ns:  # e.g. max_batch=1 with --unbatched ""
            continue
        engine = Engine(pipe, settings).start()
        try:
            for rnd in range(args.rounds):  # the N values in turn, round after round (drift hits every N alike)
                if time.perf_counter() - args.t_start > args.budget_s:
                    print(f"{variant}: time budget spent, round {rnd + 1} skipped", flush=True)
                    break
                for k, n in enumerate(ns):
                    r = await run_n(engine, n, width, height, args.chunks, args.warmup, tag=rnd * len(ns) + k,
                                    breakdown=breakdown)
                    r["round"] = rnd
                    rows.append(r)
                    print(f"{variant} max_batch={max_batch} N={n} round {rnd + 1}: per-session "
                          f"{r['gen_fps_per_session_median']:.1f} fps (min {r['gen_fps_per_session_min']:.1f}), "
                          f"aggregate {r['gen_fps_aggregate']:.1f} fps, 1st chunk {r['first_chunk_s_max']:.2f} s, "
                          f"rows/forward {r['rows_per_forward']:.2f}, peak {r['peak_gib']:.1f} GiB", flush=True)
                    if breakdown is not None:
                        print(f"  breakdown (whole run, warm-up chunks included): DiT {r['forward_ms']:.1f} ms a "
                              f"forward = {r['forward_ms_per_row']:.1f} ms a row; decoder {r['decode_ms_per_chunk']:.1f} "
                              f"ms a session's chunk", flush=True)
                    save()
        finally:
            engine.close()
            del engine
        if args.rounds > 1:
            summary(variant, max_batch, [r for r in rows if r["max_batch"] == max_batch])
    out[variant]["build_and_run_s"] = time.perf_counter() - t0
    del pipe
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}, each optionally +compile")
    ap.add_argument("--sessions", default="1,2,4,8", help="comma list of N")
    ap.add_argument("--max-batch", default="8,1", help="comma list: 8 = batched, 1 = one session per step")
    ap.add_argument("--unbatched", default="4", help="N values also run with max_batch=1")
    ap.add_argument("--unbatched-variants", default=None,
                    help="comma list of the variants that get the max_batch=1 runs (default: the first)")
    ap.add_argument("--chunks", type=int, default=5, help="chunks per session")
    ap.add_argument("--warmup", type=int, default=1, help="chunks per session not timed for the steady rate")
    ap.add_argument("--decoder-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="--model toy: its decoder's dtype (auto: as `serve`, bfloat16 on a CPU with native bfloat16)")
    ap.add_argument("--breakdown", action="store_true",
                    help="CPU only: host time a DiT forward / a row of it / a session's decode (see Breakdown)")
    ap.add_argument("--rounds", type=int, default=1, help="run the N values this many times in turn; print medians")
    ap.add_argument("--model", choices=("wan1.3b", "toy"), default="wan1.3b")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny configs in float32: check the script on a CPU")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip the remaining runs after this many seconds")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    try:
        args.sessions = [int(x) for x in args.sessions.split(",")]
        args.max_batch = [int(x) for x in args.max_batch.split(",")]
        args.unbatched = [int(x) for x in args.unbatched.split(",") if x]
    except ValueError:
        ap.error("--sessions, --max-batch and --unbatched take comma lists of integers")
    variants = args.variants.split(",")
    args.unbatched_variants = args.unbatched_variants.split(",") if args.unbatched_variants else variants[:1]
    bad = [v for v in variants + args.unbatched_variants
           if v.split("+")[0] not in VARIANTS or not set(v.split("+")[1:]) <= {"compile", "gelu", "fp8attn", "normrope"}]
    if bad:
        ap.error(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}, each optionally +compile, +gelu, "
                 "+fp8attn, +normrope")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if not 1 <= args.warmup < args.chunks:
        ap.error("--warmup must be >= 1 and below --chunks")
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu" and args.model != "toy" and not args.smoke:
        ap.error("the 1.3B model needs a GPU; on a CPU use --model toy (or --smoke)")
    if args.breakdown and dev.type != "cpu":
        ap.error("--breakdown times the host: it means compute time on the CPU only (use --device cpu)")
    args.t_start = time.perf_counter()
    out: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
                 "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "model": args.model,
                 "chunks": args.chunks, "warmup": args.warmup}

    def save():
        if args.json is not None:
            args.json.write_text(json.dumps(out, indent=1))

    for v in variants:
        if time.perf_counter() - args.t_start > args.budget_s:
            break
        try:
            with engine_threads(dev) as args.threads:  # as `serve`: the busy thread takes the CPU's threads
                asyncio.run(run_variant(v, args, dev, out, save))
        except Exception as e:  # noqa: BLE001 - e.g. fp8 unsupported here: say so, go on with the others
            print(f"{v}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", flush=True)
            out.setdefault(v, {})["error"] = f"{type(e).__name__}: {e}"[:500]
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
