"""Train a block-causal Wan DiT with flow matching on shapes latents, and score its streams.

Data (``build_dataset``): per item, a caption and two encodings of one clip's motion:
``a`` = the first ``latent_frames`` latents of the clip from frame 0, and ``b`` = ``window``
latents that start at latent position ``P`` (random, ``burn`` + 1 .. ``max_position``): the clip
is rendered from video frame 4(P-1-burn), encoded, and its last ``window`` latents kept (the
first ``burn`` + 1 only warm up the encoder's causal caches), so ``b[j]`` covers the same video
frames as latent ``P + j`` of a long stream.

Each training sequence has ``latent_frames`` frames, in one of two layouts:

* contiguous: ``a`` at RoPE frame positions 0 .. F-1 (the start of a stream);
* sink + window: ``a[:sink]`` at positions 0 .. sink-1, then ``b`` at P .. P+window-1: what a
  chunk of an endless stream sees with a rolling attention window and attention sink (the
  engine's ``local_frames=12, sink_frames=3``), the sink arbitrarily far in the past.

Noise (diffusion forcing, CausVid / Self-Forcing style): every block of ``frames_per_block``
frames gets its own timestep, from the shift-5 flow-matching distribution or, a part of the time,
the Self-Forcing 4-step list; for half the sequences the first k blocks are clean (t = 0) as the
cache pass makes them at inference. Loss: MSE to the flow ``noise - x0`` over noisy blocks;
attention is block-causal. The caption encoder is the fixed ``TinyTextEncoder``.

``flow_forward`` is ``WanModel.forward`` with per-sample frame positions for RoPE (needed for the
sink layout); for contiguous positions it equals ``model(x, t, ctx, frames_per_block=k)``.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch

from streamgen.models.wan import WanModel, _block_causal_attention, rope_split
from streamgen.sampling.schedules import self_forcing_timesteps, shift_sigmas
from streamgen.training import shapes


def rope_at(head_dim: int, pos: torch.Tensor, h: int, w: int, theta: float = 10000.0):
    """cos/sin (B, F*h*w, 1, head_dim/2) float32 for frames at positions ``pos`` (B, F) on an h x w
    grid: ``rope_cos_sin`` with a frame position per sample and frame."""
    b, f = pos.shape
    dev = pos.device
    nf, nh, nw = rope_split(head_dim)

    def inv(n: int) -> torch.Tensor:
        return 1.0 / theta ** (torch.arange(0, n, 2, device=dev, dtype=torch.float64) / n)

    af = pos.double()[..., None] * inv(nf)  # (B, F, nf/2)
    ah = torch.arange(h, device=dev, dtype=torch.float64)[:, None] * inv(nh)  # (h, nh/2)
    aw = torch.arange(w, device=dev, dtype=torch.float64)[:, None] * inv(nw)  # (w, nw/2)
    ang = torch.cat([
        af.view(b, f, 1, 1, -1).expand(b, f, h, w, -1),
        ah.view(1, 1, h, 1, -1).expand(b, f, h, w, -1),
        aw.view(1, 1, 1, w, -1).expand(b, f, h, w, -1),
    ], dim=-1).reshape(b, f * h * w, 1, head_dim // 2)  # fmt: skip
    return ang.cos().float(), ang.sin().float()


def flow_forward(model: WanModel, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pos: torch.Tensor,
                 frames_per_block: int) -> torch.Tensor:
    """Block-causal flow prediction with RoPE frame positions ``pos`` (B, F); x (B, 16, F, h, w),
    t (B, F) on 0..1000, context (B, L, text_dim). Differentiable."""
    b = x.shape[0]
    tokens, grid = model._patchify(x)
    e, e0 = model._time(t, b, grid[0])
    ctx = model.embed_text(context)
    f, h, w = grid
    rope = rope_at(model.cfg.head_dim, pos, h, w)

    def self_attn(q, k, v):
        return _block_causal_attention(q, k, v, h * w, f, frames_per_block, None, 0)

    for block in model.blocks:
        tokens = block(tokens, e0, rope, self_attn, block.cross_attn.key_value(ctx), model.dtype)
    return model._unpatchify(model.head(tokens, e, model.dtype), grid)


# -- data ------------------------------------------------------------------------------------------


@torch.no_grad()
def build_dataset(vae, *, items: int, seconds: float = float("inf"), size: int = 128, latent_frames: int = 12,
                  window: int = 9, burn: int = 4, max_position: int = 400, batch: int = 32, seed: int = 3,
                  log: Callable[[str], None] = print) -> dict:
    """Encode up to ``items`` captioned clips (stops early after ``seconds``); see the module doc.
    Returns {"a": (N,16,latent_frames,h,w) bf16, "b": (N,16,window,h,w) bf16, "position": (N,) long,
    "captions": list[str]} on the VAE's device."""
    device = next(vae.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    a, bb, pos, caps = [], [], [], []
    t0 = time.perf_counter()
    n = 0
    while n < items and time.perf_counter() - t0 < seconds:
        m = min(batch, items - n)
        sb = shapes.sample_batch(m, size, gen, empty_prob=0.05).to(device)
        p = torch.randint(1 + burn, max_position + 1, (m,), generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            a.append(vae.encode(shapes.render(sb, 0, 1 + 4 * (latent_frames - 1))).to(torch.bfloat16))
            later = shapes.render(sb, (4 * (p - 1 - burn)).to(device), 1 + 4 * (burn + window))
            bb.append(vae.encode(later)[:, :, -window:].to(torch.bfloat16))
        pos.append(p)
        caps += sb.captions
        n += m
    log(f"dataset: {n} clips encoded in {time.perf_counter() - t0:.1f}s")
    return {"a": torch.cat(a), "b": torch.cat(bb), "position": torch.cat(pos).to(device), "captions": caps}


def caption_table(captions: list[str], text_encoder, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique contexts (U, L, dim) trimmed to the longest caption, index (N,) into them)."""
    uniq = sorted(set(captions))
    where = {c: i for i, c in enumerate(uniq)}
    ctx = text_encoder.encode(uniq)  # (U, text_len, dim)
    used = int((ctx.abs().sum(-1) > 0).any(0).nonzero().max()) + 1
    return ctx[:, :used].to(device), torch.tensor([where[c] for c in captions], device=device)


# -- training --------------------------------------------------------------------------------------


def sample_timesteps(batch: int, blocks: int, shift: float, sf_fraction: float, clean_fraction: float,
                     generator: torch.Generator) -> torch.Tensor:
    """Per-block timesteps (batch, blocks) on 0..1000 (see the module doc)."""
    u = torch.rand(batch, blocks, generator=generator, dtype=torch.float64)
    t = shift_sigmas(u, shift) * 1000.0
    sf = self_forcing_timesteps(4, shift)
    pick = sf[torch.randint(0, len(sf), (batch, blocks), generator=generator)]
    t = torch.where(torch.rand(batch, blocks, generator=generator, dtype=torch.float64) < sf_fraction, pick, t)
    k = torch.randint(1, blocks, (batch, 1), generator=generator)
    clean = (torch.arange(blocks)[None] < k) & (torch.rand(batch, 1, generator=generator) < clean_fraction)
    return torch.where(clean, 0.0, t).float()


def train_dit(model: WanModel, data: dict, text_encoder, *, seconds: float, max_steps: int = 10**9, batch: int = 64,
              lr: float = 6e-4, frames_per_block: int = 3, sink: int = 3, shift: float = 5.0,
              sf_fraction: float = 0.3, clean_fraction: float = 0.5, ema_decay: float = 0.999, seed: int = 4,
              log: Callable[[str], None] = print) -> tuple[WanModel, dict]:
    """Train ``model`` in place; returns (EMA copy of the model, {"steps", "seconds", "loss"})."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(seed)
    gen_dev = torch.Generator(device).manual_seed(seed)
    ctx_table, ctx_index = caption_table(data["captions"], text_encoder, device)
    a, b, position = data["a"], data["b"], data["position"]
    n, _, frames = a.shape[:3]
    window = b.shape[2]
    if sink + window != frames or frames % frames_per_block or sink % frames_per_block:
        raise ValueError(f"layout mismatch: sink {sink} + window {window} must equal {frames} latent frames, "
                         f"all multiples of frames_per_block {frames_per_block}")
    blocks = frames // frames_per_block
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    decay_params = [p for name, p in model.named_parameters() if p.ndim >= 2 and "modulation" not in name]
    other = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "modulation" not in name)]
    opt = torch.optim.AdamW([{"params": decay_params, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))
    model.train().requires_grad_(True)
    contiguous = torch.arange(frames, device=device)
    t0 = time.perf_counter()
    step, avg = 0, None
    while step < max_steps:
        elapsed = time.perf_counter() - t0
        if elapsed > seconds:
            break
        frac = elapsed / seconds
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.randint(0, n, (batch,), generator=gen).to(device)
        sinky = (torch.rand(batch, generator=gen) < 0.5).to(device)
        x0 = torch.where(sinky.view(-1, 1, 1, 1, 1), torch.cat([a[idx, :, :sink], b[idx]], dim=2), a[idx]).float()
        gap = torch.cat([contiguous[:sink].expand(batch, -1),
                         position[idx, None] + torch.arange(window, device=device)], dim=1)
        pos = torch.where(sinky[:, None], gap, contiguous.expand(batch, -1))  # (B, F)
        t = sample_timesteps(batch, blocks, shift, sf_fraction, clean_fraction, gen).to(device)
        t = t.repeat_interleave(frames_per_block, dim=1)  # (B, F)
        sigma = (t / 1000.0).view(batch, 1, frames, 1, 1)
        noise = torch.randn(x0.shape, generator=gen_dev, device=device)
        xt = (1 - sigma) * x0 + sigma * noise
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            pred = flow_forward(model, xt, t, ctx_table[ctx_index[idx]], pos, frames_per_block)
        err = (pred.float() - (noise - x0)).pow(2).mean(dim=(1, 3, 4))  # (B, F)
        weight = (t > 0).float()
        loss = (err * weight).sum() / weight.sum().clamp_min(1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        if step % 10 == 1:  # a host sync every 10 steps only
            avg = loss.item() if avg is None else 0.9 * avg + 0.1 * loss.item()
        if step % 500 == 0 or step == 1:
            log(f"dit step {step} {time.perf_counter() - t0:.0f}s loss {avg:.4f} lr {opt.param_groups[0]['lr']:.2e}")
    model.eval().requires_grad_(False)
    return ema, {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "loss": round(float(avg or 0), 4)}


# -- evaluation -------------------------------------------------------------------------------------


@torch.no_grad()
def stream_frames(model, vae, text_encoder, prompt: str, *, chunks: int, sampler: str = "self-forcing",
                  steps: int = 4, shift: float = 5.0, guidance: float = 1.0, local_frames: int | None = 12,
                  sink_frames: int = 3, seed: int = 0, size: int = 128):
    """Generate ``chunks`` chunks through ``SessionState`` -> uint8 (T, H, W, 3) on the CPU."""
    from streamgen.sampling.stream import StreamConfig, SessionState

    p = next(model.parameters())
    cfg = StreamConfig(num_steps=steps, shift=shift, sampler=sampler, guidance_scale=guidance,
                       local_frames=local_frames, sink_frames=sink_frames if local_frames else None, seed=seed)
    session = SessionState(model, prompt, height=size, width=size, config=cfg, text_encoder=text_encoder, decoder=vae,
                            negative_prompt="" if guidance != 1.0 else None,
                            total_frames=chunks * model.cfg.frames_per_chunk, device=p.device, dtype=p.dtype)
    from streamgen.media.frames import to_uint8, unit_frames

    frames = torch.cat([session.next_chunk().frames for _ in range(chunks)], dim=2)  # (1, 3, T, H, W)
    return to_uint8(unit_frames(frames)).cpu()


def score(frames, prompt: str) -> dict:
    """Does the video show what ``prompt`` asks? Per attribute named in the prompt: 1.0 / 0.0;
    plus ``stray`` and ``area`` from ``shapes.analyse``."""
    want = shapes.parse_caption(prompt)
    st = shapes.analyse(frames)
    out = {"stray": round(st["stray"], 4), "area": round(st["area"], 4)}
    if want["colour"] is not None:
        out["colour"] = float(not math.isnan(st["object"][0]) and shapes.nearest_colour(st["object"]) == want["colour"])
    if want["background"] is not None:
        out["background"] = float(shapes.nearest_colour(st["background"], shapes.BACKGROUNDS) == want["background"])
    if want["motion"] is not None:
        out["motion"] = float(shapes.motion_of(st) == want["motion"])
    return out


EVAL_PROMPTS = [
    "a red circle moving right on a black background",
    "a blue square moving left on a white background",
    "a green triangle moving up on a gray background",
    "a yellow circle moving down on a blue background",
    "a white square bouncing on a black background",
    "a purple triangle moving right on a white background",
    "a orange square moving up on a green background",
    "a cyan circle bouncing on a gray background",
]
