"""One stream over the ranks of a ``torchrun`` launch, for ``streamgen generate --parallel MODE``.

Every rank runs the same command: it builds the same pipeline, wraps the DiT for the split
(``ulysses`` / ``ring``: :class:`~streamgen.parallel.sequence.SequenceParallelWan`; ``pipeline``:
:class:`~streamgen.parallel.pipeline.PipelineParallelWan`) and runs the same engine session with
the same seed (SPMD), so the collectives of every model call meet on every rank. Rank 0 writes the
file; the others decode too (the decoder is replicated) and discard their frames.

    torchrun --nproc-per-node 2 -m streamgen generate --model self-forcing-1.3b ... --parallel ulysses --out a.mp4
"""

from __future__ import annotations

import os
from typing import Any

def in_launch() -> bool:
    """Whether this process is one rank of a torchrun launch (its environment says so)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init(device_name: str) -> tuple[int, int, str]:
    """Join the launch's process group (NCCL on CUDA, gloo otherwise); returns (rank, world size,
    the device name this rank runs on: ``cuda:LOCAL_RANK`` on CUDA, else ``device_name``)."""
    import torch
    import torch.distributed as dist

    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device_name = f"cuda:{local}"
    elif device_name == "auto":
        device_name = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device_name


def wrap(model: Any, mode: str) -> Any:
    """``model`` split over the world's ranks by ``mode`` (raises ValueError where it cannot be)."""
    if mode in ("ulysses", "ring"):
        from streamgen.parallel.sequence import SequenceParallelWan

        return SequenceParallelWan(model, mode=mode)
    from streamgen.parallel.pipeline import PipelineParallelWan

    return PipelineParallelWan(model)


def finish() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
