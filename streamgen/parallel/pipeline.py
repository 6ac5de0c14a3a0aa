"""One stream over several ranks: block-pipeline parallelism for the block-causal Wan DiT (as StreamDiffusionV2
splits its DiT: blocks across GPUs).

``PipelineParallelWan(model, group=None, micro_batches=None)`` wraps a built :class:`~streamgen.models.wan.WanModel`
(every rank holds the full weights, built the same way, and runs only its own blocks) and offers the streaming
interface a ``SessionState`` drives (``cfg``, ``parameters()``, ``new_cache``, ``set_prompt``, ``forward_chunk``
with ``blocks=``) and the engine's batched step (``forward_rows``), so the chunk loop, prompt switch (KV
re-cache), window roll and ``streamgen.engine.batch.run_programs`` run unchanged on every rank (SPMD: every rank
runs the same sessions with the same seeds and gets the same flow back).

Stage r of N owns the contiguous blocks ``[r*nb/N, (r+1)*nb/N)`` of the model's ``nb`` (integer division, so
stages differ by one block at most) and only their KV cache: its :class:`WanCache` is built with
``num_layers`` = its block count (self- and cross-attention K/V of its layers, indexed by the block's place
in the stage; the same window, ring and plan logic), so a session's KV memory splits over the ranks.

One forward (``forward_chunk``, or ``forward_rows`` over several caches):

1. Every rank plans the call on its cache (Python bookkeeping, the same on every rank, every error raised on
   every rank before any message) and computes the time modulation and RoPE tables from the inputs it already
   has (same ops on the same inputs: the same bits as on one rank; cheaper than sending them). The first
   stage patchifies the latents.
2. The hidden states (B, L, dim) float32 go stage to stage: rank r receives them from r-1 (``irecv``), runs its
   blocks (attention over its own cache layers), sends them to r+1 (``isend``); the last stage runs the head.
3. The last stage broadcasts the flow (B, 16, f, h, w) float32 to every rank.

What overlaps, and what does not:

* One stream alone (``forward_chunk``): the stages run one after the other (a chunk's denoising steps are
  sequential: step s+1 needs step s's output), so while rank r works the others wait. This splits the KV
  cache (and the block compute) over the ranks, not the latency: a forward takes one rank's time plus N-1
  hand-offs and the broadcast.
* Several rows (``forward_rows``: the engine's batched step over several sessions): the caches are split into
  ``micro_batches`` consecutive micro-batches (None: one per cache) that flow through the stages GPipe-style:
  each stage sends micro-batch m on (non-blocking) and goes on with m+1 while the next stage works on m, with
  the receive of m+1 posted before m is computed. With M micro-batches a forward takes M+N-1 stage slots
  instead of M*N (on paper; tests/test_parallel_pipeline.py checks that two stages do compute at the same
  time, not a speed-up).
* Not here: StreamDiffusionV2's Stream Batch (the denoising steps of consecutive chunks in flight at once)
  changes what a chunk attends to (the previous chunk is not clean yet), so it does not equal one rank.

Numerics: each block runs the same ops on the same inputs as on one rank, so on the CPU in float32 a chunk
equals one rank's bit for bit (``forward_rows``: equals one rank's ``forward_rows``). Every message runs on
``group`` (default: the world), on whatever backend it was made with (gloo on the CPU, NCCL on GPUs).
Constraint: at least one block a rank.

Launch on GPUs (one process per GPU)::

    torchrun --nproc-per-node 2 -m streamgen.parallel.pipeline --chunks 4 [--sessions 2]

runs a tiny-config stream (window roll and prompt switch included) and ``--sessions`` sessions batched by the
engine's ``run_programs`` split over the ranks and, on rank 0, the same on one rank, and prints the largest
difference.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn

from streamgen.models.wan import WanCache, WanModel, _Rows

__all__ = ["PipelineParallelWan", "stage_layers"]


def stage_layers(num_layers: int, world: int, rank: int) -> range:
    """The blocks stage ``rank`` of ``world`` owns: ``[rank*nb/world, (rank+1)*nb/world)``."""
    return range(rank * num_layers // world, (rank + 1) * num_layers // world)


@dataclass
class _Micro:
    """One micro-batch of a forward, as every rank prepares it: its latents x (patchified by the first stage,
    per row where ``per_row``, as ``WanModel.forward_rows`` does), time embeddings e (B, Fe, dim) and e0
    (B, Fe, 6, dim), RoPE cos/sin, and ``attention(j)``: the self-attention function and the cross K/V (or
    function) of the stage's j-th block."""

    x: torch.Tensor
    per_row: bool
    e: torch.Tensor
    e0: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]
    attention: Callable[[int], tuple]


def _rows_attention(att: _Rows, j: int) -> tuple:
    """The self-attention function and cross-attention function of a stage's j-th block over a micro-batch of
    caches (``WanModel.forward_rows``'s per-cache attention, on layer j of each cache)."""
    return functools.partial(att.self_attn, j), functools.partial(att.cross_attn, j)


class PipelineParallelWan(nn.Module):
    """A WanModel's streaming forward split by blocks over the ranks of ``group`` (see the module docstring);
    ``micro_batches``: how many micro-batches ``forward_rows`` splits its caches into (None: one per cache)."""

    def __init__(self, model: WanModel, group=None, micro_batches: int | None = None):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("PipelineParallelWan needs torch.distributed initialised "
                               "(torchrun, or init_process_group)")
        if micro_batches is not None and micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.model = model
        self.group = group
        self.micro_batches = micro_batches
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        cfg = model.cfg
        self.cfg = cfg
        if cfg.num_layers < self.world:
            raise ValueError(f"num_layers={cfg.num_layers} blocks cannot give each of the {self.world} ranks one")
        self.layers = stage_layers(cfg.num_layers, self.world, self.rank)
        # the geometry of one rank's cache: its blocks only
        self.shard_cfg = replace(cfg, num_layers=len(self.layers))
        # peers as global ranks (isend/irecv/broadcast take those, whatever the group)
        glob = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self._prev, self._next, self._last = glob(self.rank - 1), glob(self.rank + 1), glob(self.world - 1)
        self.first, self.last = self.rank == 0, self.rank == self.world - 1

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    supports_blocks = True  # the one-forward re-cache: each stage's cache plans it as one rank's does

    def cache_numel(self, batch: int, latent_hw: tuple[int, int], capacity: int) -> int:
        """Elements of one rank's cache storage: ``WanCache.numel_for`` of its blocks only."""
        return WanCache.numel_for(self.shard_cfg, batch, latent_hw, capacity)

    def new_cache(self, batch: int, latent_hw: tuple[int, int], *, max_frames: int = 21, local_frames=None,
                  sink_frames: int = 0, dtype=None, device=None, storage=None, kv=None) -> WanCache:
        """This rank's shard of a session cache, same window as ``WanModel.new_cache``: the self- and
        cross-attention K/V of its blocks (layer j = the stage's j-th block)."""
        p = self.model.patch_embedding.weight
        return WanCache(self.shard_cfg, batch, latent_hw, max_frames=max_frames, local_frames=local_frames,
                        sink_frames=sink_frames, dtype=dtype or self.dtype,
                        device=device if device is not None else p.device, storage=storage, kv=kv)

    def _check_cache(self, cache: WanCache) -> None:
        if cache.cfg.num_layers != len(self.layers):
            raise ValueError(f"a cache of {cache.cfg.num_layers} layers, this stage has {len(self.layers)} blocks: "
                             "make it with this wrapper's new_cache")

    @torch.no_grad()
    def set_prompt(self, cache: WanCache, context: torch.Tensor) -> None:
        """Cross-attention K/V for ``context`` (B, L, text_dim) of this rank's blocks (no messages: every rank
        embeds the text itself)."""
        self._check_cache(cache)
        if context.shape[0] != cache.batch:
            raise ValueError(f"context batch {context.shape[0]} != cache batch {cache.batch}")
        ctx = self.model.embed_text(context.to(cache.device))
        for j, i in enumerate(self.layers):
            k, v = self.model.blocks[i].cross_attn.key_value(ctx)
            cache.cross_k[j].copy_(k)
            cache.cross_v[j].copy_(v)
        cache.prompt_set = True

    def _check_chunk(self, x: torch.Tensor, caches: list[WanCache]) -> None:
        """The checks one rank's forward makes on x and its caches, made on every rank before any message."""
        _, c, _, h, w = x.shape
        if c != self.cfg.in_dim:
            raise ValueError(f"latents have {c} channels, the model expects in_dim={self.cfg.in_dim}")
        for cache in caches:
            self._check_cache(cache)
            if (h, w) != cache.latent_hw:
                raise ValueError(f"chunk (h={h}, w={w}) does not match a cache (hw={cache.latent_hw})")
            if not cache.prompt_set:
                raise ValueError("no prompt in this cache: call set_prompt(cache, context) first")

    def _grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        pt, ph, pw = self.cfg.patch_size
        return x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw

    def _run(self, micros: list[_Micro], grid: tuple[int, int, int]) -> torch.Tensor:
        """The micro-batches through the stages (GPipe: this stage computes micro-batch m while the next one
        computes m-1); returns the flow of all of them (B, out_dim, f, h, w) float32 on every rank."""
        m = self.model
        n_tok = grid[0] * grid[1] * grid[2]

        def recv(mb: _Micro):
            buf = torch.empty(mb.x.shape[0], n_tok, self.cfg.dim, dtype=torch.float32, device=mb.x.device)
            return buf, dist.irecv(buf, self._prev, group=self.group)

        incoming = None if self.first else recv(micros[0])
        sends, flows = [], []
        for n, mb in enumerate(micros):
            if self.first:
                if mb.per_row:  # as WanModel.forward_rows: the patch convolution row by row
                    tokens = torch.cat([m._patchify(mb.x[i : i + 1])[0] for i in range(mb.x.shape[0])])
                else:
                    tokens = m._patchify(mb.x)[0]
            else:
                tokens, req = incoming
                req.wait()
                if n + 1 < len(micros):  # the next micro-batch's hidden states arrive while this one runs
                    incoming = recv(micros[n + 1])
            for j, i in enumerate(self.layers):
                self_attn, cross = mb.attention(j)
                tokens = m.blocks[i](tokens, mb.e0, mb.rope, self_attn, cross, m.dtype, m.attention)
            if self.last:
                flows.append(m._unpatchify(m.head(tokens, mb.e, m.dtype), grid))
            else:
                tokens = tokens.contiguous()
                sends.append((tokens, dist.isend(tokens, self._next, group=self.group)))
        for _, req in sends:
            req.wait()
        x = micros[0].x
        shape = (sum(mb.x.shape[0] for mb in micros), self.cfg.out_dim, *x.shape[2:])
        flow = torch.cat(flows) if self.last else torch.empty(shape, dtype=torch.float32, device=x.device)
        dist.broadcast(flow, self._last, group=self.group)
        return flow

    @torch.no_grad()
    def forward_chunk(self, x: torch.Tensor, t, cache: WanCache, *, start_frame: int | None = None,
                      update_cache: bool = False, blocks: tuple[int, ...] | None = None) -> torch.Tensor:
        """``WanModel.forward_chunk`` through the stages (``blocks`` included); every rank passes the same x
        and t and gets the whole chunk's flow (B, 16, f, h, w) float32."""
        m = self.model
        b, _, f, h, w = x.shape
        if (h, w) != cache.latent_hw or b != cache.batch:
            raise ValueError(f"chunk (B={b}, h={h}, w={w}) does not match the cache "
                             f"(B={cache.batch}, hw={cache.latent_hw})")
        self._check_chunk(x, [cache])
        if start_frame is None:
            start_frame = cache.frames_written
        plan = cache._plan_call(int(start_frame), f, update_cache, blocks)
        grid = self._grid(x)
        e, e0 = m._time(t, b, f)
        rope = m._rope(grid, int(start_frame), x.device)
        mask = None if plan.n_prefix_keys is not None else cache._key_mask(plan, grid[0] * grid[1] * grid[2])

        def attention(j: int):
            return (functools.partial(cache._attend, j, plan=plan, mask=mask, attn=m.attention),
                    (cache.cross_k[j], cache.cross_v[j]))

        flow = self._run([_Micro(x, False, e, e0, rope, attention)], grid)
        cache._commit(plan)
        return flow

    @torch.no_grad()
    def forward_rows(self, x: torch.Tensor, t: torch.Tensor, caches: list[WanCache], *, start_frames: list[int],
                     update_cache: list[bool]) -> torch.Tensor:
        """``WanModel.forward_rows`` through the stages, its caches split into micro-batches of consecutive
        caches that are pipelined (see the module docstring); every rank gets the flow of all rows."""
        if len(caches) == 1:
            return self.forward_chunk(x, t, caches[0], start_frame=start_frames[0], update_cache=update_cache[0])
        m = self.model
        b, _, f, h, w = x.shape
        sizes = [c.batch for c in caches]
        if not len(caches) == len(start_frames) == len(update_cache):
            raise ValueError(f"{len(caches)} caches, {len(start_frames)} start_frames, "
                             f"{len(update_cache)} update_cache")
        if sum(sizes) != b:
            raise ValueError(f"x has {b} rows, the caches hold {sum(sizes)}")
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("a cache appears twice in one forward_rows call")
        self._check_chunk(x, caches)
        t = t.to(m.patch_embedding.weight.device).reshape(b)
        plans = [c._plan(int(s), f, u) for c, s, u in zip(caches, start_frames, update_cache)]
        grid = self._grid(x)
        n_tok = grid[0] * grid[1] * grid[2]
        masks = [None if p.n_prefix_keys is not None else c._key_mask(p, n_tok) for c, p in zip(caches, plans)]
        ropes = {s: m._rope(grid, int(s), x.device) for s in set(start_frames)}
        n_mb = min(self.micro_batches or len(caches), len(caches))
        cuts = [k * len(caches) // n_mb for k in range(n_mb + 1)]  # micro-batch k: caches [cuts[k], cuts[k+1])
        micros, row = [], 0
        for a, z in zip(cuts, cuts[1:]):
            n_rows = sum(sizes[a:z])
            rows = range(row, row + n_rows)
            times = [m._time(t[i : i + 1], 1, f) for i in rows]  # per row, as WanModel.forward_rows
            per_row = [ropes[s] for s, n in zip(start_frames[a:z], sizes[a:z]) for _ in range(n)]
            rope = (torch.stack([r[0] for r in per_row]), torch.stack([r[1] for r in per_row]))
            att = _Rows(caches[a:z], plans[a:z], masks[a:z], sizes[a:z], m.attention)
            micros.append(_Micro(x[row : row + n_rows], True, torch.cat([p[0] for p in times]),
                                 torch.cat([p[1] for p in times]), rope, functools.partial(_rows_attention, att)))
            row += n_rows
        flow = self._run(micros, grid)
        for c, p in zip(caches, plans):
            c._commit(p)
        return flow


# ----------------------------------------------------------------------------- torchrun smoke run


def _sessions(model, n: int, chunks: int, switch_at: int, hw: int) -> list[list[torch.Tensor]]:
    """``n`` tiny sessions (seeds 0..n-1, their own prompts, window 7 with 1 sink: the ring wraps from the third
    chunk) run together by the engine's ``run_programs`` (their denoising steps batched: ``forward_rows``);
    session 0 switches its prompt before chunk ``switch_at``. Returns each session's clean latents per chunk."""
    from streamgen.engine.batch import run_programs
    from streamgen.sampling.stream import SessionState, StreamConfig

    g = torch.Generator().manual_seed(11)
    dev = next(model.parameters()).device
    prompts = [torch.randn(1, 6, model.cfg.text_dim, generator=g).to(dev) for _ in range(n + 1)]
    ss = [SessionState(model, prompts[k], height=hw, width=hw,
                       config=StreamConfig(local_frames=7, sink_frames=1, seed=k)) for k in range(n)]
    out: list[list[torch.Tensor]] = [[] for _ in range(n)]
    with torch.no_grad():
        for c in range(chunks):
            if c == switch_at:
                ss[0].set_prompt(prompts[n])
            res = run_programs(model, {k: s.chunk_program() for k, s in enumerate(ss)})
            for k in range(n):
                if isinstance(res[k], BaseException):
                    raise res[k]
                out[k].append(res[k].latents)
    return out


def main(argv: list[str] | None = None) -> int:
    from streamgen.models.wan import WanConfig
    from streamgen.parallel.sequence import _stream

    ap = argparse.ArgumentParser(prog="python -m streamgen.parallel.pipeline",
                                 description="Block-pipeline smoke run (launch with torchrun).")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--size", type=int, default=64, help="frame size in pixels (square, multiple of 16)")
    ap.add_argument("--sessions", type=int, default=2, help="sessions batched by run_programs (micro-batches)")
    args = ap.parse_args(argv)
    from streamgen.parallel.launch import in_launch, init

    if not in_launch():
        ap.error("run under torchrun (RANK, WORLD_SIZE, MASTER_ADDR unset)")
    rank, world, name = init("auto")  # NCCL on CUDA (this rank's GPU), else gloo
    dev = torch.device(name)
    torch.manual_seed(0)
    model = WanModel(WanConfig.preset("tiny", num_layers=max(3, world))).to(dev).eval()
    pp = PipelineParallelWan(model)
    split = _stream(pp, args.chunks, args.chunks // 2, args.size)
    rows = _sessions(pp, args.sessions, args.chunks, args.chunks // 2, args.size)
    if rank == 0:
        alone = _stream(model, args.chunks, args.chunks // 2, args.size)
        alone_rows = _sessions(model, args.sessions, args.chunks, args.chunks // 2, args.size)
        diff = max((a - b).abs().max().item() for a, b in zip(split, alone))
        diff_rows = max((a - b).abs().max().item() for p, q in zip(rows, alone_rows) for a, b in zip(p, q))
        print(f"pipeline, world {world}: {args.chunks} chunks, max |split - one rank| = {diff:.3g}; "
              f"{args.sessions} sessions batched: {diff_rows:.3g}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
