"""GPU memory budget planning: which parts of a Wan DiT stay on the GPU and what streams each chunk.

``plan = make_plan(cfg, width=832, height=480, budget_bytes=8 << 30, weight_quant="fp8", kv_quant="fp8")``
    Chooses, for one session of a streaming DiT (``cfg``: a ``WanConfig``), the layout that moves
    the fewest bytes over PCIe per chunk while the estimated peak fits the budget:

    * weights: every block resident, or ``n`` blocks resident (spread evenly over the depth so the
      copy stream has compute to hide behind) and the rest streamed through ``prefetch + 1`` slots
      (``streamgen.ops.offload``, ``resident=``); the deepest prefetch up to ``weight_prefetch``
      that fits comes first (prefetch 0 serializes copy and compute), then the fewest bytes;
    * the self-attention KV cache: resident, or in host memory streamed layer by layer
      (``streamgen.ops.kvcache``); fp8/int8 storage when ``kv_quant`` is given;
    * activations: the FFN over token slices of whole latent frames (``streamgen.ops.chunked``)
      when that is what lets more of the model stay resident.

    Resident whatever the plan: the tensors outside the blocks (embeddings, time MLPs, head) and
    the cross-attention K/V. ``plan.fits`` is False (and ``plan.reason`` one line naming
    ``--gpu-memory-gb``) when not even the smallest layout fits.

    Each chunk runs ``steps + 1`` forwards (the denoising steps and the cache pass); a streamed
    block or KV layer is copied in once per forward. ``plan.h2d_bytes`` is that per chunk,
    ``plan.d2h_bytes`` the committed K/V written back (the other direction of the link), and
    ``plan.pcie_bound_s(gbps)`` the time the host-to-device copies alone take at ``gbps`` GB/s,
    the floor of a chunk's time when the copies outweigh the compute.

Estimates, not measurements: weight and cache sizes are exact (the same layouts the transforms
build, from a meta-device model); activations are a formula over the chunk's tokens (the float32
residual and its temporaries, the projections, the FFN hidden, the time MLP's float32 weights)
plus ``margin`` (max(256 MiB, 4% of the budget)) for what the formula misses (allocator rounding,
kernel workspaces). The H100 runs in bench/BENCHMARKS.md ("Offload") saw about 3.4 GiB of
non-weight, non-cache memory for 14B at 4680 tokens, more than this formula gives; bench/kv_offload.py
prints the estimate beside the measured peak so the formula can be checked. The decoder, the text
encoder and the CUDA context are not included.

``plan.apply(model)`` applies the plan's transforms to a built (and, if planned, already
quantized) model and returns their handles; ``plan.lines()`` is what ``streamgen info --plan``
prints.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, replace

import torch

__all__ = ["Plan", "make_plan", "model_sizes", "activation_bytes", "add_plan_arguments", "run_plan", "PlanError"]

GIB = 1 << 30
DEFAULT_H2D_GBPS = 53.0  # measured on an H100, PCIe gen 5 x16 (bench/BENCHMARKS.md, "Offload")


class PlanError(ValueError):
    """No layout fits the budget; the message is one line naming the option."""


@dataclass(frozen=True)
class Sizes:
    block: int  # bytes of one block's packed region (offload layout, 256-byte aligned tensors)
    outside: int  # bytes of everything outside the blocks
    layers: int


def model_sizes(cfg, dtype: torch.dtype = torch.bfloat16, weight_quant: str | None = None) -> Sizes:
    """Exact weight sizes of ``cfg`` in ``dtype`` (blocks quantized by ``streamgen.ops.quant`` when
    ``weight_quant``), from a one-block model on the meta device (no memory)."""
    from streamgen.models.wan import WanModel
    from streamgen.ops.offload import _block_entries

    with torch.device("meta"):
        m = WanModel(replace(cfg, num_layers=1)).to(dtype)
    if weight_quant is not None:
        from streamgen.ops.quant import quantize

        quantize(m, weight_quant)
    _, block = _block_entries(m.blocks[0])
    inside = {id(t) for t in (*m.blocks.parameters(), *m.blocks.buffers())}
    outside = sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()) if id(t) not in inside)
    return Sizes(block, outside, cfg.num_layers)


def activation_bytes(cfg, tokens: int, *, dtype: torch.dtype = torch.bfloat16, ffn_tokens: int | None = None,
                     weight_quant: str | None = None) -> int:
    """Estimated activation peak of one forward over ``tokens`` tokens (all rows of the batch):
    inside a block the float32 residual and its float32 temporaries (4 of them: norm, modulation,
    RoPE), six ``dtype`` projections (y, q, k, v, attention out, o), RoPE cos/sin, and the FFN hidden
    twice (first Linear, GELU) over ``ffn_tokens`` at a time (plus its fp8 copy under fp8); before the
    blocks the time MLP's weights upcast to float32. The larger of the two."""
    s = torch.empty((), dtype=dtype).element_size()
    rows = tokens if ffn_tokens is None else min(tokens, ffn_tokens)
    block = tokens * cfg.dim * (4 * 4 + 6 * s) + tokens * cfg.head_dim * 4
    block += rows * cfg.ffn_dim * (2 * s + (1 if weight_quant == "fp8" else 0))
    time_mlp = 4 * cfg.dim * 6 * cfg.dim  # time_projection's weight in float32
    return max(block, time_mlp)


@dataclass
class Plan:
    """A layout for one session (see the module docstring); sizes in bytes."""

    model: str
    width: int
    height: int
    tokens: int  # per chunk
    budget: int
    fits: bool
    forwards: int  # per chunk
    weight_quant: str | None = None
    kv_quant: str | None = None
    resident_blocks: list[int] = field(default_factory=list)
    streamed_blocks: int = 0
    weight_prefetch: int = 0
    kv_offload: bool = False
    kv_prefetch: int = 0
    ffn_tokens: int | None = None
    parts: dict[str, int] = field(default_factory=dict)  # what the GPU holds, by part
    h2d: dict[str, int] = field(default_factory=dict)  # bytes copied in per chunk, by part
    d2h_bytes: int = 0
    host_bytes: int = 0  # pinned host memory the plan needs (streamed blocks + offloaded KV)
    reason: str = ""
    layers: int = 0
    block_bytes: int = 0
    kv_layer_bytes: int = 0
    window_frames: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def h2d_bytes(self) -> int:
        return sum(self.h2d.values())

    def pcie_bound_s(self, gbps: float = DEFAULT_H2D_GBPS) -> float:
        return self.h2d_bytes / (gbps * 1e9)

    def lines(self, gbps: float = DEFAULT_H2D_GBPS) -> list[str]:
        g = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
        wq = self.weight_quant or "unquantized"
        out = [f"plan: {self.model} at {self.width}x{self.height} ({self.tokens} tokens a chunk, a {self.window_frames}-frame "
               f"KV window), budget {g(self.budget)}"]
        if not self.fits:
            return out + [f"does not fit: {self.reason}"]
        n_res = len(self.resident_blocks)
        if self.streamed_blocks == 0:
            w = f"all {self.layers} blocks resident"
        else:
            w = (f"{n_res} of {self.layers} blocks resident, {self.streamed_blocks} streamed from pinned host memory "
                 f"(prefetch {self.weight_prefetch}: {self.weight_prefetch + 1} slots)")
        out.append(f"  weights ({wq}, {self.block_bytes / 2**20:.1f} MiB a block): {w}: {g(self.parts['weights'])}")
        out.append(f"  outside the blocks (embeddings, time MLPs, head): {g(self.parts['outside'])}")
        kq = self.kv_quant or "unquantized"
        if self.kv_offload:
            kv = (f"in pinned host memory ({g(self.host_kv)}), streamed layer by layer (prefetch {self.kv_prefetch}: "
                  f"{self.kv_prefetch + 1} slots)")
        else:
            kv = "resident"
        out.append(f"  self-attention KV cache ({kq}, {self.kv_layer_bytes / 2**20:.1f} MiB a layer): {kv}: "
                   f"{g(self.parts['kv'])}")
        out.append(f"  cross-attention K/V: {g(self.parts['cross'])}")
        ffn = "whole" if self.ffn_tokens is None else f"in slices of {self.ffn_tokens} tokens"
        out.append(f"  activations (estimate; FFN {ffn}): {g(self.parts['activations'])}, margin {g(self.parts['margin'])}")
        disk = self.host_kv + (5 * self.block_bytes if self.streamed_blocks else 0)
        out.append(f"  total {g(self.total)} of {g(self.budget)}; pinned host memory {g(self.host_bytes)} "
                   f"(blocks read from disk by 4 readers instead: {g(disk)} + the page cache)")
        moved = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in self.h2d.items() if v) or "nothing"
        out.append(f"  moved per chunk ({self.forwards} forwards): host-to-device {self.h2d_bytes / 1e9:.1f} GB ({moved}), "
                   f"device-to-host {self.d2h_bytes / 1e9:.2f} GB; PCIe bound at {gbps:g} GB/s: "
                   f"{self.pcie_bound_s(gbps) * 1e3:.0f} ms a chunk")
        return out

    @property
    def host_kv(self) -> int:
        return self.kv_layer_bytes * self.layers if self.kv_offload else 0

    def apply(self, model, device=None, *, source: str = "memory", path=None, readers: int = 1) -> list:
        """Apply the plan to ``model`` (already quantized as planned): FFN slicing, block offload with
        the resident blocks (``source``/``path``/``readers`` as ``offload`` takes them: the disk tier),
        the KV store. Returns the handles (``remove()`` each to undo)."""
        from streamgen.ops.chunked import chunk_ffn
        from streamgen.ops.kvcache import kv_cache
        from streamgen.ops.offload import offload

        if not self.fits:
            raise PlanError(self.reason)
        handles = []
        if self.ffn_tokens is not None:
            handles.append(chunk_ffn(model, self.ffn_tokens))
        if self.streamed_blocks:
            dev = device if device is not None else next(model.parameters()).device
            handles.append(offload(model, device=dev, prefetch=self.weight_prefetch, resident=self.resident_blocks,
                                   source=source, path=path, readers=readers))
        if self.kv_offload or self.kv_quant is not None:
            handles.append(kv_cache(model, offload=self.kv_offload, prefetch=self.kv_prefetch, quant=self.kv_quant))
        return handles


def _spread(n: int, total: int) -> list[int]:
    """n of range(total), evenly spaced."""
    return sorted({int((i + 0.5) * total / n) for i in range(n)}) if n else []


def make_plan(cfg, *, width: int, height: int, budget_bytes: int, model: str = "", frames_per_chunk: int | None = None,
              window_frames: int | None = None, steps: int = 4, batch: int = 1, dtype: torch.dtype = torch.bfloat16,
              weight_quant: str | None = None, kv_quant: str | None = None, weight_prefetch: int = 2,
              kv_prefetch: int = 1, margin: int | None = None) -> Plan:
    """The plan that moves the fewest bytes per chunk within ``budget_bytes`` (see the module docstring)."""
    from streamgen.ops.kvcache import kv_cache_bytes

    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise PlanError(f"--width/--height {width}x{height}: each must be a positive multiple of 16")
    fpc = frames_per_chunk or cfg.frames_per_chunk
    window = window_frames or cfg.local_frames or 12  # the streaming presets' window
    latent = (height // 8, width // 8)
    tpf = (latent[0] // cfg.patch_size[1]) * (latent[1] // cfg.patch_size[2])
    tokens = batch * fpc * tpf
    forwards = steps + 1
    sizes = model_sizes(cfg, dtype, weight_quant)
    L = sizes.layers
    margin = max(256 << 20, budget_bytes // 25) if margin is None else margin
    kv_full = kv_cache_bytes(cfg, batch, latent, window, dtype=dtype, quant=kv_quant)
    written = kv_full["per_layer"] * fpc // window  # one chunk's K/V (and scales) of one layer
    base = Plan(model=model or f"dim {cfg.dim} x {L} layers", width=width, height=height, tokens=tokens,
                budget=budget_bytes, fits=False, forwards=forwards, weight_quant=weight_quant, kv_quant=kv_quant,
                layers=L, block_bytes=sizes.block, kv_layer_bytes=kv_full["per_layer"], window_frames=window)
    # FFN slices: whole, then whole latent frames (multiples of 8 tokens at every size Wan takes)
    ffn_options = [None] + [k * tpf for k in range(batch * fpc - 1, 0, -1)]
    best, smallest = None, None
    for ffn_tokens in ffn_options:
        act = activation_bytes(cfg, tokens, dtype=dtype, ffn_tokens=ffn_tokens, weight_quant=weight_quant)
        for kv_off in (False, True):
            kvb = kv_cache_bytes(cfg, batch, latent, window, dtype=dtype, quant=kv_quant, offload=kv_off,
                                 prefetch=min(kv_prefetch, L - 1))
            fixed = sizes.outside + kvb["cross"] + act + kvb["device"] + margin
            for wp in sorted({min(weight_prefetch, L - 1), 1, 0}, reverse=True):
                avail = budget_bytes - fixed
                if avail >= L * sizes.block:
                    n_res, streamed, wpre = L, 0, 0
                else:  # as many resident blocks as fit beside the slots
                    n_res = max(0, min((avail - (wp + 1) * sizes.block) // sizes.block, L - 1))
                    streamed = L - n_res
                    wpre = min(wp, streamed - 1)
                weights = n_res * sizes.block + (wpre + 1) * sizes.block * (streamed > 0)
                total = fixed + weights
                p = replace(base, resident_blocks=_spread(n_res, L) if streamed else list(range(L)),
                            streamed_blocks=streamed, weight_prefetch=wpre, kv_offload=kv_off,
                            kv_prefetch=min(kv_prefetch, L - 1) if kv_off else 0, ffn_tokens=ffn_tokens,
                            parts={"weights": weights, "outside": sizes.outside, "kv": kvb["device"],
                                   "cross": kvb["cross"], "activations": act, "margin": margin},
                            h2d={"weights": forwards * streamed * sizes.block,
                                 "kv": forwards * L * kvb["per_layer"] if kv_off else 0},
                            d2h_bytes=L * written if kv_off else 0,
                            host_bytes=streamed * sizes.block + kvb["host"])
                if smallest is None or total < smallest.total:
                    smallest = p
                if total > budget_bytes:
                    continue
                p.fits = True
                # nothing moved; else the deepest prefetch (p=0 serializes copies and compute: 1.6-2.2x
                # on an H100), then the fewest bytes moved; then no FFN slicing; then a resident cache
                key = (p.h2d_bytes > 0, -(wpre if streamed else weight_prefetch), p.h2d_bytes, ffn_tokens is not None,
                       kv_off)
                if best is None or key < best[0]:
                    best = (key, p)
    if best is not None:
        return best[1]
    need = smallest.total
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in smallest.parts.items())
    reason = (f"--gpu-memory-gb {budget_bytes / GIB:g}: {base.model} at {width}x{height} needs at least "
              f"{need / GIB:.2f} GiB even streaming its blocks and KV cache with the FFN in slices of "
              f"{smallest.ffn_tokens} tokens ({parts} GiB); give more memory, a smaller size or --quant/--kv-quant")
    return replace(smallest, fits=False, reason=reason)


# -- streamgen info --plan ---------------------------------------------------------------------------


def _gb(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB") from None
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive number of GiB")
    return v


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory plan (--plan)")
    g.add_argument("--plan", action="store_true",
                   help="print what stays on the GPU for one session within --gpu-memory-gb, and the bytes moved per chunk")
    g.add_argument("--gpu-memory-gb", type=_gb, default=None, metavar="GIB", help="GPU memory budget of --plan, GiB")
    g.add_argument("--model", default="wan2.1-t2v-14b", metavar="NAME",
                   help="model preset or Wan config preset (default: wan2.1-t2v-14b)")
    g.add_argument("--width", type=int, default=None, help="video width (default: the preset's)")
    g.add_argument("--height", type=int, default=None, help="video height (default: the preset's)")
    g.add_argument("--quant", choices=("fp8", "int8-weight"), default=None, help="weights quantized as `serve --quant`")
    g.add_argument("--kv-quant", choices=("fp8", "int8"), default=None, help="KV cache stored in fp8 (e4m3) or int8")
    g.add_argument("--local-frames", type=int, default=None, help="KV window in latent frames (default: the preset's, or 12)")
    g.add_argument("--steps", type=int, default=4, help="denoising steps a chunk (default: 4)")
    g.add_argument("--h2d-gbps", type=float, default=DEFAULT_H2D_GBPS,
                   help=f"host-to-device bandwidth for the time estimate (default: {DEFAULT_H2D_GBPS:g}, an H100's)")


def _config(name: str):
    from streamgen.models.wan import PRESETS, WanConfig
    from streamgen.pipeline import MODELS, UsageError

    if name in MODELS:
        preset = MODELS[name]
        if preset.weights:  # a trained built-in model: its config is in its file
            from streamgen.weights import builtin_path, toy_metadata

            wcfg = toy_metadata(builtin_path(preset.weights))["wan_config"]
            wcfg["patch_size"] = tuple(wcfg["patch_size"])
            cfg = WanConfig(**wcfg)
        else:
            cfg = WanConfig.preset(preset.wan)
        return cfg, preset.width, preset.height, preset.local_frames or 12
    if name in PRESETS:
        return WanConfig.preset(name), 832, 480, 12
    raise UsageError(f"--model {name}: allowed: {', '.join([*MODELS, *sorted(set(PRESETS) - set(MODELS))])}")


def run_plan(args: argparse.Namespace) -> int:
    from streamgen.pipeline import UsageError

    if args.gpu_memory_gb is None:
        raise UsageError("--plan needs --gpu-memory-gb GIB (the GPU memory budget)")
    cfg, w, h, window = _config(args.model)
    w, h = args.width or w, args.height or h
    for flag, v in (("--width", w), ("--height", h)):
        if v <= 0 or v % 16:
            raise UsageError(f"{flag} {v}: must be a positive multiple of 16")
    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: must be >= 1")
    if args.local_frames is not None and args.local_frames < cfg.frames_per_chunk:
        raise UsageError(f"--local-frames {args.local_frames}: must hold a chunk ({cfg.frames_per_chunk} frames)")
    plan = make_plan(cfg, width=w, height=h, budget_bytes=int(args.gpu_memory_gb * GIB), model=args.model,
                     window_frames=args.local_frames or window, steps=args.steps, weight_quant=args.quant,
                     kv_quant=args.kv_quant)
    if not plan.fits:
        raise UsageError(plan.reason)
    for line in plan.lines(args.h2d_gbps):
        print(line)
    return 0
