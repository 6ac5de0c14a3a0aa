"""One stream over several ranks: sequence parallelism (Ulysses, or ring attention) for the block-causal Wan DiT.

``SequenceParallelWan(model, group=None, mode="ulysses")`` wraps a built :class:`~streamgen.models.wan.WanModel`
(every rank holds the full weights, built the same way) and offers the streaming interface a
``SessionState`` drives (``cfg``, ``parameters()``, ``new_cache``, ``set_prompt``, ``forward_chunk``),
so the chunk loop, prompt switch (KV re-cache) and window roll run unchanged on every rank (SPMD:
every rank runs the same session with the same seed, and gets the same flow back).

One ``forward_chunk`` on N ranks (DeepSpeed-Ulysses):

1. Patch embedding, time embedding and RoPE tables of the whole chunk on every rank (cheap);
   rank r keeps the tokens ``[r*L/N, (r+1)*L/N)`` of the chunk's ``L`` tokens.
2. Per block, the norms, modulation, q/k/v/o projections and the FFN run on the rank's tokens,
   all heads. Around each attention, an all-to-all turns q, k, v ``(B, L/N, H, D)`` into
   ``(B, L, H/N, D)`` (the whole sequence, the rank's heads); attention runs over the rank's
   cache, and a second all-to-all turns the output back to ``(B, L/N, H, D)``.
3. The head runs on the rank's tokens; an all-gather puts the chunk's flow together on every rank.

Caches are sharded with the attention: rank r's :class:`WanCache` holds the self- and
cross-attention K/V of heads ``[r*H/N, (r+1)*H/N)`` only (``1/N`` of the single-rank cache, the
same window, ring and plan logic), so a session's KV memory splits over the ranks. Communication per
block: 4 all-to-alls of ``B*L*dim/N`` elements per rank for self-attention, 2 for
cross-attention.

Constraints: ``num_heads`` and the chunk's token count divisible by the world size; a per-frame
``t`` needs each rank's tokens to be whole frames.

``mode="ring"`` (ring attention): rank r keeps, of every latent frame, the tokens
``[r*T/N, (r+1)*T/N)`` (``T`` tokens a frame), all heads, through the whole block: its queries, and
its cache holds the self-attention K/V of those tokens of every cached frame (``1/N`` of the
single-rank self-attention cache, the same window, ring and plan logic with ``T/N`` tokens a frame;
the cross-attention K/V, all heads, are replicated and cross-attention runs locally). The key set
(window + chunk, or per block ``j`` of ``blocks=`` the keys up to the end of block ``j``) has the
same frame layout on every rank, so each rank's K/V block is masked the same way: the blocks travel
around the ring (``batch_isend_irecv`` to rank r+1, from r-1, the next block in flight while one is
attended), and the partial attentions merge by a running log-sum-exp (numerically stable online
softmax, float32). No rank holds more than its own and one travelling K/V block. Any head count
works; the frame's tokens must divide by N (a per-frame ``t`` needs nothing more). The merge
reorders the softmax sums, so ring equals one rank within float rounding (~3e-7 relative in
float32), not bit for bit; it uses its own attention kernel, not ``model.attention``. Every collective runs on ``group`` (default: the
world), on whatever backend it was made with (gloo on the CPU, NCCL on GPUs).

Launch on GPUs (one process per GPU)::

    torchrun --nproc-per-node 2 -m streamgen.parallel.sequence --chunks 4 [--mode ring]

runs a tiny-config stream (window roll and prompt switch included) split over the ranks and, on
rank 0, the same stream on one rank, and prints the largest difference.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn as nn

from streamgen.models.wan import WanCache, WanModel

__all__ = ["MODES", "SequenceParallelWan", "all_to_all_heads", "all_to_all_seq", "merge_partial"]

MODES = ("ulysses", "ring")


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """x (N, ...) contiguous: chunk j goes to rank j; returns (N, ...) with chunk i from rank i."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # not empty_like: it keeps x's strides
    dist.all_to_all_single(out, x, group=group)
    return out


def all_to_all_heads(x: torch.Tensor, world: int, group=None) -> torch.Tensor:
    """(B, L/N, H, D) sequence shard, all heads -> (B, L, H/N, D) whole sequence, this rank's heads."""
    b, n, h, d = x.shape
    y = x.view(b, n, world, h // world, d).permute(2, 0, 1, 3, 4)  # (N, B, L/N, H/N, D)
    y = _all_to_all(y, group)  # chunk i: rank i's tokens, my heads
    return y.permute(1, 0, 2, 3, 4).reshape(b, world * n, h // world, d)


def all_to_all_seq(x: torch.Tensor, world: int, group=None) -> torch.Tensor:
    """Inverse of :func:`all_to_all_heads`: (B, L, H/N, D) -> (B, L/N, H, D)."""
    b, n_all, hl, d = x.shape
    n = n_all // world
    y = x.view(b, world, n, hl, d).permute(1, 0, 2, 3, 4)  # (N, B, L/N, H/N, D)
    y = _all_to_all(y, group)  # chunk i: my tokens, rank i's heads
    return y.permute(1, 2, 0, 3, 4).reshape(b, n, world * hl, d)


def merge_partial(out, lse, out_b, lse_b):
    """Merge two partial attentions over disjoint key sets: ``out`` (B, H, Lq, D) normalised over its
    keys with log-sum-exp ``lse`` (B, H, Lq, 1), and ``out_b``/``lse_b``; returns the pair over the
    union. ``lse = -inf`` (no valid key yet) is allowed on either side."""
    new = torch.logaddexp(lse, lse_b)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)  # both -inf: weights 0, not nan
    return out * torch.exp(lse - safe) + out_b * torch.exp(lse_b - safe), new


def _partial_attention(q, k, v, mask):
    """q (B, H, Lq, D), k/v (B, H, Lk, D) float32, mask bool (1, 1, 1, Lk) or None ->
    (out normalised over these keys, log-sum-exp of the scores) as in :func:`merge_partial`."""
    s = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # a row with no valid key here
    return torch.matmul(torch.exp(s - safe), v), lse


class SequenceParallelWan(nn.Module):
    """A WanModel's streaming forward split over the ranks of ``group`` (see the module docstring);
    ``mode``: ``"ulysses"`` (all-to-all over heads, the default) or ``"ring"`` (ring attention)."""

    def __init__(self, model: WanModel, group=None, mode: str = "ulysses"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {', '.join(MODES)}")
        if not dist.is_initialized():
            raise RuntimeError("SequenceParallelWan needs torch.distributed initialised (torchrun, or init_process_group)")
        self.model = model
        self.group = group
        self.mode = mode
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        cfg = model.cfg
        self.cfg = cfg
        if mode == "ring":
            # ring P2P peers as global ranks (P2POp takes those, whatever the group)
            glob = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
            self._next, self._prev = glob((self.rank + 1) % self.world), glob((self.rank - 1) % self.world)
            return
        if cfg.num_heads % self.world:
            raise ValueError(f"num_heads={cfg.num_heads} is not divisible by the world size {self.world} "
                             "(Ulysses splits heads); use mode='ring'")
        hl = cfg.num_heads // self.world
        self.heads = slice(self.rank * hl, (self.rank + 1) * hl)
        # the geometry of one rank's cache: its heads only (head_dim unchanged)
        self.shard_cfg = replace(cfg, num_heads=hl, dim=hl * cfg.head_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def _ring_hw(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """A latent size whose frames have this rank's T/N tokens (the ring cache's geometry)."""
        _, ph, pw = self.cfg.patch_size
        t = (latent_hw[0] // ph) * (latent_hw[1] // pw)
        if t % self.world:
            raise ValueError(f"ring attention needs a frame's {t} tokens divisible by the world size {self.world}")
        return ph, pw * (t // self.world)

    def cache_numel(self, batch: int, latent_hw: tuple[int, int], capacity: int) -> int:
        """Elements of one rank's cache storage (Ulysses: 1/N of ``WanCache.numel_for`` of the full
        model; ring: 1/N of the self-attention K/V, the whole cross-attention K/V)."""
        if self.mode == "ring":
            return WanCache.numel_for(self.cfg, batch, self._ring_hw(latent_hw), capacity)
        return WanCache.numel_for(self.shard_cfg, batch, latent_hw, capacity)

    def new_cache(self, batch: int, latent_hw: tuple[int, int], *, max_frames: int = 21, local_frames=None,
                  sink_frames: int = 0, dtype=None, device=None, storage=None, kv=None) -> WanCache:
        """This rank's shard of a session cache, same window as ``WanModel.new_cache``: Ulysses, the
        K/V of its heads; ring, the self-attention K/V of its T/N tokens of each frame (its
        ``tokens_per_frame`` is T/N; ``latent_hw`` stays the stream's) and the whole cross K/V."""
        p = self.model.patch_embedding.weight
        kw = dict(max_frames=max_frames, local_frames=local_frames, sink_frames=sink_frames,
                  dtype=dtype or self.dtype, device=device if device is not None else p.device, storage=storage, kv=kv)
        if self.mode == "ring":
            _, ph, pw = self.cfg.patch_size
            cache = WanCache(self.cfg, batch, self._ring_hw(latent_hw), **kw)
            cache.latent_hw, cache.grid_hw = tuple(latent_hw), (latent_hw[0] // ph, latent_hw[1] // pw)
            return cache
        return WanCache(self.shard_cfg, batch, latent_hw, **kw)

    @torch.no_grad()
    def set_prompt(self, cache: WanCache, context: torch.Tensor) -> None:
        """Cross-attention K/V for ``context`` (B, L, text_dim): this rank's heads (Ulysses), all (ring)."""
        if self.mode == "ring":
            self.model.set_prompt(cache, context)
            return
        if context.shape[0] != cache.batch:
            raise ValueError(f"context batch {context.shape[0]} != cache batch {cache.batch}")
        ctx = self.model.embed_text(context.to(cache.device))
        for i, block in enumerate(self.model.blocks):
            k, v = block.cross_attn.key_value(ctx)  # (B, text_len, H, D)
            cache.cross_k[i].copy_(k[:, :, self.heads])
            cache.cross_v[i].copy_(v[:, :, self.heads])
        cache.prompt_set = True

    def _self_attn(self, layer: int, q, k, v, *, cache: WanCache, plan, mask):
        q, k, v = (all_to_all_heads(a, self.world, self.group) for a in (q, k, v))  # (B, L, H/N, D)
        out = cache._attend(layer, q, k, v, plan, mask, self.model.attention)
        return all_to_all_seq(out, self.world, self.group)  # (B, L/N, H, D)

    def _cross_attn(self, layer: int, q, *, cache: WanCache):
        q = all_to_all_heads(q, self.world, self.group)
        out = self.model.attention(q, cache.cross_k[layer], cache.cross_v[layer])
        return all_to_all_seq(out, self.world, self.group)

    # -- ring attention

    def _ring(self, queries, kb, vb, mask) -> list[torch.Tensor]:
        """``queries``: [(q (B, Lq, H, D), n keys)]; this rank's keys kb/vb (B, >= max n, H, D) and the
        key mask (1, 1, 1, Lk) or None, the same on every rank. Every rank's K/V block visits every
        rank once; each query group attends to the first n keys of each block. Returns the outputs
        (B, Lq, H, D) in q's dtype."""
        n_max = max(n for _, n in queries)
        buf = torch.stack([kb[:, :n_max], vb[:, :n_max]]).float().transpose(2, 3).contiguous()  # (2, B, H, n, D)
        qs = [(q.float().transpose(1, 2), n) for q, n in queries]  # (B, H, Lq, D)
        state = [None] * len(qs)
        for step in range(self.world):
            reqs = ()
            if step < self.world - 1:  # the next block in flight while this one is attended
                nxt = torch.empty_like(buf)
                reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, buf, self._next, self.group),
                                               dist.P2POp(dist.irecv, nxt, self._prev, self.group)])
            for i, (q, n) in enumerate(qs):
                m = None if mask is None else mask[..., :n]
                part = _partial_attention(q, buf[0, :, :, :n], buf[1, :, :, :n], m)
                state[i] = part if state[i] is None else merge_partial(*state[i], *part)
            for r in reqs:
                r.wait()
            if reqs:
                buf = nxt
        return [o.transpose(1, 2).to(q.dtype) for o, (q, _) in zip((s[0] for s in state), queries)]

    def _ring_self_attn(self, layer: int, q, k, v, *, cache: WanCache, plan, mask):
        """``WanCache._attend`` with the keys of all ranks: the same writes and store, then the ring."""
        kb, vb = cache._write(layer, k, v, plan)
        if plan.blocks:
            reread = getattr(cache._kv, "reread", None)
            if reread is None:  # one ring pass; block j's queries see each rank's first n_j keys
                return torch.cat(self._ring([(q[:, a:b], n) for a, b, n, _ in plan.blocks], kb, vb, None), dim=1)
            outs = []  # a lossy store: later blocks see what it keeps of the earlier ones, a pass each
            for a, b, n, writes in plan.blocks:
                outs += self._ring([(q[:, a:b], n)], kb, vb, None)
                reread(layer, kb, vb, writes)
            return torch.cat(outs, dim=1)
        if plan.n_prefix_keys is not None:
            return self._ring([(q, plan.n_prefix_keys)], kb, vb, None)[0]
        if plan.concat_chunk:
            kb, vb = torch.cat([kb, k.to(kb.dtype)], dim=1), torch.cat([vb, v.to(vb.dtype)], dim=1)
        return self._ring([(q, kb.shape[1])], kb, vb, mask)[0]

    supports_blocks = True  # the one-forward re-cache: Ulysses sees the whole sequence; ring, every rank's prefix

    @torch.no_grad()
    def forward_chunk(self, x: torch.Tensor, t, cache: WanCache, *, start_frame: int | None = None,
                      update_cache: bool = False, blocks: tuple[int, ...] | None = None) -> torch.Tensor:
        """``WanModel.forward_chunk`` over the ranks (``blocks`` included); every rank passes the same x
        and t and gets the whole chunk's flow (B, 16, f, h, w) float32."""
        m = self.model
        b, _, f, h, w = x.shape
        if (h, w) != cache.latent_hw or b != cache.batch:
            raise ValueError(f"chunk (B={b}, h={h}, w={w}) does not match the cache (B={cache.batch}, hw={cache.latent_hw})")
        if not cache.prompt_set:
            raise ValueError("no prompt in this cache: call set_prompt(cache, context) first")
        if start_frame is None:
            start_frame = cache.frames_written
        plan = cache._plan_call(int(start_frame), f, update_cache, blocks)
        # 1. the whole chunk's embeddings, then this rank's tokens
        tokens, grid = m._patchify(x)  # (B, L, dim)
        e, e0 = m._time(t, b, f)  # (B, Fe, dim), (B, Fe, 6, dim)
        cos, sin = m._rope(grid, int(start_frame), x.device)  # (L, 1, D/2)
        if self.mode == "ring":
            return self._forward_ring(tokens, grid, e, e0, (cos, sin), cache, plan)
        n_all = tokens.shape[1]
        if n_all % self.world:
            raise ValueError(f"the chunk has {n_all} tokens, not divisible by the world size {self.world}")
        n = n_all // self.world
        lo, hi = self.rank * n, (self.rank + 1) * n
        if e0.shape[1] > 1:  # per-frame t: the rank's tokens must be whole frames
            tpf = cache.tokens_per_frame
            if n % tpf:
                raise ValueError(f"a per-frame t needs whole frames per rank: {n} tokens a rank, {tpf} a frame")
            e, e0 = e[:, lo // tpf : hi // tpf], e0[:, lo // tpf : hi // tpf]
        tokens, rope = tokens[:, lo:hi], (cos[lo:hi], sin[lo:hi])
        mask = None if plan.n_prefix_keys is not None else cache._key_mask(plan, n_all)
        # 2. the blocks on the rank's tokens, attention over the whole sequence for the rank's heads
        for i, block in enumerate(m.blocks):
            self_attn = functools.partial(self._self_attn, i, cache=cache, plan=plan, mask=mask)
            cross = functools.partial(self._cross_attn, i, cache=cache)
            tokens = block(tokens, e0, rope, self_attn, cross, m.dtype, m.attention)
        cache._commit(plan)
        # 3. the head on the rank's tokens, gathered: (B, L, prod(patch) * out_dim)
        y = m.head(tokens, e, m.dtype).contiguous()
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y, group=self.group)
        return m._unpatchify(torch.cat(parts, dim=1), grid)

    def _forward_ring(self, tokens, grid, e, e0, rope, cache: WanCache, plan):
        m = self.model
        b, n_all, _ = tokens.shape
        f = grid[0]
        tl = cache.tokens_per_frame  # T/N: this rank's tokens of each frame
        if tl * self.world * f != n_all:
            raise ValueError(f"cache of {tl} tokens a frame a rank does not fit a chunk of {n_all} tokens "
                             f"over {self.world} ranks: make it with this wrapper's new_cache")
        idx = (torch.arange(f, device=tokens.device)[:, None] * (tl * self.world) + self.rank * tl
               + torch.arange(tl, device=tokens.device)[None]).flatten()  # frame-major, f * T/N tokens
        tokens, rope = tokens[:, idx], (rope[0][idx], rope[1][idx])  # per-frame e/e0 apply as they are
        mask = None if plan.n_prefix_keys is not None else cache._key_mask(plan, idx.numel())
        for i, block in enumerate(m.blocks):
            self_attn = functools.partial(self._ring_self_attn, i, cache=cache, plan=plan, mask=mask)
            tokens = block(tokens, e0, rope, self_attn, (cache.cross_k[i], cache.cross_v[i]), m.dtype, m.attention)
        cache._commit(plan)
        y = m.head(tokens, e, m.dtype).contiguous()  # (B, f * T/N, C)
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y, group=self.group)
        y = torch.stack(parts).view(self.world, b, f, tl, -1).permute(1, 2, 0, 3, 4).reshape(b, n_all, -1)
        return m._unpatchify(y, grid)


# ----------------------------------------------------------------------------- torchrun smoke run


def _stream(model, chunks: int, switch_at: int, hw: int, seed: int = 0) -> list[torch.Tensor]:
    """A tiny stream with a rolling window (local 7, sink 1: the ring wraps from the third chunk) and a prompt
    switch before chunk ``switch_at``; returns the clean latents of each chunk."""
    from streamgen.sampling.stream import SessionState, StreamConfig

    g = torch.Generator().manual_seed(seed + 1)
    dev = next(model.parameters()).device
    p1, p2 = (torch.randn(1, 6, model.cfg.text_dim, generator=g).to(dev) for _ in range(2))
    s = SessionState(model, p1, height=hw, width=hw, config=StreamConfig(local_frames=7, sink_frames=1, seed=seed))
    out = []
    for c in range(chunks):
        if c == switch_at:
            s.set_prompt(p2)
        out.append(s.next_chunk().latents)
    return out


def main(argv: list[str] | None = None) -> int:
    from streamgen.models.wan import WanConfig

    ap = argparse.ArgumentParser(prog="python -m streamgen.parallel.sequence",
                                 description="Sequence-parallel smoke run (launch with torchrun).")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--size", type=int, default=64, help="frame size in pixels (square, multiple of 16)")
    ap.add_argument("--mode", choices=MODES, default="ulysses", help="how attention is split (default: ulysses)")
    args = ap.parse_args(argv)
    from streamgen.parallel.launch import in_launch, init

    if not in_launch():
        ap.error("run under torchrun (RANK, WORLD_SIZE, MASTER_ADDR unset)")
    rank, _, name = init("auto")  # NCCL on CUDA (this rank's GPU), else gloo
    dev = torch.device(name)
    torch.manual_seed(0)
    # Ulysses needs heads divisible by the ranks; ring takes any count (3 here)
    heads = 2 * dist.get_world_size() if args.mode == "ulysses" else 3
    model = WanModel(WanConfig.preset("tiny", num_heads=heads, dim=32 * heads)).to(dev).eval()
    split = _stream(SequenceParallelWan(model, mode=args.mode), args.chunks, args.chunks // 2, args.size)
    if rank == 0:
        alone = _stream(model, args.chunks, args.chunks // 2, args.size)
        diff = max((a - b).abs().max().item() for a, b in zip(split, alone))
        print(f"{args.mode}, world {dist.get_world_size()}: {args.chunks} chunks, max |split - one rank| = {diff:.3g}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
