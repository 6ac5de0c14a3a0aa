"""Streaming decoder throughput on the GPU: Wan2.1 VAE and TAEHV ``decode_chunk``, video frames/s.

    PYTHONPATH=. python bench/decoders.py                          # 832x480, 21 latent frames in chunks of 3
    PYTHONPATH=. python bench/decoders.py --json $OUT/decoders.json
    PYTHONPATH=. python bench/decoders.py --check --vae-variants bf16,fp16,bf16+fpp1   # + error vs fp32

One stream = a fresh ``new_state()`` and ``--chunks`` calls of ``decode_chunk`` on chunks of ``--fpc``
normalized latent frames (random normal, what the DiT emits); frames out = 1 + 4(F-1) (81 for 21
latents). Random weights (speed does not depend on their values). Wall time with a synchronize at the
end of each stream, warm-up stream first, median of ``--reps``. Variants: dtype, ``cudnn.benchmark``,
channels_last_3d weights, ``frames_per_pass=1`` (one latent frame per decoder pass: less activation
memory; also checked equal to the whole-chunk pass). Reference (ARCHITECTURE.md, H100): Self-Forcing's
block-wise Wan VAE decoder, fp16, 34.7 fps. Needs no av/diffusers.
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

from streamgen.models.taehv import TAEHV, TAEHVConfig  # noqa: E402
from streamgen.models.wan_vae import WanVAE, WanVAEConfig  # noqa: E402

DEVICE = "cuda"  # the benches time CUDA; a CPU smoke run may rebind it
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def channels_last_(module: torch.nn.Module) -> None:
    """Conv weights to channels-last (5-D: channels_last_3d, 4-D: channels_last); activations follow."""
    for prm in module.parameters():
        if prm.dim() in (4, 5):
            fmt = torch.channels_last_3d if prm.dim() == 5 else torch.channels_last
            prm.data = prm.data.contiguous(memory_format=fmt)


def stream(dec, latents: torch.Tensor, fpc: int, keep: bool = False, **kw) -> tuple[float, int, torch.Tensor]:
    """Decode latents chunk by chunk; returns (wall s, frames out, last chunk's frames or, with keep,
    all frames concatenated in float32)."""
    state = dec.new_state()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    frames = 0
    outs = []
    for s in range(0, latents.shape[2], fpc):
        out = dec.decode_chunk(latents[:, :, s:s + fpc], state, **kw)
        frames += out.shape[2]
        outs.append(out.float() if keep else out)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, frames, torch.cat(outs, dim=2) if keep else outs[-1]


def bench(name: str, dec, latents, args, reps: int, **kw) -> dict:
    for _ in range(args.warmup):
        stream(dec, latents, args.fpc, **kw)
    torch.cuda.reset_peak_memory_stats()
    runs = [stream(dec, latents, args.fpc, **kw) for _ in range(reps)]
    walls = [r[0] for r in runs]
    wall = statistics.median_low(walls)
    frames = runs[0][1]
    last = runs[0][2]
    return {"name": name, "wall_s": walls, "wall_median_s": wall, "frames": frames, "fps": frames / wall,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "finite": bool(torch.isfinite(last).all())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--chunks", type=int, default=7)
    p.add_argument("--fpc", type=int, default=3)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--taehv-reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--vae-variants", default="bf16,bf16+bench,fp16+bench,bf16+bench+cl,bf16+bench+fpp1")
    p.add_argument("--taehv-variants", default="bf16,fp16+bench")
    p.add_argument("--check", action="store_true",
                   help="compare every variant's whole stream with an fp32 stream of the same weights")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    dev = torch.cuda.get_device_properties(0)
    n_lat = args.chunks * args.fpc
    g = torch.Generator(device=DEVICE).manual_seed(0)
    latents = torch.randn(1, 16, n_lat, args.height // 8, args.width // 8, device=DEVICE, generator=g)
    results: dict = {"info": {"device": dev.name, "torch": torch.__version__, "args": vars(args)}, "runs": []}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    refs: dict[str, torch.Tensor] = {}  # fp32 reference stream per decoder kind (--check)

    def run(kind: str, variant: str, make, reps: int):
        parts = variant.split("+")
        dtype = DTYPES[parts[0]]
        torch.backends.cudnn.benchmark = "bench" in parts
        try:
            torch.manual_seed(0)
            with torch.device(DEVICE):
                dec = make().to(dtype).eval()
            if "cl" in parts:
                channels_last_(dec)
            kw = {"frames_per_pass": 1} if "fpp1" in parts else {}
            r = bench(f"{kind} {variant}", dec, latents, args, reps, **kw)
            if "fpp1" in parts:
                # same stream, whole-chunk passes vs one latent frame per pass
                _, _, a = stream(dec, latents, args.fpc, keep=True)
                _, _, b = stream(dec, latents, args.fpc, keep=True, frames_per_pass=1)
                r["fpp1_vs_chunk_rel_err"] = rel_err(b, a)
                del a, b
            if args.check:
                ref = refs.get(kind)
                if ref is None:
                    torch.manual_seed(0)
                    with torch.device(DEVICE):
                        ref32 = make().float().eval()
                    ref = refs[kind] = stream(ref32, latents, args.fpc, keep=True)[2]
                    del ref32
                out = stream(dec, latents, args.fpc, keep=True, **kw)[2]
                r["vs_fp32_rel_err"] = rel_err(out, ref)
                del out
            del dec
        except Exception as exc:  # noqa: BLE001 - reported
            traceback.print_exc()
            r = {"name": f"{kind} {variant}", "error": f"{type(exc).__name__}: {exc}"[:500]}
        torch.cuda.empty_cache()
        results["runs"].append(r)
        print(json.dumps(r), flush=True)
        save()

    for v in filter(None, args.vae_variants.split(",")):
        run("wan-vae", v, lambda: WanVAE(WanVAEConfig.preset("wan2.1")), args.reps)
    for v in filter(None, args.taehv_variants.split(",")):
        run("taehv", v, lambda: TAEHV(TAEHVConfig.preset("taew2.1")), args.taehv_reps)
    torch.backends.cudnn.benchmark = False

    print(f"\nDecoders, {args.width}x{args.height}, {n_lat} latent frames in chunks of {args.fpc}, {dev.name}")
    print(f"{'decoder':<28}{'frames':>7}{'wall s':>9}{'fps':>9}{'peak GiB':>10}{'vs fp32':>12}")
    for r in results["runs"]:
        if "error" in r:
            print(f"{r['name']:<28} ERROR {r['error'][:90]}")
            continue
        err = r.get("vs_fp32_rel_err")
        print(f"{r['name']:<28}{r['frames']:>7}{r['wall_median_s']:>9.3f}{r['fps']:>9.1f}{r['peak_gib']:>10.2f}"
              + (f"{err:>12.2e}" if err is not None else f"{'-':>12}") + ("" if r["finite"] else "  (non-finite output)"))
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
