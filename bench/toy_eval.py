"""Evaluate ``streamgen-toy`` against the renderer's ground truth (streamgen/training/toy_data.py).

    python bench/toy_eval.py                       # shipped weights, CPU, all sections
    python bench/toy_eval.py --device cuda --weights out/toy.safetensors --json out/eval.json
    python bench/toy_eval.py --speed-only          # CPU speed, 2 threads

Sections (every stream goes through the engine's ``SessionState`` chunk loop with the toy's
recommended settings, 4 self-forcing steps, no CFG; all prompts of a section in one batch):

1. held-out prompts (combinations never trained on; ``--prompts``, default 60): colour, shape,
   motion and background of chunks 1-4 (0.56 s to 3.56 s; a motion needs more than the first
   chunk's 9 frames to read) by ``toy_data.analyse_clip``, compared with the prompt's; also the
   first chunk alone (colour, shape, background);
2. temporal stability: flicker = mean |frame difference| (0-255) on background pixels of
   consecutive frames inside a chunk; boundary jump ratio = mean |difference| of the last frame
   of a chunk and the first of the next over the mean inside chunks (1.0 = seamless);
3. prompt switch: after 3 chunks the prompt changes one attribute (colour, background or shape,
   in turn); chunks until the chunk whose majority reading is the new value (1 = the first chunk
   after the switch; > 3 counts as never);
4. drift: the held-out checks on the last 4 chunks of a ``--drift-seconds`` (120) stream against
   its chunks 1-4 (``--drift-prompts`` of the held-out prompts);
5. speed: one stream, 128x128, ``torch.set_num_threads(--threads)``: text encode + chunk loop +
   decode, generated frames per second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from streamgen.training import toy, toy_data as td  # noqa: E402

ATTRS = ("colour", "shape", "motion", "background")


def accuracy(frames: torch.Tensor, combos, first: int, last: int) -> dict:
    """Per attribute, the share of streams whose frames [first, last) read back as asked."""
    hits = {a: 0 for a in ATTRS}
    per = []
    for i, c in enumerate(combos):
        got = td.analyse_clip(frames[i, :, first:last])
        ok = {a: got[a] == want for a, want in zip(ATTRS, c)}
        per.append({"got": {a: got[a] for a in ATTRS}, "ok": ok})
        for a in ATTRS:
            hits[a] += ok[a]
    return {"acc": {a: hits[a] / len(combos) for a in ATTRS}, "per": per}


def temporal(frames: torch.Tensor, starts: list[int]) -> dict:
    """Flicker (background pixels, inside chunks) and the boundary / inside-chunk jump ratio."""
    x = frames.add(1).mul(127.5)  # (B, 3, T, H, W) 0..255
    t = x.shape[2]
    bounds = set(starts[1:])
    inside, boundary, flick = [], [], []
    for k in range(1, t):
        d = (x[:, :, k] - x[:, :, k - 1]).abs().mean(1)  # (B, H, W)
        if k in bounds:
            boundary.append(d.mean().item())
        else:
            inside.append(d.mean().item())
            bgm = torch.stack([~td.analyse_frame(frames[b, :, k])["mask"] & ~td.analyse_frame(frames[b, :, k - 1])["mask"]
                               for b in range(x.shape[0])])  # fmt: skip
            flick.append((d * bgm).sum().item() / bgm.sum().clamp_min(1).item())
    mi, mb = sum(inside) / len(inside), sum(boundary) / max(1, len(boundary))
    return {"inside_jump": mi, "boundary_jump": mb, "boundary_ratio": mb / mi, "flicker_bg": sum(flick) / len(flick)}


def switch_targets(combos) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    kinds = ("colour", "background", "shape")
    before, after, what = [], [], []
    for i, (c, s, m, b) in enumerate(combos):
        kind = kinds[i % 3]
        if kind == "colour":
            new = td.COLOUR_NAMES[(td.COLOUR_NAMES.index(c) + 3 + i % 4) % 8]
            after.append(td.prompt_for(new, s, m, b, seed=i))
        elif kind == "background":
            new = td.BACKGROUND_NAMES[(td.BACKGROUND_NAMES.index(b) + 1 + i % 4) % 5]
            after.append(td.prompt_for(c, s, m, new, seed=i))
        else:
            new = td.SHAPE_NAMES[(td.SHAPE_NAMES.index(s) + 1 + i % 3) % 4]
            after.append(td.prompt_for(c, new, m, b, seed=i))
        before.append(td.prompt_for(c, s, m, b, seed=i))
        what.append((kind, new))
    return before, after, what


def switch_latency(frames: torch.Tensor, starts: list[int], what, at: int, max_after: int = 3) -> list[int]:
    out = []
    bounds = starts + [frames.shape[2]]
    for i, (kind, new) in enumerate(what):
        n = max_after + 1
        for k in range(max_after):
            c = at + k
            got = td.analyse_clip(frames[i, :, bounds[c] : bounds[c + 1]])[kind]
            if got == new:
                n = k + 1
                break
        out.append(n)
    return out


def speed(model, text, decoder, threads: int, chunks: int = 24, size: int = 128, device: str = "cpu") -> dict:
    """One stream's chunk loop (text encode, 4 steps + cache pass, decode) on ``device``."""
    from streamgen.sampling.stream import SessionState, StreamConfig

    torch.set_num_threads(threads)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    s = toy.SAMPLING
    cfg = StreamConfig(num_steps=s["num_steps"], shift=s["shift"], frames_per_chunk=s["frames_per_chunk"],
                       local_frames=s["local_frames"], sink_frames=s["sink_frames"])  # fmt: skip
    warm = SessionState(model, "a red ball moving right on black", height=size, width=size, config=cfg,
                        text_encoder=text, decoder=decoder, device=dev)  # fmt: skip
    for _ in range(3):
        warm.next_chunk()
    sync()
    t0 = time.perf_counter()
    sess = SessionState(model, "a cobalt box rising over a dark blue sky", height=size, width=size, config=cfg,
                        text_encoder=text, decoder=decoder, device=dev)  # fmt: skip
    n = 0
    for _ in range(chunks):
        n += sess.next_chunk().frames.shape[2]
    sync()
    dt = time.perf_counter() - t0
    return {"device": str(dev), "threads": threads, "size": size, "frames": n, "seconds": dt, "fps": n / dt,
            "ms_per_chunk": 1000 * dt / chunks}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=60)
    p.add_argument("--drift-seconds", type=float, default=120)
    p.add_argument("--drift-prompts", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--speed-sizes", default="128", help="comma-separated square sizes for the speed section")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--speed-device", default="cpu", help="where the speed section runs (cpu: the goal's 2-core figure)")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from streamgen.weights import load_toy

    dev = torch.device(args.device)
    model, text, decoder = load_toy(dev, torch.float32, path=args.weights)
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
                 else f"cpu ({os.cpu_count()} cores)", "command": " ".join(["python bench/toy_eval.py"] + (argv or sys.argv[1:]))}  # fmt: skip
    if not args.speed_only:
        prompts = td.heldout_prompts(args.prompts)
        texts, combos = [p for p, _ in prompts], [c for _, c in prompts]
        t0 = time.perf_counter()
        # 1-2. held-out accuracy, temporal stability (first 4 chunks)
        frames, starts = toy.stream(model, text, decoder, texts, chunks=5, seed=args.seed)
        a = accuracy(frames, combos, starts[1], frames.shape[2])
        res["heldout"] = a["acc"]
        res["heldout_first_chunk"] = accuracy(frames, combos, 0, starts[1])["acc"]
        res["temporal"] = temporal(frames, starts)
        res["examples"] = [{"prompt": t, "want": dict(zip(ATTRS, c)), **a["per"][i]} for i, (t, c) in
                           enumerate(zip(texts[:8], combos[:8]))]  # fmt: skip
        print(f"held-out ({len(texts)} prompts, chunks 1-4): {res['heldout']}  [{time.perf_counter() - t0:.0f}s]", flush=True)
        print(f"temporal: {res['temporal']}", flush=True)
        # 3. prompt switch after 3 chunks
        before, after, what = switch_targets(combos)
        fr, st = toy.stream(model, text, decoder, before, chunks=6, switch={3: after}, seed=args.seed + 1)
        lat = switch_latency(fr, st, what, at=3)
        res["switch"] = {"within_2": sum(n <= 2 for n in lat) / len(lat), "mean_chunks": sum(lat) / len(lat),
                         "by_kind": {k: sum(n <= 2 for n, (kk, _) in zip(lat, what) if kk == k) /
                                     max(1, sum(kk == k for kk, _ in what)) for k in ("colour", "background", "shape")},
                         "latencies": lat}  # fmt: skip
        print(f"switch: within 2 chunks {res['switch']['within_2']:.3f}, mean {res['switch']['mean_chunks']:.2f}, "
              f"{res['switch']['by_kind']}", flush=True)
        # 4. drift over a long stream
        if args.drift_seconds > 0:
            n = min(args.drift_prompts, len(texts))
            chunks = max(8, round(args.drift_seconds * td.FPS / 12))
            fr, st = toy.stream(model, text, decoder, texts[:n], chunks=chunks, seed=args.seed + 2)
            first = accuracy(fr, combos[:n], st[1], st[5])["acc"]
            last = accuracy(fr, combos[:n], st[-4], fr.shape[2])["acc"]
            res["drift"] = {"prompts": n, "chunks": chunks, "seconds": fr.shape[2] / td.FPS, "first": first, "last": last,
                            "temporal_last": temporal(fr[:, :, st[-4]:], [s - st[-4] for s in st[-4:]])}  # fmt: skip
            print(f"drift ({n} prompts, {chunks} chunks = {fr.shape[2] / td.FPS:.0f}s): first {first} last {last}", flush=True)
    if not args.no_speed:
        sdev = torch.device(args.speed_device)
        parts = load_toy(sdev, torch.float32, path=args.weights) if sdev != dev else (model, text, decoder)
        res["speed"] = [speed(*parts, threads=args.threads, size=int(s), device=str(sdev)) for s in args.speed_sizes.split(",")]
        for r in res["speed"]:
            print(f"speed: {r}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
