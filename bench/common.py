"""Shared by the GPU benches: a Wan DiT with random weights built in place on the device."""

from __future__ import annotations

import torch

from streamgen.models.wan import WanConfig, WanModel


def random_wan(preset: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> WanModel:
    """Random weights made in place on ``device`` (no fp32 or host copy of the model): matrices
    N(0, 1/fan_in), biases N(0, 0.02), norm weights N(1, 0.1). Speed does not depend on the values."""
    with torch.device("meta"):
        model = WanModel(WanConfig.preset(preset))
    model = model.to(dtype).to_empty(device=device).eval()
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=g)
            else:  # norm weights
                p.normal_(1.0, 0.1, generator=g)
    return model


def sync_free(model, x, t, cache, start) -> bool | str:
    """One steady-state ``forward_chunk`` under ``torch.cuda.set_sync_debug_mode("error")``: True,
    or the error of the first host sync."""
    try:
        torch.cuda.set_sync_debug_mode("error")
        model.forward_chunk(x, t, cache, start_frame=start)
        return True
    except RuntimeError as exc:
        return f"no: {exc}"[:200]
    finally:
        torch.cuda.set_sync_debug_mode("default")
