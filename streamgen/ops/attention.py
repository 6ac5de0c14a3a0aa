"""Attention backends: detected, never assumed.

All functions take and return ``(B, L, heads, head_dim)`` tensors (the layout Wan and
flash-attn use). The default backend is PyTorch SDPA (which picks cuDNN / flash /
efficient kernels itself on CUDA); flash-attn is used only when it is installed, the
tensors are on a CUDA device in fp16/bf16, and the caller did not ask for ``"sdpa"``.
Absence of an optional kernel is logged once and falls back to SDPA.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "flash", "fp8")

# ``auto`` takes flash-attn only from this many keys on. Measured on an H200 (bench/BENCHMARKS.md, attention
# kernels per call shape): flash-attn-4 is 1.09-1.20x SDPA's cuDNN kernel over 18720-32760 keys, level at 4680
# keys (0.323 vs 0.312 ms), and 1.4-1.7x slower on the 512-key cross-attention.
FLASH_MIN_KEYS = 8192


@dataclass(frozen=True)
class Detected:
    flash_attn: str | None  # import path of the flash-attn function found, or None
    flash_attn_version: str | None
    sdpa_backends: tuple[str, ...]  # SDPA kernels usable on this machine


@functools.lru_cache(maxsize=1)
def _flash_fn():
    """Return (callable, module path, version) for the best flash-attn found, or (None, None, None)."""
    # flash-attn 4 (CuTe DSL, Hopper/Blackwell), then flash-attn 3 (Hopper), then 2.
    for mod_name, fn_name in (
        ("flash_attn.cute", "flash_attn_func"),
        ("flash_attn_interface", "flash_attn_func"),
        ("flash_attn", "flash_attn_func"),
    ):
        try:
            mod = importlib.import_module(mod_name)
            fn = getattr(mod, fn_name)
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            continue
        return fn, f"{mod_name}.{fn_name}", _dist_version(mod_name)
    return None, None, None


def _dist_version(mod_name: str) -> str | None:
    """Version of the installed distribution that provides ``mod_name`` (flash-attn-4 has no __version__)."""
    from importlib import metadata

    top = mod_name.split(".")[0]
    for dist in metadata.packages_distributions().get(top, []):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return getattr(sys.modules.get(top), "__version__", None)


@functools.lru_cache(maxsize=1)
def detect() -> Detected:
    _, path, version = _flash_fn()
    sdpa = ["math"]
    if torch.cuda.is_available():
        bk = torch.backends.cuda
        for name, flag in (
            ("cudnn", getattr(bk, "cudnn_sdp_enabled", lambda: False)),
            ("flash", bk.flash_sdp_enabled),
            ("efficient", bk.mem_efficient_sdp_enabled),
        ):
            if flag():
                sdpa.append(name)
    return Detected(flash_attn=path, flash_attn_version=version, sdpa_backends=tuple(sdpa))


@functools.lru_cache(maxsize=None)
def _log_once(msg: str) -> None:
    log.info(msg)


def wants_flash(backend: str, is_cuda: bool, dtype: torch.dtype, n_keys: int, masked: bool) -> bool:
    """Whether :func:`attention` tries flash-attn for a call (it still falls back where none is installed).
    ``fp8`` calls that are not long enough for the fp8 kernel take the ``auto`` path."""
    if backend == "sdpa" or masked or not is_cuda or dtype not in (torch.float16, torch.bfloat16):
        return False
    return backend == "flash" or n_keys >= FLASH_MIN_KEYS


def wants_fp8(backend: str, is_cuda: bool, dtype: torch.dtype, n_keys: int, masked: bool) -> bool:
    """Whether :func:`attention` runs a call on the fp8 kernel (``ops.fp8_attention``): backend ``fp8``, CUDA,
    fp16/bf16, no mask, at least ``FLASH_MIN_KEYS`` keys (the self-attention over the cache; the 512-key
    cross-attention and a stream's first chunk stay in bf16)."""
    return (backend == "fp8" and not masked and is_cuda and dtype in (torch.float16, torch.bfloat16)
            and n_keys >= FLASH_MIN_KEYS)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention on ``(B, L, H, D)`` tensors; returns ``(B, Lq, H, D)``.

    ``attn_mask`` (bool, True = attend, broadcastable to ``(B, H, Lq, Lk)``) forces SDPA. ``auto`` uses
    flash-attn where installed and there are at least ``FLASH_MIN_KEYS`` keys; ``flash`` at any length.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if wants_fp8(backend, q.is_cuda, q.dtype, k.shape[1], attn_mask is not None):
        from streamgen.ops.fp8_attention import fp8_attention

        return fp8_attention(q, k, v)
    if wants_flash(backend, q.is_cuda, q.dtype, k.shape[1], attn_mask is not None):
        fn, path, _ = _flash_fn()
        if fn is not None:
            out = fn(q, k, v)
            return out[0] if isinstance(out, tuple) else out
        if backend == "flash":
            _log_once("flash-attn requested but not installed; using SDPA")
    # (B, H, L, D) for SDPA
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
    )
    return out.transpose(1, 2)


def use_backend(model, backend: str = "auto"):
    """Route every attention call of a built ``WanModel`` through :func:`attention` with ``backend``
    (``auto``: flash-attn where detected and applicable, else SDPA; ``fp8``: the long self-attention calls
    on the fp8 kernel where it runs and passes its probe on the model's device, else ``auto`` after one
    log line). Returns the model."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "fp8":
        param = next(iter(model.parameters()), None)
        head_dim = getattr(getattr(model, "cfg", None), "head_dim", 128)
        why = fp8_probe(param.device if param is not None else torch.device("cpu"), head_dim)
        if why is not None:
            log.info("%s; attention runs as --attention auto", why)
            backend = "auto"
        else:
            log.info("attention: the self-attention over >= %d keys runs on the fp8 kernel", FLASH_MIN_KEYS)
    if backend != "sdpa" and _flash_fn()[0] is None:
        _log_once("flash-attn not installed; attention runs on PyTorch SDPA")
    model.attention = functools.partial(attention, backend=backend)
    return model


FP8_PROBE_TOL = 0.05  # relative L2 error against float32 attention (the kernel measures ~1e-2)


@functools.lru_cache(maxsize=None)
def fp8_probe(device: torch.device, head_dim: int = 128) -> str | None:
    """None when the fp8 kernel runs on ``device`` and is within ``FP8_PROBE_TOL`` of float32 attention on a
    random call with the model's ``head_dim`` (Wan: 128); else why it is not used."""
    from streamgen.ops import fp8_attention as fp8

    device = torch.device(device)
    if device.type != "cuda":
        return f"the fp8 attention kernel runs on CUDA (device {device.type})"
    why = fp8.why_unavailable("cuda", torch.cuda.get_device_capability(device))
    if why is not None:
        return why
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, head_dim, device=device, generator=g).to(torch.bfloat16) for n in (300, 700, 700))
    try:
        out = fp8.fp8_attention(q, k, v).float()
    except ValueError as e:  # a head dim the kernel does not take
        return str(e)
    except Exception as e:  # noqa: BLE001 - a kernel that cannot compile or run is "not available"
        return f"the fp8 attention kernel failed ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    ref = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    err = ((out - ref).norm() / ref.norm()).item()
    if not err <= FP8_PROBE_TOL:
        return f"the fp8 attention kernel is {err:.3g} from float32 attention (allowed {FP8_PROBE_TOL})"
    return None
