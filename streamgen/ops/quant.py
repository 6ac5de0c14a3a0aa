"""Weight quantization of a built model's DiT blocks: fp8 (weights and activations) or int8 weights.

``quantize(model, mode="fp8" | "int8-weight", *, skip=(), blocks_attr="blocks", fast_accum=True) -> model``
    Rewrites ``model`` in place (house style 4: ``models/wan.py`` knows nothing of this) and returns
    it. Every ``nn.Linear`` inside ``model.<blocks_attr>`` (Wan: self/cross-attention q, k, v, o and
    the two FFN layers) whose qualified name matches none of the ``fnmatch`` patterns in ``skip``
    (e.g. ``"blocks.0.*"``, ``"*.cross_attn.*"``) is replaced by

    * ``Fp8Linear`` (``"fp8"``): ``weight`` float8_e4m3fn ``[out, in]`` with a per-output-channel
      ``weight_scale`` float32 ``[out, 1]`` (``w ~= weight * weight_scale``; amax / 448 per row).
      On CUDA with compute capability >= 8.9 where ``torch._scaled_mm`` with row-wise scales works
      and Triton is importable (checked once per device: a small probe matmul and the Triton
      quantizer, each compared against its eager/float32 emulation), bfloat16 activations are
      quantized per row (per token) to e4m3 with amax / 448 scales by one Triton kernel and
      multiplied by ``torch._scaled_mm`` (fp8 tensor cores, bf16 out, bias fused, ``fast_accum``).
      Anywhere else (CPU, older GPUs, no Triton, a failed probe, fp16/fp32 activations, widths not
      divisible by 16) the same module computes the reference path: the weight cast to the
      activation dtype, a plain matmul, the scales applied to the output. A failed probe is logged
      once per device; nothing raises. The probe syncs: run one forward before capturing CUDA graphs.
    * ``Int8WeightLinear`` (``"int8-weight"``): ``weight`` int8 (round(w / scale), scale = amax / 127)
      with the same ``weight_scale``; dequantized at the matmul. Saves memory, not time.

    Measured on one H100 (bench/BENCHMARKS.md, "Quantization"): fp8 makes the 14B chunk (4680
    tokens) 1.10x faster and 13 GiB smaller; the 1.3B chunk is not faster (its 1536-wide GEMMs gain
    nothing from fp8 and the extra launches cost host time) but its weights halve. Expect a
    relative error of about 4e-2 against bf16 (fp8) or 1e-2 (int8-weight) on the chunk output.

    Embeddings, the time MLPs and the head stay in their dtype (``WanModel`` reads the time MLPs'
    ``.weight`` directly). Quantized modules keep their weight/scale dtypes under ``model.to(dtype)``
    and ``.half()`` (only their bias follows), so a cast after ``quantize`` cannot silently
    reinterpret fp8 data. ``state_dict()`` keys are ``X.weight`` / ``X.weight_scale`` / ``X.bias``:
    LightX2V's layout, so a quantized model saves to and loads from LightX2V files.

    Order with offload (streamgen/ops/offload.py): ``quantize`` first, then ``offload`` (the
    quantized tensors travel as any others). ``quantize`` on an offloaded model raises ValueError.

``from_lightx2v(source, cfg=None, *, device="cpu", dtype=torch.bfloat16, state_key=None) -> WanModel``
    A LightX2V quantized Wan checkpoint (path, any layout ``models/checkpoints.py`` reads, or a state
    dict with native keys) -> a WanModel whose block linears hold the file's int8 / float8_e4m3fn
    weights and ``[out, 1]`` scales as stored (int8 -> ``Int8WeightLinear``, e4m3 ->
    ``Fp8Linear``): no dequantized copy is ever made. Other tensors are cast to ``dtype``; quantized
    weights outside the blocks (or in e5m2) are dequantized to ``dtype``.

Building blocks (tests, benchmarks): ``quantize_weight(w, qdtype)``, ``quantize_rows_fp8(x2)``,
``fp8_rowwise_reference(x, weight, weight_scale, bias)`` (the fast path's numerics in float32),
``fp8_scaled_mm_linear(x, weight, weight_scale, bias, ...)`` (the fast path itself) and
``fp8_support(device)``.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from streamgen.ops.offload import OffloadHandle

log = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "FP8_MAX",
    "Fp8Linear",
    "Int8WeightLinear",
    "QuantLinear",
    "Fp8Support",
    "quantize",
    "from_lightx2v",
    "quantize_weight",
    "quantize_rows_fp8",
    "fp8_rowwise_reference",
    "fp8_scaled_mm_linear",
    "fp8_support",
    "count_quantized",
    "weight_bytes",
]

MODES = ("fp8", "int8-weight")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
_MIN_SCALE = 1e-12  # all-zero rows: any positive scale gives zeros

QuantFn = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


# ----------------------------------------------------------------------------- numerics


def quantize_weight(w: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (out, in) -> (q in ``qdtype``, scale float32 (out, 1)) with ``w ~= q * scale``,
    symmetric per output channel: float8_e4m3fn (amax / 448) or int8 (amax / 127, rounded)."""
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(w.shape)}")
    wf = w.detach().float()
    qmax = {FP8: FP8_MAX, torch.int8: INT8_MAX}.get(qdtype)
    if qmax is None:
        raise ValueError(f"qdtype={qdtype}: choose torch.float8_e4m3fn or torch.int8")
    scale = (wf.abs().amax(dim=1, keepdim=True) / qmax).clamp(min=_MIN_SCALE)
    q = wf / scale
    if qdtype == torch.int8:
        q = q.round_()
    return q.clamp_(-qmax, qmax).to(qdtype), scale


def quantize_rows_fp8(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row (per-token) activation quantization: ``x2`` (M, K) -> (a float8_e4m3fn
    (M, K), scale float32 (M, 1)) with ``x2 ~= a * scale``, scale = row amax / 448."""
    xf = x2.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_rowwise_reference(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """What the fp8 fast path computes, in float32: activations quantized per row as in
    :func:`quantize_rows_fp8`, both operands dequantized exactly, float32 matmul. (..., K) -> (..., N)."""
    a, sa = quantize_rows_fp8(x.reshape(-1, x.shape[-1]))
    y = (a.float() * sa) @ (weight.float() * weight_scale.float().view(-1, 1)).t()
    if bias is not None:
        y = y + bias.float()
    return y.view(*x.shape[:-1], weight.shape[0])


def fp8_scaled_mm_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    quant: QuantFn = quantize_rows_fp8,
    fuse_bias: bool = True,
    out_dtype: torch.dtype = torch.bfloat16,
    fast_accum: bool = False,
) -> torch.Tensor:
    """The fast path: ``x`` (..., K) quantized per row by ``quant``, then ``torch._scaled_mm`` with
    row-wise scales (a (M, K) row-major, weight.t() (K, N) column-major, scale_a (M, 1), scale_b
    (1, N), float32) -> (..., N) in ``out_dtype``. ``fuse_bias=False`` adds the bias afterwards."""
    n, k = weight.shape
    a, sa = quant(x.reshape(-1, k))
    b = None if bias is None else bias.to(out_dtype)
    y = torch._scaled_mm(
        a,
        weight.t(),
        scale_a=sa,
        scale_b=weight_scale.view(1, n),
        bias=b if fuse_bias else None,
        out_dtype=out_dtype,
        use_fast_accum=fast_accum,
    )
    if b is not None and not fuse_bias:
        y = y + b
    return y.view(*x.shape[:-1], n)


# ----------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Fp8Support:
    """Whether the fp8 fast path runs on a device, and how."""

    ok: bool
    reason: str  # why not, or "" when ok
    fused_bias: bool = False  # torch._scaled_mm accepted a bias with row-wise scales
    quant: QuantFn | None = None  # the fused activation quantizer (Triton)


_support: dict[torch.device, Fp8Support] = {}
_support_lock = threading.Lock()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


# widest row quantized from registers in one read; wider rows are read twice in blocks of 4096
# (H100: one pass over 16384-wide blocks was slower at K=8960 and 13824, 140/122 us vs 88/102 us)
_ONE_PASS_MAX = 8192


@functools.lru_cache(maxsize=1)
def triton_quantize_rows_fp8() -> QuantFn:
    """:func:`quantize_rows_fp8` as one Triton kernel (one program per row: amax, scale, e4m3
    store), so a linear layer costs one extra launch instead of ~6 passes over its input.
    Raises ImportError where Triton is absent."""
    import triton
    import triton.language as tl

    @triton.jit
    def _kernel(x_ptr, a_ptr, s_ptr, K, stride_x, stride_a, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        a_row = a_ptr + row * stride_a
        if ONE_PASS:
            offs = tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            scale = tl.maximum(tl.max(tl.abs(v), axis=0) / 448.0, 1e-12)
            q = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -448.0), 448.0)
            tl.store(a_row + offs, q.to(a_ptr.dtype.element_ty), mask=offs < K)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for k in range(0, K, BLOCK):
                offs = k + tl.arange(0, BLOCK)
                v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
                acc = tl.maximum(acc, tl.abs(v))
            scale = tl.maximum(tl.max(acc, axis=0) / 448.0, 1e-12)
            for k in range(0, K, BLOCK):
                offs = k + tl.arange(0, BLOCK)
                v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
                q = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -448.0), 448.0)
                tl.store(a_row + offs, q.to(a_ptr.dtype.element_ty), mask=offs < K)
        tl.store(s_ptr + row, scale)

    def quant(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, k = x2.shape
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        a = torch.empty((m, k), dtype=FP8, device=x2.device)
        s = torch.empty((m, 1), dtype=torch.float32, device=x2.device)
        one = k <= _ONE_PASS_MAX
        block = triton.next_power_of_2(k) if one else 4096
        warps = 4 if block <= 2048 else 8
        _kernel[(m,)](x2, a, s, k, x2.stride(0), a.stride(0), BLOCK=block, ONE_PASS=one, num_warps=warps)
        return a, s

    return quant


def _check_quantizer(quant: QuantFn, device: torch.device) -> str:
    """"" if ``quant`` agrees with :func:`quantize_rows_fp8` on both kernel variants, else why not."""
    g = torch.Generator(device=device).manual_seed(1)
    for k in (96, _ONE_PASS_MAX + 80):
        x = (torch.randn(33, k, generator=g, device=device) * torch.logspace(-2, 2, 33, device=device)[:, None])
        x = x.to(torch.bfloat16)
        x[3] = 0
        a, s = quant(x)
        a0, s0 = quantize_rows_fp8(x)
        if a.dtype != FP8 or a.shape != a0.shape or s.shape != s0.shape:
            return f"quantizer returned {a.dtype} {tuple(a.shape)}, scale {tuple(s.shape)}"
        err = _rel_err(a.float() * s, a0.float() * s0)
        if not torch.allclose(s, s0, rtol=1e-6, atol=0) or err > 1e-3:
            return f"quantizer disagrees with quantize_rows_fp8 at K={k} (rel err {err:.3g})"
    return ""


def _probe_scaled_mm(device: torch.device) -> tuple[bool | None, str]:
    """One small ``torch._scaled_mm`` call with row-wise scales on ``device``, compared with
    :func:`fp8_rowwise_reference` on the same operands -> (bias fused?, "") or (None, why not)."""
    if not hasattr(torch, "_scaled_mm"):
        return None, f"torch {torch.__version__} has no torch._scaled_mm"
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(64, 96, generator=g, device=device).to(torch.bfloat16)
    w, ws = quantize_weight(torch.randn(48, 96, generator=g, device=device), FP8)
    bias = torch.randn(48, generator=g, device=device).to(torch.bfloat16)
    ref = fp8_rowwise_reference(x, w, ws, bias)
    errors = []
    for fused in (True, False):
        try:
            with torch.no_grad():
                y = fp8_scaled_mm_linear(x, w, ws, bias, fuse_bias=fused)
            err = _rel_err(y, ref)
            if bool(torch.isfinite(y).all()) and err < 1e-2:
                return fused, ""
            errors.append(f"wrong result (rel err {err:.3g} vs its emulation)")
        except Exception as exc:  # noqa: BLE001 - the kernel is optional: any failure means "absent"
            errors.append(f"{type(exc).__name__}: {_first_line(exc)}")
    return None, "torch._scaled_mm row-wise: " + "; ".join(errors)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:160] if text else ""


def _probe(device: torch.device) -> Fp8Support:
    if device.type != "cuda":
        return Fp8Support(False, f"device type {device.type!r} (the fast path is CUDA only)")
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return Fp8Support(False, f"compute capability {cap[0]}.{cap[1]} < 8.9 (no fp8 tensor cores)")
    fused, why = _probe_scaled_mm(device)
    if fused is None:
        return Fp8Support(False, why)
    # without a fused quantizer the ~6 eager passes over the activations cost more than fp8 saves
    try:
        quant = triton_quantize_rows_fp8()
        why = _check_quantizer(quant, device)
    except Exception as exc:  # noqa: BLE001 - Triton is optional: missing, or failing to compile
        why = f"Triton activation quantizer unavailable ({type(exc).__name__}: {_first_line(exc)})"
    if why:
        return Fp8Support(False, why)
    return Fp8Support(True, "", fused_bias=fused, quant=quant)


def fp8_support(device: torch.device | str) -> Fp8Support:
    """Detected once per device (a probe matmul and the Triton quantizer's first compile: about a
    second, with host syncs); a failure is logged once, as a warning."""
    sup = _support.get(device)  # type: ignore[call-overload]  # the hot path: x.device, a hit
    if sup is not None:
        return sup
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    with _support_lock:
        sup = _support.get(dev)
        if sup is None:
            sup = _probe(dev)
            if not sup.ok:
                log.warning("fp8 fast path unavailable on %s (%s): Fp8Linear layers use dequantized weights "
                            "and matmuls in the activation dtype", dev, sup.reason)
            _support[dev] = sup
    return sup


# ----------------------------------------------------------------------------- modules


class QuantLinear(nn.Module):
    """A linear layer with a quantized ``weight`` (out, in) and float32 ``weight_scale`` (out, 1);
    ``bias`` (out,) in a float dtype, or None. Subclasses set ``qdtype``."""

    qdtype: torch.dtype

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, device=None, bias_dtype=torch.bfloat16
    ):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features, dtype=self.qdtype, device=device), requires_grad=False
        )
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "QuantLinear":
        """Quantize ``linear``'s weight (any device, meta included); the bias is kept as is."""
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device,
                  bias_dtype=w.dtype)  # fmt: skip
        q, s = quantize_weight(w, cls.qdtype)
        mod.weight = nn.Parameter(q, requires_grad=False)
        mod.weight_scale = s
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return mod

    @classmethod
    def from_quantized(
        cls, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
    ) -> "QuantLinear":
        """Wrap already quantized tensors (no copy when they are on one device with the right dtypes)."""
        if weight.dtype != cls.qdtype:
            raise ValueError(f"{cls.__name__} needs a {cls.qdtype} weight, got {weight.dtype}")
        n, k = weight.shape
        if tuple(weight_scale.shape) not in ((n, 1), (n,)):
            raise ValueError(f"weight_scale has shape {tuple(weight_scale.shape)}, expected ({n}, 1)")
        mod = cls(k, n, bias is not None, device="meta")
        mod.weight = nn.Parameter(weight, requires_grad=False)
        mod.weight_scale = weight_scale.float().reshape(n, 1)
        mod.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        return mod

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale.float()).to(dtype)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        """Weight cast to x.dtype (exact for int8 and e4m3 in bf16/fp16/fp32), matmul, per-channel
        scale applied to the output columns."""
        y = F.linear(x, self.weight.to(x.dtype))
        s = self.weight_scale.view(-1).to(x.dtype)
        return y * s if self.bias is None else torch.addcmul(self.bias.to(x.dtype), y, s)

    def _apply(self, fn, recurse=True):
        # keep the quantized weight and its scale in their dtypes under model.to(dtype)/.half();
        # devices still follow.
        def keep_dtype(t):
            out = fn(t)
            if (t is self.weight or t is self.weight_scale) and out.dtype != t.dtype:
                out = t.to(device=out.device)
            return out

        return super()._apply(keep_dtype, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Fp8Linear(QuantLinear):
    """float8_e4m3fn weight with per-output-channel scales; fp8 x fp8 matmul with per-token
    activation scales where :func:`fp8_support` says so, else the dequantized reference path.
    ``fast_accum``: ``torch._scaled_mm(use_fast_accum=...)`` (Hopper's faster fp8 accumulation)."""

    qdtype = FP8
    fast_accum = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == torch.bfloat16 and not (self.in_features % 16 or self.out_features % 16):
            sup = _support.get(x.device) or fp8_support(x.device)
            if sup.ok and x.numel():
                return fp8_scaled_mm_linear(x, self.weight, self.weight_scale, self.bias, quant=sup.quant,
                                            fuse_bias=sup.fused_bias, fast_accum=self.fast_accum)  # fmt: skip
        return self._reference(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fast_accum={self.fast_accum}"


class Int8WeightLinear(QuantLinear):
    """int8 weight with per-output-channel scales, dequantized at the matmul (weight-only: saves
    memory and host-to-device bytes under offload, computes in the activation dtype)."""

    qdtype = torch.int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reference(x)


_MODULES: dict[str, type[QuantLinear]] = {"fp8": Fp8Linear, "int8-weight": Int8WeightLinear}


# ----------------------------------------------------------------------------- model rewrite


def _check_not_offloaded(model: nn.Module) -> None:
    if any(isinstance(v, OffloadHandle) for v in vars(model).values()):
        raise ValueError(
            "quantize() must be applied before offload(): the offloaded blocks' weights point into "
            "shared device slots. Call handle.remove(), then quantize(model, ...), then offload(model, ...)"
        )


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def quantize(
    model: nn.Module,
    mode: str = "fp8",
    *,
    skip: Iterable[str] | str = (),
    blocks_attr: str = "blocks",
    fast_accum: bool = True,
) -> nn.Module:
    """Replace the ``nn.Linear`` layers inside ``model.<blocks_attr>`` with quantized ones; see the
    module docstring. Returns ``model`` (modified in place)."""
    if mode not in _MODULES:
        raise ValueError(f"mode={mode!r} is not a quantization mode; choose one of {', '.join(map(repr, MODES))}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_not_offloaded(model)
    blocks = getattr(model, blocks_attr, None) if isinstance(blocks_attr, str) else None
    if not isinstance(blocks, nn.Module):
        raise ValueError(f"blocks_attr={blocks_attr!r}: {type(model).__name__} has no such submodule")
    patterns = (skip,) if isinstance(skip, str) else tuple(skip)
    names = [f"{blocks_attr}.{n}" for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]
    unused = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unused:
        raise ValueError(
            f"skip={list(patterns)!r}: pattern(s) {unused} match no linear layer in {blocks_attr} "
            f"(names look like {names[0] if names else '-'!r}; fnmatch patterns such as 'blocks.0.*')"
        )
    cls = _MODULES[mode]
    with torch.no_grad():
        for name in names:
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                continue
            parent, child = _parent(model, name)
            layer = cls.from_linear(getattr(parent, child))
            if isinstance(layer, Fp8Linear):
                layer.fast_accum = bool(fast_accum)
            setattr(parent, child, layer)
    return model


def _dequantize(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (w.float() * scale.float().reshape(w.shape[0], *([1] * (w.ndim - 1)))).to(dtype)


def from_lightx2v(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    cfg=None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    state_key: str | None = None,
):
    """A WanModel with the quantized layers of a LightX2V checkpoint kept quantized; see the module
    docstring. ``source``: a path (read by ``models/checkpoints.py``, so every layout and prefix it
    knows works) or a state dict with native keys and ``X.weight_scale`` entries."""
    from streamgen.models.checkpoints import CheckpointError, check_keys, infer_wan_config, load_wan_state_dict
    from streamgen.models.wan import WanModel

    if isinstance(source, Mapping):
        sd = dict(source)
        what = "state dict"
    else:
        sd, cfg, _ = load_wan_state_dict(
            source, cfg, device=device, dtype=dtype, state_key=state_key, keep_quantized=True
        )
        what = str(source)
    scales = {k[: -len("_scale")]: sd.pop(k) for k in [k for k in sd if k.endswith(".weight_scale")]}
    stray = sorted(k + "_scale" for k in scales if k not in sd)
    if stray:
        raise CheckpointError(f"{what}: scales without a weight: {stray[:8]}")
    if cfg is None:
        cfg = infer_wan_config({k: tuple(v.shape) for k, v in sd.items()})
    with torch.device("meta"):
        model = WanModel(cfg)

    kinds = {cls.qdtype: mode for mode, cls in _MODULES.items()}
    out: dict[str, torch.Tensor] = {}
    n_kept = 0
    for name, mod in model.blocks.named_modules(prefix="blocks"):
        key = f"{name}.weight"
        if not isinstance(mod, nn.Linear) or key not in scales or sd.get(key) is None:
            continue
        w, s = sd[key], scales[key]
        mode = kinds.get(w.dtype)
        if mode is None:
            continue  # e.g. e5m2: dequantized below
        if tuple(s.shape) not in ((w.shape[0], 1), (w.shape[0],)):
            raise CheckpointError(f"{what}: {key}_scale has shape {tuple(s.shape)}, expected ({w.shape[0]}, 1)")
        parent, child = _parent(model, name)
        setattr(parent, child, _MODULES[mode](mod.in_features, mod.out_features, mod.bias is not None, device="meta"))
        out[key] = w.to(device)
        out[key + "_scale"] = s.to(device=device, dtype=torch.float32).reshape(w.shape[0], 1)
        n_kept += 1
    for k, v in sd.items():
        if k in out:
            continue
        if k in scales:
            out[k] = _dequantize(v.to(device), scales[k].to(device), dtype)
        elif v.dtype in (torch.int8, FP8, torch.float8_e5m2) and k.endswith(".weight"):
            raise CheckpointError(f"{what}: {k} is {v.dtype} without a {k}_scale; cannot dequantize")
        else:
            out[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
    if n_kept == 0:
        log.warning("%s: no int8/float8_e4m3fn block weights with scales found; nothing kept quantized", what)
    check_keys(model.state_dict(), out, what=f"{what}: LightX2V checkpoint does not match the model")
    model.load_state_dict(out, strict=True, assign=True)
    return model.eval()


def count_quantized(model: nn.Module) -> dict[str, int]:
    """Number of quantized linear layers per class name (for logs and tests)."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return counts


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (quantized weights count 1 byte per element)."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total

