"""Block offload: keep a model's repeated blocks in (pinned) host memory and stream them onto the
device one step ahead of use.

``handle = offload(model, device="cuda", blocks_attr="blocks", prefetch=1, pin=True)``
    Rewrites a built model in place (house style 4: ``models/wan.py`` knows nothing of this):

    * everything outside ``model.<blocks_attr>`` (embeddings, head) is moved to ``device`` and
      stays there;
    * each block's parameters and buffers are packed into one flat host region (one buffer for
      all blocks, page-locked when ``device`` is CUDA and ``pin``), so a block travels in a single
      host-to-device copy;
    * ``prefetch + 1`` device slots, each as large as the largest block, are reused round-robin.
      A block's parameters become views into the slot it was last copied into (``param.data`` is
      re-pointed, so parameter objects keep their identity).

    Scheduling is driven by forward pre-hooks on every block and on each of its submodules that
    owns a tensor, so a block is "entered" on the first call into any part of it (WanModel calls
    ``block.cross_attn.key_value`` before ``block(...)``; ``set_prompt`` calls only the former).
    Entering block ``i`` for the ``k``-th time overall, on slot ``k % (prefetch+1)``:

    1. the previously entered block's slot is marked free with an event on the compute stream;
    2. unless the slot already holds block ``i``, its copy is issued now (a miss: no overlap);
    3. blocks ``i+1 .. i+prefetch`` (modulo the number of blocks: the last blocks of one forward
       prefetch the first blocks of the next) are copied into the following slots on a dedicated
       copy stream, each copy first waiting on the event that marked its slot free;
    4. the compute stream waits on the event recorded after block ``i``'s copy.

    No host synchronisation anywhere in steady state (events only). The only state is the order
    in which blocks are entered, so ``forward``, ``forward_chunk`` and ``set_prompt`` of many
    interleaved sessions all work; a different order only costs copies, never correctness.

Contract: a block's tensors are only read from inside forward calls of the block or its
submodules, on the thread and stream that run the model. Blocks entered in list order get the
prefetch; any other order is still correct, with copies issued on demand.
Inference only (no backward: a slot is overwritten once its block is left). Outside a forward a
block's parameters point into a slot and hold whatever was copied there last: read weights with
``handle.host_state_dict()``. Apply other rewrites (quantization, attention backends) before
offload; CUDA graphs and torch.compile over the block loop are not supported.

``source="disk", path="model.safetensors"``: block tensors are read from a safetensors file
(the model's own state_dict keys, ``<blocks_attr>.N.<name>``, any dtype castable to the model's)
instead of from the model, which may then hold its blocks on the ``meta`` device. ``readers``
threads (default 1) fill ``readers + 1`` page-locked staging buffers from the memory-mapped file
(each request first asks the kernel to read the block's byte range ahead, ``MADV_WILLNEED``) and
issue each block's device copy themselves; the model thread waits (on the host, only when the reader is behind) until the
copy it needs has been issued, then orders the compute stream after it with the same events. Host
memory: ``readers + 1`` blocks of staging plus the OS page cache (clean file pages the kernel may
drop: host RAM can be smaller than the model). Each streamed block is read once per forward
(``stats()["reads"]``). Throughput is that of reading the file (page
cache or disk), usually far below the pinned path's.

On a CPU device the same code runs with plain copies and no streams or events (for tests).

``resident=[i, ...]``: those blocks stay on the device (the planner's partial residency); the
others stream as above, prefetch and wrap-around counted among them.

``handle.remove()`` restores a resident model on ``device``; ``handle.stats()`` reports sizes
and copy counters.
"""

from __future__ import annotations

import json
import mmap
import os
import queue
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["offload", "OffloadHandle"]

_MADV_WILLNEED = getattr(mmap, "MADV_WILLNEED", None)
_ALIGN = 256  # byte alignment of every tensor inside a block's flat region
_ATTR = "_streamgen_offload"


@dataclass(frozen=True)
class _Entry:
    """One tensor of a block: a parameter (re-pointed via ``.data``) or a buffer (re-bound in every
    owner's ``_buffers``), at ``offset`` bytes in the block's flat region."""

    name: str  # within the block, as in its state_dict
    param: nn.Parameter | None
    owners: tuple[tuple[nn.Module, str], ...]  # buffers only
    offset: int
    nbytes: int
    shape: torch.Size
    dtype: torch.dtype


def _round_up(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


def _typed_view(flat: torch.Tensor, e: _Entry) -> torch.Tensor:
    return flat[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)


def _block_entries(block: nn.Module) -> tuple[list[_Entry], int]:
    """Lay out one block's parameters and buffers; returns the entries and the region size."""
    entries: list[_Entry] = []
    offset = 0

    def add(name: str, t: torch.Tensor, param, owners) -> None:
        nonlocal offset
        nbytes = t.numel() * t.element_size()
        entries.append(_Entry(name, param, tuple(owners), offset, nbytes, t.shape, t.dtype))
        offset = _round_up(offset + nbytes)

    for name, p in block.named_parameters():
        add(name, p, p, ())
    buffers: dict[int, tuple[str, torch.Tensor, list]] = {}
    for path, mod in block.named_modules():
        for name, buf in mod._buffers.items():
            if buf is not None:
                key = f"{path}.{name}" if path else name
                buffers.setdefault(id(buf), (key, buf, []))[2].append((mod, name))
    for key, buf, owners in buffers.values():
        add(key, buf, None, owners)
    return entries, max(offset, _ALIGN)


def _bind(entries: list[_Entry], tensors: list[torch.Tensor]) -> None:
    for e, t in zip(entries, tensors):
        if e.param is not None and e.param.is_meta:  # .data cannot leave the meta device
            torch.utils.swap_tensors(e.param, nn.Parameter(t, requires_grad=e.param.requires_grad))
        elif e.param is not None:
            e.param.data = t
        else:
            for mod, name in e.owners:
                mod._buffers[name] = t


def _entry_tensor(e: _Entry) -> torch.Tensor:
    """The tensor object the model holds for ``e`` (the Parameter itself, or the buffer)."""
    return e.param if e.param is not None else e.owners[0][0]._buffers[e.owners[0][1]]


def _check_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a torch device (e.g. 'cuda', 'cuda:1', 'cpu')") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available here; use device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device={device!r}: offload supports 'cuda' and 'cpu' devices, not {dev.type!r}")
    return dev


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


class _SafetensorsFile:
    """A memory-mapped safetensors file: ``raw(key)`` is a uint8 view of a tensor's bytes (no copy)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: never written back
        except (OSError, ValueError) as exc:
            raise ValueError(f"path={self.path!r}: not a readable safetensors file ({exc})") from exc
        header.pop("__metadata__", None)
        self.header = header
        self._base = 8 + n
        self._data = torch.frombuffer(self._mm, dtype=torch.uint8)

    def dtype(self, key: str) -> torch.dtype:
        code = self.header[key]["dtype"]
        if code not in _ST_DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has dtype {code}, which offload cannot read")
        return _ST_DTYPES[code]

    def raw(self, key: str) -> torch.Tensor:
        a, b = self.header[key]["data_offsets"]
        return self._data[self._base + a : self._base + b]

    def span(self, keys: list[str]) -> tuple[int, int]:
        """The byte range of the file that holds ``keys`` (start, end)."""
        offs = [self.header[k]["data_offsets"] for k in keys]
        return self._base + min(a for a, _ in offs), self._base + max(b for _, b in offs)

    def willneed(self, start: int, end: int) -> None:
        """Ask the kernel to read ``[start, end)`` of the file ahead (no-op where madvise is missing)."""
        if _MADV_WILLNEED is not None and end > start:
            page = mmap.PAGESIZE
            a = start // page * page
            try:
                self._mm.madvise(_MADV_WILLNEED, a, end - a)
            except (OSError, ValueError):
                pass

    def read_into(self, dst: torch.Tensor, key: str) -> None:
        """Copy tensor ``key`` into ``dst`` (same shape), casting if the dtypes differ."""
        raw = self.raw(key)
        dtype = self.dtype(key)
        if dtype == dst.dtype:
            dst.view(torch.uint8).view(-1).copy_(raw)
        else:  # .clone(): the bytes need not be aligned for a typed view
            dst.copy_(raw.clone().view(dtype).view(dst.shape))

    def check(self, key: str, shape: torch.Size, dtype: torch.dtype) -> str | None:
        if key not in self.header:
            return None
        got = torch.Size(self.header[key]["shape"])
        src = self.dtype(key)
        if got != shape:
            return f"{key}: shape {tuple(got)} in the file, {tuple(shape)} in the model"
        if src.is_floating_point != dtype.is_floating_point and dtype != torch.bool and src != torch.bool:
            return f"{key}: dtype {src} in the file cannot be cast to the model's {dtype}"
        return ""


def offload(
    model: nn.Module,
    *,
    device: torch.device | str,
    blocks_attr: str = "blocks",
    prefetch: int = 1,
    pin: bool = True,
    source: str = "memory",
    path: str | os.PathLike | None = None,
    resident: Iterable[int] = (),
    readers: int = 1,
) -> "OffloadHandle":
    """Offload ``getattr(model, blocks_attr)``'s blocks to host memory; see the module docstring.

    ``prefetch``: blocks copied ahead of the one computing (``0 <= prefetch < number of blocks``);
    the device holds ``prefetch + 1`` block slots. ``pin``: page-lock the host copy (CUDA only;
    without it copies are staged by the driver and block the host). ``source``: ``"memory"`` (the
    model's own block tensors, packed into host memory) or ``"disk"`` (read from the safetensors
    file ``path``). ``resident``: indices of blocks that stay on the device like the rest of the
    model (the budget planner's partial residency, streamgen/plan.py); the others are streamed, and
    ``prefetch`` counts among them. ``readers``: threads reading blocks from the file (disk
    source), each block ``readers + 1`` staging buffers; up to ``min(readers, prefetch)`` blocks
    are read at once. Returns the handle that undoes it (``remove()``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    dev = _check_device(device)
    if not isinstance(blocks_attr, str) or not hasattr(model, blocks_attr):
        raise ValueError(f"blocks_attr={blocks_attr!r}: {type(model).__name__} has no such attribute")
    blocks = getattr(model, blocks_attr)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise ValueError(
            f"blocks_attr={blocks_attr!r} must name a non-empty nn.ModuleList/nn.Sequential of blocks, "
            f"got {type(blocks).__name__}" + (" of length 0" if isinstance(blocks, nn.Module) else "")
        )
    try:
        keep = sorted({int(i) for i in resident})
    except (TypeError, ValueError):
        raise ValueError(f"resident={resident!r} must be block indices") from None
    if keep and not (0 <= keep[0] and keep[-1] < len(blocks) and len(keep) < len(blocks)):
        raise ValueError(f"resident={resident!r}: block indices in [0, {len(blocks) - 1}], at least one block streamed")
    streamed = len(blocks) - len(keep)
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 0 <= prefetch < streamed:
        raise ValueError(f"prefetch={prefetch!r} must be an int in [0, {streamed - 1}] (number of streamed blocks - 1)")
    if not isinstance(pin, bool):
        raise ValueError(f"pin={pin!r} must be a bool")
    if source not in ("memory", "disk"):
        raise ValueError(f"source={source!r} must be 'memory' or 'disk'")
    if isinstance(readers, bool) or not isinstance(readers, int) or readers < 1:
        raise ValueError(f"readers={readers!r} must be an int >= 1 (threads reading the file)")
    if (source == "disk") != (path is not None):
        raise ValueError(f"path={path!r}: give a safetensors path exactly when source='disk' (source={source!r})")
    if getattr(model, _ATTR, None) is not None:
        raise ValueError("model is already offloaded: call its handle's remove() first")
    file = _SafetensorsFile(path) if source == "disk" else None
    return OffloadHandle(model, blocks, blocks_attr, dev, prefetch, pin and dev.type == "cuda", file, keep, readers)


class OffloadHandle:
    """The state of one offloaded model (created by :func:`offload`)."""

    def __init__(
        self,
        model: nn.Module,
        blocks: nn.Module,
        blocks_attr: str,
        device: torch.device,
        prefetch: int,
        pin: bool,
        file: _SafetensorsFile | None,
        resident: list[int] = (),
        readers: int = 1,
    ):
        self.device = device
        self.prefetch = prefetch
        self.source = "memory" if file is None else "disk"
        self._model = model
        self.resident = list(resident)
        self.streamed = [i for i in range(len(blocks)) if i not in set(self.resident)]  # model block indices
        self._blocks = [blocks[i] for i in self.streamed]  # what is streamed; the rest is resident
        self._file = file
        n_blocks = len(self._blocks)
        self._cuda = device.type == "cuda"

        # 1. layout, refusing tensors shared between blocks or with the resident part
        layouts = [_block_entries(b) for b in self._blocks]
        self._entries = [entries for entries, _ in layouts]
        self.block_bytes = [size for _, size in layouts]
        owner: dict[int, int] = {}
        for i, entries in enumerate(self._entries):
            for e in entries:
                j = owner.setdefault(id(_entry_tensor(e)), i)
                if j != i:
                    raise ValueError(f"blocks {self.streamed[j]} and {self.streamed[i]} share a tensor {tuple(e.shape)}: tied weights cannot be offloaded")
        block_modules = {id(m) for b in self._blocks for m in b.modules()}
        resident = [m for m in model.modules() if id(m) not in block_modules]
        for m in resident:
            for t in (*m._parameters.values(), *m._buffers.values()):
                if t is not None and id(t) in owner:
                    raise ValueError(f"a tensor {tuple(t.shape)} of block {self.streamed[owner[id(t)]]} is also used outside "
                                     "the streamed blocks")
        if any(t.is_meta for m in resident for t in (*m._parameters.values(), *m._buffers.values()) if t is not None):
            raise ValueError("tensors outside the blocks are on the meta device: load them before offload")
        if file is None and any(_entry_tensor(e).is_meta for entries in self._entries for e in entries):
            raise ValueError("the blocks hold meta tensors (no data): use source='disk' with a safetensors path")
        if file is not None:
            self._keys = [[f"{blocks_attr}.{i}.{e.name}" for e in entries] for i, entries in zip(self.streamed, self._entries)]
            self._check_file()

        # 2. host memory, page-locked in place (exact size, no allocator rounding): every block
        #    (memory source) or readers + 1 staging buffers (disk source)
        self.max_block_bytes = max(self.block_bytes)
        self.readers = readers if file is not None else 0
        sizes = self.block_bytes if file is None else [self.max_block_bytes] * (readers + 1)
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        self._host = torch.empty(offsets[-1], dtype=torch.uint8)
        self.pinned = False
        self._unpin = None
        if pin:
            self._pin_host()
        host_regions = [self._host[a:b] for a, b in zip(offsets, offsets[1:])]
        self._host_blocks = host_regions if file is None else []
        self._staging = host_regions if file is not None else []

        # 3. device slots and the views of every block into every slot
        self.num_slots = prefetch + 1
        self.slots = [torch.empty(self.max_block_bytes, dtype=torch.uint8, device=device) for _ in range(self.num_slots)]
        self._views = [[[_typed_view(s, e) for e in entries] for s in self.slots] for entries in self._entries]

        # 4. pack block by block (frees each block's original storage as it goes), bind to slots
        self._slot_block = [-1] * self.num_slots  # block whose copy was last issued into each slot
        self._bound = [-1] * n_blocks  # slot whose views each block's tensors point at
        with torch.no_grad():
            for i, entries in enumerate(self._entries):
                if file is None:
                    for e in entries:
                        _typed_view(self._host_blocks[i], e).copy_(_entry_tensor(e).detach())
                self._rebind(i, i % self.num_slots)

        # 5. the resident part goes to the device
        with torch.no_grad():
            for m in resident:
                for p in m._parameters.values():
                    if p is not None:
                        p.data = p.data.to(device)
                for name, buf in m._buffers.items():
                    if buf is not None:
                        m._buffers[name] = buf.to(device)

        # 6. streams, events, counters, the reader thread, hooks
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(device)
            self._ready = [torch.cuda.Event() for _ in self.slots]
            self._free = [torch.cuda.Event() for _ in self.slots]
            self._staging_free = [torch.cuda.Event() for _ in self._staging]
            for s in self.slots:
                s.record_stream(self._copy_stream)
        self._current = -1  # block entered last (its tensors may still be in use)
        self._current_slot = -1
        self._next_slot = 0
        self.copies = 0
        self.bytes_copied = 0
        self.misses = 0  # copies issued at entry (not prefetched)
        self._pending: list[threading.Event | None] = [None] * self.num_slots
        self._reader_error: BaseException | None = None
        self._requests: queue.SimpleQueue | None = None
        self._workers: list[threading.Thread] = []
        self.reads = [0] * n_blocks  # disk source: times each streamed block was read from the file
        self._reads_lock = threading.Lock()
        self._issue_lock = threading.Lock()  # one reader at a time enqueues its (wait, copy, record)
        if file is not None:
            self._spans = [file.span(keys) for keys in self._keys]
            self._requests = queue.SimpleQueue()
            self._staging_pool: queue.SimpleQueue = queue.SimpleQueue()
            for k in range(len(self._staging)):
                self._staging_pool.put(k)
            self._workers = [threading.Thread(target=self._read_loop, name=f"offload-reader-{i}", daemon=True)
                             for i in range(readers)]
            for w in self._workers:
                w.start()
        self._hooks = []
        for i, block in enumerate(self._blocks):
            hook = self._make_hook(i)
            for m in block.modules():
                if m is block or any(t is not None for t in (*m._parameters.values(), *m._buffers.values())):
                    self._hooks.append(m.register_forward_pre_hook(hook))
        setattr(model, _ATTR, self)

    # -- setup helpers

    def _check_file(self) -> None:
        missing, bad = [], []
        for keys, entries in zip(self._keys, self._entries):
            for key, e in zip(keys, entries):
                problem = self._file.check(key, e.shape, e.dtype)
                if problem is None:
                    missing.append(key)
                elif problem:
                    bad.append(problem)
        if missing or bad:
            more = lambda xs: f"{xs[:5]}" + (f" and {len(xs) - 5} more" if len(xs) > 5 else "")  # noqa: E731
            raise ValueError(
                f"path={self._file.path!r} does not match the model's blocks: "
                + (f"missing keys {more(missing)}" if missing else "")
                + ("; " if missing and bad else "")
                + (f"mismatched {more(bad)}" if bad else "")
                + " (convert other checkpoint layouts to native keys first)"
            )

    def _pin_host(self) -> None:
        n = self._host.numel()
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(self._host.data_ptr(), n, 0)
        if int(err) != 0:
            raise RuntimeError(
                f"cudaHostRegister of {n / 2**30:.1f} GiB failed ({err}): not enough lockable host memory? "
                "Pass pin=False (slower copies) or offload a smaller model"
            )
        self.pinned = True
        self._unpin = weakref.finalize(self, cudart.cudaHostUnregister, self._host.data_ptr())

    def _make_hook(self, i: int):
        def hook(module, args):
            if self._current != i:
                self._enter(i)

        return hook

    def _rebind(self, block: int, slot: int) -> None:
        _bind(self._entries[block], self._views[block][slot])
        self._bound[block] = slot

    def _fill(self, flat: torch.Tensor, block: int) -> None:
        """Disk source: block ``block``'s tensors from the file into the flat region ``flat``."""
        for key, e in zip(self._keys[block], self._entries[block]):
            self._file.read_into(_typed_view(flat, e), key)
        with self._reads_lock:
            self.reads[block] += 1

    # -- the hot path (no host syncs)

    def _copy(self, block: int, slot: int) -> None:
        n = self.block_bytes[block]
        if self._requests is not None:  # disk: a reader thread reads and issues the copy
            self._file.willneed(*self._spans[block])  # the kernel starts reading it from disk now
            done = threading.Event()
            self._pending[slot] = done
            self._requests.put((block, slot, done))
        elif self._cuda:
            with torch.cuda.stream(self._copy_stream):
                self._copy_stream.wait_event(self._free[slot])
                self.slots[slot][:n].copy_(self._host_blocks[block], non_blocking=True)
                self._ready[slot].record(self._copy_stream)
        else:
            self.slots[slot][:n].copy_(self._host_blocks[block])
        self._slot_block[slot] = block
        self.copies += 1
        self.bytes_copied += n

    def _enter(self, block: int) -> None:
        n_blocks, n_slots = len(self._blocks), self.num_slots
        compute = torch.cuda.current_stream(self.device) if self._cuda else None
        # 1. the block left behind: its slot is free once the work queued so far is done
        if self._current_slot >= 0 and self._cuda:
            self._free[self._current_slot].record(compute)
        slot = self._next_slot
        self._next_slot = (slot + 1) % n_slots
        # 2. this block (a miss unless it was prefetched)
        if self._slot_block[slot] != block:
            self.misses += 1
            self._copy(block, slot)
        # 3. the next ones, wrapping around into the next forward
        for j in range(1, self.prefetch + 1):
            nb, ns = (block + j) % n_blocks, (slot + j) % n_slots
            if self._slot_block[ns] != nb:
                self._copy(nb, ns)
        # 4. compute waits for the copy (disk: first for the reader to have issued it)
        pending = self._pending[slot]
        if pending is not None:
            pending.wait()
            self._pending[slot] = None
            if self._reader_error is not None:
                self._slot_block[slot] = -1
                raise RuntimeError(f"offload: reading blocks from {self._file.path} failed") from self._reader_error
        if self._cuda:
            compute.wait_event(self._ready[slot])
        if self._bound[block] != slot:
            self._rebind(block, slot)
        self._current, self._current_slot = block, slot

    def _read_loop(self) -> None:
        """Disk source, on each reader thread: take a request, fill a free staging buffer from the
        file, then issue its copy into the slot. A staging buffer is refilled only after its previous
        copy finished (a sync of this thread). Copies into one slot are issued in request order: a
        slot's next request is only made after the model thread waited for the previous one."""
        while True:
            req = self._requests.get()
            if req is None:
                return
            block, slot, done = req
            k = None
            try:
                if self._reader_error is None:
                    k = self._staging_pool.get()
                    n, stage = self.block_bytes[block], self._staging[k]
                    if self._cuda:
                        self._staging_free[k].synchronize()
                    self._fill(stage, block)
                    if self._cuda:
                        with self._issue_lock, torch.cuda.device(self.device), torch.cuda.stream(self._copy_stream):
                            self._copy_stream.wait_event(self._free[slot])
                            self.slots[slot][:n].copy_(stage[:n], non_blocking=True)
                            self._ready[slot].record(self._copy_stream)
                            self._staging_free[k].record(self._copy_stream)
                    else:
                        self.slots[slot][:n].copy_(stage[:n])
            except BaseException as exc:  # handed to the model thread, raised at the block's entry
                self._reader_error = exc
            finally:
                if k is not None:
                    self._staging_pool.put(k)
                done.set()

    # -- public

    def stats(self) -> dict:
        """Sizes (bytes) and counters. ``gpu_bytes`` = slots + the resident (non-block) tensors;
        ``host_bytes`` = the (pinned) host buffer: all blocks, or the staging of the disk source;
        ``copies``/``bytes_copied`` count block copies issued so far, ``misses`` those issued when
        the block was already needed (not prefetched); ``blocks`` counts the streamed blocks
        (``streamed``: their indices; ``resident_blocks`` stay on the device, in ``resident_bytes``);
        ``reads[i]``: times streamed block i was read from the file (disk source)."""
        resident = sum(t.numel() * t.element_size() for t in self._resident_tensors())
        slot_bytes = self.num_slots * self.max_block_bytes
        return {
            "device": str(self.device),
            "source": self.source,
            "blocks": len(self._blocks),
            "streamed": list(self.streamed),
            "resident_blocks": list(self.resident),
            "prefetch": self.prefetch,
            "num_slots": self.num_slots,
            "bytes_per_block": list(self.block_bytes),
            "max_block_bytes": self.max_block_bytes,
            "slot_bytes": slot_bytes,
            "resident_bytes": resident,
            "gpu_bytes": slot_bytes + resident,
            "host_bytes": int(self._host.numel()),
            "pinned": self.pinned,
            "slot_blocks": list(self._slot_block),
            "copies": self.copies,
            "bytes_copied": self.bytes_copied,
            "misses": self.misses,
            "readers": self.readers,
            "reads": list(self.reads),
        }

    def wait_reads(self) -> None:
        """Disk source: return once every block read requested so far has been read and its copy
        issued (the prefetch into the next forward included); a no-op otherwise. For counters and
        tests; the hot path never needs it."""
        for done in list(self._pending):
            if done is not None:
                done.wait()

    def _resident_tensors(self):
        block_ids = {id(_entry_tensor(e)) for entries in self._entries for e in entries}
        seen: set[int] = set()
        for t in (*self._model.parameters(), *self._model.buffers()):
            if id(t) not in block_ids and id(t) not in seen:
                seen.add(id(t))
                yield t

    def _host_block_tensors(self, block: int) -> list[torch.Tensor]:
        """Block ``block``'s tensors on the host: views of the host buffer, or read from the file."""
        if self._file is None:
            return [_typed_view(self._host_blocks[block], e) for e in self._entries[block]]
        out = []
        for key, e in zip(self._keys[block], self._entries[block]):
            t = torch.empty(e.shape, dtype=e.dtype)
            self._file.read_into(t, key)
            out.append(t)
        return out

    def host_state_dict(self) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with every block tensor replaced by its host copy (read-only use;
        the disk source reads the file)."""
        host = {}
        for i, entries in enumerate(self._entries):
            for e, t in zip(entries, self._host_block_tensors(i)):
                host[id(_entry_tensor(e))] = t
        sd = self._model.state_dict(keep_vars=True)
        return {k: host.get(id(v), v).detach() for k, v in sd.items()}

    def remove(self) -> None:
        """Undo the offload: every block tensor gets its own storage on ``device`` again, hooks go,
        the reader thread stops, slots and host buffers are released. Synchronizes (not for the
        hot path)."""
        if self._model is None:
            raise RuntimeError("this offload was already removed")
        for h in self._hooks:
            h.remove()
        for _ in self._workers:
            self._requests.put(None)
        for w in self._workers:
            w.join()
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        with torch.no_grad():
            for i, entries in enumerate(self._entries):
                _bind(entries, [t.to(self.device, copy=True) for t in self._host_block_tensors(i)])
        if self._cuda:
            torch.cuda.synchronize(self.device)
        if self._unpin is not None:
            self._unpin()
        delattr(self._model, _ATTR)
        self._model = None
        self._hooks, self._entries, self._views, self.slots = [], [], [], []
        self._host_blocks, self._staging, self._host = [], [], torch.empty(0, dtype=torch.uint8)
        self._file = None
