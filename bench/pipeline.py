"""The whole engine on the GPU: what a viewer of one stream gets, in output frames per second.

    PYTHONPATH=. python bench/pipeline.py --json $OUT/pipeline.json

One session through ``streamgen.engine.core.Engine`` (the busy loop the server uses): Wan2.1 1.3B
block-causal DiT (random bf16 weights; 4 Self-Forcing steps + cache pass per chunk of 3 latent
frames, attention window 12 frames with 3 sink frames), the decoder (Wan VAE fp16 with
cudnn.benchmark, or TAEHV fp16), RIFE v4.26 2x (random weights, fp16, channels_last), uint8
conversion and the pinned host copy, at 832x480. The H.264 encode runs on the server's CPU
threads (not timed here; see bench/BENCHMARKS.md). Timed: wall time per ``await handle.get()``
after the first ``--warmup`` chunks; "out fps" = output frames (16 fps x2) / wall time. Real time
at 32 fps output means out fps >= 32. Per-stage GPU times come from a separate pass over the same
chunk with CUDA events. Needs no av/diffusers.
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

from streamgen.engine.core import Engine, EngineSettings, GenRequest, Pipeline  # noqa: E402
from streamgen.models.rife import IFNet, RIFEConfig  # noqa: E402
from streamgen.models.taehv import TAEHV, TAEHVConfig  # noqa: E402
from streamgen.models.text import load_text_encoder  # noqa: E402
from streamgen.models.wan import WanConfig, WanModel  # noqa: E402
from streamgen.models.wan_vae import WanVAE, WanVAEConfig  # noqa: E402
from streamgen.ops.compile import compile_blocks  # noqa: E402


def build(decoder: str, compile_dit: bool, dev: torch.device, smoke: bool = False):
    """smoke: tiny configs in float32, to check the script on a CPU."""
    torch.manual_seed(0)
    dt, ht = (torch.float32, torch.float32) if smoke else (torch.bfloat16, torch.float16)
    model = WanModel(WanConfig.preset("tiny" if smoke else "wan2.1-t2v-1.3b")).to(dev, dt).eval().requires_grad_(False)
    if compile_dit:
        compile_blocks(model)
    if decoder == "wan":
        torch.backends.cudnn.benchmark = True
        dec = WanVAE(WanVAEConfig.preset("tiny" if smoke else "wan2.1")).to(dev, ht).eval().requires_grad_(False)
    else:
        dec = TAEHV(TAEHVConfig.preset("tiny" if smoke else "taew2.1")).init_random_(seed=1).to(dev, ht).eval()
    rife = IFNet(RIFEConfig.preset("tiny" if smoke else "v4.26")).to(dev, ht).eval().requires_grad_(False)
    rife = rife.to(memory_format=torch.channels_last)
    text = load_text_encoder(None, dim=model.cfg.text_dim, device=dev, dtype=dt)
    return Pipeline(model=model, text_encoder=text, decoder=dec, rife=rife, device=dev, dtype=dt)


async def run_stream(pipeline: Pipeline, chunks: int, warmup: int, width: int, height: int) -> dict:
    engine = Engine(pipeline, EngineSettings(local_frames=12, sink_frames=3, max_ahead=1)).start()  # throughput: one ahead
    try:
        h = await engine.open(GenRequest("a red fox running through snow", width, height, seed=0, interpolate=2))
        times, frames = [], []
        t_prev = time.perf_counter()
        t_open = t_prev
        first = None
        for i in range(chunks):
            out = await h.get()
            t = time.perf_counter()
            if first is None:
                first = t - t_open
            if i >= warmup:
                times.append(t - t_prev)
                frames.append(out.shape[0])
            t_prev = t
        h.cancel()
    finally:
        engine.close()
    wall = sum(times)
    return {"first_chunk_s": first, "chunk_s_median": statistics.median(times), "out_frames": sum(frames),
            "wall_s": wall, "out_fps": sum(frames) / wall,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0}


async def run_latency(pipeline: Pipeline, width: int, height: int, samples: int) -> dict:
    """The server's engine settings (on-demand chunks, window 12:3): the first chunk of a cold engine,
    then per warm session open -> first chunk, and, with the consumer taking chunks at real time,
    prompt change -> the first chunk made under the new prompt (both as the engine delivers them;
    the H.264 encode, the network and the player come on top)."""
    engine = Engine(pipeline, EngineSettings(local_frames=12, sink_frames=3)).start()
    out = {"open_first_chunk_s": [], "prompt_to_chunk_s": []}
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
            h.cancel()
    finally:
        engine.close()
    for key in ("open_first_chunk_s", "prompt_to_chunk_s"):
        out[key + "_median"] = statistics.median(out[key])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="wan,taehv,taehv+compile",
                    help="comma list of DECODER[+compile], DECODER in wan|taehv")
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny configs on the CPU (checks the script, times nothing real)")
    ap.add_argument("--latency", type=int, default=0, metavar="N",
                    help="instead: cold first chunk, then N warm sessions' open -> first chunk and prompt -> new chunk")
    args = ap.parse_args(argv)
    dev = torch.device("cpu" if args.smoke else "cuda")
    if args.latency:
        decoder, _, opt = args.variants.split(",")[0].partition("+")
        r = asyncio.run(run_latency(build(decoder, opt == "compile", dev, args.smoke), args.width, args.height,
                                    args.latency))
        r["variant"] = args.variants.split(",")[0]
        print(json.dumps(r), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=1))
        print(f"\n{'variant':<16} {'cold 1st s':>10} {'open->1st s':>11} {'prompt->chunk s':>15}")
        print(f"{r['variant']:<16} {r['cold_first_chunk_s']:>10.2f} {r['open_first_chunk_s_median']:>11.3f} "
              f"{r['prompt_to_chunk_s_median']:>15.3f}")
        return 0
    rows = []
    for v in args.variants.split(","):
        decoder, _, opt = v.partition("+")
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        pipe = None
        try:
            pipe = build(decoder, opt == "compile", dev, args.smoke)
            r = asyncio.run(run_stream(pipe, args.chunks, args.warmup, args.width, args.height))
        except Exception as e:  # noqa: BLE001 - report and go on with the next variant
            r = {"error": f"{type(e).__name__}: {e}"[:300]}
        r["variant"] = v
        rows.append(r)
        print(json.dumps(r), flush=True)
        del pipe
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__,
                                               "rows": rows}, indent=1))
    print(f"\n{'variant':<16} {'1st chunk s':>11} {'chunk s':>8} {'out fps':>8} {'peak GiB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<16} ERROR {r['error']}")
        else:
            print(f"{r['variant']:<16} {r['first_chunk_s']:>11.2f} {r['chunk_s_median']:>8.3f} {r['out_fps']:>8.1f} "
                  f"{r['peak_gib']:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
