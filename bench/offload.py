"""Block offload (streamgen/ops/offload.py): one block-causal chunk, resident vs offloaded.

    PYTHONPATH=. python bench/offload.py                                  # 1.3B and 14B, prefetch 0,1,2
    PYTHONPATH=. python bench/offload.py --presets wan2.1-t2v-14b --prefetch 1 --json $OUT/offload.json
    PYTHONPATH=. python bench/offload.py --device cpu --presets tiny --hw 4,6  # CPU smoke run

What is timed: one ``forward_chunk`` of ``--frames`` latent frames (3 at 832x480 = 4680 tokens)
at frame ``--context`` of a cache that already holds ``--context`` committed frames, random bf16
weights (created on the device block by block: no fp32 copy), a 512-token prompt set once.
The call is tentative (``update_cache=False``), so every repeat computes the same output.
CUDA events around each call after warm-up; the median is reported. Peak memory is
``torch.cuda.max_memory_allocated`` over the timed calls (weights + cache + activations).

Per offloaded variant also: the block copies are bracketed with events on the copy stream
(after the wait for a free slot), giving the copy-engine busy time per forward and the achieved
host-to-device bandwidth while the model runs; ``raw H2D`` is one block copied alone.
``max|diff|`` compares with the resident output (the same kernels on the same data: 0 expected).
``--source disk`` writes the model to a safetensors file first and offloads from it (the reader
thread's throughput: page cache or disk -> pinned staging -> GPU).
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

from common import random_wan, sync_free  # noqa: E402
from streamgen.ops.offload import offload  # noqa: E402




_ST_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def save_safetensors(model: torch.nn.Module, path: str) -> None:
    """Write the state_dict tensor by tensor (never the whole model in host memory at once)."""
    sd = model.state_dict()
    header, offset = {}, 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        header[k] = {"dtype": _ST_CODES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for v in sd.values():
            f.write(v.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())


class Clock:
    """Timed region: CUDA events on the current stream, or the host clock on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self):
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.b.record()
        else:
            self.ms_cpu = (time.perf_counter() - self.t0) * 1e3

    @property
    def ms(self) -> float:
        return self.a.elapsed_time(self.b) if self.cuda else self.ms_cpu


def instrument_copies(handle) -> list:
    """Wrap the handle's block copy so that each copy is bracketed with timing events on the copy
    stream, after its wait for a free slot (bench only: reaches into the handle)."""
    spans: list = []
    if not handle._cuda or handle.source == "disk":
        return spans
    cs = handle._copy_stream

    def _copy(block: int, slot: int) -> None:
        n = handle.block_bytes[block]
        with torch.cuda.stream(cs):
            cs.wait_event(handle._free[slot])
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(cs)
            handle.slots[slot][:n].copy_(handle._host_blocks[block], non_blocking=True)
            b.record(cs)
            handle._ready[slot].record(cs)
        handle._slot_block[slot] = block
        handle.copies += 1
        handle.bytes_copied += n
        spans.append((a, b, n))

    handle._copy = _copy
    return spans


def run_chunks(model, x, t, cache, start, args, cuda):
    for _ in range(args.warmup):
        model.forward_chunk(x, t, cache, start_frame=start)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clocks = []
    for _ in range(args.reps):
        with Clock(cuda) as c:
            out = model.forward_chunk(x, t, cache, start_frame=start)
        clocks.append(c)
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return out, statistics.median(c.ms for c in clocks), peak


def raw_h2d(handle, cuda: bool, reps: int = 10) -> float:
    """GB/s of one block's copy alone (pinned host -> slot), median of ``reps``."""
    if not cuda:
        return float("nan")
    n = handle.block_bytes[0]
    ms = []
    for _ in range(reps):
        with Clock(True) as c:
            handle.slots[0][:n].copy_(handle._host_blocks[0], non_blocking=True)
        ms.append(c)
    torch.cuda.synchronize()
    handle._slot_block[0] = 0
    return n / statistics.median(c.ms for c in ms) / 1e6




def bench_preset(preset: str, args, device: torch.device) -> list[dict]:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.perf_counter()
    model = random_wan(preset, device, dtype)
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    block_bytes = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    print(f"[{preset}] {n_params / 1e9:.2f} B params, block {block_bytes / 2**20:.0f} MiB, built in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    h, w = args.hw
    f, ctx_frames = args.frames, args.context
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(args.batch, cfg.in_dim, f, h, w, generator=g, device=device)
    t = torch.full((args.batch,), 700.0, device=device)
    ctx = torch.randn(args.batch, cfg.text_len, cfg.text_dim, generator=g, device=device)
    cache = model.new_cache(args.batch, (h, w), max_frames=ctx_frames + f)
    with torch.no_grad():
        model.set_prompt(cache, ctx)
        for s in range(0, ctx_frames, f):
            xs = torch.randn(args.batch, cfg.in_dim, min(f, ctx_frames - s), h, w, generator=g, device=device)
            model.forward_chunk(xs, 0.0, cache, start_frame=s, update_cache=True)
    tokens = f * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    common = {"preset": preset, "batch": args.batch, "tokens": tokens, "context_frames": ctx_frames, "blocks": cfg.num_layers,
              "block_MiB": block_bytes / 2**20}

    rows = []
    ref, ms, peak = run_chunks(model, x, t, cache, ctx_frames, args, cuda)
    rows.append({**common, "variant": "resident", "ms": ms, "peak_GiB": peak, "weights_gpu_GiB":
                 n_params * (2 if cuda else 4) / 2**30, "max_abs_diff": 0.0})
    if cuda:
        rows[-1]["sync_free"] = sync_free(model, x, t, cache, ctx_frames)
    print(f"[{preset}] resident {ms:.1f} ms, peak {peak:.2f} GiB, sync_free={rows[-1].get('sync_free')}", flush=True)

    disk = {}
    if args.source == "disk":
        t0 = time.perf_counter()
        save_safetensors(model, args.disk_path)
        disk = {"source": "disk", "path": args.disk_path}
        print(f"[{preset}] wrote {args.disk_path} in {time.perf_counter() - t0:.1f} s", flush=True)
    for pf in args.prefetch:
        t0 = time.perf_counter()
        handle = offload(model, device=device, prefetch=pf, **disk)
        t_offload = time.perf_counter() - t0
        if cuda:
            torch.cuda.empty_cache()
        spans = instrument_copies(handle)
        out, ms, peak = run_chunks(model, x, t, cache, ctx_frames, args, cuda)
        st = handle.stats()
        row = {**common, "variant": f"offload p={pf}" + (" disk" if disk else ""), "ms": ms, "peak_GiB": peak,
               "weights_gpu_GiB": st["gpu_bytes"] / 2**30, "max_abs_diff": (out - ref).abs().max().item(),
               "offload_s": t_offload, "pinned": st["pinned"]}
        if cuda and not spans:  # disk source: the reader thread issues the copies
            # (no sync check: the reader thread waits on its staging events by design)
            row.update(effective_GBps=st["bytes_per_block"][0] * cfg.num_layers / ms / 1e6)
        elif cuda:
            timed = spans[-args.reps * cfg.num_layers :]
            copy_ms = sum(a.elapsed_time(b) for a, b, _ in timed) / args.reps
            copy_bytes = sum(n for _, _, n in timed) / args.reps
            row.update(copy_ms_per_forward=copy_ms, copy_GBps=copy_bytes / copy_ms / 1e6,
                       effective_GBps=copy_bytes / ms / 1e6, raw_h2d_GBps=raw_h2d(handle, cuda),
                       copies_per_forward=len(timed) / args.reps)
            row["sync_free"] = sync_free(model, x, t, cache, ctx_frames)
        rows.append(row)
        print(f"[{preset}] {row['variant']}: {ms:.1f} ms, peak {peak:.2f} GiB, diff {row['max_abs_diff']:.3g}, "
              + (f"copy {row['copy_ms_per_forward']:.1f} ms/fwd at {row['copy_GBps']:.1f} GB/s "
                 f"(raw {row['raw_h2d_GBps']:.1f}), sync_free={row['sync_free']}, " if spans else "")
              + f"offload() {t_offload:.1f} s", flush=True)
        t0 = time.perf_counter()
        handle.remove()
        print(f"[{preset}] remove() {time.perf_counter() - t0:.1f} s", flush=True)
        with torch.no_grad():
            again = model.forward_chunk(x, t, cache, start_frame=ctx_frames)
        assert torch.equal(again, ref), "remove() did not restore the resident model"
    if disk:
        Path(args.disk_path).unlink()
    del model, cache
    if cuda:
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="wan2.1-t2v-1.3b,wan2.1-t2v-14b")
    ap.add_argument("--prefetch", default="0,1,2", help="comma-separated prefetch depths")
    ap.add_argument("--frames", type=int, default=3, help="latent frames in the chunk")
    ap.add_argument("--context", type=int, default=6, help="committed latent frames before the chunk")
    ap.add_argument("--hw", default="60,104", help="latent h,w (60,104 = 480x832 video)")
    ap.add_argument("--batch", type=int, default=1, help="sessions batched in one call")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--source", choices=("memory", "disk"), default="memory",
                    help="disk: write the model to --disk-path and offload from that file")
    ap.add_argument("--disk-path", default="/tmp/streamgen_offload_bench.safetensors")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.prefetch = [int(p) for p in args.prefetch.split(",")]
    args.hw = tuple(int(v) for v in args.hw.split(","))
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    if device.type == "cuda":
        print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)

    rows = []
    for preset in args.presets.split(","):
        try:
            rows += bench_preset(preset, args, device)
        except Exception:  # report the other presets anyway
            traceback.print_exc()

    print("\n| model | batch | variant | ms / chunk | peak GiB | weights on GPU GiB | copy ms / fwd | copy GB/s | "
          "raw H2D GB/s | max abs diff |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        c = lambda k, fmt: format(r[k], fmt) if k in r else "-"  # noqa: E731
        print(f"| {r['preset']} | {r['batch']} | {r['variant']} | {r['ms']:.1f} | {r['peak_GiB']:.2f} | {r['weights_gpu_GiB']:.2f} "
              f"| {c('copy_ms_per_forward', '.1f')} | {c('copy_GBps', '.1f')} | {c('raw_h2d_GBps', '.1f')} "
              f"| {r['max_abs_diff']:.3g} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
