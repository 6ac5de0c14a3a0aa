"""Model name + options -> the shared pipeline, and the model/engine command-line options, once.

``MODELS`` is the model registry: what ``--model NAME`` means for `serve`, `generate` and the
benchmarks. ``add_model_arguments(parser)`` defines the options that choose and shape the pipeline
(weights, decoder, device, dtype, speed-ups, attention window, sampler); ``build_pipeline(args)``
turns them into a :class:`streamgen.engine.Pipeline` (model, text encoder, decoder, VAE, RIFE,
device, dtype) and ``engine_settings(args)`` into the engine's per-stream settings. A bad
combination raises :class:`UsageError` with one line naming the option and what is allowed.

    pipe = build_pipeline(Namespace(model="tiny", ...))       # or build(MODELS["tiny"], device=...)
    engine = Engine(pipe, engine_settings(args))

Built-in models need no weight files: ``toy`` (the default: streamgen/weights/toy.safetensors,
trained on procedural captioned clips, real time on a 2-core CPU), ``tiny`` (random weights with a
fixed seed: exercises every path on a CPU in seconds, streams noise; for tests), ``shapes``
(streamgen/weights/shapes.safetensors, an older undertrained model). The
others load ``--checkpoint`` (DiT), ``--vae`` (Wan2.1_VAE.pth or taew2_1.pth for ``--decoder
taehv``) and ``--text-encoder`` (umT5-XXL).
"""

from __future__ import annotations

import argparse
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from streamgen.engine.core import EngineSettings, Pipeline

log = logging.getLogger(__name__)

DEFAULT_MODEL = "toy"


@dataclass(frozen=True)
class WeightSource:
    """Where a preset's weights file comes from: the hub reference an option defaults to
    (streamgen.hub) and the repo files it needs (globs; what `streamgen download` fetches)."""

    option: str  # "checkpoint" | "vae" | "text_encoder" | "rife"
    ref: str
    patterns: tuple[str, ...]

    @property
    def flag(self) -> str:
        return "--" + self.option.replace("_", "-")


_WAN13, _WAN14 = "Wan-AI/Wan2.1-T2V-1.3B", "Wan-AI/Wan2.1-T2V-14B"
_LIGHTX2V = "lightx2v/Wan2.1-Distill-Models"  # single-file distilled DiTs (BF16, scaled FP8, INT8)
_UMT5 = ("models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/*")


def _wan_files(repo: str, dit: WeightSource | None = None) -> tuple[WeightSource, ...]:
    """Wan2.1's VAE and umT5 text encoder from ``repo``, and the DiT (default: the repo's own)."""
    dit = dit or WeightSource("checkpoint", repo, ("diffusion_pytorch_model*.safetensors*", "config.json"))
    return (dit, WeightSource("vae", f"{repo}:Wan2.1_VAE.pth", ("Wan2.1_VAE.pth",)),
            WeightSource("text_encoder", f"{repo}:models_t5_umt5-xxl-enc-bf16.pth", _UMT5))


# Practical-RIFE v4.26 (MIT) as its author publishes it: a release zip holding flownet.pkl
RIFE_SOURCE = WeightSource("rife", "hzwer/RIFE:RIFEv4.26_0921.zip", ("RIFEv4.26_0921.zip",))


@dataclass(frozen=True)
class ModelPreset:
    """What ``--model NAME`` means.

    wan: WanConfig preset of the DiT; mode: "stream" (block-causal chunk loop) or "full"
    (bidirectional whole clip, `generate` only); sampler / steps / shift / guidance: sampling
    defaults; width / height: default size; max_pixels: largest width*height a stream may ask for;
    local_frames / sink_frames: attention window of a stream (None: no window, the cache grows with
    the stream); decoder: "wan" | "taehv"; builtin: runs without weight files; weights: the shipped
    file of a trained built-in model (streamgen/weights/NAME.safetensors), None for random weights.
    """

    wan: str
    mode: str
    sampler: str
    steps: int
    shift: float
    guidance: float
    width: int
    height: int
    max_pixels: int = 1280 * 720
    local_frames: int | None = 12
    sink_frames: int = 3
    decoder: str = "wan"
    builtin: bool = False
    weights: str | None = None
    fps: int = 16
    files: tuple[WeightSource, ...] = ()  # defaults of --checkpoint/--vae/--text-encoder (hub references)


MODELS: dict[str, ModelPreset] = {
    # the built-in default (streamgen/weights/README.md): trained on procedural captioned clips (coloured
    # shapes moving over plain or gradient backgrounds); follows colour, background and motion in real time
    # on a 2-core CPU
    "toy": ModelPreset("toy", "stream", "self-forcing", 4, 5.0, 1.0, 128, 128, max_pixels=256 * 256,
                       decoder="taehv", builtin=True, weights="toy"),
    # random weights with a fixed seed: every path on a CPU in seconds (tests); streams noise
    "tiny": ModelPreset("tiny", "stream", "self-forcing", 4, 5.0, 1.0, 128, 128, max_pixels=512 * 512,
                        decoder="taehv", builtin=True),
    # the tiny model sampled bidirectionally (UniPC + CFG over the whole clip): the non-distilled path
    "tiny-full": ModelPreset("tiny", "full", "unipc", 8, 5.0, 3.0, 128, 128, max_pixels=512 * 512,
                             local_frames=None, sink_frames=0, decoder="taehv", builtin=True),
    # trained built-in model (streamgen/weights/README.md): a coloured shape moving on a plain background
    "shapes": ModelPreset("shapes", "stream", "self-forcing", 4, 5.0, 1.0, 128, 128, max_pixels=512 * 512,
                          builtin=True, weights="shapes"),
    # Self-Forcing's distilled block-causal DiT on Wan2.1 1.3B's VAE and text encoder
    "self-forcing-1.3b": ModelPreset("wan2.1-t2v-1.3b", "stream", "self-forcing", 4, 5.0, 1.0, 832, 480,
                                     files=_wan_files(_WAN13, WeightSource(
                                         "checkpoint", "gdhe17/Self-Forcing:checkpoints/self_forcing_dmd.pt",
                                         ("checkpoints/self_forcing_dmd.pt",)))),
    "wan2.1-t2v-1.3b": ModelPreset("wan2.1-t2v-1.3b", "full", "unipc", 50, 5.0, 5.0, 832, 480,
                                   local_frames=None, sink_frames=0, files=_wan_files(_WAN13)),
    "wan2.1-t2v-14b": ModelPreset("wan2.1-t2v-14b", "full", "unipc", 50, 5.0, 5.0, 832, 480,
                                  local_frames=None, sink_frames=0, files=_wan_files(_WAN14)),
    # LightX2V's 4-step distilled Wan2.1 T2V 14B: bidirectional, no CFG, the re-noising few-step loop at shift 5
    # (its configs/distill/wan_t2v_distill_4step_cfg.json); the BF16 file of lightx2v/Wan2.1-Distill-Models (its
    # scaled_fp8_e4m3 / int8 files load with --checkpoint), VAE and umT5 of Wan2.1 14B
    "lightx2v-t2v-14b": ModelPreset("wan2.1-t2v-14b", "full", "self-forcing", 4, 5.0, 1.0, 832, 480,
                                    local_frames=None, sink_frames=0, files=_wan_files(_WAN14, WeightSource(
                                        "checkpoint", f"{_LIGHTX2V}:wan2.1_t2v_14b_lightx2v_4step.safetensors",
                                        ("wan2.1_t2v_14b_lightx2v_4step.safetensors",)))),
}
STREAM_MODELS = tuple(n for n, p in MODELS.items() if p.mode == "stream")
SAMPLER_CHOICES = ("self-forcing", "euler", "unipc")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}  # same on every command
DEFAULT_NEGATIVE_PROMPT = (  # Wan2.1's default negative prompt
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)


class UsageError(Exception):
    """A bad option or combination; the CLI prints it as one line and exits with status 2."""


# -- option types ---------------------------------------------------------------------------------


def size16(text: str) -> int:
    """argparse type: a positive multiple of 16 (latent = size/8, DiT patch 2)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; use a positive multiple of 16 (e.g. 256, 480, 832)")
    if v <= 0 or v % 16:
        lo = v // 16 * 16
        near = f"{lo} or {lo + 16}" if lo >= 16 else "16"
        raise argparse.ArgumentTypeError(
            f"{v} is not a positive multiple of 16 (the latent is size/8 and the DiT patch is 2); "
            f"allowed: 16, 32, ..., e.g. {near}")
    return v


def dtype_name(text: str) -> str:
    """argparse type of --dtype: a name of ``DTYPES`` or its short form (fp32, bf16, fp16)."""
    name = DTYPE_ALIASES.get(text.lower(), text.lower())
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a dtype; allowed: auto, float32 (fp32), bfloat16 (bf16), float16 (fp16)")
    return name


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {lo}")
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} must be >= {lo}")
        return v

    return parse


positive = _int_at_least(1)  # argparse type: an integer >= 1
non_negative = _int_at_least(0)  # argparse type: an integer >= 0


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0")
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{v} must be > 0")
    return v


def model_type(models: tuple[str, ...]):
    """argparse type of --model: a preset name, or the hub repo (ORG/NAME) a preset's DiT comes from."""
    from streamgen.hub import parse

    by_repo = {parse(src.ref).repo: name for name in models if name in MODELS
               for src in MODELS[name].files if src.option == "checkpoint"}

    def model(text: str) -> str:
        if text in models:
            return text
        if text in by_repo:
            return by_repo[text]
        if os.path.isdir(os.path.expanduser(text)) and any(MODELS[n].files for n in models if n in MODELS):
            return text  # a local copy of a preset's repo (check_options finds which)
        if os.path.isfile(os.path.expanduser(text)):
            raise argparse.ArgumentTypeError(f"{text!r} is a file; --model takes a preset, its hub repo or a folder "
                                             "holding a copy of that repo (a weights file goes to --checkpoint)")
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a model; allowed: {', '.join(models)}"
            + (f", or a preset's hub repo: {', '.join(sorted(by_repo))}" if by_repo else "")
            + ", or a folder holding a copy of one")

    return model


def add_model_arguments(p: argparse.ArgumentParser, *, models: tuple[str, ...] = tuple(MODELS)) -> None:
    """The options that choose and shape the pipeline, shared by `serve`, `generate` and the benchmarks."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, type=model_type(models), metavar="NAME",
                   help=f"model preset: {', '.join(models)}, or the hub repo of a preset's DiT, e.g. "
                        f"gdhe17/Self-Forcing (default: {DEFAULT_MODEL}, built in)")
    hub = " (or a hub reference ORG/NAME[@REV][:FILE] in the local Hugging Face cache)"
    g.add_argument("--checkpoint", help="DiT weights: a file or a checkpoint folder" + hub + "; not for built-in models")
    g.add_argument("--vae", help="decoder weights: Wan2.1_VAE.pth / diffusers AutoencoderKLWan folder, or taew2_1.pth"
                   + hub)
    g.add_argument("--text-encoder", help="umT5-XXL: HF folder or models_t5_umt5-xxl-enc-bf16.pth" + hub)
    g.add_argument("--decoder", choices=("wan", "taehv"), default=None, help="video decoder (default: per model)")
    g.add_argument("--rife", default="auto", metavar="PATH",
                   help="RIFE v4.25/v4.26 flownet.pkl (or a .zip holding it, or a hub reference) for interpolation "
                        "('auto': $STREAMGEN_RIFE_WEIGHTS, weights/rife-v4.26/flownet.pkl, or hzwer/RIFE's "
                        "v4.26 zip in the Hugging Face cache; 'none': no interpolation)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--dtype", type=dtype_name, default="auto",
                   help="model dtype: auto, float32/fp32, bfloat16/bf16, float16/fp16 (default: bfloat16 on cuda, "
                        "float32 on cpu)")
    g.add_argument("--decoder-dtype", type=dtype_name, default="auto",
                   help="decoder dtype: auto, float32/fp32, bfloat16/bf16, float16/fp16 (default: the model's, except "
                        "on a CPU with native bfloat16 (AVX512-BF16 or AMX), where a float32 model's decoder runs in "
                        "bfloat16: 2.6x faster for the toy's decoder, 53.7 dB from float32)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT blocks (static shapes; ~1.5x on an H100, falls back to eager)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay each session's whole chunk step (4 steps + cache pass) as CUDA graphs (streamgen.ops."
                        "graphs; +7%% on top of --compile on an H200; eager with one log line where it cannot apply)")
    g.add_argument("--quant", choices=("fp8", "int8-weight"), default=None,
                   help="quantize the DiT blocks' linear layers (fp8: 1.1x on 14B, half the weight memory)")
    g.add_argument("--attention", choices=("auto", "sdpa", "fp8"), default="auto",
                   help="attention kernels: auto (flash-attn-4 over long key sets where installed, else PyTorch "
                        "SDPA), sdpa, or fp8 (the self-attention over the cache on fp8 tensor cores, streamgen.ops."
                        "fp8_attention; CUDA with Triton, else auto with one log line)")
    g.add_argument("--offload", type=non_negative, default=None, metavar="PREFETCH",
                   help="keep the DiT blocks in pinned host memory and stream them onto the GPU PREFETCH "
                        "blocks ahead (1 is enough for 1.3B; 14B in ~16 GiB)")
    s = p.add_argument_group("sampling")
    s.add_argument("--frames-per-chunk", type=positive, default=None, help="latent frames per chunk (default: model's)")
    s.add_argument("--local-frames", type=non_negative, default=None,
                   help="attention window in latent frames, sink included (default: model's, 12 for streaming "
                        "models; 0: no window, the KV cache grows with the stream, ~290 MB per latent frame for "
                        "1.3B at 832x480 bf16, so every stream needs a chunk count)")
    s.add_argument("--sink-frames", type=non_negative, default=None, help="latent frames kept at the window's front")
    s.add_argument("--steps", type=positive, default=None, help="denoising steps (default: per model)")
    s.add_argument("--shift", type=positive_float, default=None, help="sigma shift (default: per model)")
    s.add_argument("--sampler", choices=SAMPLER_CHOICES, default=None, help="default: per model")
    s.add_argument("--guidance", type=float, default=None, help="CFG scale for euler/unipc (default: per model)")
    s.add_argument("--negative-prompt", default=None, help="negative prompt for CFG (default: Wan's)")


# -- device, files --------------------------------------------------------------------------------


def pick_device(name: str, flag: str = "--device") -> "torch.device":
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {name}: not a device; allowed: auto, cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {name}: allowed: auto, cpu, cuda, cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {name}: no CUDA device is available; allowed here: auto, cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def pick_dtype(name: str, device: "torch.device", flag: str = "--dtype") -> "torch.dtype":
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise UsageError(f"{flag} {name}: allowed: {', '.join(DTYPES)}")
    return getattr(torch, name)


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 dot products natively (AVX512-BF16 or AMX tiles), so that
    oneDNN's bfloat16 convolutions beat float32 ones (on the 2-core CI machine: 2.6x for the toy's
    decoder, 3.6x for the shapes model's Wan VAE). False where torch cannot tell."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(bool(f()) for f in probes if f is not None)
    except RuntimeError:
        return False


def pick_decoder_dtype(name: str, device: "torch.device", model_dtype: "torch.dtype",
                       flag: str = "--decoder-dtype") -> "torch.dtype":
    """The decoder's dtype: ``auto`` is the model's, except that a float32 model on a CPU with
    native bfloat16 gets a bfloat16 decoder (a CPU without it keeps float32, said in one log line)."""
    import torch

    if name != "auto":
        return pick_dtype(name, device, flag)
    if device.type != "cpu" or model_dtype != torch.float32:
        return model_dtype
    if cpu_native_bf16():
        return torch.bfloat16
    log.info("decoder: float32 (this CPU has no native bfloat16, AVX512-BF16 or AMX; bfloat16 would be slower)")
    return torch.float32


def require_file(flag: str, path: str | None, what: str) -> str:
    if path is None:
        raise UsageError(f"{flag} is required for this model ({what})")
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file or directory ({what})")
    return path


def check_output(flag: str, path: str, suffixes: tuple[str, ...] = (".mp4",)) -> str:
    """An output file path that can be written: one of ``suffixes`` (none: any name), in a folder that exists."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; give a file name")
    if suffixes and not path.lower().endswith(suffixes):
        raise UsageError(f"{flag} {path}: the file must end in {' or '.join(suffixes)} (H.264 in MP4)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: folder {folder} does not exist")
    return path


def rife_path(spec: str | None, *, required: bool) -> str | None:
    """--rife: 'none', 'auto' (the default search path) or a path. Returns the weights path or None
    (none found and not ``required``)."""
    from streamgen.media.interpolate import RIFE_DOWNLOAD, WEIGHTS_ENV, default_weights_path

    if spec == "none":
        if required:
            raise UsageError("--rife none: interpolation needs RIFE weights; pass --rife PATH/flownet.pkl")
        return None
    from streamgen.hub import resolve

    path = default_weights_path() if spec in (None, "auto") else resolve("--rife", spec)
    if path is None:
        if required:
            raise UsageError(f"interpolation needs RIFE weights: pass --rife PATH/flownet.pkl (Practical-RIFE "
                             f"v4.25/v4.26) or set ${WEIGHTS_ENV}, or fetch them once with: {RIFE_DOWNLOAD}")
        log.info("RIFE weights not found (set --rife PATH or $%s): interpolation is off", WEIGHTS_ENV)
        return None
    path = require_file("--rife", str(path), "RIFE v4.25/v4.26 flownet.pkl")
    log.info("RIFE weights: %s", path)
    return path


def load_rife_model(path: str, device: "torch.device", dtype: "torch.dtype | None" = None, flag: str = "--rife"):
    """RIFE for interpolation: ``dtype`` (default fp16 on CUDA, fp32 on the CPU), channels_last on CUDA."""
    import torch

    from streamgen.models.checkpoints import CheckpointError
    from streamgen.models.rife import load_rife

    try:
        model = load_rife(path, device=device, dtype=dtype or (torch.float16 if device.type == "cuda" else torch.float32))
    except (CheckpointError, FileNotFoundError) as e:
        raise UsageError(f"{flag}: {e}") from None
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


# -- building ---------------------------------------------------------------------------------------


def _repo_files(root: str) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/") for n in names]
    return out


def local_model(folder: str) -> tuple[str, dict[str, str]]:
    """A folder holding a copy of a preset's hub repo (e.g. ``hf download REPO --local-dir DIR``) ->
    (the preset, {option: path in the folder} for the preset's files found there). The preset is
    the one whose DiT files are all there; presets that share a file layout (Wan2.1 1.3B / 14B) are
    told apart by the folder's config.json ``dim``. Raises UsageError naming --model otherwise."""
    import fnmatch
    import json

    from streamgen.hub import parse
    from streamgen.models.wan import WanConfig

    root = os.path.expanduser(folder)
    files = _repo_files(root)

    def found(pattern: str) -> bool:
        return any(fnmatch.fnmatch(f, pattern) for f in files)

    dim = None
    if os.path.isfile(os.path.join(root, "config.json")):
        try:
            with open(os.path.join(root, "config.json")) as f:
                dim = json.load(f).get("dim")
        except (OSError, ValueError, AttributeError):
            dim = None
    hits = []
    for name, preset in MODELS.items():
        ckpt = next((src for src in preset.files if src.option == "checkpoint"), None)
        if ckpt is None or not all(found(pt) for pt in ckpt.patterns):
            continue
        if dim is not None and parse(ckpt.ref).file is None and WanConfig.preset(preset.wan).dim != dim:
            continue  # a diffusers-layout folder of the other size
        hits.append((parse(ckpt.ref).file is None, name))  # a named file is the stronger evidence
    hits.sort()
    if not hits:
        wanted = sorted({pt for p in MODELS.values() for src in p.files if src.option == "checkpoint" for pt in src.patterns})
        raise UsageError(f"--model {folder}: no preset's DiT files in this folder (looked for {', '.join(wanted)}); "
                         "a folder for --model is a copy of a preset's hub repo, e.g. "
                         "`hf download Wan-AI/Wan2.1-T2V-1.3B --local-dir DIR`")
    if len(hits) > 1 and hits[0][0] == hits[1][0]:
        raise UsageError(f"--model {folder}: its files fit presets {', '.join(n for _, n in hits)}; "
                         f"name one with --model and pass the folder to --checkpoint")
    name = hits[0][1]
    paths = {}
    for src in MODELS[name].files:
        ref = parse(src.ref)
        if ref.file is None:
            paths[src.option] = root
        elif os.path.isfile(os.path.join(root, ref.file)):
            paths[src.option] = os.path.join(root, ref.file)
    return name, paths


def check_options(args: argparse.Namespace) -> ModelPreset:
    """Validate the model options (no weights are read); returns the preset. A ``--model`` folder
    (a local copy of a preset's repo, see ``local_model``) becomes that preset, its files the
    defaults of the options not given."""
    from streamgen.hub import resolve

    if args.model not in MODELS:
        args.model, local = local_model(args.model)
        for option, path in local.items():
            if getattr(args, option, None) is None:
                setattr(args, option, path)
    preset = MODELS[args.model]
    decoder = args.decoder or preset.decoder
    if not preset.builtin:  # each takes a path or a hub reference ORG/NAME[@REV][:FILE] (streamgen.hub)
        defaults = {src.option: src.ref for src in preset.files}  # the preset's own files, from the hub cache
        if decoder != "wan":  # the presets name the Wan VAE; a TAEHV decoder's weights are the user's
            defaults.pop("vae", None)
        for option, what in (("checkpoint", f"DiT weights for {args.model}; built in: "
                                            f"{', '.join(n for n, p in MODELS.items() if p.builtin)}"),
                             ("vae", f"{decoder} decoder weights"), ("text_encoder", "umT5-XXL encoder")):
            flag, given = "--" + option.replace("_", "-"), getattr(args, option)
            hint = f"streamgen download {args.model} (or pass {flag} PATH)" if given is None else None
            setattr(args, option, resolve(flag, given or defaults.get(option), hint=hint))
            require_file(flag, getattr(args, option), what)
        _require_modules("--text-encoder", ("transformers", "sentencepiece"), "the umT5-XXL encoder and its tokenizer")
    else:
        given = [f for f, v in (("--checkpoint", args.checkpoint), ("--vae", args.vae),
                                ("--text-encoder", args.text_encoder)) if v is not None]
        if given:
            raise UsageError(f"{given[0]}: --model {args.model} is built in and loads no weight files; models that "
                             f"take {given[0]}: {', '.join(n for n, p in MODELS.items() if not p.builtin)}")
    if preset.builtin and preset.weights is not None and decoder != preset.decoder:
        raise UsageError(f"--decoder {decoder}: the built-in {args.model!r} model ships its own "
                         f"{preset.decoder} decoder only (allowed: {preset.decoder})")
    if args.offload is not None and args.compile:
        raise UsageError("--offload and --compile cannot be combined (offload hooks every block call); pick one")
    if args.offload is not None and args.cuda_graphs:
        raise UsageError("--offload and --cuda-graphs cannot be combined (weights move between replays); pick one")
    sampler = args.sampler or preset.sampler
    if sampler == "self-forcing" and args.guidance not in (None, 1.0):
        raise UsageError("--guidance applies to --sampler euler/unipc; the distilled self-forcing sampler runs without CFG")
    return preset


def build_pipeline(args: argparse.Namespace, *, rife_required: bool = False) -> "Pipeline":
    """The pipeline named by the model options in ``args`` (see add_model_arguments)."""
    preset = check_options(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    rife = rife_path(args.rife, required=rife_required)
    decoder_dtype = pick_decoder_dtype(args.decoder_dtype, device, dtype)
    return build(preset, device=device, dtype=dtype, decoder=args.decoder, checkpoint=args.checkpoint,
                 vae=args.vae, text_encoder=args.text_encoder, offload=args.offload, quant=args.quant,
                 compile=args.compile, rife=rife, cuda_graphs=args.cuda_graphs, decoder_dtype=decoder_dtype,
                 attention=args.attention)


def build(preset: ModelPreset | str, *, device=None, dtype=None, decoder: str | None = None,
          checkpoint: str | None = None, vae: str | None = None, text_encoder: str | None = None,
          offload: int | None = None, quant: str | None = None, compile: bool = False,
          rife: str | None = None, cuda_graphs: bool = False, decoder_dtype="auto",
          attention: str = "auto") -> "Pipeline":
    """The pipeline of ``preset`` on ``device`` / ``dtype`` (defaults: CPU, float32).

    offload: None keeps the DiT resident; N >= 0 loads it into host memory and streams its blocks
    onto ``device`` N blocks ahead of use (streamgen.ops.offload). quant: None, "fp8" or
    "int8-weight" (streamgen.ops.quant, before any offload). rife: flownet.pkl path or None.
    decoder_dtype: a torch dtype, or "auto" (``pick_decoder_dtype``: the model's, bfloat16 for a
    float32 model on a CPU with native bfloat16). attention: a backend of ``ops.attention.use_backend``."""
    import torch

    from streamgen.engine.core import Pipeline
    from streamgen.models import wan
    from streamgen.models.text import load_text_encoder
    from streamgen.ops.attention import use_backend

    preset = MODELS[preset] if isinstance(preset, str) else preset
    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    decoder = decoder or preset.decoder
    if preset.weights == "toy":
        from streamgen.models.text import PromptCache
        from streamgen.weights import load_toy

        model, toy_text, dec = load_toy(device=device, dtype=torch.float32)
        text, vae_model = PromptCache(toy_text), None
    elif preset.builtin:
        if preset.weights is not None:
            from streamgen.weights import load_builtin

            model, dec, _ = load_builtin(preset.weights)
            vae_model, cfg = dec, model.cfg
        else:
            cfg = wan.WanConfig.preset(preset.wan)
            with torch.random.fork_rng(devices=[]):  # fixed random weights; the caller's global RNG is left alone
                torch.manual_seed(0)
                model = wan.WanModel(cfg)
                dec, vae_model = _tiny_decoder(decoder)
        text = load_text_encoder(None, dim=cfg.text_dim, device=device, dtype=torch.float32)
    else:
        from streamgen.models.checkpoints import load_wan_model

        with _reading("--checkpoint"):
            model = load_wan_model(checkpoint, None, device=device if offload is None else torch.device("cpu"),
                                   dtype=dtype)
        with _reading("--text-encoder"):
            text = load_text_encoder(text_encoder, dim=model.cfg.text_dim, device=device, dtype=dtype)
        with _reading("--vae"):
            dec, vae_model = _load_decoder(decoder, vae, device, dtype)
    if quant is not None:
        from streamgen.ops.quant import quantize

        model = quantize(model.to(dtype=dtype), quant)
    if offload is None:
        model = model.to(device=device, dtype=dtype)
    else:
        from streamgen.ops.offload import offload as offload_blocks

        model = model.to(dtype=dtype)
        offload_blocks(model, device=device, prefetch=offload)  # the handle lives on in the blocks' hooks
    model = use_backend(model.eval().requires_grad_(False), attention)
    if device.type == "cuda":  # the FFN's GELU in its first GEMM's epilogue, where the probe passes (ops.fused)
        from streamgen.ops.fused import fuse_ffn_gelu

        fuse_ffn_gelu(model)
    compiled = False
    if compile:
        from streamgen.ops.compile import compile_blocks

        compiled = compile_blocks(model)
    graphs = None
    if cuda_graphs:
        from streamgen.ops.graphs import ChunkGraphs

        graphs = ChunkGraphs(model)  # sessions are attached by the engine; falls back to eager with one log line
    if decoder_dtype == "auto":
        decoder_dtype = pick_decoder_dtype("auto", device, dtype)
    dec = dec.to(device=device, dtype=decoder_dtype).eval().requires_grad_(False)
    rife_model = load_rife_model(rife, device) if rife is not None else None
    log.info("pipeline: %s on %s %s, decoder %s %s, RIFE %s", preset.wan, device, str(dtype).replace("torch.", ""),
             decoder, str(decoder_dtype).replace("torch.", ""), "on" if rife_model is not None else "off")
    return Pipeline(model=model, text_encoder=text, decoder=dec, vae=vae_model, rife=rife_model, fps=preset.fps,
                    device=device, dtype=dtype, preset=preset, graphs=graphs, compiled=compiled)


def _require_modules(flag: str, modules: tuple[str, ...], what: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"{flag}: reading {what} needs {', '.join(missing)}, which is not installed: "
                         "pip install 'streamgen[wan]' (from a checkout: pip install -e '.[wan]')")


@contextmanager
def _reading(flag: str):
    """A weights file that cannot be read becomes a UsageError naming the option (and, through the
    CheckpointError's message, the file and what is wrong with it)."""
    from streamgen.models.checkpoints import CheckpointError

    try:
        yield
    except (CheckpointError, FileNotFoundError) as e:
        raise UsageError(f"{flag}: {e}") from None


def engine_settings(args: argparse.Namespace, preset: ModelPreset, **kw) -> "EngineSettings":
    """The engine's stream settings from the sampling options (``kw`` overrides, e.g. max_ahead)."""
    from streamgen.engine.core import EngineSettings

    local = preset.local_frames if args.local_frames is None else (args.local_frames or None)
    sink = (min(preset.sink_frames, local - 1) if args.sink_frames is None else args.sink_frames) if local else 0
    if local and sink >= local:
        raise UsageError(f"--sink-frames {sink}: must be < --local-frames {local} (the sink is part of the window)")
    sampler = args.sampler or preset.sampler
    guidance = args.guidance if args.guidance is not None else (preset.guidance if sampler != "self-forcing" else 1.0)
    steps = args.steps or (preset.steps if sampler == preset.sampler else (4 if sampler == "self-forcing" else 30))
    negative = args.negative_prompt
    if guidance != 1.0 and negative is None:
        negative = "" if preset.builtin else DEFAULT_NEGATIVE_PROMPT
    settings = EngineSettings(local_frames=local, sink_frames=sink, frames_per_chunk=args.frames_per_chunk,
                              num_steps=steps, shift=args.shift or preset.shift, sampler=sampler,
                              guidance=guidance, negative_prompt=negative if guidance != 1.0 else None)
    return replace(settings, **kw)


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


def _load_decoder(kind: str, path: str, device, dtype):
    if kind == "taehv":
        from streamgen.models.taehv import TAEHVConfig, load_taehv

        return load_taehv(path, TAEHVConfig.preset("taew2.1"), device=device, dtype=dtype), None
    from streamgen.models.wan_vae import WanVAEConfig, load_wan_vae

    vae = load_wan_vae(path, WanVAEConfig.preset("wan2.1"), device=device, dtype=dtype)
    return vae, vae
