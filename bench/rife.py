"""RIFE interpolation throughput on the GPU: output frames/s of ``Interpolator.process`` per chunk.

    python bench/rife.py                                   # 832x480 + 1280x720, fp16/bf16, chunks 12/24/48
    python bench/rife.py --weights .rife/flownet.pkl --compile --channels-last --json $OUT/rife.json

Measures what the stream pays: one ``process`` call on a chunk of T frames already on the GPU
(fp16 frames of a panning texture), i.e. the batched RIFE forward of all T pairs (times factor-1
timesteps) plus the scene-cut check and the output assembly. CUDA events around each call, warm-up
first, median of ``--reps``. Weights: real ``flownet.pkl`` when given, else random init (speed does
not depend on the values much; flows are wilder with random weights). Needs no av.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamgen.media.interpolate import Interpolator  # noqa: E402
from streamgen.models.rife import IFNet, RIFEConfig, compile_rife, load_rife  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def panning_frames(n: int, h: int, w: int, device, step=(3.5, 1.25)) -> torch.Tensor:
    """(n, 3, h, w) fp16 frames: a smooth random texture panning by ``step`` px per frame."""
    g = torch.Generator(device="cpu").manual_seed(0)
    tex = torch.rand(1, 3, (h + 64) // 8, (w + 256) // 8, generator=g).to(device)
    tex = F.interpolate(tex, size=(h + 64, w + 256), mode="bicubic", align_corners=False).clamp(0, 1)
    ys = torch.linspace(-1, 1, h, device=device)
    xs = torch.linspace(-1, 1, w, device=device)
    gy, gx = torch.meshgrid(ys * h / (h + 64), xs * w / (w + 256), indexing="ij")
    out = []
    for i in range(n):
        dx, dy = 2 * step[0] * i / (w + 256), 2 * step[1] * i / (h + 64)
        grid = torch.stack([gx + dx - 0.5, gy + dy - 0.05], -1)[None]
        out.append(F.grid_sample(tex, grid, align_corners=True, padding_mode="reflection")[0])
    return torch.stack(out).half()


def time_process(interp: Interpolator, frames: torch.Tensor, chunk: int, reps: int, warmup: int) -> list[float]:
    """ms per process() of one chunk, cycling through the sequence so input differs between calls."""
    state = interp.new_state()
    n_chunks = frames.shape[0] // chunk
    chunks = [frames[i * chunk:(i + 1) * chunk] for i in range(n_chunks)]
    for i in range(warmup):
        interp.process(chunks[i % n_chunks], state)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        interp.process(chunks[i % n_chunks], state)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="832x480,1280x720")
    p.add_argument("--dtypes", default="fp16,bf16")
    p.add_argument("--chunks", default="12,24,48", help="input frames per process() call")
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--weights", default=None, help="flownet.pkl (default: random init)")
    p.add_argument("--channels-last", action="store_true", help="also time channels_last")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (first size/dtype/chunk only)")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one 832x480 fp16 chunk of 12")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default=None, help="write all results here")
    args = p.parse_args()

    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark is for the GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    props = torch.cuda.get_device_properties(dev)
    print(f"# {props.name}, torch {torch.__version__}, cuda {torch.version.cuda}, "
          f"weights {'real ' + args.weights if args.weights else 'random init'}, factor {args.factor}")

    def build(dtype, channels_last=False, compiled=False) -> IFNet:
        if args.weights:
            m = load_rife(args.weights, device=dev, dtype=dtype)
        else:
            torch.manual_seed(0)
            m = IFNet(RIFEConfig.preset("v4.26")).to(dev, dtype).eval().requires_grad_(False)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        if compiled:
            m = compile_rife(m)
        return m

    # accuracy of the reduced-precision models against fp32 on the same input (sanity, not speed)
    frames_small = panning_frames(4, 480, 832, dev)
    ref = Interpolator(build(torch.float32), args.factor, None).process(frames_small, Interpolator(None, 1).new_state())
    for name in args.dtypes.split(","):
        if name == "fp32":
            continue
        out = Interpolator(build(DTYPES[name]), args.factor, None).process(frames_small, Interpolator(None, 1).new_state())
        mse = ((out.float() - ref.float()) ** 2).mean().item()
        print(f"# {name} vs fp32 at 832x480: PSNR {10 * torch.log10(torch.tensor(1 / max(mse, 1e-12))).item():.1f} dB")

    results = []
    variants = [("eager", False, False)]
    if args.channels_last:
        variants.append(("channels_last", True, False))
    print(f"{'size':>9} {'dtype':>5} {'variant':>22} {'chunk':>5} {'ms/chunk':>9} {'out fps':>8} {'peak GiB':>8}")
    for si, size in enumerate(args.sizes.split(",")):
        w, h = (int(v) for v in size.split("x"))
        chunks = [int(c) for c in args.chunks.split(",")]
        frames = panning_frames(max(chunks) * 3, h, w, dev)
        for di, dname in enumerate(args.dtypes.split(",")):
            todo = list(variants)
            if args.compile and si == 0 and di == 0:
                todo += [("compile", False, True), ("compile+channels_last", True, True)]
            for vname, cl, comp in todo:
                model = build(DTYPES[dname], cl, comp)
                interp = Interpolator(model, args.factor)
                for chunk in chunks:
                    if comp and chunk != chunks[0]:
                        continue
                    torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    try:
                        ms = time_process(interp, frames, chunk, args.reps, args.warmup)
                    except Exception as e:  # a compile failure is reported, not fatal
                        print(f"{size:>9} {dname:>5} {vname:>22} {chunk:>5}  failed: {type(e).__name__}: {e}"[:300])
                        continue
                    med = statistics.median(ms)
                    fps = args.factor * chunk / (med / 1000)
                    peak = torch.cuda.max_memory_allocated() / 2**30
                    r = dict(size=size, dtype=dname, variant=vname, chunk=chunk, factor=args.factor, ms_median=med,
                             ms_min=min(ms), ms_max=max(ms), out_fps=fps, peak_gib=peak,
                             wall_s=time.perf_counter() - t0)
                    results.append(r)
                    print(f"{size:>9} {dname:>5} {vname:>22} {chunk:>5} {med:9.2f} {fps:8.0f} {peak:8.2f}", flush=True)
                del model, interp
                torch.cuda.empty_cache()

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        interp = Interpolator(build(torch.float16, channels_last=True), args.factor)
        st = interp.new_state()
        f = panning_frames(36, 480, 832, dev)
        for i in range(2):
            interp.process(f[12 * i:12 * (i + 1)], st)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            interp.process(f[24:], st)
            torch.cuda.synchronize()
        ka = prof.key_averages()
        try:
            print(ka.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=70))
        except Exception:  # older torch names the column cuda
            print(ka.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=70))

    # no host syncs inside process(): steady-state chunk under sync debug mode
    interp = Interpolator(build(torch.float16), args.factor)
    st = interp.new_state()
    f = panning_frames(24, 480, 832, dev)
    interp.process(f[:12], st)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        interp.process(f[12:], st)
        print("# process(): no host sync in a steady-state chunk")
    except RuntimeError as e:
        print(f"# process() synchronizes with the host: {e}")
    finally:
        torch.cuda.set_sync_debug_mode(0)

    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=props.name, torch=torch.__version__, results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
