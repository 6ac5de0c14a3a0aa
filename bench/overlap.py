"""Decode on a second CUDA stream, overlapping the next chunk's denoise: what it would gain (issue 12, issue 13).

    PYTHONPATH=. python3 bench/overlap.py --json $OUT/overlap.json          # H100/H200: 1.3B, 832x480
    PYTHONPATH=. python3 bench/overlap.py --smoke                           # CPU: tiny configs, no streams

One session of the Wan2.1 1.3B DiT (random bf16 weights, 4 self-forcing steps + the cache pass per chunk of 3
latent frames, window 12:3; ``--dit compile+graphs``: compiled blocks replayed as CUDA graphs, as
``serve --compile --cuda-graphs``), and a decoder (Wan VAE fast path or TAEHV, random weights, ``--decoder-dtype``).
Per decoder, four timings of ``--chunks`` chunks after ``--warmup`` (host wall from the first chunk to the final
synchronize; the median of ``--reps`` streams):

  dit        the DiT chunks alone (latents only)
  decode     the decoder alone, on the latents the DiT stream made (the same chunk sequence)
  serial     DiT then decode, chunk after chunk, on one stream: what the engine does today
  overlap    DiT on the default stream; chunk k's decode on a second stream, waiting for chunk k's latents by
             an event, while the host goes on to enqueue chunk k+1's DiT. The decoder's causal state lives on
             that stream; nothing syncs the host between chunks

"gain" = serial / overlap. ``ideal`` = serial / max(dit, decode): what a perfect overlap would reach. Numerics:
the overlapped frames equal the serial ones byte for byte (same kernels, same order per stream), checked.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import kernel_times, random_wan  # noqa: E402
from streamgen.models.taehv import TAEHV, TAEHVConfig  # noqa: E402
from streamgen.models.wan import WanConfig, WanModel  # noqa: E402
from streamgen.models.wan_vae import WanVAE, WanVAEConfig  # noqa: E402
from streamgen.ops.attention import use_backend  # noqa: E402
from streamgen.ops.compile import compile_blocks  # noqa: E402
from streamgen.ops.fused import fuse_ffn_gelu, fuse_norm_rope  # noqa: E402
from streamgen.ops.graphs import ChunkGraphs  # noqa: E402
from streamgen.sampling.stream import SessionState, StreamConfig  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_decoder(name: str, dev: torch.device, dtype: torch.dtype, smoke: bool):
    if name == "wan":
        dec = WanVAE(WanVAEConfig.preset("tiny" if smoke else "wan2.1"))
    else:
        dec = TAEHV(TAEHVConfig.preset("tiny" if smoke else "taew2.1")).init_random_(seed=1)
    return dec.to(dev, dtype).eval().requires_grad_(False)


class Bench:
    def __init__(self, args, dev: torch.device):
        self.args, self.dev = args, dev
        self.cuda = dev.type == "cuda"
        torch.manual_seed(0)
        if args.smoke:
            self.model = WanModel(WanConfig.preset("tiny")).to(dev, torch.float32).eval().requires_grad_(False)
        else:
            self.model = random_wan("wan2.1-t2v-1.3b", dev, torch.bfloat16).requires_grad_(False)
        self.graphs = None
        use_backend(self.model, args.attention)  # auto: flash-attn where installed, as streamgen.pipeline.build
        if args.gelu_epilogue:
            fuse_ffn_gelu(self.model)
        if args.norm_rope:
            fuse_norm_rope(self.model)
        if "compile" in args.dit:
            compile_blocks(self.model)
        if "graphs" in args.dit and self.cuda:
            self.graphs = ChunkGraphs(self.model)
        dt = next(self.model.parameters()).dtype
        self.ctx = torch.randn(1, 512, self.model.cfg.text_dim, device=dev, dtype=dt,
                               generator=torch.Generator(device=dev).manual_seed(1))

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def session(self) -> SessionState:
        a = self.args
        cfg = StreamConfig(frames_per_chunk=3, num_steps=4, seed=0)
        cfg.local_frames, cfg.sink_frames = 12, 3
        sess = SessionState(self.model, self.ctx, height=a.height, width=a.width, config=cfg)
        if self.graphs is not None:
            self.graphs.attach(sess)
        return sess

    def dit(self) -> tuple[float, list[torch.Tensor]]:
        sess = self.session()
        for _ in range(self.args.warmup):
            sess.next_chunk()
        self.sync()
        t0 = time.perf_counter()
        lat = [sess.next_chunk().latents for _ in range(self.args.chunks)]
        self.sync()
        return time.perf_counter() - t0, lat

    def profile(self, chunks: int) -> dict:
        """GPU kernel time of ``chunks`` steady DiT chunks (after the warm-up) by kind, and the 15 longest kernels."""
        from torch.profiler import ProfilerActivity, profile

        sess = self.session()
        for _ in range(self.args.warmup):
            sess.next_chunk()
        self.sync()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            for _ in range(chunks):
                sess.next_chunk()
            self.sync()
        wall = time.perf_counter() - t0
        kinds, per = kernel_times(prof)
        kinds = {k: v / chunks for k, v in kinds.items()}
        per = {n: [ms / chunks, calls] for n, (ms, calls) in per.items()}
        top = sorted(per.items(), key=lambda kv: -kv[1][0])[:15]
        return {"chunks": chunks, "wall_ms_per_chunk": round(wall * 1e3 / chunks, 1),
                **{f"{k}_ms_per_chunk": round(v, 1) for k, v in kinds.items()},
                "top": [[n[:100], round(v[0], 2), v[1] // chunks] for n, v in top]}

    def decode(self, dec, lat: list[torch.Tensor]) -> float:
        st = dec.new_state()
        for x in lat[:1]:
            dec.decode_chunk(x, st)
        st = dec.new_state()
        self.sync()
        t0 = time.perf_counter()
        for x in lat:
            dec.decode_chunk(x, st)
        self.sync()
        return time.perf_counter() - t0

    def serial(self, dec) -> tuple[float, list[torch.Tensor]]:
        sess = self.session()
        st = dec.new_state()
        for _ in range(self.args.warmup):
            dec.decode_chunk(sess.next_chunk().latents, st)
        self.sync()
        t0 = time.perf_counter()
        frames = [dec.decode_chunk(sess.next_chunk().latents, st) for _ in range(self.args.chunks)]
        self.sync()
        return time.perf_counter() - t0, frames

    def overlap(self, dec) -> tuple[float, list[torch.Tensor]]:
        if not self.cuda:
            return self.serial(dec)
        side = torch.cuda.Stream(device=self.dev)
        main = torch.cuda.current_stream(self.dev)
        sess = self.session()
        st = dec.new_state()

        def one(out: list):
            x = sess.next_chunk().latents
            ready = torch.cuda.Event()
            ready.record(main)
            with torch.cuda.stream(side):
                side.wait_event(ready)
                x.record_stream(side)
                out.append(dec.decode_chunk(x, st))

        warm: list = []
        for _ in range(self.args.warmup):
            one(warm)
        self.sync()
        t0 = time.perf_counter()
        frames: list = []
        for _ in range(self.args.chunks):
            one(frames)
        self.sync()
        return time.perf_counter() - t0, frames


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--decoders", default="wan,taehv")
    p.add_argument("--decoder-dtype", choices=tuple(DTYPES), default=None, help="default bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--dit", choices=("eager", "compile", "compile+graphs"), default="compile+graphs")
    p.add_argument("--gelu-epilogue", action="store_true", help="the FFN GELU in its GEMM's epilogue (ops.fused)")
    p.add_argument("--attention", choices=("auto", "sdpa", "fp8"), default="auto", help="as serve --attention")
    p.add_argument("--norm-rope", action="store_true", help="the q/k RMSNorm + RoPE as one kernel (ops.fused)")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N steady DiT chunks: kernel time a chunk by kind, the 15 longest kernels")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.height = args.width = 64
        args.chunks, args.warmup, args.reps, args.dit = 3, 1, 1, "eager"
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    ddt = DTYPES[args.decoder_dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    b = Bench(args, dev)
    frames_per_chunk = 12  # 3 latent frames (the first chunk of a stream decodes 9; all timed chunks are later)
    info = {"device": torch.cuda.get_device_name(dev) if b.cuda else "cpu", "torch": torch.__version__,
            "dit": args.dit, "decoder_dtype": str(ddt), "date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv[1:]}
    print(json.dumps({"info": info}), flush=True)
    rows = []
    dit_s, lat = [], None
    for _ in range(args.reps):
        s, lat = b.dit()
        dit_s.append(s)
    for name in [d for d in args.decoders.split(",") if d]:
        dec = build_decoder(name, dev, ddt, args.smoke)
        dec_s = [b.decode(dec, lat) for _ in range(args.reps)]
        ser, ovl, same = [], [], True
        for _ in range(args.reps):
            s1, f1 = b.serial(dec)
            s2, f2 = b.overlap(dec)
            ser.append(s1)
            ovl.append(s2)
            same = same and all(torch.equal(x, y) for x, y in zip(f1, f2))
        med = {k: statistics.median(v) for k, v in
               (("dit", dit_s), ("decode", dec_s), ("serial", ser), ("overlap", ovl))}
        n = args.chunks * frames_per_chunk
        row = {"decoder": name, **{f"{k}_s": round(v, 4) for k, v in med.items()},
               **{f"{k}_fps": round(n / v, 2) for k, v in med.items()},
               "gain": round(med["serial"] / med["overlap"], 3),
               "ideal": round(med["serial"] / max(med["dit"], med["decode"]), 3),
               "same_bytes": same, "serial_all": [round(v, 4) for v in ser], "overlap_all": [round(v, 4) for v in ovl]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    prof = b.profile(args.profile) if args.profile else None
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows, "profile": prof}, indent=1))
    print(f"\n{info['device']}, DiT {args.dit}, decoder {ddt}, {args.chunks} chunks x 12 frames, median of {args.reps}")
    print("| decoder | DiT alone fps | decode alone fps | serial fps | overlap fps | gain | ideal | same bytes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['decoder']} | {r['dit_fps']} | {r['decode_fps']} | {r['serial_fps']} | {r['overlap_fps']} | "
              f"{r['gain']:.3f}x | {r['ideal']:.3f}x | {r['same_bytes']} |")
    if prof:
        print(f"\nDiT profile, {prof['chunks']} steady chunks: wall {prof['wall_ms_per_chunk']} ms a chunk under the "
              f"profiler; kernels a chunk: attention {prof['attention_ms_per_chunk']} ms, GEMMs {prof['gemm_ms_per_chunk']}, "
              f"other {prof['other_ms_per_chunk']}")
        for name, ms, calls in prof["top"]:
            print(f"  {ms:8.2f} ms  x{calls:<4d} {name}")
    return 0 if all(r["same_bytes"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
