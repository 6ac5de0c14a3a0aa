"""The streaming chunk loop (Self-Forcing / CausVid / LongLive inference) as a session object.

One ``SessionState`` is one video stream: its own self-attention/cross-attention cache
(``model.new_cache``), decoder state, noise generator and latent history. The model,
text encoder and decoder are shared and stateless across sessions, so an engine can
interleave many sessions on one model.

Per chunk of ``frames_per_chunk`` latent frames starting at absolute frame ``start``:

1. ``sampler == "self-forcing"`` (distilled few-step models): x = noise; for each
   timestep t_i of the warped list: ``flow = model.forward_chunk(x, t_i, cache,
   start_frame=start, update_cache=False)``; ``x0 = x - sigma_i * flow``; unless last,
   ``x = (1 - sigma_{i+1}) * x0 + sigma_{i+1} * fresh_noise``.
   ``sampler == "euler" | "unipc"`` (non-distilled block-causal diffusion, CausVid's
   ``CausalDiffusionInferencePipeline``): the chunk is integrated with the multistep sampler,
   with CFG through a second cache holding the negative prompt when ``guidance_scale > 1``.
2. Cache pass: one forward at ``t = context_t`` (0) on the clean x0 with ``update_cache=True``
   (both caches under CFG), so later chunks attend to clean K/V.
3. The clean latents go to the decoder (``decoder.decode_chunk(latents, state)``), whose
   causal cache is carried across chunks.

Randomness comes only from the session's ``torch.Generator`` (seeded; on the model's device),
drawn in a fixed order: per chunk, the initial noise, then one fresh noise per re-noise step.
So a session is deterministic for a seed, and the draws can be replayed (see tests).

Prompt switch (LongLive KV re-cache): ``set_prompt(p)`` is queued and applied before the next
chunk: the cross-attention K/V are recomputed for ``p``, the self-attention cache is reset and
rebuilt by running the clean latents of the attention window (the last ``local_frames`` frames,
which then also provide the new sink; all frames without a window) through the model at t = 0
with ``update_cache=True`` at their original positions and chunk boundaries, under the new prompt
(``recache_chunks``): as ONE forward over all of them, ``forward_chunk(..., blocks=chunk sizes)``
(block-causal: each chunk's queries attend to the re-cached frames up to the end of that chunk,
exactly as the chunk-by-chunk calls do), where the model has ``supports_blocks`` and
``SessionState.one_forward_recache`` is on; else one committing forward per chunk.
Generation then continues smoothly under ``p`` without a cut.

Batching: ``chunk_program()`` is ``next_chunk()`` as a generator of ``ModelCall`` lists (the
forward_chunk calls above, in order, with their inputs), so that a driver (streamgen.engine.batch)
can run the calls of many sessions as one batched forward; ``next_chunk()`` drives it alone
(``run_alone``). Everything else (noise draws, sampler arithmetic, re-cache, decode) stays in the
session, in the same order, so the stream is the same whichever way it is driven.

Image start: ``SessionState(..., image=latent)`` or ``set_image(latent)`` before the first chunk
puts one clean latent frame (e.g. ``WanVAE.encode`` of an image, (B,16,1,h,w)) at frame 0, writes
it to the cache as context, and the first ``next_chunk()`` returns it prepended (1 + f latent
frames, decoded to 1 + 4f video frames).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from streamgen.sampling.samplers import SAMPLERS, make_sampler
from streamgen.sampling.schedules import NUM_TRAIN_TIMESTEPS, FlowSchedule, self_forcing_timesteps

STREAM_SAMPLERS = ("self-forcing",) + SAMPLERS
LATENT_CHANNELS = 16


class Decoder(Protocol):
    def new_state(self) -> Any: ...

    def decode_chunk(self, latents: torch.Tensor, state: Any) -> torch.Tensor: ...


@dataclass
class StreamConfig:
    """How a session samples. Defaults are Self-Forcing's (4 warped steps, shift 5, 3 frames/chunk).

    frames_per_chunk: latent frames per chunk (None: the model config's ``frames_per_chunk``).
    num_steps / shift / denoising_steps / warp: the timestep list (see schedules.py);
        for "euler"/"unipc" num_steps and shift give the many-step grid.
    sampler: "self-forcing" (distilled, re-noising), "euler" or "unipc" (multistep, with CFG).
    guidance_scale: CFG scale for "euler"/"unipc"; > 1 needs a negative prompt.
    context_t: timestep of the cache pass on clean latents (Self-Forcing ``context_noise``, 0).
    max_frames: cache capacity in latent frames (None: the window, or ``total_frames``).
    local_frames / sink_frames: attention window (None: the model config's; see WanModel).
    seed: seed of the session's noise generator.
    """

    frames_per_chunk: int | None = None
    num_steps: int = 4
    shift: float = 5.0
    denoising_steps: list[int] | None = None
    warp: bool = True
    sampler: str = "self-forcing"
    guidance_scale: float = 1.0
    context_t: float = 0.0
    max_frames: int | None = None
    local_frames: int | None = None
    sink_frames: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sampler not in STREAM_SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r} not allowed; allowed: {', '.join(STREAM_SAMPLERS)}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.frames_per_chunk is not None and self.frames_per_chunk < 1:
            raise ValueError(f"frames_per_chunk must be >= 1, got {self.frames_per_chunk}")
        if self.guidance_scale != 1.0 and self.sampler == "self-forcing":
            raise ValueError("guidance_scale applies to sampler 'euler'/'unipc'; distilled 'self-forcing' runs without CFG")


@dataclass
class Chunk:
    """One generated chunk. latents (B,16,f,h,w) clean; frames (B,3,T,H,W) in [-1,1] or None
    (no decoder); start_frame: absolute latent index of latents[:, :, 0]."""

    index: int
    start_frame: int
    latents: torch.Tensor
    frames: torch.Tensor | None
    prompt: Any = None
    switched: bool = False  # a prompt switch took effect at this chunk


@dataclass(eq=False)
class ModelCall:
    """One ``model.forward_chunk`` a chunk program asks for: x (B,16,f,h,w) at absolute frame
    ``start`` of ``cache``, timesteps t (B,). A driver may run it alone or batched with other
    sessions' calls of the same shape (``WanModel.forward_rows``): the result is the same.
    ``blocks``: frame counts of consecutive committed blocks in x (``forward_chunk(blocks=...)``, the
    one-forward re-cache); such a call runs alone, never batched with another."""

    x: torch.Tensor
    t: torch.Tensor
    cache: Any
    start: int
    update_cache: bool
    blocks: tuple[int, ...] | None = None

    def key(self) -> tuple:
        """Calls with equal keys can share one forward (a call with blocks: none but itself)."""
        alone = None if self.blocks is None else (self.blocks, id(self.cache))
        return (tuple(self.x.shape[2:]), self.x.dtype, self.t.dtype, alone)

    def run(self, model) -> torch.Tensor:
        """This call as one ``model.forward_chunk``."""
        kw = {} if self.blocks is None else {"blocks": self.blocks}
        return model.forward_chunk(self.x, self.t, self.cache, start_frame=self.start, update_cache=self.update_cache,
                                   **kw)


# A chunk program: yields lists of ModelCalls (on distinct caches), is sent their outputs in order
Program = Generator[list[ModelCall], list[torch.Tensor], Any]


def run_alone(model, program: Program):
    """Drive a chunk program with one ``forward_chunk`` per call; returns the program's result."""
    try:
        calls = next(program)
        while True:
            outs = [c.run(model) for c in calls]
            calls = program.send(outs)
    except StopIteration as stop:
        return stop.value


@dataclass
class _Prompt:
    value: Any  # what the user gave (str or tensor)
    context: torch.Tensor  # (B, L, text_dim)


class SessionState:
    """A chunk-by-chunk video stream over a shared block-causal ``WanModel``.

    model: a WanModel (``new_cache``, ``set_prompt``, ``forward_chunk``).
    prompt: str (needs ``text_encoder``) or a context tensor (B, L, text_dim) / (L, text_dim).
    text_encoder: anything with ``encode(list[str]) -> (B, L, text_dim)`` (e.g. ``PromptCache``).
    decoder: optional, ``new_state()`` / ``decode_chunk(latents, state)``.
    height, width: video size in pixels (latent = /8; multiples of 16).
    total_frames: latent frames the stream will produce at most (sizes the cache when there is
        no attention window); None needs ``max_frames`` or a window.
    cache_storage: ``f(numel, dtype) -> 1-D tensor`` the caches are carved from (a slot of the
        engine's pool, streamgen.engine.pool); None: each cache allocates its own.

    ``next_chunk()`` runs the chunk alone; ``chunk_program()`` is the same chunk as a generator of
    model calls, so that a driver (the engine) can run the calls of many sessions as one batch.
    ``one_forward_recache`` (class default True): a prompt switch re-caches the window in one
    forward where the model ``supports_blocks``; False: one forward per re-cached chunk.
    """

    one_forward_recache = True

    def __init__(self, model, prompt, *, height: int, width: int, config: StreamConfig | None = None,
                 text_encoder=None, decoder: Decoder | None = None, negative_prompt=None, image: torch.Tensor | None = None,
                 batch: int = 1, total_frames: int | None = None, device=None, dtype: torch.dtype | None = None,
                 latent_dtype: torch.dtype = torch.float32,
                 cache_storage: Callable[[int, torch.dtype], torch.Tensor] | None = None):
        self.model = model
        self.cache_storage = cache_storage
        self.config = cfg = config or StreamConfig()
        self.text_encoder = text_encoder
        self.decoder = decoder
        self.batch = batch
        mcfg = model.cfg
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = dtype or param.dtype
        self.latent_dtype = latent_dtype
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % 16:
                raise ValueError(f"{name}={v} must be a positive multiple of 16 (latent = {name}/8, patch 2)")
        self.height, self.width = height, width
        self.latent_hw = (height // 8, width // 8)
        self.frames_per_chunk = cfg.frames_per_chunk or mcfg.frames_per_chunk
        self.local_frames = cfg.local_frames if cfg.local_frames is not None else mcfg.local_frames
        self.sink_frames = cfg.sink_frames if cfg.sink_frames is not None else mcfg.sink_frames
        if self.local_frames is not None and self.frames_per_chunk > self.local_frames - self.sink_frames:
            raise ValueError(f"frames_per_chunk={self.frames_per_chunk} does not fit the attention window: need "
                             f"frames_per_chunk <= local_frames - sink_frames = {self.local_frames - self.sink_frames}")
        if cfg.max_frames is not None:
            max_frames = cfg.max_frames
        elif self.local_frames is not None:
            max_frames = self.local_frames  # the cache holds exactly the window
        elif total_frames is not None:
            max_frames = total_frames
        else:
            raise ValueError("SessionState needs total_frames, config.max_frames or an attention window (local_frames)")
        self.max_frames = max_frames
        self.total_frames = total_frames

        # 1. timesteps, per step, as preallocated (B,) device tensors
        if cfg.sampler == "self-forcing":
            ts = self_forcing_timesteps(cfg.num_steps, cfg.shift, steps=cfg.denoising_steps, warp=cfg.warp)
            self.schedule = None
            self._sigmas = [float(t) / NUM_TRAIN_TIMESTEPS for t in ts] + [0.0]
        else:
            sched = FlowSchedule.unipc(cfg.num_steps, cfg.shift) if cfg.sampler == "unipc" else FlowSchedule.euler(cfg.num_steps, cfg.shift)
            self.schedule = sched
            ts = sched.timesteps
            self._sigmas = [float(s) for s in sched.sigmas]
            self._stepper = make_sampler(cfg.sampler, sched)
        self.timesteps = ts.to(torch.float32)
        self._t = self.timesteps.to(self.device)[:, None].expand(-1, batch).contiguous()  # (steps, B)
        self._t_ctx = torch.full((batch,), float(cfg.context_t), device=self.device, dtype=torch.float32)

        # 2. caches (one per prompt branch) and the noise generator
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.seed)
        self.cache = self._new_cache()
        self.cache_uncond = None
        self._prompt = self._encode(prompt)
        model.set_prompt(self.cache, self._prompt.context)
        if cfg.guidance_scale != 1.0:
            if negative_prompt is None:
                raise ValueError("guidance_scale != 1 needs negative_prompt (use '' for the empty prompt)")
            self.cache_uncond = self._new_cache()
            self._negative = self._encode(negative_prompt)
            model.set_prompt(self.cache_uncond, self._negative.context)
        self._pending_prompt: _Prompt | None = None

        shape = (batch, LATENT_CHANNELS, self.frames_per_chunk, *self.latent_hw)
        self._noise = torch.empty(shape, device=self.device, dtype=latent_dtype)

        # 3. stream position, latent history for re-cache, decoder state
        self.next_frame = 0
        self.chunk_index = 0
        self._history: deque[tuple[int, torch.Tensor]] = deque()  # (start_frame, clean latents), in order
        self._image: torch.Tensor | None = None
        self.decoder_state = decoder.new_state() if decoder is not None else None
        if image is not None:
            self.set_image(image)

    # -- setup -------------------------------------------------------------------------
    def _new_cache(self):
        storage = None
        if self.cache_storage is not None:
            numel = self.model_cache_numel(self.model, self.batch, self.latent_hw, self.max_frames)
            storage = self.cache_storage(numel, self.dtype)
        return self.model.new_cache(self.batch, latent_hw=self.latent_hw, max_frames=self.max_frames,
                                    local_frames=self.local_frames, sink_frames=self.sink_frames,
                                    dtype=self.dtype, device=self.device, storage=storage)

    @staticmethod
    def model_cache_numel(model, batch: int, latent_hw: tuple[int, int], max_frames: int) -> int:
        """Elements of one of a session's caches on ``model``: a model split over ranks
        (streamgen.parallel) says its own shard's size, any other the full ``cache_numel``."""
        sized = getattr(model, "cache_numel", None)
        if sized is not None:
            return sized(batch, latent_hw, max_frames)
        return SessionState.cache_numel(model.cfg, batch, latent_hw, max_frames)

    @staticmethod
    def cache_numel(mcfg, batch: int, latent_hw: tuple[int, int], max_frames: int) -> int:
        """Elements of one of a session's caches (there are 2 under CFG); see ``WanCache.numel_for``."""
        from streamgen.models.wan import WanCache

        return WanCache.numel_for(mcfg, batch, latent_hw, max_frames)

    def _encode(self, prompt) -> _Prompt:
        if isinstance(prompt, torch.Tensor):
            ctx = prompt if prompt.dim() == 3 else prompt[None]
        else:
            if self.text_encoder is None:
                raise ValueError("a text prompt needs a text_encoder (or pass a context tensor)")
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be str or tensor, got {type(prompt).__name__}")
            ctx = self.text_encoder.encode([prompt])
        if ctx.shape[0] == 1 and self.batch > 1:
            ctx = ctx.expand(self.batch, -1, -1)
        if ctx.shape[0] != self.batch:
            raise ValueError(f"prompt context batch {ctx.shape[0]} != session batch {self.batch}")
        return _Prompt(prompt, ctx.to(device=self.device, dtype=self.dtype))

    @property
    def prompt(self):
        return self._prompt.value

    def set_prompt(self, prompt) -> None:
        """Switch the prompt; takes effect from the next chunk (with KV re-cache of the window)."""
        self._pending_prompt = self._encode(prompt)

    @torch.no_grad()
    def set_image(self, latent: torch.Tensor) -> None:
        """Start the stream from one clean latent frame (B or 1, 16, 1, h, w) at frame 0."""
        if self.next_frame != 0:
            raise RuntimeError("set_image must come before the first chunk")
        if latent.dim() != 5 or latent.shape[1] != LATENT_CHANNELS or latent.shape[2] != 1 or tuple(latent.shape[3:]) != self.latent_hw:
            raise ValueError(f"image latent must be (B, {LATENT_CHANNELS}, 1, {self.latent_hw[0]}, {self.latent_hw[1]}), got {tuple(latent.shape)}")
        latent = latent.to(device=self.device, dtype=self.latent_dtype).expand(self.batch, -1, -1, -1, -1)
        run_alone(self.model, self._cache_pass(latent, 0))
        self._remember(0, latent)
        self._image = latent
        self.next_frame = 1

    # -- model calls (as programs: see ModelCall) -----------------------------------------
    def _cache_pass(self, x0: torch.Tensor, start: int) -> Program:
        calls = [ModelCall(x0, self._t_ctx, self.cache, start, True)]
        if self.cache_uncond is not None:
            calls.append(ModelCall(x0, self._t_ctx, self.cache_uncond, start, True))
        yield calls

    def _remember(self, start: int, x0: torch.Tensor) -> None:
        self._history.append((start, x0))
        if self.local_frames is not None:
            # keep the chunks that intersect the last local_frames frames
            end = start + x0.shape[2]
            while self._history[0][0] + self._history[0][1].shape[2] <= end - self.local_frames:
                self._history.popleft()

    def recache_chunks(self) -> list[tuple[int, torch.Tensor]]:
        """(start_frame, clean latents) a prompt switch now re-runs, in order: the frames
        ``[r, next_frame)`` at their original chunk boundaries (the first one trimmed to start at
        r). r = 0 without a window, else ``next_frame - local_frames`` (clamped at 0), the window
        of the last chunk, as LongLive re-caches: after ``cache.reset_self_attn(r)`` the frames
        r .. r+sink become the sink, each re-run chunk attends to the same window it had when it
        was generated, and the next chunk attends to the sink and the newest frames."""
        end = self.next_frame
        r = 0 if self.local_frames is None else max(0, end - self.local_frames)
        out = []
        for start, x0 in self._history:
            stop = start + x0.shape[2]
            if stop <= r:
                continue
            if start < r:
                x0, start = x0[:, :, r - start:], r
            out.append((start, x0))
        return out

    def _apply_prompt_switch(self) -> Program:
        p, self._pending_prompt = self._pending_prompt, None
        self._prompt = p
        self.model.set_prompt(self.cache, p.context)
        if self.next_frame == 0:
            return
        chunks = self.recache_chunks()
        self.cache.reset_self_attn(chunks[0][0])
        if len(chunks) > 1 and self.one_forward_recache and getattr(self.model, "supports_blocks", False):
            # one forward, block-causal over the original chunks (they are consecutive: _history)
            x0 = torch.cat([x for _, x in chunks], dim=2)  # (B, 16, sum f, h, w)
            yield [ModelCall(x0, self._t_ctx, self.cache, chunks[0][0], True,
                             blocks=tuple(x.shape[2] for _, x in chunks))]
            return
        for start, x0 in chunks:
            yield [ModelCall(x0, self._t_ctx, self.cache, start, True)]

    # -- the loop -------------------------------------------------------------------------------
    def _randn(self, out: torch.Tensor) -> torch.Tensor:
        return torch.randn(out.shape, generator=self.generator, device=self.device, dtype=out.dtype, out=out)

    def _denoise_self_forcing(self, start: int) -> Program:
        sig = self._sigmas
        x = self._randn(self._noise)  # the buffer is overwritten only after x is consumed
        x0 = x
        for i in range(len(self.timesteps)):
            (flow,) = yield [ModelCall(x, self._t[i], self.cache, start, False)]
            x0 = x - sig[i] * flow.to(self.latent_dtype)
            if i + 1 < len(self.timesteps):
                noise = self._randn(self._noise)
                x = (1.0 - sig[i + 1]) * x0 + sig[i + 1] * noise
        return x0

    def _denoise_multistep(self, start: int) -> Program:
        stepper = self._stepper
        stepper.reset()
        x = self._randn(self._noise).clone()
        scale = self.config.guidance_scale
        for i in range(len(self.timesteps)):
            calls = [ModelCall(x, self._t[i], self.cache, start, False)]
            if self.cache_uncond is not None:
                calls.append(ModelCall(x, self._t[i], self.cache_uncond, start, False))
            flows = [f.to(self.latent_dtype) for f in (yield calls)]
            flow = flows[0] if self.cache_uncond is None else flows[1] + scale * (flows[0] - flows[1])
            x = stepper.step(i, x, flow)
        return x

    def _step_program(self, start: int) -> Program:
        """The chunk step as a program: denoise the chunk at ``start``, then the cache pass."""
        if self.config.sampler == "self-forcing":
            x0 = yield from self._denoise_self_forcing(start)
        else:
            x0 = yield from self._denoise_multistep(start)
        yield from self._cache_pass(x0, start)
        return x0

    def _chunk_step(self, start: int) -> torch.Tensor:
        """Denoise the chunk at ``start`` and commit its clean K/V (the cache pass); returns x0.
        The unit ``streamgen.ops.graphs`` captures as CUDA graphs (it shadows this per session)."""
        return run_alone(self.model, self._step_program(start))

    @property
    def batchable(self) -> bool:
        """False when a transform runs this session's chunk step its own way (CUDA graphs)."""
        return "_chunk_step" not in self.__dict__

    @torch.no_grad()
    def next_chunk(self) -> Chunk:
        """Generate, cache and decode the next chunk."""
        return run_alone(self.model, self.chunk_program())

    def chunk_program(self) -> Program:
        """``next_chunk`` as a program (prompt switch re-cache, denoise steps, cache pass, then the
        decode); its result is the Chunk. Call under ``torch.no_grad()``."""
        f = self.frames_per_chunk
        start = self.next_frame
        if self.local_frames is None and start + f > self.max_frames:
            raise RuntimeError(f"stream full: the cache holds {self.max_frames} latent frames and there is no attention "
                               "window (set local_frames, or a larger total_frames/max_frames)")
        switched = self._pending_prompt is not None
        if switched:
            yield from self._apply_prompt_switch()
        if self.batchable:
            x0 = yield from self._step_program(start)
        else:
            x0 = self._chunk_step(start)
        self._remember(start, x0)
        latents, first = x0, start
        if self._image is not None:
            latents, first = torch.cat([self._image, x0], dim=2), 0  # (B,16,1+f,h,w)
            self._image = None
        frames = self.decoder.decode_chunk(latents, self.decoder_state) if self.decoder is not None else None
        chunk = Chunk(index=self.chunk_index, start_frame=first, latents=latents, frames=frames,
                      prompt=self._prompt.value, switched=switched)
        self.next_frame = start + f
        self.chunk_index += 1
        return chunk

    def __iter__(self):
        while True:
            yield self.next_chunk()


def frames_for_chunks(num_chunks: int, frames_per_chunk: int, *, image: bool = False) -> int:
    """Video frames the Wan VAE decodes for ``num_chunks`` chunks (first latent -> 1 frame, then 4 each)."""
    latents = num_chunks * frames_per_chunk + (1 if image else 0)
    return 1 + 4 * (latents - 1) if latents > 0 else 0
