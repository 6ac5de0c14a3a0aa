"""Bidirectional whole-clip sampling for non-distilled checkpoints (``wan2.1-*`` presets, `generate`).

All latent frames are sampled at once with a multistep sampler and CFG; the caller decodes them
chunk by chunk through the same post-processing as the streaming engine.
"""

from __future__ import annotations

import torch

from streamgen.sampling.samplers import guided, sample
from streamgen.sampling.schedules import FlowSchedule
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

    schedule = FlowSchedule.unipc(steps, shift) if sampler == "unipc" else FlowSchedule.euler(steps, shift)
    return sample(guided(cond, uncond if negative is not None else None, guidance), noise, schedule, sampler)
