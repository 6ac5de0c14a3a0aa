"""`streamgen generate`: generate a video chunk by chunk into an MP4 file.

    streamgen generate --prompt "a red fox" --chunks 4 --out out.mp4
    streamgen generate --model self-forcing-1.3b --checkpoint self_forcing_dmd.pt \\
        --vae Wan2.1_VAE.pth --text-encoder umt5-xxl/ --prompt "..." --chunks 20 \\
        --prompt-at 10:"the fox jumps into a river" --out fox.mp4

Streaming models run through the same :class:`streamgen.engine.Engine` as `streamgen serve` (one
session with exactly ``--chunks`` chunks; ``--prompt-at`` switches take effect at their chunk),
so a file and a stream of the same settings and seed hold the same frames. Bidirectional presets
(``wan2.1-*``, ``tiny-full``) sample the whole clip with UniPC + CFG and decode it chunk by chunk
through the same post-processing. ``--interpolate 2|4`` runs RIFE between the decoder and the file,
which then has 2x / 4x the frames at 2x / 4x ``--fps``. The file is H.264 (yuv420p) in MP4.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time

from streamgen.pipeline import UsageError, add_model_arguments, check_output, positive, positive_float, size16

PARALLEL_MODES = ("ulysses", "ring", "pipeline")  # streamgen.parallel.launch.wrap (imported only when used)


def seed(text: str) -> int:
    """argparse type of --seed: the range a stream's start.seed has (protocol.Limits.max_seed)."""
    from streamgen.protocol import DEFAULT_LIMITS

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; allowed 0..{DEFAULT_LIMITS.max_seed}") from None
    if not 0 <= v <= DEFAULT_LIMITS.max_seed:
        raise argparse.ArgumentTypeError(f"{v}: allowed 0..{DEFAULT_LIMITS.max_seed} (a stream's seed range)")
    return v


def _prompt_at(text: str) -> tuple[int, str]:
    chunk, sep, prompt = text.partition(":")
    if not sep or not chunk.strip().isdigit() or not prompt.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not CHUNK:TEXT (CHUNK a chunk index >= 0, TEXT non-empty), e.g. 4:a cat")
    return int(chunk), prompt


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    g = p.add_argument_group("video")
    g.add_argument("--prompt", required=True, help="text prompt")
    g.add_argument("--prompt-at", type=_prompt_at, action="append", default=[], metavar="CHUNK:TEXT",
                   help="switch to TEXT from chunk CHUNK on (repeatable)")
    g.add_argument("--image", help="start from this image (first frame; needs --decoder wan)")
    g.add_argument("--chunks", type=positive, default=4, help="number of chunks (default: 4)")
    g.add_argument("--width", type=size16, default=None, help="pixels, multiple of 16 (default: per model)")
    g.add_argument("--height", type=size16, default=None, help="pixels, multiple of 16 (default: per model)")
    g.add_argument("--fps", type=positive_float, default=16.0, help="frames per second of the file (default: 16)")
    g.add_argument("--seed", type=seed, default=0, help="noise seed, 0..2**32-1 as a stream's (default: 0)")
    g.add_argument("--crf", type=int, default=18, help="x264 quality, 0-51, lower is better (default: 18)")
    g.add_argument("--interpolate", type=int, choices=(1, 2, 4), default=1,
                   help="RIFE frame interpolation between the decoder and the file: N times the frames, "
                        "written at N times --fps (default: 1, off)")
    g.add_argument("--parallel", choices=PARALLEL_MODES, default=None,
                   help="split the DiT of this one stream over the ranks of a torchrun launch (every rank runs this "
                        "command; rank 0 writes --out): ulysses / ring (sequence parallel), pipeline (blocks)")
    g.add_argument("--out", required=True, help="output .mp4 path")
    g.add_argument("-q", "--quiet", action="store_true", help="print only the final line (no progress)")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UsageError as e:
        print(f"streamgen generate: error: {e}", file=sys.stderr)
        return 2


def _check(args: argparse.Namespace, preset) -> dict[int, str]:
    """Checks of the video options that need no model; returns the prompt switches {chunk: text}."""
    from streamgen.protocol import DEFAULT_LIMITS

    if args.decoder is None and args.image is not None:
        args.decoder = "wan"
    if not args.prompt.strip():
        raise UsageError("--prompt: empty; give the text of the video (the server refuses an empty prompt too)")
    for text in [args.prompt, *(t for _, t in args.prompt_at)]:
        if len(text.encode()) > DEFAULT_LIMITS.max_prompt_bytes:
            raise UsageError(f"--prompt: {len(text.encode())} bytes of UTF-8; allowed at most "
                             f"{DEFAULT_LIMITS.max_prompt_bytes} (the server's limit)")
    if args.chunks > DEFAULT_LIMITS.max_chunks:
        raise UsageError(f"--chunks {args.chunks}: allowed 1..{DEFAULT_LIMITS.max_chunks}")
    w, h = args.width or preset.width, args.height or preset.height
    if w * h > preset.max_pixels:
        raise UsageError(f"--width {w} --height {h}: width*height must be <= {preset.max_pixels} for {args.model}")
    switches: dict[int, str] = {}
    for chunk, text in args.prompt_at:
        if chunk >= args.chunks:
            raise UsageError(f"--prompt-at {chunk}:...: chunk {chunk} is beyond the last chunk "
                             f"(allowed: 0..{args.chunks - 1} for --chunks {args.chunks})")
        if chunk in switches:
            raise UsageError(f"--prompt-at: chunk {chunk} given twice")
        switches[chunk] = text
    if switches and preset.mode == "full":
        raise UsageError(f"--prompt-at needs a streaming model; {args.model} samples the whole clip at once")
    if args.image is not None:
        if (args.decoder or preset.decoder) != "wan":
            raise UsageError("--image needs --decoder wan (the image is encoded by the Wan VAE)")
        if not os.path.isfile(args.image):
            raise UsageError(f"--image {args.image}: no such file")
        if preset.mode == "full":
            raise UsageError(f"--image needs a streaming model; {args.model} is text-to-video only")
    if not 0 <= args.crf <= 51:
        raise UsageError(f"--crf {args.crf}: allowed 0..51")
    check_output("--out", args.out)
    return switches


def _preset_config(preset):
    from streamgen.models.wan import WanConfig

    try:
        return WanConfig.preset(preset.wan)
    except ValueError:  # a trained built-in model: its config comes with its weights
        return None


def available_memory(device) -> int:
    """Bytes free on ``device``: CUDA's free memory, or the host's MemAvailable (physical memory where
    /proc/meminfo is absent)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_needed(cfg, *, full: bool, windowless: bool, frames: int, width: int, height: int, bytes_per: int,
                  branches: int) -> int:
    """An estimate of the bytes that grow with the video's length (0 when nothing does): the whole
    clip's latents and one block's activations for bidirectional sampling, the KV cache of every frame
    for a stream without an attention window. ``branches``: 2 with CFG."""
    tokens = frames * (height // 16) * (width // 16)  # latent /8, DiT patch 2
    if full:
        latents = frames * cfg.in_dim * (height // 8) * (width // 8) * 4  # fp32 noise / x0
        return latents * 2 + branches * tokens * (5 * cfg.dim + cfg.ffn_dim) * bytes_per
    if windowless:
        return branches * cfg.num_layers * 2 * tokens * cfg.dim * bytes_per  # K and V of every layer
    return 0


def _check_memory(args, preset, settings, cfg, width, height) -> None:
    """--chunks bounded by what the device holds, checked before anything is allocated."""
    from streamgen.pipeline import pick_device, pick_dtype

    device = pick_device(args.device)
    bytes_per = pick_dtype(args.dtype, device).itemsize
    fpc = args.frames_per_chunk or cfg.frames_per_chunk
    kw = dict(full=preset.mode == "full", windowless=not settings.local_frames, width=width, height=height,
              bytes_per=bytes_per, branches=2 if settings.guidance != 1.0 else 1)
    need = memory_needed(cfg, frames=args.chunks * fpc, **kw)
    have = available_memory(device)
    if need > have:
        per_chunk = max(1, memory_needed(cfg, frames=fpc, **kw))
        why = "the whole clip is sampled at once" if kw["full"] else "the KV cache holds every frame (no window)"
        raise UsageError(f"--chunks {args.chunks}: needs about {need / 2**30:.1f} GiB on {device} ({why}), "
                         f"{have / 2**30:.1f} GiB are free; allowed here: at most --chunks {max(1, have // per_chunk)} "
                         f"at {width}x{height}")


def _run(args: argparse.Namespace) -> int:
    from streamgen.engine.core import engine_threads
    from streamgen.pipeline import check_options, pick_device

    preset = check_options(args)
    switches = _check(args, preset)
    # a stream runs on the engine's busy thread, which then gets the CPU's intra-op threads
    with engine_threads(pick_device(args.device)) if preset.mode != "full" else contextlib.nullcontext() as threads:
        return _run_with(args, preset, switches, threads)


def _run_with(args: argparse.Namespace, preset, switches: dict[int, str], threads: int | None) -> int:
    from streamgen.pipeline import build_pipeline, engine_settings

    width, height = args.width or preset.width, args.height or preset.height
    image = None
    if args.image is not None:
        from streamgen.media.frames import ImageError, read_image

        try:
            image = read_image(args.image, width, height)
        except ImageError as e:
            raise UsageError(f"--image {args.image}: {e}") from None
    settings = engine_settings(args, preset, max_ahead=2, threads=threads)
    rank = _join_launch(args, preset)
    cfg = _preset_config(preset)
    if cfg is not None:  # refuse before reading any weights
        _check_memory(args, preset, settings, cfg, width, height)
    pipe = build_pipeline(args, rife_required=args.interpolate > 1)
    if cfg is None:
        _check_memory(args, preset, settings, pipe.model.cfg, width, height)
    if args.parallel is not None:
        from streamgen.parallel.launch import wrap

        try:
            pipe.model = wrap(pipe.model, args.parallel)
        except ValueError as e:
            raise UsageError(f"--parallel {args.parallel}: {e}") from None
    try:
        return _generate(args, preset, pipe, settings, width, height, switches, image, rank)
    finally:
        if args.parallel is not None:
            from streamgen.parallel.launch import finish

            finish()


def _join_launch(args: argparse.Namespace, preset) -> int:
    """``--parallel``: checks, then this process's rank of the torchrun launch (0 without one)."""
    if args.parallel is None:
        return 0
    from streamgen.parallel.launch import in_launch, init

    if not in_launch():
        raise UsageError(f"--parallel {args.parallel}: run under torchrun, one process per rank (e.g. torchrun "
                         "--nproc-per-node 2 -m streamgen generate ...); RANK / WORLD_SIZE / MASTER_ADDR are unset")
    if preset.mode == "full":
        raise UsageError(f"--parallel needs a streaming model; {args.model} samples the whole clip at once")
    for flag, on in (("--compile", args.compile), ("--cuda-graphs", args.cuda_graphs),
                     ("--offload", args.offload is not None), ("--attention fp8", args.attention == "fp8")):
        if on:
            raise UsageError(f"--parallel and {flag} cannot be combined (the split model runs its blocks its own way)")
    try:
        rank, _, args.device = init(args.device)
    except (RuntimeError, ValueError) as e:  # a rendezvous or backend that cannot start
        raise UsageError(f"--parallel {args.parallel}: could not join the torchrun launch: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if rank != 0:
        args.quiet = True
    return rank


def _generate(args, preset, pipe, settings, width, height, switches, image, rank: int) -> int:
    from streamgen.media.encode import Mp4Writer

    fps = args.fps * args.interpolate
    say = (lambda *a, **k: None) if args.quiet else print
    say(f"streamgen generate: {args.model} {width}x{height} {args.chunks} chunks, sampler {settings.sampler} "
          f"{settings.num_steps} steps shift {settings.shift}" + (f" cfg {settings.guidance:g}" if settings.guidance != 1.0 else "")
          + f", {pipe.device} {str(pipe.dtype).replace('torch.', '')}"
          + (f", RIFE {args.interpolate}x" if args.interpolate > 1 else ""), file=sys.stderr)
    t_start = time.perf_counter()
    writer_cm = Mp4Writer(args.out, width, height, fps, crf=args.crf) if rank == 0 else _Discard()
    with writer_cm as writer, _Progress(args) as progress:
        if preset.mode == "full":
            _run_full(args, pipe, settings, writer, width, height, progress)
        else:
            asyncio.run(_run_stream(args, pipe, settings, writer, width, height, switches, image, progress))
        total = writer.frames
    elapsed = time.perf_counter() - t_start
    if rank != 0:
        return 0
    print(f"wrote {args.out}: {total} frames {width}x{height} at {fps:g} fps "
          f"({total / fps:.2f} s of video) in {elapsed:.1f} s ({total / elapsed:.1f} frames/s)", file=sys.stderr)
    return 0


class _Discard:
    """The writer of a rank other than 0 under ``--parallel``: counts the frames, keeps none."""

    frames = 0

    def write(self, frames) -> None:
        self.frames += len(frames)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class _Progress:
    """One update per chunk: a tqdm bar on a terminal, a line per chunk otherwise, nothing with --quiet."""

    def __init__(self, args):
        from tqdm import tqdm

        self.quiet, self.n = args.quiet, args.chunks
        self.bar = tqdm(total=args.chunks, unit="chunk", desc="generate", file=sys.stderr,
                        disable=True if args.quiet else None)  # None: off when stderr is not a terminal

    def chunk(self, i: int, frames: int, dt: float, total: int, note: str = "") -> None:
        rate = f"{frames / max(dt, 1e-9):.1f} frames/s"
        if not self.bar.disable:
            self.bar.set_postfix_str(rate + note, refresh=False)
            self.bar.update(1)
        elif not self.quiet:
            print(f"chunk {i + 1}/{self.n}: {frames} frames in {dt:.2f} s ({rate}), {total} total{note}",
                  file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


async def _run_stream(args, pipe, settings, writer, width, height, switches, image, progress) -> None:
    from streamgen.engine.core import Engine, EngineError, GenRequest

    req = GenRequest(prompt=args.prompt, width=width, height=height, seed=args.seed, chunks=args.chunks,
                     interpolate=args.interpolate, image=image, prompts=switches, name="generate")
    try:
        engine = Engine(pipe, settings)
        engine.validate(req)
    except EngineError as e:
        raise UsageError(f"--{(e.field or 'model').replace('_', '-')}: {e}") from None
    engine.start()
    loop = asyncio.get_running_loop()
    handle = await engine.open(req)
    try:
        for i in range(args.chunks):
            t0 = time.perf_counter()
            try:
                frames = await handle.get()
            except EngineError as e:
                raise UsageError(f"generation failed at chunk {i + 1}: {e}") from None
            dt = time.perf_counter() - t0
            await loop.run_in_executor(None, writer.write, frames)
            note = f"  [prompt: {switches[i][:40]!r}]" if handle.last_switched and i in switches else ""
            progress.chunk(i, len(frames), dt, writer.frames, note)
    finally:
        handle.cancel()
        await loop.run_in_executor(None, engine.close)


def _run_full(args, pipe, settings, writer, width, height, progress) -> None:
    """Bidirectional checkpoints: sample all latent frames at once (CFG), decode chunk by chunk."""
    import torch

    from streamgen.media.frames import to_uint8, unit_frames
    from streamgen.media.interpolate import Interpolator
    from streamgen.sampling.full import sample_clip

    fpc = args.frames_per_chunk or pipe.model.cfg.frames_per_chunk
    text = pipe.text_encoder
    ctx = text.encode([args.prompt]).to(device=pipe.device, dtype=pipe.dtype)
    neg = None
    if settings.guidance != 1.0:
        neg = text.encode([settings.negative_prompt or ""]).to(device=pipe.device, dtype=pipe.dtype)
    t0 = time.perf_counter()
    x0 = sample_clip(pipe.model, ctx, neg, frames=args.chunks * fpc, height=height, width=width,
                     sampler=settings.sampler, steps=settings.num_steps, shift=settings.shift,
                     guidance=settings.guidance, seed=args.seed)
    if not args.quiet:
        print(f"sampled {args.chunks * fpc} latent frames in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    interp = Interpolator(pipe.rife if args.interpolate > 1 else None, args.interpolate, settings.scene_threshold)
    istate, dstate = interp.new_state(), pipe.decoder.new_state()
    for i in range(args.chunks):
        t0 = time.perf_counter()
        with torch.no_grad():
            decoded = pipe.decoder.decode_chunk(x0[:, :, i * fpc:(i + 1) * fpc], dstate)
            frames = to_uint8(interp.process(unit_frames(decoded), istate)).cpu().numpy()
        writer.write(frames)
        progress.chunk(i, len(frames), time.perf_counter() - t0, writer.frames)
