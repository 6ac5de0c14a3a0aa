"""Train a Wan VAE (models/wan_vae.py) as an autoencoder on shapes videos.

The encoder's posterior mean is the latent (no KL term); a little Gaussian noise (``latent_noise``
times the batch's latent RMS) is added before the decoder so that it tolerates the imperfect
latents a DiT produces. Loss: L1 + MSE on pixels. Training runs through the same causal code
path as ``WanVAE.encode`` / ``decode_chunk`` (one fresh state per call, first chunk), so the
trained model streams as any Wan VAE does.

``latent_statistics`` measures the per-channel mean / std of the raw posterior means; a config
with them (``with_statistics``) makes ``encode`` return unit-scale latents for the DiT.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from streamgen.models.wan_vae import WanVAE, WanVAEConfig, WanVAEState
from streamgen.training import shapes


def raw_latents(vae: WanVAE, video: torch.Tensor) -> torch.Tensor:
    """(B, 3, 1+4k, H, W) in [-1, 1] -> un-normalised posterior mean (B, z, 1+k, H/8, W/8), with grads."""
    h = vae.encoder(video, WanVAEState(), first=True)
    return vae.conv1(h)[:, : vae.cfg.z_dim]


def decode_raw(vae: WanVAE, z: torch.Tensor) -> torch.Tensor:
    """Un-normalised latents -> (B, 3, T, H, W), unclamped, with grads (the first-chunk path)."""
    return vae.decoder(vae.conv2(z), WanVAEState(), first=True)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.float(), b.float()).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def train_vae(vae: WanVAE, *, seconds: float, max_steps: int = 10**9, batch: int = 16, frames: int = 17,
              size: int = 128, lr: float = 2e-3, latent_noise: float = 0.1, seed: int = 0,
              log: Callable[[str], None] = print) -> dict:
    """Train ``vae`` in place for ``seconds`` (or ``max_steps``) on random shapes clips (random
    start frames, so later-in-stream motion is covered). Returns {"steps", "seconds", "psnr"}."""
    device = next(vae.parameters()).device
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    vae.train().requires_grad_(True)
    t0 = time.perf_counter()
    step, last = 0, float("nan")
    while step < max_steps:
        elapsed = time.perf_counter() - t0
        if elapsed > seconds:
            break
        frac = elapsed / seconds
        for group in opt.param_groups:  # warm-up, then cosine to 5%
            group["lr"] = lr * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        b = shapes.sample_batch(batch, size, gen).to(device)
        start = torch.where(torch.rand(batch, generator=gen) < 0.3, 0, torch.randint(0, 400, (batch,), generator=gen))
        video = shapes.render(b, start.to(device), frames)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            z = raw_latents(vae, video)
            rms = z.detach().float().pow(2).mean().sqrt()
            z = z + latent_noise * rms * torch.randn_like(z)
            rec = decode_raw(vae, z).float()
        loss = (rec - video).abs().mean() + F.mse_loss(rec, video)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 200 == 0 or step == 1:
            last = psnr(rec.detach().clamp(-1, 1), video)
            log(f"vae step {step} {time.perf_counter() - t0:.0f}s loss {loss.item():.4f} psnr {last:.2f} dB")
    vae.eval().requires_grad_(False)
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "psnr_train": round(last, 2)}


@torch.no_grad()
def latent_statistics(vae: WanVAE, *, clips: int = 256, batch: int = 32, frames: int = 17, size: int = 128,
                      seed: int = 1) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) of raw posterior means over ``clips`` random clips."""
    device = next(vae.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    s = s2 = None
    n = 0
    for i in range(0, clips, batch):
        b = shapes.sample_batch(min(batch, clips - i), size, gen).to(device)
        z = raw_latents(vae, shapes.render(b, 0, frames)).float()  # (B, z, f, h, w)
        zc = z.transpose(0, 1).reshape(z.shape[1], -1)
        s = zc.sum(1) if s is None else s + zc.sum(1)
        s2 = zc.pow(2).sum(1) if s2 is None else s2 + zc.pow(2).sum(1)
        n += zc.shape[1]
    mean = s / n
    std = (s2 / n - mean.pow(2)).clamp_min(1e-8).sqrt()
    return [round(float(v), 5) for v in mean], [round(float(v), 5) for v in std]


def with_statistics(vae: WanVAE, mean: list[float], std: list[float]) -> WanVAE:
    """Set the VAE's latent normalisation to (mean, std) in place (config and cached tensors)."""
    vae.cfg = dataclasses.replace(vae.cfg, latents_mean=tuple(mean), latents_std=tuple(std))
    vae._stats.clear()
    return vae


@torch.no_grad()
def evaluate_vae(vae: WanVAE, *, clips: int = 16, frames: int = 17, size: int = 128, seed: int = 2) -> float:
    """PSNR (dB) of encode -> decode over random clips, through the public streaming API."""
    device = next(vae.parameters()).device
    b = shapes.sample_batch(clips, size, torch.Generator().manual_seed(seed)).to(device)
    video = shapes.render(b, 0, frames)
    rec = vae.decode(vae.encode(video))
    return psnr(rec, video.to(rec.dtype))


def make_vae(base_dim: int = 8) -> WanVAE:
    return WanVAE(WanVAEConfig.preset("tiny", base_dim=base_dim))
