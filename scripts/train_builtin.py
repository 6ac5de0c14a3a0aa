"""Train the built-in "shapes" model: a small Wan VAE and a small block-causal Wan DiT on procedural
videos of coloured shapes (streamgen/training), then score its streams per sampler.

    PYTHONPATH=. python scripts/train_builtin.py --out out/ --vae-seconds 90 --dit-seconds 210
    PYTHONPATH=. python scripts/train_builtin.py --out out/ --resume streamgen/weights/shapes.safetensors \\
        --vae-seconds 0 --dit-seconds 120        # continue the DiT with the shipped VAE

Writes OUT/shapes.safetensors (copy it to streamgen/weights/), OUT/train_log.txt, OUT/metrics.json
and OUT/samples_<sampler>.png (rows: evaluation prompts; columns: frames along the stream).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

SAMPLERS = {  # name -> (sampler, steps, shift, guidance)
    "sf4": ("self-forcing", 4, 5.0, 1.0),
    "euler8": ("euler", 8, 5.0, 1.0),
    "euler16": ("euler", 16, 5.0, 1.0),
    "euler16-cfg2": ("euler", 16, 5.0, 2.0),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--resume", default=None, help="built-in weights file to start from (VAE and DiT)")
    p.add_argument("--vae-base", type=int, default=8)
    p.add_argument("--vae-seconds", type=float, default=75)
    p.add_argument("--vae-steps", type=int, default=10**9)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-burn", type=int, default=6, help="most latent frames streamed before the trained ones")
    p.add_argument("--vae-crop", type=int, default=64)
    p.add_argument("--object-weight", type=float, default=10.0)
    p.add_argument("--stats-clips", type=int, default=256, help="clips for the latent statistics (and /16 for the VAE score)")
    p.add_argument("--items", type=int, default=6144, help="clips in the DiT dataset")
    p.add_argument("--data-seconds", type=float, default=45)
    p.add_argument("--dit-dim", type=int, default=128)
    p.add_argument("--dit-layers", type=int, default=6)
    p.add_argument("--dit-seconds", type=float, default=200)
    p.add_argument("--dit-steps", type=int, default=10**9)
    p.add_argument("--dit-batch", type=int, default=96)
    p.add_argument("--dit-lr", type=float, default=6e-4)
    p.add_argument("--eval-chunks", type=int, default=8)
    p.add_argument("--eval-prompts", type=int, default=8)
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--deadline", type=float, default=float("inf"), help="seconds after which no further sampler is scored")
    args = p.parse_args()

    from streamgen.models.text import load_text_encoder
    from streamgen.models.wan import WanConfig, WanModel
    from streamgen.training import dit, vae as vae_train
    from streamgen.weights import load_builtin, save_builtin

    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "train_log.txt"), "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    log(f"train_builtin: {card}, torch {torch.__version__}, args {vars(args)}")
    t_all = time.perf_counter()
    info: dict = {"card": card, "torch": torch.__version__, "size": args.size}
    torch.manual_seed(0)

    # 1. VAE
    if args.resume:
        model, vae, prev = load_builtin(args.resume, device=device)
        info["resumed_from"] = prev
    else:
        vae = vae_train.make_vae(args.vae_base).to(device)
        model = None
    if args.vae_seconds > 0:
        info["vae"] = vae_train.train_vae(vae, seconds=args.vae_seconds, max_steps=args.vae_steps, batch=args.vae_batch,
                                          max_burn=args.vae_burn, size=args.size, crop=args.vae_crop,
                                          object_weight=args.object_weight, log=log)
        mean, std = vae_train.latent_statistics(vae, clips=args.stats_clips, size=args.size)
        vae_train.with_statistics(vae, mean, std)
        log(f"latent mean {mean}\nlatent std {std}")
    whole, last = vae_train.evaluate_vae(vae, clips=max(2, args.stats_clips // 16), size=args.size)
    info["vae_psnr"], info["vae_psnr_last_chunk"] = round(whole, 2), round(last, 2)
    log(f"vae: PSNR {whole:.2f} dB over 69-frame streams decoded 3 latents a chunk, {last:.2f} dB on the last chunk")

    # 2. DiT
    cfg = WanConfig(dim=args.dit_dim, ffn_dim=4 * args.dit_dim, num_heads=args.dit_dim // 64, num_layers=args.dit_layers,
                    text_dim=64, frames_per_chunk=3, local_frames=12, sink_frames=3)
    if model is None or model.cfg != cfg:
        model = WanModel(cfg).to(device)
    model = model.float().requires_grad_(True)
    text = load_text_encoder(None, dim=cfg.text_dim, device=device, dtype=torch.float32)
    data = dit.build_dataset(vae, items=args.items, seconds=args.data_seconds, size=args.size, log=log)
    ema, info["dit"] = dit.train_dit(model, data, text, seconds=args.dit_seconds, max_steps=args.dit_steps,
                                     batch=args.dit_batch, lr=args.dit_lr, log=log)
    info["dataset_clips"] = len(data["captions"])
    del data
    path = os.path.join(args.out, "shapes.safetensors")
    info["train_seconds"] = round(time.perf_counter() - t_all, 1)
    save_builtin(path, ema, vae, training=info)
    log(f"saved {path} ({os.path.getsize(path) / 1e6:.2f} MB)")

    # 3. score streams per sampler (local_frames 12, sink 3: the engine's window)
    prompts = dit.EVAL_PROMPTS[: args.eval_prompts]
    metrics = {}
    for name in args.samplers.split(","):
        sampler, steps, shift, guidance = SAMPLERS[name]
        if time.perf_counter() - t_all > args.deadline:
            log(f"eval {name}: skipped (past --deadline {args.deadline:.0f}s)")
            continue
        t0 = time.perf_counter()
        rows, scores = [], []
        for i, prompt in enumerate(prompts):
            fr = dit.stream_frames(ema, vae, text, prompt, chunks=args.eval_chunks, sampler=sampler, steps=steps,
                                   shift=shift, guidance=guidance, seed=i, size=args.size)
            scores.append(dit.score(fr, prompt))
            rows.append(torch.cat([fr[j] for j in torch.linspace(0, fr.shape[0] - 1, 6).long().tolist()], dim=1))
        keys = sorted({k for s in scores for k in s})
        mean = {k: round(sum(s[k] for s in scores if k in s) / sum(k in s for s in scores), 3) for k in keys}
        mean["seconds"] = round(time.perf_counter() - t0, 1)
        metrics[name] = {"mean": mean, "per_prompt": dict(zip(prompts, scores))}
        log(f"eval {name:13s} " + " ".join(f"{k} {v}" for k, v in mean.items()))
        try:
            from PIL import Image

            Image.fromarray(torch.cat(rows, dim=0).numpy()).save(os.path.join(args.out, f"samples_{name}.png"))
        except ImportError:
            pass
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"training": info, "eval": metrics}, f, indent=1)
    log(f"total {time.perf_counter() - t_all:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
