"""Train a Wan VAE (models/wan_vae.py) as an autoencoder on shapes videos.

The encoder's posterior mean is the latent (no KL term); a little Gaussian noise (``latent_noise``
times the batch's latent RMS) is added before the decoder so that it tolerates the imperfect
latents a DiT produces. Training runs through the causal streaming code path of ``WanVAE``
(carried conv caches; see ``train_vae``), so the trained model streams as any Wan VAE does.

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


def _encode_decode(vae: WanVAE, video: torch.Tensor, enc: WanVAEState, dec: WanVAEState, first: bool,
                   latent_noise: float) -> torch.Tensor:
    """One streaming step of the autoencoder (states carried): frames -> noisy latents -> frames."""
    z = vae.conv1(vae.encoder(video, enc, first=first))[:, : vae.cfg.z_dim]
    rms = z.detach().float().pow(2).mean().sqrt()
    z = z + latent_noise * rms * torch.randn_like(z)
    return vae.decoder(vae.conv2(z), dec, first=first)


def train_vae(vae: WanVAE, *, seconds: float, max_steps: int = 10**9, batch: int = 32, groups: int = 2,
              max_burn: int = 6, size: int = 128, crop: int | None = 64, lr: float = 2e-3, latent_noise: float = 0.1,
              object_weight: float = 10.0, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Train ``vae`` in place for ``seconds`` (or ``max_steps``) on random shapes clips.

    Streaming is what the VAE must do well: each step first runs a random number (0 ..
    ``max_burn``) of latent frames through encoder and decoder without gradients, carrying their
    causal caches, then trains on the next ``groups`` latent frames (4 video frames each; the
    stream's first frame too when there is no burn-in). So chunks deep into a stream, whose
    caches hold real history rather than the zero padding of a stream start, are trained.
    Videos are ``size`` x ``size`` cut to a random ``crop`` x ``crop`` window (the model is
    convolutional; the crop keeps the pixel scale). Pixels of the object weigh
    ``1 + object_weight`` in the L1 + MSE loss: the shape covers a few percent of the image and is
    otherwise learnt long after the background. Returns {"steps", "seconds", "psnr_train"}."""
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
        burn = int(torch.randint(0, max_burn + 1, (1,), generator=gen))
        b = shapes.sample_batch(batch, size, gen).to(device)
        start = torch.where(torch.rand(batch, generator=gen) < 0.3, 0, torch.randint(0, 400, (batch,), generator=gen))
        video = shapes.render(b, start.to(device), 1 + 4 * (burn + groups))
        if crop is not None and crop < size:
            y, x = torch.randint(0, size - crop + 1, (2,), generator=gen).tolist()
            video = video[..., y : y + crop, x : x + crop]
        enc, dec = WanVAEState(), WanVAEState()
        first = burn == 0
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            if not first:
                with torch.no_grad():
                    _encode_decode(vae, video[:, :, : 1 + 4 * burn], enc, dec, True, latent_noise)
                video = video[:, :, 1 + 4 * burn :]
            rec = _encode_decode(vae, video, enc, dec, first, latent_noise).float()
        bg = b.background.view(batch, 3, 1, 1, 1) * 2 - 1
        weight = 1.0 + object_weight * ((video - bg).abs().amax(dim=1, keepdim=True) > 0.1).float()
        err = rec - video
        loss = ((err.abs() + err.pow(2)) * weight).mean() / weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 200 == 0 or step == 1:
            last = psnr(rec.detach().clamp(-1, 1), video)
            log(f"vae step {step} {time.perf_counter() - t0:.0f}s loss {loss.item():.4f} psnr {last:.2f} dB (burn {burn})")
    vae.eval().requires_grad_(False)
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "psnr_train": round(last, 2)}


@torch.no_grad()
def latent_statistics(vae: WanVAE, *, clips: int = 256, batch: int = 32, frames: int = 45, size: int = 128,
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
def evaluate_vae(vae: WanVAE, *, clips: int = 16, latents: int = 18, chunk: int = 3, size: int = 128,
                 seed: int = 2) -> tuple[float, float]:
    """(PSNR of the whole stream, PSNR of its last chunk) in dB: clips of 1 + 4(latents-1) frames
    encoded, then decoded ``chunk`` latent frames at a time through ``decode_chunk``."""
    device = next(vae.parameters()).device
    b = shapes.sample_batch(clips, size, torch.Generator().manual_seed(seed)).to(device)
    video = shapes.render(b, 0, 1 + 4 * (latents - 1))
    z = vae.encode(video)
    state = vae.new_state()
    rec = torch.cat([vae.decode_chunk(z[:, :, i : i + chunk], state) for i in range(0, latents, chunk)], dim=2)
    video = video.to(rec.dtype)
    return psnr(rec, video), psnr(rec[:, :, -4 * chunk :], video[:, :, -4 * chunk :])


def make_vae(base_dim: int = 8) -> WanVAE:
    return WanVAE(WanVAEConfig.preset("tiny", base_dim=base_dim))
