"""``streamgen-toy``: the built-in model's parts and its three training stages.

Parts (everything trained here, no external weights):

* ``ToyTextEncoder``: word-level tokenizer over ``toy_data.VOCABULARY`` (+ <pad>, <bos>, <unk>),
  embeddings + positions + 2 pre-norm transformer layers -> ``(B, text_len, 64)``; rows past a
  prompt's tokens are zero (the text-encoder contract of ``streamgen.models.text``).
* ``ToyEncoder`` (training only): 4 video frames (stacked as 12 channels) -> one latent frame
  (16, H/8, W/8). Latent ``k`` covers video frames ``4k-3 .. 4k`` (``toy_data.latent_times``).
* ``ToyDecoder``: a TAEHV-layout decoder (``streamgen.models.taehv``, channels (64, 32, 16, 16):
  3 x 2x space, 2 x 2x time, one-frame memories) with a fixed ``latent_scale``, so the DiT works
  on unit-variance latents: ``decode_chunk(latents, state)`` decodes ``latents * latent_scale``.
* The DiT: the engine's own ``WanModel`` (``TOY_CONFIG``), block-causal, 3 latent frames a chunk,
  rolling window of 12 latent frames with a 3-frame sink.

Stages (each one step: ``ae_step`` / ``dit_step``; loops: ``train_ae`` / ``train_dit``):

1. autoencoder: encoder + decoder on rendered clips (MSE + L1, object pixels weighted, Gaussian
   noise on the latents so the decoder tolerates the DiT's imperfect latents);
2. DiT + text encoder, teacher forcing with noised context: a training sequence is 5 chunks,
   sink chunk (latent frames 0-2) + 4 window chunks at positions P .. P+11 (P = 3: the start of
   a stream; else up to 480 frames later, the sink far in the past, as in an endless stream).
   The model sees the clean chunks (context, t = 0, as the cache pass writes them) and a noisy
   copy of every chunk, in one sequence, with the attention mask of the engine's rolling window
   (``teacher_forcing_mask``): noisy chunk i sees the sink, clean chunks i-2, i-1 and itself.
   Context latents are corrupted for half the sequences (blend with noise, sigma <= 0.25, still
   labelled t = 0). Timesteps per chunk: mostly the few-step lists the sampler uses (shift 5:
   [1000, 937.5, 833.3, 625], shift 3: [1000, 900, 750, 500]), else the shift-3 continuum. Loss:
   flow (noise - x0) MSE, object latents weighted 1 + 6 x coverage. Prompt switches: a clip whose
   caption changes at window chunk j is trained under the *new* caption throughout (what the
   engine's KV re-cache does) with the loss masked before chunk j;
3. the same with self-generated history: for ``self_frac`` of the sequences the context is the
   model's own x0 prediction (no grad) from the noisy chunks at t = 625, so the model learns to
   continue from its own imperfect outputs.

The sampler is the engine's ``SessionState`` with ``sampler="self-forcing"`` (4 steps, no CFG):
``SAMPLING`` holds the recommended settings.
"""

from __future__ import annotations

import copy
import math
import random
import re
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from streamgen.models.taehv import TAEHV, MemBlock, TAEHVConfig, TGrow
from streamgen.models.wan import WanConfig, WanModel
from streamgen.sampling.schedules import self_forcing_timesteps, shift_sigmas
from streamgen.training import toy_data as td
from streamgen.training.dit import rope_at

TOY_CONFIG = WanConfig(dim=256, ffn_dim=768, num_heads=4, num_layers=6, text_dim=64, text_len=32,
                       frames_per_chunk=3, local_frames=12, sink_frames=3)  # fmt: skip
TINY_CONFIG = WanConfig(dim=64, ffn_dim=128, num_heads=1, num_layers=2, text_dim=16, text_len=32,
                        frames_per_chunk=3, local_frames=12, sink_frames=3)  # fmt: skip
DECODER_CHANNELS = (64, 32, 16, 16)
# the recommended SessionState / StreamConfig settings of the shipped weights
SAMPLING = {"num_steps": 4, "shift": 5.0, "frames_per_chunk": 3, "local_frames": 12, "sink_frames": 3,
            "width": 128, "height": 128}  # fmt: skip
SEQ_CHUNKS = 5  # training sequence: sink chunk + 4 window chunks


# ----------------------------------------------------------------------------------- text encoder


class ToyTextEncoder(nn.Module):
    """Small trained caption encoder: ``encode(list[str]) -> (B, text_len, dim)`` float, no grads."""

    PAD, BOS, UNK = 0, 1, 2

    def __init__(self, vocab: tuple[str, ...] = td.VOCABULARY, dim: int = 64, text_len: int = 32, layers: int = 2,
                 heads: int = 4):
        super().__init__()
        self.vocab = tuple(vocab)
        self.index = {w: i + 3 for i, w in enumerate(self.vocab)}
        self.dim, self.text_len = dim, text_len
        self.embed = nn.Embedding(len(self.vocab) + 3, dim)
        self.pos = nn.Parameter(torch.randn(text_len, dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers))  # fmt: skip
        self.norm = nn.LayerNorm(dim)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, text_len) long: <bos>, word ids (<unk> for other words), <pad>; truncated."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("encode()/tokenize() take a list of prompt strings")
        ids = torch.zeros(len(prompts), self.text_len, dtype=torch.long)
        for i, p in enumerate(prompts):
            words = [self.BOS] + [self.index.get(w, self.UNK) for w in re.findall(r"[a-z]+", p.lower())]
            words = words[: self.text_len]
            ids[i, : len(words)] = torch.tensor(words)
        return ids

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = ids != self.PAD  # (B, L)
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=~keep)
        return self.norm(x) * keep[..., None]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.forward(self.tokenize(prompts).to(self.device))


# ----------------------------------------------------------------------------------- autoencoder


class ToyEncoder(nn.Module):
    """(B, 3, 4K, H, W) video in [-1, 1] -> (B, 16, K, H/8, W/8) latents; each latent sees its 4 frames."""

    def __init__(self, width: int = 64, latent_channels: int = 16):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(12, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, latent_channels, 3, padding=1),
        )  # fmt: skip

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = video.shape
        if t % 4:
            raise ValueError(f"the encoder takes 4 frames per latent, got {t} frames")
        k = t // 4
        x = video.view(b, c, k, 4, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b * k, 4 * c, h, w)  # (B*K, 12, H, W)
        z = self.net(x)
        return z.view(b, k, *z.shape[1:]).transpose(1, 2)  # (B, 16, K, h, w)


class ToyDecoder(TAEHV):
    """TAEHV-layout decoder on unit-variance latents: decodes ``latents * latent_scale``."""

    def __init__(self, channels: tuple[int, int, int, int] = DECODER_CHANNELS):
        super().__init__(TAEHVConfig(channels=tuple(channels)))
        self.register_buffer("latent_scale", torch.ones(()))

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, state) -> torch.Tensor:
        return super().decode_chunk(latents.float() * self.latent_scale.float(), state)

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        return super().decode_video(latents.float() * self.latent_scale.float())

    def train_forward(self, z: torch.Tensor) -> torch.Tensor:
        """Differentiable whole-clip decode of raw (unscaled) latents (B, 16, K, h, w) -> (B, 3, 4K, H, W)
        in [0, 1] space, neither clamped nor trimmed (``decode_video``'s parallel mode)."""
        b = z.shape[0]
        x = z.transpose(1, 2)  # (B, K, C, h, w)
        for i in self._order:
            layer = self.decoder[i]
            if isinstance(layer, MemBlock):
                past = F.pad(x, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1]
                x = layer(x.flatten(0, 1), past.flatten(0, 1)).reshape(b, -1, *x.shape[2:])
            else:
                y = layer(x.flatten(0, 1))
                x = y.reshape(b, -1, *y.shape[1:])
        return x.transpose(1, 2)


# ----------------------------------------------------------------------------------- data


@dataclass
class Batch:
    frames: torch.Tensor  # (B, 3, 4F, H, W) in [-1, 1]
    cover: torch.Tensor  # (B, 4F, H, W)
    positions: torch.Tensor  # (B, F) long latent positions (RoPE)
    chunk_loss: torch.Tensor  # (B, F // 3) float, 0 = context only
    captions: list[str]


def dit_batch(batch: int, rng: random.Random, device, *, size: int = 128, switch_prob: float = 0.35,
              gap_prob: float = 0.5, max_gap_chunks: int = 160, two_prob: float = 0.2,
              switch_weights: dict[str, float] | None = None) -> Batch:
    """One training batch of ``SEQ_CHUNKS`` chunks (see the module doc), rendered on ``device``."""
    fpc, n_win = 3, SEQ_CHUNKS - 1
    starts, sw_chunk, sw_time = [], [], []
    for _ in range(batch):
        p = 3 if rng.random() > gap_prob else 3 + 3 * rng.randint(1, max_gap_chunks)
        j = rng.randint(1, n_win)  # window chunk of the switch (if any)
        starts.append(p)
        sw_chunk.append(j)
        sw_time.append(4.0 * (p + fpc * (j - 1)) - 3)
    scenes = td.sample_scenes(batch, rng, two_prob=two_prob, switch_prob=switch_prob, switch_at=sw_time,
                              switch_weights=switch_weights)
    p = torch.tensor(starts, device=device)
    times = torch.cat([td.latent_times(torch.zeros_like(p), fpc), td.latent_times(p, fpc * n_win)], dim=1)
    frames, cover = td.render(scenes, times, size, size)
    pos = torch.cat([torch.arange(fpc, device=device).expand(batch, -1),
                     p[:, None] + torch.arange(fpc * n_win, device=device)], dim=1)  # fmt: skip
    loss = torch.ones(batch, SEQ_CHUNKS)
    for i in range(batch):
        if scenes.switch_kind[i] is not None:
            loss[i, : sw_chunk[i]] = 0.0
    captions = [td.caption(scenes, i, state=1) for i in range(batch)]
    return Batch(frames, cover, pos, loss.to(device), captions)


def latent_cover(cover: torch.Tensor) -> torch.Tensor:
    """(B, 4F, H, W) pixel coverage -> (B, F, H/8, W/8) latent coverage (mean over 4 frames x 8 x 8)."""
    b, t, h, w = cover.shape
    return cover.view(b, t // 4, 4, h // 8, 8, w // 8, 8).mean(dim=(2, 4, 6))


# ----------------------------------------------------------------------------------- DiT forward


def teacher_forcing_mask(chunks: int, frames_per_chunk: int, tokens_per_frame: int, local_frames: int,
                         sink_frames: int, device=None) -> torch.Tensor:
    """Bool (L, L), L = 2 * chunks * frames_per_chunk * tokens_per_frame, True = attend, for the
    sequence [clean chunks 0..C-1, noisy chunks 0..C-1]: clean chunk i attends the sink chunks and
    the window's clean chunks up to itself (the cache pass); noisy chunk i the same clean chunks
    before it and itself (a denoising step). Window = ``WanCache``'s: the sink's frames and the
    last ``local_frames - sink_frames`` frames up to the chunk's end."""
    if sink_frames % frames_per_chunk or local_frames % frames_per_chunk:
        raise ValueError("sink_frames and local_frames must be multiples of frames_per_chunk")
    sink, win = sink_frames // frames_per_chunk, (local_frames - sink_frames) // frames_per_chunk
    m = torch.zeros(2 * chunks, 2 * chunks, dtype=torch.bool)
    for i in range(chunks):
        ctx = [j for j in range(i + 1) if j < sink or j > i - win]
        m[i, ctx] = True
        m[chunks + i, [j for j in ctx if j != i]] = True
        m[chunks + i, chunks + i] = True
    n = frames_per_chunk * tokens_per_frame
    return m.repeat_interleave(n, 0).repeat_interleave(n, 1).to(device)


def tf_forward(model: WanModel, clean: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
               positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flow prediction for ``noisy`` (B, 16, F, h, w) at per-frame ``t`` (B, F), given the context
    latents ``clean`` (same shape, at t = 0), text ``context`` (B, L, text_dim), RoPE frame
    ``positions`` (B, F) of both copies and ``teacher_forcing_mask``. Differentiable."""
    b, _, f, h, w = noisy.shape
    ph, pw = model.cfg.patch_size[1:]
    x = torch.cat([clean, noisy], dim=2)  # (B, 16, 2F, h, w)
    tt = torch.cat([torch.zeros_like(t), t], dim=1)  # (B, 2F)
    tokens, grid = model._patchify(x)
    e, e0 = model._time(tt, b, 2 * f)
    ctx = model.embed_text(context)
    rope = rope_at(model.cfg.head_dim, torch.cat([positions, positions], dim=1), h // ph, w // pw)

    def self_attn(q, k, v):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)

    for block in model.blocks:
        tokens = block(tokens, e0, rope, self_attn, block.cross_attn.key_value(ctx), model.dtype)
    n = tokens.shape[1] // 2
    half = (f, grid[1], grid[2])
    return model._unpatchify(model.head(tokens[:, n:], e[:, f:], model.dtype), half)


# ----------------------------------------------------------------------------------- training state


@dataclass
class ToyParts:
    model: WanModel
    text: ToyTextEncoder
    encoder: ToyEncoder
    decoder: ToyDecoder

    def modules(self) -> dict[str, nn.Module]:
        return {"dit": self.model, "text": self.text, "encoder": self.encoder, "decoder": self.decoder}


def new_parts(cfg: WanConfig = TOY_CONFIG, decoder_channels=DECODER_CHANNELS, encoder_width: int = 64,
              seed: int = 0) -> ToyParts:
    torch.manual_seed(seed)
    model = WanModel(cfg)
    init_wan_(model)
    text = ToyTextEncoder(dim=cfg.text_dim, text_len=cfg.text_len)
    return ToyParts(model, text, ToyEncoder(encoder_width), ToyDecoder(decoder_channels))


@torch.no_grad()
def init_wan_(model: WanModel) -> None:
    """Small-std init for training from scratch; output head zero (the first prediction is 0)."""
    for name, p in model.named_parameters():
        if p.ndim >= 2 and "modulation" not in name:
            nn.init.normal_(p, std=0.02)
        elif name.endswith("bias"):
            p.zero_()
    model.head.head.weight.zero_()


def _adamw(modules: list[nn.Module], lr: float) -> torch.optim.Optimizer:
    decay, other = [], []
    for m in modules:
        for name, p in m.named_parameters():
            (decay if p.ndim >= 2 and "modulation" not in name and "embed" not in name else other).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.99))


def _lr_at(step: int, frac: float, lr: float, warmup: int) -> float:
    return lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm.to(pe.dtype), 1 - decay)


# ----------------------------------------------------------------------------------- stage 1: AE


def ae_batch(batch: int, latents: int, rng: random.Random, device, size: int = 128):
    k0 = torch.tensor([rng.randint(0, 400) for _ in range(batch)], device=device)
    sw = [4.0 * (int(k) + rng.randint(0, latents)) - 3 for k in k0.tolist()]
    scenes = td.sample_scenes(batch, rng, two_prob=0.25, switch_prob=0.3, switch_at=sw)
    return td.render(scenes, td.latent_times(k0, latents), size, size)


def ae_step(parts: ToyParts, opt, rng: random.Random, *, batch: int, latents: int = 6, size: int = 128,
            noise_max: float = 0.3) -> torch.Tensor:
    """One autoencoder step (encoder + decoder); returns the loss (a tensor, no host sync)."""
    device = parts.decoder.latent_scale.device
    frames, cover = ae_batch(batch, latents, rng, device, size)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        z = parts.encoder(frames).float()
        sigma = torch.rand(batch, 1, 1, 1, 1, device=device) * noise_max
        out = parts.decoder.train_forward(z + sigma * torch.randn_like(z)).float()
    target = frames.add(1).div(2)
    wt = 1 + 8 * F.max_pool2d(cover, 3, 1, 1)[:, None]  # (B, 1, T, H, W), object edges included
    err = (out - target).pow(2) + 0.5 * (out - target).abs()
    loss = (err * wt).mean() / wt.mean() + 1e-3 * z.pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(parts.encoder.parameters()) + list(parts.decoder.parameters()), 1.0)
    opt.step()
    return loss.detach()


@torch.no_grad()
def measure_latent_scale(parts: ToyParts, rng: random.Random, *, batch: int = 32, size: int = 128) -> float:
    device = parts.decoder.latent_scale.device
    frames, _ = ae_batch(batch, 6, rng, device, size)
    return float(parts.encoder(frames).float().std())


def train_ae(parts: ToyParts, *, seconds: float, max_steps: int = 10**9, batch: int = 24, lr: float = 2e-3,
             size: int = 128, seed: int = 1, log: Callable[[str], None] = print) -> dict:
    rng = random.Random(seed)
    parts.encoder.train().requires_grad_(True)
    parts.decoder.train().requires_grad_(True)
    opt = _adamw([parts.encoder, parts.decoder], lr)
    t0 = time.perf_counter()
    step, avg = 0, None
    while step < max_steps and time.perf_counter() - t0 < seconds:
        frac = (time.perf_counter() - t0) / seconds
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, frac, lr, 100)
        loss = ae_step(parts, opt, rng, batch=batch, size=size)
        step += 1
        if step % 20 == 1:
            v = float(loss)
            avg = v if avg is None else 0.8 * avg + 0.2 * v
        if step % 200 == 1:
            log(f"ae step {step} {time.perf_counter() - t0:.0f}s loss {avg:.4f}")
    scale = measure_latent_scale(parts, rng, size=size)
    parts.decoder.latent_scale.fill_(scale)
    parts.encoder.eval().requires_grad_(False)
    parts.decoder.eval().requires_grad_(False)
    log(f"ae done: {step} steps, loss {avg:.4f}, latent scale {scale:.3f}")
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "loss": round(float(avg or 0), 5),
            "latent_scale": scale}


@torch.no_grad()
def ae_psnr(parts: ToyParts, rng: random.Random, *, batch: int = 8, size: int = 128) -> float:
    """PSNR (dB) of streamed decode (``decode_chunk``, 3 latents a chunk) vs the rendered clip."""
    device = parts.decoder.latent_scale.device
    frames, _ = ae_batch(batch, 12, rng, device, size)
    z = parts.encoder(frames).float() / parts.decoder.latent_scale
    state = parts.decoder.new_state()
    state.started = True  # keep all 4 frames of each latent (mid-stream clip)
    out = torch.cat([parts.decoder.decode_chunk(z[:, :, i : i + 3], state) for i in range(0, 12, 3)], dim=2)
    mse = (out.float() - frames).div(2).pow(2).mean()
    return float(10 * torch.log10(1 / mse.clamp_min(1e-10)))


@torch.no_grad()
def ae_attribute_accuracy(parts: ToyParts, n: int = 32, size: int = 128) -> dict:
    """Shape / colour accuracy of the renderer's analysis on autoencoded held-out clips (3 latents,
    mid-stream decode): the ceiling the DiT can reach through this decoder."""
    device = parts.decoder.latent_scale.device
    combos = td.heldout_combinations()[:n]
    scene = td.Scene.cat([td.make_scene(*c) for c in combos])
    frames, _ = td.render(scene, td.latent_times(torch.full((len(combos),), 8, device=device), 3), size, size)
    z = parts.encoder(frames).float() / parts.decoder.latent_scale
    state = parts.decoder.new_state()
    state.started = True
    out = parts.decoder.decode_chunk(z, state).float().clamp(-1, 1)
    hits = {"shape": 0, "colour": 0}
    for i, c in enumerate(combos):
        a = td.analyse_clip(out[i].cpu())
        hits["colour"] += a["colour"] == c[0]
        hits["shape"] += a["shape"] == c[1]
    return {k: round(v / len(combos), 3) for k, v in hits.items()}


# ----------------------------------------------------------------------------------- stage 2/3: DiT


_SF_LISTS = None


def sample_chunk_timesteps(batch: int, chunks: int, gen: torch.Generator, device) -> torch.Tensor:
    """(batch, chunks) timesteps on 0..1000: 70 % from the few-step lists (shift 5 and 3), else the
    shift-3 continuum."""
    global _SF_LISTS
    if _SF_LISTS is None:
        _SF_LISTS = torch.cat([self_forcing_timesteps(4, 5.0), self_forcing_timesteps(4, 3.0)]).float()
    pick = _SF_LISTS[torch.randint(0, len(_SF_LISTS), (batch, chunks), generator=gen)]
    cont = shift_sigmas(torch.rand(batch, chunks, generator=gen).double().clamp(0.02, 1), 3.0).float() * 1000
    use = torch.rand(batch, chunks, generator=gen) < 0.7
    return torch.where(use, pick, cont).to(device)


def dit_step(parts: ToyParts, ema: ToyParts | None, opt, rng: random.Random, gen: torch.Generator, mask: torch.Tensor,
             *, batch: int, size: int = 128, self_frac: float = 0.0, ctx_noise_frac: float = 0.5,
             ema_decay: float = 0.998, switch_prob: float = 0.35,
             switch_weights: dict[str, float] | None = None) -> torch.Tensor:
    """One DiT + text-encoder step (stage 2, or stage 3 with ``self_frac`` > 0); returns the loss."""
    model, text = parts.model, parts.text
    device = model.patch_embedding.weight.device
    cuda = device.type == "cuda"
    fpc = model.cfg.frames_per_chunk
    data = dit_batch(batch, rng, device, size=size, switch_prob=switch_prob, switch_weights=switch_weights)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        x0 = parts.encoder(data.frames).float() / parts.decoder.latent_scale  # (B, 16, F, h, w)
    b, _, f = x0.shape[:3]
    chunks = f // fpc
    occ = latent_cover(data.cover)[:, None]  # (B, 1, F, h, w)
    ids = text.tokenize(data.captions).to(device)
    t = sample_chunk_timesteps(b, chunks, gen, "cpu").to(device).repeat_interleave(fpc, dim=1)  # (B, F)
    sigma = (t / 1000).view(b, 1, f, 1, 1)
    noise = torch.randn_like(x0)
    xt = (1 - sigma) * x0 + sigma * noise
    # context: clean, or blended with noise (still labelled t = 0)
    cs = torch.rand(b, 1, 1, 1, 1, device=device) * 0.25 * (torch.rand(b, 1, 1, 1, 1, device=device) < ctx_noise_frac)
    clean = (1 - cs) * x0 + cs * torch.randn_like(x0)
    if self_frac > 0:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            s_last = 0.625
            xs = (1 - s_last) * x0 + s_last * torch.randn_like(x0)
            ctx = text(ids)
            flow = tf_forward(model, clean, xs, torch.full_like(t, 625.0), ctx, data.positions, mask).float()
            own = xs - s_last * flow
        pick = (torch.rand(b, 1, 1, 1, 1, device=device) < self_frac)
        clean = torch.where(pick, own, clean)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        pred = tf_forward(model, clean, xt, t, text(ids), data.positions, mask).float()
    wt = (1 + 6 * occ) * data.chunk_loss.repeat_interleave(fpc, dim=1).view(b, 1, f, 1, 1)
    err = (pred - (noise - x0)).pow(2)
    loss = (err * wt).sum() / (wt.sum() * x0.shape[1]).clamp_min(1.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(text.parameters()), 1.0)
    opt.step()
    if ema is not None:
        _ema_update(ema.model, model, ema_decay)
        _ema_update(ema.text, text, ema_decay)
    return loss.detach()


def make_mask(cfg: WanConfig, size: int, device) -> torch.Tensor:
    h = size // 8 // cfg.patch_size[1]
    return teacher_forcing_mask(SEQ_CHUNKS, cfg.frames_per_chunk, h * h, cfg.local_frames, cfg.sink_frames, device)


def train_dit(parts: ToyParts, ema: ToyParts, *, seconds: float, max_steps: int = 10**9, batch: int = 48,
              lr: float = 5e-4, size: int = 128, self_frac: float = 0.0, self_after: float = 0.5, seed: int = 2,
              warmup: int = 200, switch_prob: float = 0.35, switch_weights: dict[str, float] | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Stages 2 and 3: teacher forcing, then (after ``self_after`` of the time) ``self_frac`` of the
    sequences with self-generated context. ``ema`` is updated in place."""
    device = parts.model.patch_embedding.weight.device
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(parts.model.cfg, size, device)
    parts.model.train().requires_grad_(True)
    parts.text.train().requires_grad_(True)
    opt = _adamw([parts.model, parts.text], lr)
    t0 = time.perf_counter()
    step, avg = 0, None
    while step < max_steps and time.perf_counter() - t0 < seconds:
        frac = (time.perf_counter() - t0) / seconds
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, frac, lr, warmup)
        sf = self_frac if frac >= self_after else 0.0
        decay = min(0.998, (1 + step) / (10 + step))
        loss = dit_step(parts, ema, opt, rng, gen, mask, batch=batch, size=size, self_frac=sf, ema_decay=decay,
                        switch_prob=switch_prob, switch_weights=switch_weights)
        step += 1
        if step % 20 == 1:
            v = float(loss)
            avg = v if avg is None else 0.8 * avg + 0.2 * v
        if step % 200 == 1:
            log(f"dit step {step} {time.perf_counter() - t0:.0f}s loss {avg:.4f} self {sf}")
    parts.model.eval().requires_grad_(False)
    parts.text.eval().requires_grad_(False)
    log(f"dit done: {step} steps, loss {avg:.4f}")
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "loss": round(float(avg or 0), 5)}


def ema_copy(parts: ToyParts) -> ToyParts:
    return ToyParts(copy.deepcopy(parts.model).eval().requires_grad_(False),
                    copy.deepcopy(parts.text).eval().requires_grad_(False), parts.encoder, parts.decoder)


# ----------------------------------------------------------------------------------- streaming


@torch.no_grad()
def stream(model: WanModel, text, decoder, prompts: list[str], *, chunks: int, switch: dict[int, list[str]] | None = None,
           seed: int = 0, size: int = 128, settings: dict | None = None) -> tuple[torch.Tensor, list[int]]:
    """All ``prompts`` as one batched ``SessionState`` stream of ``chunks`` chunks; ``switch``:
    {chunk index: new prompts} (applied before that chunk). Returns (frames (B, 3, T, H, W) in
    [-1, 1] on the CPU, the first frame index of every chunk)."""
    from streamgen.sampling.stream import SessionState, StreamConfig

    s = dict(SAMPLING, **(settings or {}))
    p = next(model.parameters())
    cfg = StreamConfig(num_steps=s["num_steps"], shift=s["shift"], frames_per_chunk=s["frames_per_chunk"],
                       local_frames=s["local_frames"], sink_frames=s["sink_frames"], seed=seed)  # fmt: skip
    ctx = text.encode(prompts)
    sess = SessionState(model, ctx, height=size, width=size, config=cfg, decoder=decoder, batch=len(prompts),
                        device=p.device, dtype=p.dtype)  # fmt: skip
    out, starts, n = [], [], 0
    for c in range(chunks):
        if switch and c in switch:
            sess.set_prompt(text.encode(switch[c]))
        fr = sess.next_chunk().frames.float().cpu()
        starts.append(n)
        n += fr.shape[2]
        out.append(fr)
    return torch.cat(out, dim=2), starts


# ----------------------------------------------------------------------------------- checkpoints


def _text_config(text: ToyTextEncoder) -> dict:
    return {"vocab": list(text.vocab), "dim": text.dim, "text_len": text.text_len, "layers": len(text.layers),
            "heads": text.layers[0].self_attn.num_heads}


def save_checkpoint(folder: str, parts: ToyParts, ema: ToyParts, info: dict, shard_bytes: int = 15 * 2**20) -> list[str]:
    """Resumable training state: every part in float32 and the EMA DiT / text encoder in float16,
    in safetensors shards of at most ``shard_bytes`` (``ckpt-NN.safetensors``), configs in metadata.
    (Optimizer moments are not kept: a resumed run restarts AdamW with a short warm-up.)"""
    import dataclasses
    import json
    import os

    from safetensors.torch import save_file

    tensors = {}
    for name, m in parts.modules().items():
        tensors.update({f"{name}.{k}": v.detach().float().cpu().contiguous() for k, v in m.state_dict().items()})
    for name, m in (("ema_dit", ema.model), ("ema_text", ema.text)):
        tensors.update({f"{name}.{k}": v.detach().half().cpu().contiguous() for k, v in m.state_dict().items()})
    meta = {"format": "streamgen-toy-ckpt-1", "wan_config": json.dumps(dataclasses.asdict(parts.model.cfg)),
            "text_config": json.dumps(_text_config(parts.text)),
            "decoder_channels": json.dumps(list(parts.decoder.cfg.channels)),
            "encoder_width": str(parts.encoder.net[0].out_channels), "info": json.dumps(info)}
    os.makedirs(folder, exist_ok=True)
    shards, cur, size = [], {}, 0
    for k, v in tensors.items():
        nb = v.numel() * v.element_size()
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += nb
    shards.append(cur)
    paths = []
    for i, sd in enumerate(shards):
        path = os.path.join(folder, f"ckpt-{i:02d}.safetensors")
        save_file(sd, path, metadata=dict(meta, shard=str(i), shards=str(len(shards))))
        paths.append(path)
    return paths


def load_checkpoint(folder: str, device="cpu") -> tuple[ToyParts, ToyParts, dict]:
    """(parts, ema, info) from ``save_checkpoint``'s shards, parts in float32 on ``device``."""
    import glob
    import json
    import os

    from safetensors import safe_open

    paths = sorted(glob.glob(os.path.join(folder, "ckpt-*.safetensors")))
    if not paths:
        raise FileNotFoundError(f"no ckpt-NN.safetensors shards in {folder}")
    sd, meta = {}, {}
    for p in paths:
        with safe_open(p, framework="pt") as f:
            meta = f.metadata()
            sd.update({k: f.get_tensor(k) for k in f.keys()})
    if len(paths) != int(meta["shards"]):
        raise ValueError(f"{folder} has {len(paths)} shards, the checkpoint has {meta['shards']}")
    wcfg = json.loads(meta["wan_config"])
    wcfg["patch_size"] = tuple(wcfg["patch_size"])
    tcfg = json.loads(meta["text_config"])
    parts = ToyParts(WanModel(WanConfig(**wcfg)), ToyTextEncoder(tuple(tcfg["vocab"]), tcfg["dim"], tcfg["text_len"],
                                                                    tcfg["layers"], tcfg["heads"]),
                     ToyEncoder(int(meta["encoder_width"])), ToyDecoder(tuple(json.loads(meta["decoder_channels"]))))
    for name, m in parts.modules().items():
        m.load_state_dict({k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}, strict=True)
    ema = ema_copy(parts)
    for name, m in (("ema_dit", ema.model), ("ema_text", ema.text)):
        m.load_state_dict({k[len(name) + 1:]: v.float() for k, v in sd.items() if k.startswith(name + ".")}, strict=True)
    for m in list(parts.modules().values()) + [ema.model, ema.text]:
        m.to(device)
    return parts, ema, json.loads(meta["info"])
