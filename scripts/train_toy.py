"""Train ``streamgen-toy`` (streamgen/training/toy.py): autoencoder, then DiT + text encoder with
teacher forcing, then with self-generated context; export streamgen/weights/toy.safetensors.

Each call is one GPU piece (a time budget per stage; keep a call under 10 minutes), resumable:

    python scripts/train_toy.py --out $OUT --ae-seconds 100 --dit-seconds 330 --self-frac 0.5
    python scripts/train_toy.py --out $OUT --resume prev_out/ --ae-seconds 0 --dit-seconds 300

Writes OUT/ckpt-NN.safetensors (resumable state: all parts in float32 + EMA, see
``toy.save_checkpoint``), OUT/toy.safetensors (the EMA weights in float16: copy it to
streamgen/weights/), OUT/train_log.txt and OUT/metrics.json (losses, autoencoder PSNR, a quick
held-out check). ``--tiny`` runs a few steps of every stage on tiny settings (CPU smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", default=None, help="folder with ckpt-NN.safetensors of an earlier call")
    p.add_argument("--device", default="auto")
    p.add_argument("--ae-seconds", type=float, default=100)
    p.add_argument("--ae-batch", type=int, default=24)
    p.add_argument("--dit-seconds", type=float, default=330)
    p.add_argument("--dit-batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--self-frac", type=float, default=0.5, help="share of sequences with self-generated context")
    p.add_argument("--self-after", type=float, default=0.4, help="from this fraction of the DiT time on")
    p.add_argument("--switch-prob", type=float, default=0.35, help="share of sequences with a prompt switch")
    p.add_argument("--switch-weights", default=None, metavar="KIND=W,...",
                   help="relative odds of the switch kinds colour, shape, motion, background (default: equal), "
                        "e.g. shape=3 to train shape changes three times as often")
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--eval-prompts", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny models, 64 px, 2 steps a stage (smoke test)")
    args = p.parse_args(argv)

    from streamgen.training import toy, toy_data

    weights = None
    if args.switch_weights:
        weights = dict.fromkeys(("colour", "shape", "motion", "background"), 1.0)
        for item in args.switch_weights.split(","):
            kind, _, w = item.partition("=")
            try:
                if kind.strip() not in weights or float(w) < 0:
                    raise ValueError
                weights[kind.strip()] = float(w)
            except ValueError:
                p.error(f"--switch-weights: {item!r} is not KIND=W with KIND one of {', '.join(weights)} and W >= 0")
    from streamgen.weights import TOY_SAMPLING, save_toy

    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "train_log.txt"), "a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log(f"device {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    size = 64 if args.tiny else 128
    steps = 2 if args.tiny else args.max_steps
    info: dict = {}
    if args.resume:
        parts, ema, info = toy.load_checkpoint(args.resume, dev)
        log(f"resumed from {args.resume}: {json.dumps(info)[:300]}")
    else:
        if args.tiny:
            parts = toy.new_parts(toy.TINY_CONFIG, decoder_channels=(8, 8, 8, 8), encoder_width=8, seed=args.seed)
        else:
            parts = toy.new_parts(seed=args.seed)
        for m in parts.modules().values():
            m.to(dev)
        ema = toy.ema_copy(parts)
    n_dit = sum(p.numel() for p in parts.model.parameters())
    n_dec = sum(p.numel() for p in parts.decoder.parameters())
    n_txt = sum(p.numel() for p in parts.text.parameters())
    log(f"params: dit {n_dit / 1e6:.2f}M decoder {n_dec / 1e6:.2f}M text {n_txt / 1e6:.2f}M")
    history = info.setdefault("runs", [])
    run: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
                 else "cpu", "args": vars(args)}  # fmt: skip

    # 1. autoencoder
    if args.ae_seconds > 0:
        run["ae"] = toy.train_ae(parts, seconds=args.ae_seconds, max_steps=steps, batch=2 if args.tiny else args.ae_batch,
                                 size=size, seed=args.seed + 1, log=log)
        run["ae"]["psnr_streamed"] = round(toy.ae_psnr(parts, random.Random(7), batch=2 if args.tiny else 8, size=size), 2)
        log(f"ae streamed PSNR {run['ae']['psnr_streamed']} dB")
    if args.ae_seconds > 0 or not args.resume:
        run.setdefault("ae", {})["heldout_accuracy"] = toy.ae_attribute_accuracy(parts, n=4 if args.tiny else 64, size=size)
        log(f"ae held-out attribute accuracy (the decoder's ceiling): {run['ae']['heldout_accuracy']}")
    parts.encoder.eval().requires_grad_(False)
    parts.decoder.eval().requires_grad_(False)

    # 2-3. DiT + text encoder (teacher forcing, then self-generated context)
    if args.dit_seconds > 0:
        run["dit"] = toy.train_dit(parts, ema, seconds=args.dit_seconds, max_steps=steps,
                                   batch=2 if args.tiny else args.dit_batch, lr=args.lr, size=size,
                                   self_frac=args.self_frac, self_after=0.0 if args.tiny else args.self_after,
                                   seed=args.seed + 2 + 100 * len(history), warmup=2 if args.tiny else
                                   (50 if args.resume else 200), switch_prob=args.switch_prob,
                                   switch_weights=weights, log=log)  # fmt: skip
    history.append(run)

    # 4. save: resumable shards + the shipped file (EMA weights)
    toy.save_checkpoint(args.out, parts, ema, info)
    sampling = dict(TOY_SAMPLING, width=size, height=size)
    save_toy(os.path.join(args.out, "toy.safetensors"), ema.model, ema.text, parts.decoder, sampling=sampling,
             training={"runs": [{k: v for k, v in r.items() if k != "args"} for r in history]})
    log("saved checkpoint + toy.safetensors")

    # 5. quick held-out check (first 4 chunks)
    metrics = {"runs": history}
    if args.eval_prompts > 0:
        prompts = toy_data.heldout_prompts(args.eval_prompts)
        frames, starts = toy.stream(ema.model, ema.text, parts.decoder, [p for p, _ in prompts], chunks=4, size=size)
        hits = {"colour": 0, "shape": 0, "motion": 0, "background": 0}
        for i, (_, c) in enumerate(prompts):
            a = toy_data.analyse_clip(frames[i])
            for k, want in zip(("colour", "shape", "motion", "background"), c):
                hits[k] += a[k] == want
        metrics["quick_eval"] = {k: round(v / len(prompts), 3) for k, v in hits.items()}
        log(f"quick held-out eval ({len(prompts)} prompts, 4 chunks): {metrics['quick_eval']}")
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
