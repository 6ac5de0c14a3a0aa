"""Streaming decoder throughput on the GPU: Wan2.1 VAE and TAEHV ``decode_chunk``, video frames/s.

    PYTHONPATH=. python bench/decoders.py                          # 832x480, 21 latent frames in chunks of 3
    PYTHONPATH=. python bench/decoders.py --check --json $OUT/decoders.json      # + error vs an fp32 stream
    PYTHONPATH=. python bench/decoders.py --layers --graphs --overlap           # + the experiments below

One stream = a fresh ``new_state()`` and ``--chunks`` calls of ``decode_chunk`` on chunks of ``--fpc``
normalized latent frames (random normal, what the DiT emits); frames out = 1 + 4(F-1) (81 for 21
latents). Random weights (speed does not depend on their values). Wall time from the first call to a
synchronize at the end of the stream; warm-up stream first; min and median of ``--reps`` streams.
"enqueue" is the host time spent inside the ``decode_chunk`` calls (launching): far under the wall
time means the GPU never waits for Python, so CUDA graphs cannot gain much.

Wan VAE variants, ``DTYPE[+flag...]``: ``ref`` = ``decode_impl="reference"`` (Decoder3d.forward,
NCDHW), ``fast`` = ``decode_impl="fast"`` (channels-last, concatenation-free causal cache, fused
RMSNorm+SiLU in Triton), ``nofuse`` = fast without the Triton norm, ``c2d`` = fast with
``use_conv2d_sum(96)`` (the 96-channel residual convs as 3 summed conv2d), ``bench`` = cudnn.benchmark
(set for every variant, on or off, so results do not depend on the order), ``cl`` = channels_last_3d
weights, ``fpp1`` = ``frames_per_pass=1`` (also checked equal to whole-chunk passes). TF32 is off for
the whole run, so fp32 means fp32. ``--check``: every variant's whole stream against an fp32 stream of
the reference path. Extra experiments: ``--layers`` (one conv at each decoder resolution: conv3d NCDHW
vs NDHWC vs three conv2d summed; norm + SiLU + concatenation vs the fused norm into the padded input),
``--graphs`` (one chunk's decode captured as a CUDA graph and replayed chunk after chunk, checked
against the eager stream), ``--overlap`` (the decode of a chunk on a second stream beside bf16 GEMMs
standing in for the next chunk's denoise: does the pair finish sooner than one after the other?).
Reference (ARCHITECTURE.md, H100): Self-Forcing's block-wise Wan VAE decoder, fp16, 34.7 fps.
Needs no av/diffusers.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamgen.models import wan_vae  # noqa: E402
from streamgen.models.taehv import TAEHV, TAEHVConfig  # noqa: E402
from streamgen.models.wan_vae import WanVAE, WanVAEConfig  # noqa: E402

DEVICE = "cuda"  # the benches time CUDA; a CPU smoke run may rebind it
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLAGS = {"ref", "fast", "nofuse", "c2d", "bench", "cl", "fpp1"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def channels_last_(module: torch.nn.Module) -> None:
    """Conv weights to channels-last (5-D: channels_last_3d, 4-D: channels_last)."""
    for prm in module.parameters():
        if prm.dim() in (4, 5):
            fmt = torch.channels_last_3d if prm.dim() == 5 else torch.channels_last
            prm.data = prm.data.contiguous(memory_format=fmt)


def stream(dec, latents: torch.Tensor, fpc: int, keep: bool = False, **kw) -> dict:
    """Decode latents chunk by chunk: wall s, host s inside the calls, frames out, and (keep) all
    frames concatenated in float32."""
    state = dec.new_state()
    sync()
    t0 = time.perf_counter()
    frames, enqueue, outs = 0, 0.0, []
    for s in range(0, latents.shape[2], fpc):
        t1 = time.perf_counter()
        out = dec.decode_chunk(latents[:, :, s:s + fpc], state, **kw)
        enqueue += time.perf_counter() - t1
        frames += out.shape[2]
        outs.append(out.float() if keep else out)
    sync()
    return {"wall": time.perf_counter() - t0, "enqueue": enqueue, "frames": frames,
            "out": torch.cat(outs, dim=2) if keep else outs[-1]}


def bench(name: str, dec, latents, args, reps: int, **kw) -> dict:
    for _ in range(args.warmup):
        stream(dec, latents, args.fpc, **kw)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    runs = [stream(dec, latents, args.fpc, **kw) for _ in range(reps)]
    walls = [r["wall"] for r in runs]
    wall = statistics.median(walls)
    frames = runs[0]["frames"]
    return {"name": name, "wall_s": walls, "wall_median_s": wall, "frames": frames, "fps": frames / wall,
            "fps_max": frames / min(walls), "enqueue_s": statistics.median(r["enqueue"] for r in runs),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
            "finite": bool(torch.isfinite(runs[0]["out"]).all())}


def gpu_ms(fn, iters: int = 5) -> float:
    """Median CUDA-event time of fn() in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


@torch.no_grad()
def layers(dtype: torch.dtype) -> list[dict]:
    """One 3x3x3 causal conv (C -> C, T frames + 2 cached) at each decoder resolution of 832x480, and
    the norm + SiLU that feeds it, in three layouts (cudnn.benchmark on)."""
    torch.backends.cudnn.benchmark = True
    rows = []
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for c, h, w, t in ((384, 60, 104, 3), (384, 120, 208, 6), (192, 240, 416, 12), (96, 480, 832, 12)):
        x = torch.randn(1, c, t + 2, h, w, device=DEVICE, generator=g).to(dtype)
        wt = (torch.randn(c, c, 3, 3, 3, device=DEVICE, generator=g) * (27 * c) ** -0.5).to(dtype)
        xl, wl = x.contiguous(memory_format=torch.channels_last_3d), wt.contiguous(memory_format=torch.channels_last_3d)
        flop = 2 * 27 * c * c * t * h * w
        r = {"shape": f"C={c} {w}x{h} T={t}+2"}
        r["ncdhw_ms"] = gpu_ms(lambda: F.conv3d(x, wt, padding=(0, 1, 1)))
        r["ndhwc_ms"] = gpu_ms(lambda: F.conv3d(xl, wl, padding=(0, 1, 1)))
        x4 = xl[0].transpose(0, 1)  # (T+2, C, H, W) channels-last view
        w2 = [wt[:, :, k].contiguous(memory_format=torch.channels_last) for k in range(3)]

        def conv2d_sum():
            y = F.conv2d(x4[0:t], w2[0], padding=1)
            y += F.conv2d(x4[1:t + 1], w2[1], padding=1)
            y += F.conv2d(x4[2:t + 2], w2[2], padding=1)
            return y

        r["conv2d_sum_ms"] = gpu_ms(conv2d_sum)
        y_ref = F.conv3d(x.float(), wt.float(), padding=(0, 1, 1))
        r["ndhwc_rel_err"] = rel_err(F.conv3d(xl, wl, padding=(0, 1, 1)), y_ref)
        r["conv2d_sum_rel_err"] = rel_err(conv2d_sum()[None].transpose(1, 2), y_ref)
        for k in ("ncdhw", "ndhwc", "conv2d_sum"):
            r[k + "_tflops"] = flop / r[k + "_ms"] / 1e9
        # norm + SiLU feeding that conv: the reference ops + torch.cat vs the fused norm into the padded input
        norm = wan_vae.RMSNorm(c).to(DEVICE, dtype)
        xin, cache = x[:, :, 2:].contiguous(), x[:, :, :2].contiguous()
        r["norm_ref_ms"] = gpu_ms(lambda: torch.cat([cache, F.silu(norm(xin))], dim=2))
        xin_l, cache_l = xin.contiguous(memory_format=torch.channels_last_3d), cache.contiguous(memory_format=torch.channels_last_3d)

        def fused():
            xp = torch.empty_like(xl)
            xp[:, :, :2].copy_(cache_l)
            wan_vae._norm_into(norm, xin_l, xp[:, :, 2:], silu=True)
            return xp

        r["norm_fused_ms"] = gpu_ms(fused)
        r["norm_fused_rel_err"] = rel_err(fused(), torch.cat([cache.float(), F.silu(norm.float()(xin.float()))], dim=2))
        rows.append(r)
        print(json.dumps(r), flush=True)
        del x, xl, x4, y_ref
        torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def graphs(dtype: torch.dtype, latents: torch.Tensor, fpc: int) -> dict:
    """The decode of one steady-state chunk (fast path) captured once, then per stream: chunk 0 eager,
    chunks 1..n-1 as replays (the session's cache buffers are the graph's), checked against eager."""
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    with torch.device(DEVICE):
        vae = WanVAE(WanVAEConfig.preset("wan2.1")).to(dtype).eval()
    vae.decode_impl = "fast"
    want = stream(vae, latents, fpc, keep=True)["out"]
    n = latents.shape[2] // fpc
    state = vae.new_state()
    static_in = latents[:, :, fpc:2 * fpc].clone()
    vae.decode_chunk(latents[:, :, :fpc], state)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up of the steady-state shape before the capture
        for _ in range(2):
            vae.decode_chunk(static_in, state)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = vae.decode_chunk(static_in, state)

    def replay_stream(keep: bool) -> list[torch.Tensor]:
        state.reset()
        outs = [vae.decode_chunk(latents[:, :, :fpc], state).float()]  # first chunk eager: another shape
        for i in range(1, n):
            static_in.copy_(latents[:, :, i * fpc:(i + 1) * fpc])
            graph.replay()
            if keep:
                outs.append(static_out.float())
        return outs

    err = rel_err(torch.cat(replay_stream(True), dim=2), want)
    times = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        replay_stream(False)
        sync()
        times.append(time.perf_counter() - t0)
    frames = want.shape[2]
    r = {"name": "wan-vae fp16+bench+fast+graph", "frames": frames, "wall_s": times,
         "wall_median_s": statistics.median(times), "fps": frames / statistics.median(times),
         "graph_vs_eager_rel_err": err}
    print(json.dumps(r), flush=True)
    return r


@torch.no_grad()
def overlap(dtype: torch.dtype, latents: torch.Tensor, fpc: int) -> dict:
    """One steady-state chunk decode vs bf16 GEMMs of about a denoise chunk's size: one after the
    other on one stream, then the decode on a second stream beside the GEMMs."""
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    with torch.device(DEVICE):
        vae = WanVAE(WanVAEConfig.preset("wan2.1")).to(dtype).eval()
    vae.decode_impl = "fast"
    state = vae.new_state()
    vae.decode_chunk(latents[:, :, :fpc], state)
    chunk = latents[:, :, fpc:2 * fpc]
    a = torch.randn(3 * 1560, 1536, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(1536, 8960, device=DEVICE, dtype=torch.bfloat16)

    def gemms():
        for _ in range(1000):  # ~2.6e13 FLOP, about one denoise chunk of the 1.3B
            torch.mm(a, b)

    dec = lambda: vae.decode_chunk(chunk, state)  # noqa: E731
    t_g, t_d = gpu_ms(gemms, 3), gpu_ms(dec, 3)
    side = torch.cuda.Stream()

    def both():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            dec()
        gemms()
        torch.cuda.current_stream().wait_stream(side)

    t_b = gpu_ms(both, 3)
    r = {"gemm_ms": t_g, "decode_ms": t_d, "serial_ms": t_g + t_d, "overlapped_ms": t_b,
         "gain": 1 - t_b / (t_g + t_d)}
    print(json.dumps(r), flush=True)
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--chunks", type=int, default=7)
    p.add_argument("--fpc", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--taehv-reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--vae-variants", default="fp16+ref,fp16+bench+ref,fp16+fast,fp16+bench+fast,bf16+bench+fast")
    p.add_argument("--taehv-variants", default="fp16+bench")
    p.add_argument("--check", action="store_true",
                   help="compare every variant's whole stream with an fp32 reference-path stream of the same weights")
    p.add_argument("--layers", action="store_true", help="per-layer conv / norm layouts (see above)")
    p.add_argument("--graphs", action="store_true", help="one chunk's decode as a CUDA graph (fp16, fast path)")
    p.add_argument("--overlap", action="store_true", help="decode on a second stream beside GEMMs (fp16, fast)")
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny presets on the CPU (checks the script, times nothing real)")
    args = p.parse_args(argv)
    global DEVICE
    vae_preset, taehv_preset = "wan2.1", "taew2.1"
    if args.smoke:
        DEVICE, vae_preset, taehv_preset = "cpu", "tiny", "tiny"
        args.layers = args.graphs = args.overlap = False

    torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 (the reference); fp16/bf16 are not affected
    torch.backends.cuda.matmul.allow_tf32 = False
    dev_name = "cpu" if args.smoke else torch.cuda.get_device_properties(0).name
    n_lat = args.chunks * args.fpc
    g = torch.Generator(device=DEVICE).manual_seed(0)
    latents = torch.randn(1, 16, n_lat, args.height // 8, args.width // 8, device=DEVICE, generator=g)
    results: dict = {"info": {"device": dev_name, "torch": torch.__version__, "args": vars(args)}, "runs": []}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    refs: dict[str, torch.Tensor] = {}  # fp32 reference stream per decoder kind (--check)

    def run(kind: str, variant: str, make, reps: int):
        parts = variant.split("+")
        dtype = DTYPES[parts[0]]
        if not set(parts[1:]) <= FLAGS:
            raise SystemExit(f"unknown flags in {variant!r}; allowed: {', '.join(sorted(FLAGS))}")
        torch.backends.cudnn.benchmark = "bench" in parts
        key = (str(latents.device), dtype)
        saved = wan_vae._FUSED_NORM.get(key)
        try:
            torch.manual_seed(0)
            with torch.device(DEVICE):
                dec = make().to(dtype).eval()
            if kind == "wan-vae":
                dec.decode_impl = "reference" if "ref" in parts else "fast" if {"fast", "nofuse", "c2d"} & set(parts) else "auto"
                if "nofuse" in parts:
                    wan_vae._FUSED_NORM[key] = False
                if "c2d" in parts:
                    dec.use_conv2d_sum(96)
            if "cl" in parts:
                channels_last_(dec)
            kw = {"frames_per_pass": 1} if "fpp1" in parts else {}
            r = bench(f"{kind} {variant}", dec, latents, args, reps, **kw)
            if "fpp1" in parts:
                a = stream(dec, latents, args.fpc, keep=True)["out"]
                b = stream(dec, latents, args.fpc, keep=True, frames_per_pass=1)["out"]
                r["fpp1_vs_chunk_rel_err"] = rel_err(b, a)
                del a, b
            if args.check:
                ref = refs.get(kind)
                if ref is None:
                    torch.manual_seed(0)
                    with torch.device(DEVICE):
                        ref32 = make().float().eval()
                    if kind == "wan-vae":
                        ref32.decode_impl = "reference"
                    ref = refs[kind] = stream(ref32, latents, args.fpc, keep=True)["out"]
                    del ref32
                out = stream(dec, latents, args.fpc, keep=True, **kw)["out"]
                r["vs_fp32_rel_err"] = rel_err(out, ref)
                r["vs_fp32_max_abs"] = float((out - ref).abs().max())
                del out
            del dec
        except Exception as exc:  # noqa: BLE001 - reported
            traceback.print_exc()
            r = {"name": f"{kind} {variant}", "error": f"{type(exc).__name__}: {exc}"[:500]}
        finally:
            if "nofuse" in parts:
                wan_vae._FUSED_NORM.pop(key, None) if saved is None else wan_vae._FUSED_NORM.update({key: saved})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        results["runs"].append(r)
        print(json.dumps(r), flush=True)
        save()

    for v in filter(None, args.vae_variants.split(",")):
        run("wan-vae", v, lambda: WanVAE(WanVAEConfig.preset(vae_preset)), args.reps)
    for v in filter(None, args.taehv_variants.split(",")):
        run("taehv", v, lambda: TAEHV(TAEHVConfig.preset(taehv_preset)), args.taehv_reps)
    for flag, fn in (("layers", lambda: layers(torch.float16)), ("graphs", lambda: graphs(torch.float16, latents, args.fpc)),
                     ("overlap", lambda: overlap(torch.float16, latents, args.fpc))):
        if getattr(args, flag):
            try:
                results[flag] = fn()
            except Exception as exc:  # noqa: BLE001 - reported
                traceback.print_exc()
                results[flag] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            torch.cuda.empty_cache()
            save()
    torch.backends.cudnn.benchmark = False

    print(f"\nDecoders, {args.width}x{args.height}, {n_lat} latent frames in chunks of {args.fpc}, {dev_name}")
    print(f"{'decoder':<30}{'frames':>7}{'wall s':>8}{'fps med':>8}{'fps max':>8}{'enq s':>7}{'GiB':>6}{'vs fp32':>10}")
    for r in results["runs"] + ([results["graphs"]] if isinstance(results.get("graphs"), dict) else []):
        if "error" in r:
            print(f"{r.get('name', '?'):<30} ERROR {r['error'][:90]}")
            continue
        err = r.get("vs_fp32_rel_err", r.get("graph_vs_eager_rel_err"))
        print(f"{r['name']:<30}{r['frames']:>7}{r['wall_median_s']:>8.3f}{r['fps']:>8.1f}"
              f"{r.get('fps_max', r['frames'] / min(r['wall_s'])):>8.1f}{r.get('enqueue_s', float('nan')):>7.3f}"
              f"{r.get('peak_gib', float('nan')):>6.1f}" + (f"{err:>10.2e}" if err is not None else f"{'-':>10}")
              + ("" if r.get("finite", True) else "  (non-finite output)"))
    for r in results.get("layers") or []:
        if isinstance(r, dict) and "shape" in r:
            print(f"{r['shape']:<26} conv ms ncdhw {r['ncdhw_ms']:.2f} ndhwc {r['ndhwc_ms']:.2f} 3x2d {r['conv2d_sum_ms']:.2f}"
                  f" | norm ref {r['norm_ref_ms']:.2f} fused {r['norm_fused_ms']:.2f}")
    ov = results.get("overlap")
    if isinstance(ov, dict) and "gain" in ov:
        print(f"overlap: gemm {ov['gemm_ms']:.1f} + decode {ov['decode_ms']:.1f} = {ov['serial_ms']:.1f} ms; "
              f"two streams {ov['overlapped_ms']:.1f} ms ({100 * ov['gain']:.1f}% saved)")
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
