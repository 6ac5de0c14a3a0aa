"""Shared by the GPU benches: a Wan DiT with random weights built in place on the device."""

from __future__ import annotations

import time

import torch

from streamgen.models.wan import WanConfig, WanModel


def random_wan(preset: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> WanModel:
    """``random_model`` of a named config (``WanConfig.preset``)."""
    return random_model(WanConfig.preset(preset), device, dtype, seed)


def random_model(cfg: WanConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> WanModel:
    """Random weights made in place on ``device`` (no fp32 or host copy of the model): matrices
    N(0, 1/fan_in), biases N(0, 0.02), norm weights N(1, 0.1). Speed does not depend on the values."""
    with torch.device("meta"):
        model = WanModel(cfg)
    model = model.to(dtype).to_empty(device=device).eval()
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fill_random_(name, p, g)
    return model


def fill_random_(name: str, p: torch.Tensor, g: torch.Generator) -> None:
    """The benches' random fill of parameter ``name``, in place: matrices N(0, 1/fan_in), biases
    N(0, 0.02), norm weights N(1, 0.1)."""
    if p.ndim >= 2:
        p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
    elif name.endswith("bias"):
        p.normal_(0.0, 0.02, generator=g)
    else:  # norm weights
        p.normal_(1.0, 0.1, generator=g)


class Clock:
    """CUDA events on CUDA, host time (after a sync) elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


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


ATTN_KEYS = ("flash", "fmha", "attn", "attention", "sdpa")
GEMM_KEYS = ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "scaled_mm")


def kernel_kind(name: str) -> str:
    """"attention", "gemm" or "other" for a CUDA kernel's name. Attention: the name has one of ``ATTN_KEYS``
    (cuDNN's, SDPA's and flash-attn's do) and it is not an Inductor-made Triton kernel (those take the names of
    the ops they fuse, attention's neighbours too); else a GEMM when it has one of ``GEMM_KEYS``."""
    low = name.lower()
    if any(k in low for k in ATTN_KEYS) and not low.startswith("triton_"):
        return "attention"
    return "gemm" if any(k in low for k in GEMM_KEYS) else "other"


def kernel_times(prof) -> tuple[dict[str, float], dict[str, list]]:
    """The CUDA kernels of a finished ``torch.profiler.profile``: ms by ``kernel_kind``, and {name: [ms, calls]}."""
    from torch.autograd import DeviceType

    kinds = {"attention": 0.0, "gemm": 0.0, "other": 0.0}
    per_name: dict[str, list] = {}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        ms = e.time_range.elapsed_us() / 1e3
        kinds[kernel_kind(e.name)] += ms
        slot = per_name.setdefault(e.name, [0.0, 0])
        slot[0] += ms
        slot[1] += 1
    return kinds, per_name


def median_ms(fn, clock: Clock, warmup: int, reps: int):
    """``fn()`` ``warmup`` times (at least once), then ``reps`` times each between two marks of ``clock``:
    (median ms, the last result)."""
    import statistics

    out = None
    for _ in range(max(1, warmup)):
        out = fn()
    clock.sync()
    ms = []
    for _ in range(reps):
        a = clock.mark()
        out = fn()
        b = clock.mark()
        clock.sync()
        ms.append(clock.ms(a, b))
    return statistics.median(ms), out
