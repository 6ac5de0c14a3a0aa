"""Self-attention KV cache storage: in host memory, streamed in layer by layer, and/or quantized.

``handle = kv_cache(model, offload=True, prefetch=1, quant=None | "fp8" | "int8", pin=True)``
    Rewrites a built ``WanModel`` from outside (house style 4): every cache made by
    ``model.new_cache`` from then on (``SessionState``, the engine) keeps its self-attention K/V
    in a :class:`KVStore` instead of two device tensors. Cross-attention K/V stay in the cache
    (on the device: ``text_len`` tokens, small). ``handle.remove()`` restores ``new_cache``
    (caches made before stay as they are); ``handle.stats()`` sums the counters of its stores.

Storage. Per layer one flat region: K and V ``(B, N, H, D)`` (N = capacity * tokens per frame) in
the cache dtype, or in float8_e4m3fn / int8 with one float32 scale per token and head
``(B, N, H, 1)`` (``amax / 448`` resp. ``amax / 127`` over the head's D channels: "per-token,
per-head" scales, so a new token never rescales old ones). ``store.k``/``store.v`` are views of
that storage ``(layers, B, N, H, D)``.

``offload=False``: the regions live on the device; a layer is dequantized on use.
``offload=True``: the regions live in host memory (page-locked on CUDA when ``pin``) and the
device holds ``prefetch + 1`` slots, each one layer's region, reused round robin exactly as the
weight slots of ``streamgen.ops.offload`` (and on its copy stream when the model's blocks are
offloaded too, so block i's weights and layer i's K/V travel in order on one queue):

1. entering layer i (its attention asks for its K/V): the previous layer's slot is marked free
   with an event on the compute stream; layer i is copied now unless it was prefetched (a miss);
2. layers i+1 .. i+prefetch (wrapping into the next forward) are copied into the next slots on
   the copy stream, each copy first waiting for its slot to be free and for any write-back into
   the host region it reads;
3. the compute stream waits for layer i's copy (and for the slot's last write-back).

Write-back: only what a call *commits* goes back to the host (``update_cache=True``: the cache
pass and the prompt-switch re-cache), as a device-to-host copy of the written token ranges of
the slot on a second stream (PCIe is full duplex), ordered after the writes by an event; the next
host-to-device copy out of that slot or into that host region waits for it. A tentative write
(``update_cache=False``, the denoising steps) lives in the slot only: ``WanModel`` rewrites a
tentative range before it ever reads it again (the next call at that position writes first), so
the host copy never needs it. Quantization follows the same rule: the chunk's own K/V are
attended to in full precision while it is denoised and quantized once, when committed. The
one-forward re-cache (``forward_chunk(blocks=...)``: all blocks written, then committed together)
writes back all its blocks at once; a quantized store's ``reread`` then gives each block the earlier
blocks' K/V as dequantized from storage, as the sequential committing calls would have loaded them.

On a CPU device the same code runs with plain copies, no streams or events (for tests): an
offloaded fp32 cache gives bit for bit the video of a resident one (tests/test_kvcache.py). The CUDA
path is unmeasured and untested on a GPU so far (bench/kv_offload.py is the first run). Not with CUDA
graphs (streamgen.ops.graphs): the copies and events are issued from Python at every layer. Caches
made from the engine's pool still reserve a full-size slot (only the cross-attention K/V use it).

``kv_cache_bytes(cfg, batch, latent_hw, capacity, dtype=..., quant=..., offload=..., prefetch=...)``
    The bytes a store of that geometry takes: ``{"device": ..., "host": ..., "per_layer": ...}``
    (used by the budget planner, streamgen/plan.py).

Measured error (tests/test_kvcache.py, bench/BENCHMARKS.md "Offload"): see the test's bounds.
"""

from __future__ import annotations

import contextlib
import math
import weakref

import torch
import torch.nn as nn

__all__ = ["kv_cache", "KVCacheHandle", "KVStore", "kv_cache_bytes", "quantize_kv", "dequantize_kv", "QUANT_KV"]

QUANT_KV = {"fp8": (torch.float8_e4m3fn, 448.0), "int8": (torch.int8, 127.0)}
_ALIGN = 256
_ATTR = "_streamgen_kv_cache"


def quantize_kv(x: torch.Tensor, quant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) -> (q (..., D) fp8/int8, scale (..., 1) float32) with ``x ~= q * scale``;
    one scale per vector of D (per token and head), ``amax / qmax``; all-zero vectors stay 0."""
    qdtype, qmax = QUANT_KV[quant]
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / qmax
    y = xf / scale.clamp_min(torch.finfo(torch.float32).tiny)
    if qdtype == torch.int8:
        y = y.round_().clamp_(-qmax, qmax)
    return y.to(qdtype), scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def _layout(shape, dtype: torch.dtype, quant: str | None) -> tuple[list[tuple[str, tuple, torch.dtype, int]], int]:
    """One layer's region: [(name, shape, dtype, byte offset)], region bytes."""
    _, b, n, h, d = shape
    sdt = dtype if quant is None else QUANT_KV[quant][0]
    parts = [("k", (b, n, h, d), sdt), ("v", (b, n, h, d), sdt)]
    if quant is not None:
        parts += [("k_scale", (b, n, h, 1), torch.float32), ("v_scale", (b, n, h, 1), torch.float32)]
    out, off = [], 0
    for name, shp, dt in parts:
        out.append((name, shp, dt, off))
        off += -(-math.prod(shp) * torch.empty((), dtype=dt).element_size() // _ALIGN) * _ALIGN
    return out, off


def kv_cache_bytes(cfg, batch: int, latent_hw: tuple[int, int], capacity: int, *, dtype: torch.dtype = torch.bfloat16,
                   quant: str | None = None, offload: bool = False, prefetch: int = 1) -> dict:
    """Bytes of one cache's self-attention store: ``per_layer`` (one region), ``home`` (all layers:
    on the host when offloaded, else on the device), ``device`` (what the GPU holds: all layers, or
    ``prefetch + 1`` slots, plus one dequantized layer of K and V when quantized) and ``cross``
    (the cross-attention K/V, always on the device)."""
    _, ph, pw = cfg.patch_size
    n = capacity * (latent_hw[0] // ph) * (latent_hw[1] // pw)
    shape = (cfg.num_layers, batch, n, cfg.num_heads, cfg.head_dim)
    _, region = _layout(shape, dtype, quant)
    size = torch.empty((), dtype=dtype).element_size()
    work = 0 if quant is None else 2 * batch * n * cfg.dim * size  # the layer dequantized for attention
    home = cfg.num_layers * region
    device = (prefetch + 1) * region if offload else home
    cross = 2 * cfg.num_layers * batch * cfg.text_len * cfg.dim * size
    return {"per_layer": region, "home": home, "device": device + work, "host": home if offload else 0,
            "cross": cross, "work": work}


class KVStore:
    """One cache's self-attention K/V (all layers): the ``kv`` store ``WanCache`` calls
    (``load(layer)`` before the chunk's writes, ``store(layer, plan, kb, vb)`` after them)."""

    def __init__(self, shape, dtype: torch.dtype, device: torch.device, *, offload: bool, prefetch: int,
                 quant: str | None, pin: bool, copy_stream=None):
        self.layers = shape[0]
        self.dtype = dtype
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.offload = offload
        self.quant = quant
        self.prefetch = prefetch
        self._cuda = self.device.type == "cuda"
        self._parts, self.region_bytes = _layout(shape, dtype, quant)
        home_dev = "cpu" if offload else self.device
        # zeros: masked keys must be finite, and a zero byte is 0.0 in every storage dtype
        self._home = torch.zeros(self.layers, self.region_bytes, dtype=torch.uint8, device=home_dev)
        self.pinned = False
        if offload and self._cuda and pin:
            cudart = torch.cuda.cudart()
            err = cudart.cudaHostRegister(self._home.data_ptr(), self._home.numel(), 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of the {self._home.numel() / 2**30:.1f} GiB KV cache failed "
                                   f"({err}): not enough lockable host memory? Use pin=False (slower copies)")
            self.pinned = True
            weakref.finalize(self, cudart.cudaHostUnregister, self._home.data_ptr())
        sdt = self._parts[0][2]
        n_k = math.prod(self._parts[0][1]) * torch.empty((), dtype=sdt).element_size()
        self.k = self._home[:, self._parts[0][3] : self._parts[0][3] + n_k].view(sdt).view(shape)
        self.v = self._home[:, self._parts[1][3] : self._parts[1][3] + n_k].view(sdt).view(shape)
        self._home_views = [self._views(self._home[i]) for i in range(self.layers)]
        self.copies = self.misses = self.bytes_in = self.bytes_out = 0
        if quant is None:
            self.reread = None  # lossless: WanCache has nothing to read back (instance attribute shadows the method)
        self.num_slots = prefetch + 1 if offload else 0
        self.slots = [torch.zeros(self.region_bytes, dtype=torch.uint8, device=self.device) for _ in range(self.num_slots)]
        self._slot_views = [self._views(s) for s in self.slots]
        self._slot_layer = [-1] * self.num_slots
        self._next_slot = 0
        self._current_slot = -1
        if offload and self._cuda:
            self._copy_stream = copy_stream if copy_stream is not None else torch.cuda.Stream(self.device)
            self._wb_stream = torch.cuda.Stream(self.device)
            self._ready = [torch.cuda.Event() for _ in self.slots]
            self._free = [torch.cuda.Event() for _ in self.slots]
            self._written = torch.cuda.Event()
            self._wb_slot = [torch.cuda.Event() for _ in self.slots]  # write-back out of the slot done
            self._wb_layer = [torch.cuda.Event() for _ in range(self.layers)]  # ... into the host region done
            for s in self.slots:
                s.record_stream(self._copy_stream)
                s.record_stream(self._wb_stream)

    def _views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, shp, dt, off in self._parts:
            nbytes = math.prod(shp) * torch.empty((), dtype=dt).element_size()
            out[name] = flat[off : off + nbytes].view(dt).view(shp)
        return out

    @property
    def device_bytes(self) -> int:
        return (0 if self.offload else self._home.numel()) + self.num_slots * self.region_bytes

    @property
    def host_bytes(self) -> int:
        return self._home.numel() if self.offload else 0

    # -- the hot path (no host syncs)

    def _copy_in(self, layer: int, slot: int) -> None:
        dst, src = self.slots[slot], self._home[layer]
        if self._cuda:
            with torch.cuda.stream(self._copy_stream):
                self._copy_stream.wait_event(self._free[slot])
                self._copy_stream.wait_event(self._wb_slot[slot])
                self._copy_stream.wait_event(self._wb_layer[layer])
                dst.copy_(src, non_blocking=True)
                self._ready[slot].record(self._copy_stream)
        else:
            dst.copy_(src)
        self._slot_layer[slot] = layer
        self.copies += 1
        self.bytes_in += self.region_bytes

    def _enter(self, layer: int) -> dict[str, torch.Tensor]:
        compute = torch.cuda.current_stream(self.device) if self._cuda else None
        # 1. the layer left behind: its slot is free once the work queued so far is done
        if self._current_slot >= 0 and self._cuda:
            self._free[self._current_slot].record(compute)
        slot = self._next_slot
        self._next_slot = (slot + 1) % self.num_slots
        if self._slot_layer[slot] != layer:
            self.misses += 1
            self._copy_in(layer, slot)
        # 2. the next layers, wrapping around into the next forward
        for j in range(1, self.prefetch + 1):
            nl, ns = (layer + j) % self.layers, (slot + j) % self.num_slots
            if self._slot_layer[ns] != nl:
                self._copy_in(nl, ns)
        # 3. compute waits for the copy, and for the last write-back out of this slot (a slot that
        #    still holds its layer is written again without a copy in between)
        if self._cuda:
            compute.wait_event(self._ready[slot])
            compute.wait_event(self._wb_slot[slot])
        self._current_slot = slot
        return self._slot_views[slot]

    def load(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s K and V ``(B, N, H, D)`` in the cache dtype on the device, writable:
        the chunk's K/V are written into them before attention (views of the storage or the slot
        unquantized; a dequantized copy otherwise)."""
        views = self._enter(layer) if self.offload else self._home_views[layer]
        if self.quant is None:
            return views["k"], views["v"]
        return (dequantize_kv(views["k"], views["k_scale"], self.dtype),
                dequantize_kv(views["v"], views["v_scale"], self.dtype))

    def store(self, layer: int, plan, kb: torch.Tensor, vb: torch.Tensor) -> None:
        """After the writes of ``plan`` into ``kb``/``vb`` (from ``load(layer)``): keep what the
        call commits (quantize it; write it back to the host)."""
        if not plan.commit or not plan.write:
            return
        views = self._slot_views[self._current_slot] if self.offload else self._home_views[layer]
        if self.quant is not None:
            for dst, _, n in plan.write:
                for name, buf in (("k", kb), ("v", vb)):
                    q, s = quantize_kv(buf[:, dst : dst + n], self.quant)
                    views[name][:, dst : dst + n] = q
                    views[name + "_scale"][:, dst : dst + n] = s
        if not self.offload:
            return
        home = self._home_views[layer]
        slot = self._current_slot
        if self._cuda:
            self._written.record(torch.cuda.current_stream(self.device))
            self._wb_stream.wait_event(self._written)
            ctx = torch.cuda.stream(self._wb_stream)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            for dst, _, n in plan.write:
                for name, t in views.items():
                    home[name][:, dst : dst + n].copy_(t[:, dst : dst + n], non_blocking=self._cuda)
                    self.bytes_out += t[:, dst : dst + n].numel() * t.element_size()
        if self._cuda:
            self._wb_slot[slot].record(self._wb_stream)
            self._wb_layer[layer].record(self._wb_stream)

    def reread(self, layer: int, kb: torch.Tensor, vb: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
        """After ``store``: overwrite the token ranges ``[(start, n)]`` of ``kb``/``vb`` with what a later
        ``load(layer)`` returns for them (their dequantized fp8/int8 values), so that a block of a
        ``forward_chunk(blocks=...)`` call sees the earlier blocks' K/V as it would after their own
        committing calls. None on an unquantized store (it keeps exactly what was written)."""
        views = self._slot_views[self._current_slot] if self.offload else self._home_views[layer]
        for dst, n in ranges:
            for name, buf in (("k", kb), ("v", vb)):
                buf[:, dst : dst + n] = dequantize_kv(views[name][:, dst : dst + n],
                                                      views[name + "_scale"][:, dst : dst + n], self.dtype)

    def stats(self) -> dict:
        return {"offload": self.offload, "quant": self.quant, "layers": self.layers, "region_bytes": self.region_bytes,
                "device_bytes": self.device_bytes, "host_bytes": self.host_bytes, "pinned": self.pinned,
                "copies": self.copies, "misses": self.misses, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}


class KVCacheHandle:
    """What :func:`kv_cache` did to a model (``remove()`` undoes it)."""

    def __init__(self, model: nn.Module, offload: bool, prefetch: int, quant: str | None, pin: bool):
        self.offload, self.prefetch, self.quant, self.pin = offload, prefetch, quant, pin
        self._model = model
        self.stores: weakref.WeakSet[KVStore] = weakref.WeakSet()
        self._new_cache = model.new_cache  # the class's bound method

        def new_cache(*args, **kwargs):
            if kwargs.get("kv") is not None:
                raise ValueError("new_cache(kv=...) on a model rewritten by kv_cache: remove() its handle first")
            return self._new_cache(*args, kv=self._make_store, **kwargs)

        model.new_cache = new_cache  # an instance attribute shadows the method (removed by remove())
        setattr(model, _ATTR, self)

    def _make_store(self, shape, dtype: torch.dtype, device: torch.device) -> KVStore:
        weights = getattr(self._model, "_streamgen_offload", None)  # block offload: share its copy stream
        stream = getattr(weights, "_copy_stream", None) if weights is not None and weights.device == device else None
        store = KVStore(shape, dtype, device, offload=self.offload, prefetch=self.prefetch, quant=self.quant,
                        pin=self.pin, copy_stream=stream)
        self.stores.add(store)
        return store

    def stats(self) -> dict:
        keys = ("copies", "misses", "bytes_in", "bytes_out", "device_bytes", "host_bytes")
        out = {k: 0 for k in keys}
        stores = list(self.stores)
        for s in stores:
            st = s.stats()
            for k in keys:
                out[k] += st[k]
        return {"offload": self.offload, "prefetch": self.prefetch, "quant": self.quant, "caches": len(stores), **out}

    def remove(self) -> None:
        if self._model is None:
            raise RuntimeError("this kv_cache rewrite was already removed")
        self._model.__dict__.pop("new_cache", None)
        delattr(self._model, _ATTR)
        self._model = None


def kv_cache(model: nn.Module, *, offload: bool = False, prefetch: int = 1, quant: str | None = None,
             pin: bool = True) -> KVCacheHandle:
    """Make every cache ``model.new_cache`` creates from now on keep its self-attention K/V in a
    :class:`KVStore` (see the module docstring). ``offload``: in host memory, ``prefetch`` layers
    copied ahead (``0 <= prefetch < num_layers``); ``quant``: None (the cache dtype), "fp8"
    (e4m3) or "int8", per-token per-head scales; ``pin``: page-lock the host copy (CUDA only)."""
    if not hasattr(model, "new_cache") or not hasattr(model, "cfg"):
        raise TypeError(f"model must be a WanModel (new_cache, cfg), got {type(model).__name__}")
    if not isinstance(offload, bool):
        raise ValueError(f"offload={offload!r} must be a bool")
    n = model.cfg.num_layers
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 0 <= prefetch < n:
        raise ValueError(f"prefetch={prefetch!r} must be an int in [0, {n - 1}] (number of layers - 1)")
    if quant is not None and quant not in QUANT_KV:
        raise ValueError(f"quant={quant!r} must be None or one of {sorted(QUANT_KV)}")
    if not isinstance(pin, bool):
        raise ValueError(f"pin={pin!r} must be a bool")
    if getattr(model, _ATTR, None) is not None:
        raise ValueError("model's caches are already rewritten by kv_cache: call its handle's remove() first")
    return KVCacheHandle(model, offload, prefetch, quant, pin)
