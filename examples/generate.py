"""Stream a video chunk by chunk with the library API, switching the prompt midway.

    python examples/generate.py                 # built-in tiny model (random weights: noise-like video)
    python examples/generate.py --checkpoint self_forcing_dmd.pt --vae Wan2.1_VAE.pth \\
        --text-encoder Wan2.1-T2V-1.3B/ --width 832 --height 480 --device cuda

Every chunk comes out of ``session.next_chunk()`` as clean latents plus decoded frames; the
session keeps the DiT's KV cache and the decoder's causal cache between chunks. The same loop,
with a file writer, is what ``streamgen generate`` runs.
"""

import argparse
import time

import torch

from streamgen.models.text import load_text_encoder
from streamgen.models.wan import WanConfig, WanModel
from streamgen.media.encode import Mp4Writer
from streamgen.media.frames import to_uint8, unit_frames
from streamgen.sampling.stream import StreamConfig, SessionState


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="Self-Forcing / CausVid / Wan DiT weights (default: tiny random model)")
    p.add_argument("--vae", help="Wan2.1_VAE.pth (default: tiny random VAE)")
    p.add_argument("--text-encoder", help="umT5-XXL (default: built-in tiny encoder)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--chunks", type=int, default=6)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="example.mp4")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    # 1. shared components (one model serves many sessions)
    if args.checkpoint:
        from streamgen.models.checkpoints import load_wan_model

        model = load_wan_model(args.checkpoint, device=device, dtype=dtype)
    else:
        torch.manual_seed(0)
        model = WanModel(WanConfig.preset("tiny")).to(device)
    model.eval().requires_grad_(False)
    text = load_text_encoder(args.text_encoder, dim=model.cfg.text_dim, device=device,
                             dtype=dtype if args.text_encoder else torch.float32)
    if args.vae:
        from streamgen.models.wan_vae import load_wan_vae

        vae = load_wan_vae(args.vae, device=device, dtype=dtype)
    else:
        from streamgen.models.wan_vae import WanVAE, WanVAEConfig

        vae = WanVAE(WanVAEConfig.preset("tiny")).to(device).eval()

    # 2. one session = one stream: its own caches, noise generator and decoder state
    cfg = StreamConfig(num_steps=4, shift=5.0, seed=42)  # Self-Forcing's 4 warped steps
    fpc = cfg.frames_per_chunk or model.cfg.frames_per_chunk
    session = SessionState(model, "a lighthouse on a cliff at dawn", height=args.height, width=args.width,
                            config=cfg, text_encoder=text, decoder=vae, total_frames=args.chunks * fpc)

    # 3. the chunk loop; the prompt switch re-caches the KV window and applies from the next chunk
    with Mp4Writer(args.out, args.width, args.height, fps=16) as writer:
        for i in range(args.chunks):
            if i == args.chunks // 2:
                session.set_prompt("the lighthouse in a thunderstorm at night")
            t0 = time.perf_counter()
            chunk = session.next_chunk()
            frames = to_uint8(unit_frames(chunk.frames)).cpu().numpy()  # (T, H, W, 3) uint8
            dt = time.perf_counter() - t0
            writer.write(frames)
            print(f"chunk {chunk.index}: latent frames {chunk.start_frame}..{chunk.start_frame + chunk.latents.shape[2]}, "
                  f"{len(frames)} video frames, {len(frames) / dt:.1f} frames/s" + (" (new prompt)" if chunk.switched else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
