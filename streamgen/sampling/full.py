"""Bidirectional whole-clip sampling (``wan2.1-*`` and ``lightx2v-*`` presets, `generate`).

All latent frames are sampled at once, with a multistep sampler and CFG (non-distilled checkpoints),
or with the distilled few-step re-noising loop (``sampler="self-forcing"``: LightX2V's 4-step Wan2.1
models, as its ``WanStepDistillScheduler``: x0 = x - sigma * flow, then fresh noise at the next sigma);
the caller decodes them chunk by chunk through the same post-processing as the streaming engine.
"""

from __future__ import annotations

import torch

from streamgen.sampling.samplers import guided, sample
from streamgen.sampling.schedules import NUM_TRAIN_TIMESTEPS, FlowSchedule, self_forcing_timesteps
from streamgen.sampling.stream import LATENT_CHANNELS


@torch.no_grad()
def sample_clip(model, context: torch.Tensor, negative: torch.Tensor | None, *, frames: int, height: int, width: int,
                sampler: str, steps: int, shift: float, guidance: float, seed: int) -> torch.Tensor:
    """Clean latents (1, 16, frames, height/8, width/8) float32 for the prompt ``context`` (1, L, text_dim);
    ``negative`` is the negative prompt's context (CFG with ``guidance`` when given)."""
    device, dtype = context.device, model.dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn((1, LATENT_CHANNELS, frames, height // 8, width // 8), generator=gen, device=device,
                        dtype=torch.float32)

    def cond(x, t):
        return model(x.to(dtype), t, context).float()

    def uncond(x, t):
        return model(x.to(dtype), t, negative).float()

    if sampler == "self-forcing":
        return renoise_sample(cond, noise, steps=steps, shift=shift, generator=gen)
    schedule = FlowSchedule.unipc(steps, shift) if sampler == "unipc" else FlowSchedule.euler(steps, shift)
    return sample(guided(cond, uncond if negative is not None else None, guidance), noise, schedule, sampler)


def renoise_sample(flow_fn, noise: torch.Tensor, *, steps: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """The distilled few-step loop over the Self-Forcing / LightX2V timesteps (4 -> [1000, 750, 500, 250]
    warped by ``shift``): step i predicts x0 = x - sigma_i * flow_fn(x, t_i) and, before the last step,
    re-noises it to sigma_{i+1} with fresh noise from ``generator``; returns the last x0 (float32)."""
    ts = self_forcing_timesteps(steps, shift)
    sigmas = [float(t) / NUM_TRAIN_TIMESTEPS for t in ts] + [0.0]
    x = noise
    for i, t in enumerate(ts.tolist()):
        x0 = x - sigmas[i] * flow_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32))
        if sigmas[i + 1] == 0.0:
            return x0
        fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        x = (1.0 - sigmas[i + 1]) * x0 + sigmas[i + 1] * fresh
    return x
