"""The generation engine as the server's frame source (``streamgen serve --source engine``).

``EngineFactory`` validates a ``start`` request against the served model and opens an engine
session; ``EngineSource`` is the server's view of it (``next_chunk`` awaits the busy loop's next
chunk; ``set_prompt`` / ``pause`` / ``resume`` are commands to the busy loop; ``aclose`` cancels
the session and frees its cache slot). A model generates at its native frame rate: ``start.fps``
may only name that rate (or be left out), and ``interpolate`` multiplies it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass

import numpy as np

from streamgen.engine.core import Engine, EngineError, EngineHandle, EngineSettings, GenRequest, Pipeline
from streamgen.engine.source import FrameSource, SourceError, SourceFactory, StreamRequest, decode_image

log = logging.getLogger(__name__)


class EngineSource(FrameSource):
    def __init__(self, handle: EngineHandle):
        self._h = handle
        self.width, self.height, self.fps = handle.width, handle.height, handle.fps

    async def next_chunk(self) -> np.ndarray:
        return await self._h.get()

    def set_prompt(self, prompt: str) -> None:
        self._h.set_prompt(prompt)

    def pause(self) -> None:
        self._h.pause()

    def resume(self) -> None:
        self._h.resume()

    async def aclose(self) -> None:
        self._h.cancel()


@dataclass
class ModelLimits:
    default_width: int
    default_height: int
    max_pixels: int


class EngineFactory(SourceFactory):
    """Serves one model through one :class:`Engine` (started here, closed by ``aclose``)."""

    def __init__(self, model: str, engine: Engine, limits: ModelLimits):
        self.model, self.engine, self.limits = model, engine, limits
        engine.start()

    async def create(self, request: StreamRequest) -> FrameSource:
        lim = self.limits
        if request.model not in (None, "", self.model):
            raise SourceError("model", f"model {request.model!r} is not served here; available: [{self.model!r}]")
        w, h = request.width or lim.default_width, request.height or lim.default_height
        if w * h > lim.max_pixels:
            raise SourceError("width", f"width*height must be <= {lim.max_pixels} for {self.model}, got {w}x{h}")
        if request.fps not in (None, self.engine.fps):
            raise SourceError("fps", f"{self.model} generates {self.engine.fps} fps; ask for fps {self.engine.fps} "
                                     f"(or leave it out) and use interpolate 2 or 4 for more")
        image = None
        if request.image is not None:
            image = await asyncio.get_running_loop().run_in_executor(None, decode_image, request.image, w, h)
        req = GenRequest(prompt=request.prompt, width=w, height=h, seed=request.seed or 0,
                         interpolate=request.interpolate or 1, image=image)
        try:
            handle = await self.engine.open(req)
        except EngineError as e:
            raise SourceError(e.field, str(e), e.code) from e
        return EngineSource(handle)

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.engine.close)


def make_source_factory(args: argparse.Namespace) -> EngineFactory:
    """Build the pipeline named by ``args.model`` and wrap it in an engine; SystemExit on bad flags."""
    from streamgen.sampling import generate as g

    preset = g.MODELS.get(args.model)
    if preset is None or preset.mode != "stream":
        allowed = ", ".join(n for n, p in g.MODELS.items() if p.mode == "stream")
        raise SystemExit(f"--model {args.model}: the engine serves streaming (block-causal) models: {allowed}")
    decoder = args.decoder or preset.decoder
    try:
        if not preset.builtin:
            g.require_file("--checkpoint", args.checkpoint, f"DiT weights for {args.model}")
            g.require_file("--vae", args.vae, f"{decoder} decoder weights")
            g.require_file("--text-encoder", args.text_encoder, "umT5-XXL encoder")
        if args.offload is not None and (args.compile or args.offload < 0):
            raise g.UsageError("--offload PREFETCH must be >= 0 and cannot be combined with --compile")
        device = g.pick_device(args.device)
        dtype = g.pick_dtype(args.dtype, device)
    except g.UsageError as e:
        raise SystemExit(f"streamgen serve: {e}") from e
    model, text_encoder, dec, vae = g.build_components(preset, device, dtype, decoder=decoder,
                                                       checkpoint=args.checkpoint, vae=args.vae,
                                                       text_encoder=args.text_encoder,
                                                       offload_prefetch=args.offload, quant=args.quant)
    if args.compile:
        from streamgen.ops.compile import compile_blocks

        compile_blocks(model)
    rife = _load_rife(args.rife, device)
    pipeline = Pipeline(model=model, text_encoder=text_encoder, decoder=dec, vae=vae, rife=rife,
                        device=device, dtype=dtype)
    w, h = args.width or preset.width, args.height or preset.height
    warmup = GenRequest("warm-up", w, h, interpolate=2 if rife is not None else 1)
    settings = EngineSettings(max_sessions=args.engine_sessions, local_frames=args.local_frames or None,
                              sink_frames=args.sink_frames, warmup=warmup)
    max_pixels = 1280 * 720 if not preset.builtin else 512 * 512
    log.info("engine: %s on %s %s, decoder %s, RIFE %s", args.model, device, dtype, decoder,
             "on" if rife is not None else "off")
    return EngineFactory(args.model, Engine(pipeline, settings), ModelLimits(w, h, max_pixels))


def _load_rife(spec: str, device):
    """--rife: 'none', 'auto' (the default search path; absent weights leave interpolate at 1), or a path."""
    from streamgen.media.interpolate import default_weights_path
    from streamgen.sampling import generate as g

    if spec == "none":
        return None
    path = default_weights_path() if spec == "auto" else spec
    if path is None:
        log.info("RIFE weights not found (set --rife PATH or $STREAMGEN_RIFE_WEIGHTS); interpolate stays 1")
        return None
    try:
        g.require_file("--rife", str(path), "RIFE v4.25/v4.26 flownet.pkl")
        return g.load_rife_model(str(path), device)
    except g.UsageError as e:
        raise SystemExit(f"streamgen serve: {e}") from e
