"""The cache pool: one preallocated block of memory that holds every engine session's KV cache.

A session's cache size is known before it exists (``WanCache.numel_for``: model config, frame
size, attention window, CFG), so the engine *reserves* it at ``open`` (from the event loop) and
admits the session only when the reservation fits: the pool, not the allocator, says no, so a full
GPU refuses or queues a start instead of running out of memory in the middle of a chunk. The busy
thread then carves the session's caches out of its reservation (:meth:`CachePool.storage`: views,
no allocation), and ``release`` gives the range back when the session ends.

``capacity_bytes=None`` is an unbounded pool (the CPU default): every reservation fits and
``storage`` allocates fresh tensors; the bookkeeping (``used_bytes``, ``sessions``) is the same.
With a capacity, the block is allocated once, on first use, and reservations are first-fit ranges
of it (aligned to ``align`` bytes); a freed range merges with its free neighbours.

Thread-safe: ``reserve``/``release``/``storage`` take one lock (the event loop reserves, the busy
thread carves and releases).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

__all__ = ["CachePool", "Reservation"]


@dataclass(eq=False)
class Reservation:
    """A byte range of the pool held by one session (``offset`` is None in an unbounded pool)."""

    nbytes: int
    owner: str = ""
    offset: int | None = None
    taken: int = 0  # bytes of it already handed out by ``storage``
    released: bool = False


class CachePool:
    def __init__(self, capacity_bytes: int | None, *, device: torch.device | str = "cpu", align: int = 256):
        if capacity_bytes is not None and capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0 or None, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.device = torch.device(device)
        self.align = align
        self._lock = threading.Lock()
        self._held: list[Reservation] = []  # sorted by offset when bounded
        self._block: torch.Tensor | None = None
        self.used_bytes = 0

    @property
    def sessions(self) -> int:
        return len(self._held)

    @property
    def free_bytes(self) -> int | None:
        return None if self.capacity_bytes is None else self.capacity_bytes - self.used_bytes

    def _round(self, n: int) -> int:
        return -(-n // self.align) * self.align

    def fits_ever(self, nbytes: int) -> bool:
        """Whether a reservation of ``nbytes`` could fit an empty pool."""
        return self.capacity_bytes is None or self._round(nbytes) <= self.capacity_bytes

    def reserve(self, nbytes: int, owner: str = "") -> Reservation | None:
        """Hold ``nbytes`` for one session, or None when no free range is that large now."""
        n = self._round(max(int(nbytes), 1))
        with self._lock:
            if self.capacity_bytes is None:
                res = Reservation(n, owner)
                self._held.append(res)
            else:
                at, pos = 0, 0  # first fit: the gap before each held range, then the tail
                for pos, r in enumerate(self._held):
                    if r.offset - at >= n:
                        break
                    at = r.offset + r.nbytes
                else:
                    pos = len(self._held)
                    if self.capacity_bytes - at < n:
                        return None
                res = Reservation(n, owner, offset=at)
                self._held.insert(pos, res)
            self.used_bytes += n
            return res

    def release(self, res: Reservation) -> None:
        """Give ``res`` back (idempotent)."""
        with self._lock:
            if res.released:
                return
            res.released = True
            self._held.remove(res)
            self.used_bytes -= res.nbytes

    def storage(self, res: Reservation, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The next ``numel`` elements of ``res`` as a 1-D ``dtype`` tensor (a view of the pool's
        block; a new tensor in an unbounded pool). Raises ValueError past the reservation's end."""
        size = torch.empty((), dtype=dtype).element_size()
        nbytes = numel * size
        with self._lock:
            if res.released:
                raise ValueError(f"reservation of {res.owner or 'a session'} was released")
            start = -(-res.taken // size) * size
            if start + nbytes > res.nbytes:
                raise ValueError(f"cache of {nbytes} bytes does not fit the {res.nbytes - start} bytes left in the "
                                 f"reservation of {res.owner or 'a session'}")
            res.taken = start + nbytes
            if self.capacity_bytes is None:
                return torch.empty(numel, dtype=dtype, device=self.device)
            if self._block is None:  # once, on first use: the whole pool
                self._block = torch.empty(self.capacity_bytes, dtype=torch.uint8, device=self.device)
            at = res.offset + start
            return self._block[at : at + nbytes].view(dtype)
