"""`streamgen generate`: generate a video chunk by chunk into an MP4 file.

    streamgen generate --model tiny --prompt "a red fox" --chunks 4 --out out.mp4
    streamgen generate --model self-forcing-1.3b --checkpoint self_forcing_dmd.pt \\
        --vae Wan2.1_VAE.pth --text-encoder umt5-xxl/ --prompt "..." --chunks 20 \\
        --prompt-at 10:"the fox jumps into a river" --out fox.mp4

Models (``MODELS``): ``tiny`` (and ``tiny-full``, the same weights sampled bidirectionally) is built in (random-initialised tiny Wan DiT with a fixed seed, the
deterministic built-in text encoder and a random-initialised tiny decoder); it makes noise-like
video and exists to exercise the whole path on a CPU in seconds. ``shapes`` is built in and trained
(streamgen/weights/shapes.safetensors: a coloured circle/square/triangle moving on a plain
background, e.g. --prompt "a red circle moving left on a black background"). The others need weights:
``--checkpoint`` (DiT), ``--vae`` (Wan2.1_VAE.pth or taew2_1.pth for ``--decoder taehv``) and
``--text-encoder`` (umT5-XXL folder). Streaming presets (``self-forcing-*``) run the block-causal
chunk loop of ``stream.py``; bidirectional presets (``wan2.1-*``) sample the whole clip with
UniPC + CFG and decode it chunk by chunk.

``--interpolate 2|4`` runs RIFE (``--rife flownet.pkl``) between the decoder and the file, which
then has 2x / 4x the frames at 2x / 4x ``--fps`` (media/interpolate.py: no in-betweens across a
prompt switch).

The output is H.264 (libx264, yuv420p) in MP4 via PyAV, playable anywhere.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

DEFAULT_NEGATIVE_PROMPT = (  # Wan2.1's default negative prompt
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class ModelPreset:
    """What `--model NAME` means. wan: WanConfig preset; mode: "stream" (block-causal chunk loop)
    or "full" (bidirectional whole clip); builtin: runs without any weight files given; weights: the
    shipped file (streamgen/weights/NAME.safetensors, DiT + Wan VAE + their configs) of a built-in
    trained model (None: random weights from the ``wan`` preset)."""

    wan: str
    mode: str
    sampler: str
    steps: int
    shift: float
    guidance: float
    width: int
    height: int
    decoder: str = "wan"
    builtin: bool = False
    weights: str | None = None


MODELS: dict[str, ModelPreset] = {
    "tiny": ModelPreset("tiny", "stream", "self-forcing", 4, 5.0, 1.0, 128, 128, decoder="taehv", builtin=True),
    # the tiny model sampled bidirectionally (UniPC + CFG over the whole clip): the non-distilled path
    "tiny-full": ModelPreset("tiny", "full", "unipc", 8, 5.0, 3.0, 128, 128, decoder="taehv", builtin=True),
    # trained built-in model (streamgen/weights/README.md): a coloured shape moving on a plain background
    "shapes": ModelPreset("shapes", "stream", "self-forcing", 4, 5.0, 1.0, 128, 128, builtin=True, weights="shapes"),
    "self-forcing-1.3b": ModelPreset("wan2.1-t2v-1.3b", "stream", "self-forcing", 4, 5.0, 1.0, 832, 480),
    "wan2.1-t2v-1.3b": ModelPreset("wan2.1-t2v-1.3b", "full", "unipc", 50, 5.0, 5.0, 832, 480),
    "wan2.1-t2v-14b": ModelPreset("wan2.1-t2v-14b", "full", "unipc", 50, 5.0, 5.0, 832, 480),
}
SAMPLER_CHOICES = ("self-forcing", "euler", "unipc")


class UsageError(Exception):
    """A bad argument combination; reported as `streamgen generate: error: ...`, exit status 2."""


def _size16(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; use a positive multiple of 16 (e.g. 256, 480, 832)")
    if v <= 0 or v % 16:
        raise argparse.ArgumentTypeError(
            f"{v} is not a positive multiple of 16 (the latent is size/8 and the DiT patch is 2); "
            f"allowed: 16, 32, ..., e.g. {max(16, v // 16 * 16)} or {max(16, v // 16 * 16 + 16)}")
    return v


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0")
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{v} must be > 0")
    return v


def _prompt_at(text: str) -> tuple[int, str]:
    chunk, sep, prompt = text.partition(":")
    if not sep or not chunk.strip().isdigit() or not prompt.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not CHUNK:TEXT (CHUNK a chunk index >= 0, TEXT non-empty), e.g. 4:a cat")
    return int(chunk), prompt


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", choices=list(MODELS), help="model preset (default: tiny, built in)")
    p.add_argument("--checkpoint", help="DiT weights: a file or a checkpoint folder (required except for tiny)")
    p.add_argument("--vae", help="decoder weights: Wan2.1_VAE.pth / diffusers AutoencoderKLWan folder, or taew2_1.pth")
    p.add_argument("--text-encoder", help="umT5-XXL: HF folder or models_t5_umt5-xxl-enc-bf16.pth")
    p.add_argument("--decoder", choices=("wan", "taehv"), default=None,
                   help="video decoder (default: wan; taehv for tiny unless --image)")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default=None, help="negative prompt for CFG (default: Wan's)")
    p.add_argument("--prompt-at", type=_prompt_at, action="append", default=[], metavar="CHUNK:TEXT",
                   help="switch to TEXT from chunk CHUNK on (repeatable)")
    p.add_argument("--image", help="start from this image (first frame; needs --decoder wan)")
    p.add_argument("--chunks", type=_positive, default=4, help="number of chunks (default: 4)")
    p.add_argument("--frames-per-chunk", type=_positive, default=None, help="latent frames per chunk (default: model's)")
    p.add_argument("--width", type=_size16, default=None, help="pixels, multiple of 16 (default: per model)")
    p.add_argument("--height", type=_size16, default=None, help="pixels, multiple of 16 (default: per model)")
    p.add_argument("--fps", type=_positive_float, default=16.0, help="frames per second of the file (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--steps", type=_positive, default=None, help="denoising steps (default: per model)")
    p.add_argument("--shift", type=_positive_float, default=None, help="sigma shift (default: per model)")
    p.add_argument("--sampler", choices=SAMPLER_CHOICES, default=None, help="default: per model")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale for euler/unipc (default: per model)")
    p.add_argument("--local-frames", type=_positive, default=None,
                   help="attention window in latent frames (default: model's; without one the KV cache grows with "
                        "the stream, ~290 MB per latent frame for 1.3B at 832x480 bf16)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT blocks (static shapes; ~1.5x on an H100, falls back to eager)")
    p.add_argument("--quant", choices=("fp8", "int8-weight"), default=None,
                   help="quantize the DiT blocks' linear layers (fp8: 1.1x on 14B, half the weight memory)")
    p.add_argument("--offload", type=int, default=None, metavar="PREFETCH",
                   help="keep the DiT blocks in pinned host memory and stream them onto the GPU PREFETCH "
                        "blocks ahead (1 is enough for 1.3B; 14B in ~16 GiB)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--crf", type=int, default=18, help="x264 quality, 0-51, lower is better (default: 18)")
    p.add_argument("--interpolate", type=int, choices=(1, 2, 4), default=1,
                   help="RIFE frame interpolation between the decoder and the file: N times the frames, "
                        "written at N times --fps (default: 1, off)")
    p.add_argument("--rife", default=None, metavar="PATH",
                   help="RIFE v4.25/v4.26 flownet.pkl for --interpolate (default: $STREAMGEN_RIFE_WEIGHTS, "
                        "else weights/rife-v4.26/flownet.pkl)")
    p.add_argument("--out", required=True, help="output .mp4 path")


# -- video file ---------------------------------------------------------------------------------


class Mp4Writer:
    """H.264 (libx264, yuv420p) MP4 file writer; frames are uint8 (T, H, W, 3) RGB numpy arrays."""

    def __init__(self, path: str, width: int, height: int, fps: float, crf: int = 18):
        import av
        from fractions import Fraction

        self._av = av
        self.container = av.open(path, mode="w")
        self.stream = self.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": str(crf), "preset": "medium"}
        self.frames = 0

    def write(self, frames) -> None:
        for rgb in frames:
            frame = self._av.VideoFrame.from_ndarray(rgb, format="rgb24")
            for packet in self.stream.encode(frame):
                self.container.mux(packet)
            self.frames += 1

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def to_uint8(frames):
    """(B,3,T,H,W) float in [-1,1] (batch item 0) -> (T,H,W,3) uint8 numpy."""
    x = frames[0].float().add(1.0).mul(127.5).round().clamp(0, 255).to("cpu", dtype=__import__("torch").uint8)
    return x.permute(1, 2, 3, 0).contiguous().numpy()  # (T, H, W, 3)


class FrameOutput:
    """Decoded chunks -> RIFE (``interp`` with factor > 1, one stream state) -> uint8 frames for the writer."""

    def __init__(self, interp=None):
        self.interp = interp
        self.state = interp.new_state() if interp is not None else None

    def __call__(self, frames, *, cut: bool = False):
        """(B,3,T,H,W) in [-1,1] (batch item 0) -> (factor*T, H, W, 3) uint8 numpy. ``cut``: no
        in-betweens across the boundary before this chunk (a prompt switch)."""
        if self.interp is None:
            return to_uint8(frames)
        x = frames[0].transpose(0, 1).float().add(1.0).mul_(0.5).clamp_(0.0, 1.0)  # (T, 3, H, W) in [0, 1]
        if cut:
            self.state.cut()
        y = self.interp.process(x, self.state)  # (factor*T, 3, H, W) in [0, 1]
        return to_uint8(y.transpose(0, 1).mul(2.0).sub(1.0)[None])


def read_image(path: str, width: int, height: int):
    """An image file -> (1, 3, 1, H, W) float in [-1, 1], resized to width x height (PyAV decodes it)."""
    import av
    import torch

    with av.open(path) as c:
        frame = next(c.decode(video=0))
    rgb = frame.reformat(width=width, height=height, format="rgb24").to_ndarray()  # (H, W, 3)
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().div(127.5).sub(1.0)
    return x[None, :, None]


# -- model assembly ----------------------------------------------------------------------------------


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available; allowed here: auto, cpu")
    return torch.device(name)


def pick_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def require_file(flag: str, path: str | None, what: str) -> str:
    import os

    if path is None:
        raise UsageError(f"{flag} is required for this model ({what})")
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file or directory ({what})")
    return path


def build_components(preset: ModelPreset, device, dtype, *, decoder: str, checkpoint: str | None = None,
                     vae: str | None = None, text_encoder: str | None = None, offload_prefetch: int | None = None,
                     quant: str | None = None):
    """(model, text_encoder, decoder, vae or None) for the preset on device/dtype.

    decoder: "wan" | "taehv"; checkpoint / vae / text_encoder: weight paths (unused for built-in presets).
    offload_prefetch: None keeps the DiT resident on ``device``; N >= 0 loads it into host memory and
    streams its blocks onto ``device`` N blocks ahead of use (streamgen.ops.offload).
    quant: None, "fp8" or "int8-weight": the DiT blocks' linear layers quantized (streamgen.ops.quant),
    before any offload."""
    import torch

    from streamgen.models import wan

    if preset.builtin:
        from streamgen.models.text import load_text_encoder

        if preset.weights is not None:
            from streamgen.weights import load_builtin

            if decoder != "wan":
                raise UsageError(f"--decoder {decoder}: the built-in {preset.weights!r} model ships its own Wan VAE "
                                 "only (allowed: wan)")
            model, vae_model, _ = load_builtin(preset.weights)
            dec, cfg = vae_model, model.cfg
        else:
            cfg = wan.WanConfig.preset(preset.wan)
            with torch.random.fork_rng(devices=[]):  # fixed random weights; the caller's global RNG is left alone
                torch.manual_seed(0)
                model = wan.WanModel(cfg)
                dec, vae_model = _tiny_decoder(decoder)
        text_encoder = load_text_encoder(None, dim=cfg.text_dim, device=device, dtype=torch.float32)
    else:
        from streamgen.models.checkpoints import load_wan_model

        dit_device = device if offload_prefetch is None else torch.device("cpu")
        model = load_wan_model(checkpoint, None, device=dit_device, dtype=dtype)
        from streamgen.models.text import load_text_encoder

        text_encoder = load_text_encoder(text_encoder, dim=model.cfg.text_dim, device=device, dtype=dtype)
        dec, vae_model = _load_decoder(decoder, vae, device, dtype)
    if quant is not None:
        from streamgen.ops.quant import quantize

        model = quantize(model.to(dtype=dtype), quant)
    if offload_prefetch is None:
        model = model.to(device=device, dtype=dtype)
    else:
        from streamgen.ops.offload import offload

        model = model.to(dtype=dtype)
        offload(model, device=device, prefetch=offload_prefetch)  # the handle lives on in the blocks' hooks
    model = model.eval().requires_grad_(False)
    dec = dec.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, text_encoder, dec, vae_model


def _tiny_decoder(kind: str):
    """Random-initialised tiny decoder with fixed weights (seeds the global RNG: call under fork_rng)."""
    import torch

    if kind == "taehv":
        from streamgen.models.taehv import TAEHV, TAEHVConfig

        return TAEHV(TAEHVConfig.preset("tiny")).init_random_(seed=1), None
    from streamgen.models.wan_vae import WanVAE, WanVAEConfig

    torch.manual_seed(1)  # fixed random decoder weights
    vae = WanVAE(WanVAEConfig.preset("tiny"))
    return vae, vae


def load_rife_model(path: str, device):
    """RIFE for --interpolate: fp16 + channels_last on CUDA, fp32 on the CPU."""
    import torch

    from streamgen.models.checkpoints import CheckpointError
    from streamgen.models.rife import load_rife

    try:
        model = load_rife(path, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    except CheckpointError as e:
        raise UsageError(f"--rife {path}: {e}") from e
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def _load_decoder(kind: str, path: str, device, dtype):
    if kind == "taehv":
        from streamgen.models.taehv import TAEHVConfig, load_taehv

        return load_taehv(path, TAEHVConfig.preset("taew2.1"), device=device, dtype=dtype), None
    from streamgen.models.wan_vae import WanVAEConfig, load_wan_vae

    vae = load_wan_vae(path, WanVAEConfig.preset("wan2.1"), device=device, dtype=dtype)
    return vae, vae


# -- run -----------------------------------------------------------------------------------------


def _error(msg: str) -> int:
    print(f"streamgen generate: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UsageError as e:
        return _error(str(e))


def _plan(args, preset: ModelPreset):
    """Validate argument combinations; returns the resolved settings."""
    import os

    if args.decoder is None:
        args.decoder = "wan" if args.image is not None else preset.decoder
    width = args.width or preset.width
    height = args.height or preset.height
    sampler = args.sampler or preset.sampler
    if preset.mode == "full" and sampler == "self-forcing":
        raise UsageError(f"--sampler self-forcing needs a distilled block-causal model; {args.model} is bidirectional "
                         f"(allowed: euler, unipc; streaming models: "
                         f"{', '.join(n for n, p in MODELS.items() if p.mode == 'stream')})")
    guidance = args.guidance if args.guidance is not None else (preset.guidance if sampler != "self-forcing" else 1.0)
    if sampler == "self-forcing" and guidance != 1.0:
        raise UsageError("--guidance applies to --sampler euler/unipc; the distilled self-forcing sampler runs without CFG")
    steps = args.steps or (preset.steps if sampler == preset.sampler else (4 if sampler == "self-forcing" else 30))
    shift = args.shift or preset.shift
    switches = {}
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
        if args.decoder != "wan":
            raise UsageError("--image needs --decoder wan (the image is encoded by the Wan VAE)")
        if not os.path.exists(args.image):
            raise UsageError(f"--image {args.image}: no such file")
        if preset.mode == "full":
            raise UsageError(f"--image needs a streaming model; {args.model} is text-to-video only")
    if not preset.builtin:
        require_file("--checkpoint", args.checkpoint, f"DiT weights for {args.model}; built in: "
                     f"{', '.join(n for n, p in MODELS.items() if p.builtin)}")
        require_file("--vae", args.vae, f"{args.decoder} decoder weights")
        require_file("--text-encoder", args.text_encoder, "umT5-XXL encoder")
    if args.offload is not None and args.compile:
        raise UsageError("--offload and --compile cannot be combined (offload hooks every block call); pick one")
    if args.offload is not None and args.offload < 0:
        raise UsageError(f"--offload {args.offload}: PREFETCH must be >= 0")
    if not 0 <= args.crf <= 51:
        raise UsageError(f"--crf {args.crf}: allowed 0..51")
    if args.interpolate > 1:
        from streamgen.media.interpolate import WEIGHTS_ENV, default_weights_path

        args.rife = args.rife or default_weights_path()
        if args.rife is None:
            raise UsageError(f"--interpolate {args.interpolate} needs RIFE weights: pass --rife PATH/flownet.pkl "
                             f"(Practical-RIFE v4.25/v4.26) or set ${WEIGHTS_ENV}; allowed without weights: --interpolate 1")
        require_file("--rife", str(args.rife), "RIFE v4.25/v4.26 flownet.pkl")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise UsageError(f"--out {args.out}: folder {out_dir} does not exist")
    return width, height, sampler, guidance, steps, shift, switches


def _run(args: argparse.Namespace) -> int:
    preset = MODELS[args.model]
    width, height, sampler, guidance, steps, shift, switches = _plan(args, preset)

    import torch

    from streamgen.sampling.stream import StreamConfig, SessionState

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model, text_encoder, decoder, vae = build_components(preset, device, dtype, decoder=args.decoder,
                                                       checkpoint=args.checkpoint, vae=args.vae,
                                                       text_encoder=args.text_encoder,
                                                       offload_prefetch=args.offload, quant=args.quant)
    if args.compile:
        from streamgen.ops.compile import compile_blocks

        compile_blocks(model)
    negative = args.negative_prompt if args.negative_prompt is not None else (DEFAULT_NEGATIVE_PROMPT if not preset.builtin else "")
    interp = None
    if args.interpolate > 1:
        from streamgen.media.interpolate import Interpolator

        interp = Interpolator(load_rife_model(args.rife, device), args.interpolate)
    output = FrameOutput(interp)
    fps = args.fps * args.interpolate

    print(f"streamgen generate: {args.model} {width}x{height} {args.chunks} chunks, sampler {sampler} "
          f"{steps} steps shift {shift}" + (f" cfg {guidance}" if guidance != 1.0 else "") + f", {device} {str(dtype).replace('torch.', '')}"
          + (f", RIFE {args.interpolate}x" if interp is not None else ""), file=sys.stderr)
    t_start = time.perf_counter()
    total = 0
    with Mp4Writer(args.out, width, height, fps, crf=args.crf) as writer:
        if preset.mode == "full":
            total = _run_full(args, model, text_encoder, decoder, writer, output, width, height, sampler, steps, shift,
                              guidance, negative, device, dtype)
        else:
            cfg = StreamConfig(frames_per_chunk=args.frames_per_chunk, num_steps=steps, shift=shift, sampler=sampler,
                               guidance_scale=guidance, local_frames=args.local_frames, seed=args.seed)
            fpc = args.frames_per_chunk or model.cfg.frames_per_chunk
            image_latent = None
            if args.image is not None:
                with torch.no_grad():
                    img = read_image(args.image, width, height).to(device=device, dtype=next(vae.parameters()).dtype)
                    image_latent = vae.encode(img)
            try:
                session = SessionState(model, switches.pop(0, args.prompt), height=height, width=width, config=cfg,
                                        text_encoder=text_encoder, decoder=decoder,
                                        negative_prompt=negative if guidance != 1.0 else None, image=image_latent,
                                        total_frames=args.chunks * fpc + (1 if image_latent is not None else 0),
                                        device=device, dtype=dtype)
            except ValueError as e:  # e.g. --frames-per-chunk larger than the --local-frames window
                raise UsageError(str(e)) from e
            for i in range(args.chunks):
                if i in switches:
                    session.set_prompt(switches[i])
                t0 = time.perf_counter()
                chunk = session.next_chunk()
                frames = output(chunk.frames, cut=chunk.switched)  # includes the device sync
                dt = time.perf_counter() - t0
                writer.write(frames)
                total += len(frames)
                note = f"  [prompt: {switches[i][:40]!r}]" if chunk.switched else ""
                print(f"chunk {i + 1}/{args.chunks}: {len(frames)} frames in {dt:.2f} s ({len(frames) / dt:.1f} frames/s)"
                      f", {total} total{note}", file=sys.stderr)
    elapsed = time.perf_counter() - t_start
    print(f"wrote {args.out}: {total} frames {width}x{height} at {fps:g} fps "
          f"({total / fps:.2f} s of video) in {elapsed:.1f} s ({total / elapsed:.1f} frames/s)", file=sys.stderr)
    return 0


def _run_full(args, model, text_encoder, decoder, writer, output, width, height, sampler, steps, shift, guidance,
              negative, device, dtype) -> int:
    """Bidirectional checkpoints: sample all latent frames at once (CFG), decode chunk by chunk."""
    import torch

    from streamgen.sampling.samplers import guided, sample
    from streamgen.sampling.schedules import FlowSchedule

    fpc = args.frames_per_chunk or model.cfg.frames_per_chunk
    n_lat = args.chunks * fpc
    ctx = text_encoder.encode([args.prompt]).to(device=device, dtype=dtype)
    neg = text_encoder.encode([negative]).to(device=device, dtype=dtype) if guidance != 1.0 else None
    gen = torch.Generator(device=device).manual_seed(args.seed)
    noise = torch.randn((1, 16, n_lat, height // 8, width // 8), generator=gen, device=device, dtype=torch.float32)

    def cond(x, t):
        return model(x.to(dtype), t, ctx).float()

    def uncond(x, t):
        return model(x.to(dtype), t, neg).float()

    schedule = FlowSchedule.unipc(steps, shift) if sampler == "unipc" else FlowSchedule.euler(steps, shift)
    t0 = time.perf_counter()
    with torch.no_grad():
        x0 = sample(guided(cond, uncond if neg is not None else None, guidance), noise, schedule, sampler)
    print(f"sampled {n_lat} latent frames in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    state = decoder.new_state()
    total = 0
    for i in range(args.chunks):
        t0 = time.perf_counter()
        with torch.no_grad():
            frames = output(decoder.decode_chunk(x0[:, :, i * fpc:(i + 1) * fpc], state))
        dt = time.perf_counter() - t0
        writer.write(frames)
        total += len(frames)
        print(f"chunk {i + 1}/{args.chunks}: {len(frames)} frames decoded in {dt:.2f} s ({len(frames) / dt:.1f} frames/s)",
              file=sys.stderr)
    return total
