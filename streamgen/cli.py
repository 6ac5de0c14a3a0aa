"""`streamgen` command line: one subcommand per module.

Each subcommand lives in the module named in ``COMMANDS``; the module defines
``add_arguments(parser)`` and ``run(args) -> int`` and keeps heavy imports (torch, av)
inside ``run`` so that ``streamgen --help`` stays fast.

Exit status: 0 done; 2 the command line cannot work (a bad option value or combination, a missing,
unreadable or corrupt input or weights file, an output path that cannot be written, a port that is
taken); 1 a failure at run time after the inputs were accepted (the server is down or refuses the
stream, generation fails); 130 Ctrl-C. A status-2 error is one line on stderr,
``streamgen COMMAND: error: ...``, naming the option or file, what is wrong and what is allowed;
a run raises :class:`streamgen.pipeline.UsageError` for it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("streamgen.cli", "version, torch, device, attention backends / kernels, which presets are ready; "
                              "--plan: what stays on the GPU within --gpu-memory-gb"),
    "generate": ("streamgen.generate", "generate a video chunk by chunk into an MP4 file"),
    "interpolate": ("streamgen.media.interpolate", "RIFE frame interpolation of a video file"),
    "serve": ("streamgen.server.serve", "run the streaming server (WebSocket + browser player)"),
    "watch": ("streamgen.client", "record a stream from a server to a file"),
    "download": ("streamgen.download", "fetch a model preset's weights into the local Hugging Face cache"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:  # `info`: only the memory plan's options
    from streamgen.plan import add_plan_arguments

    add_plan_arguments(p)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "plan", False):
        from streamgen.plan import run_plan

        return run_plan(args)
    import platform

    import torch

    from streamgen import __version__
    from streamgen.ops.attention import detect

    d = detect()
    rows = [
        ("streamgen", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("cuda", torch.version.cuda or "none"),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            rows.append((f"device {i}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}"))
    else:
        rows.append(("device", "cpu (no CUDA device)"))
    rows.append(("sdpa backends", ", ".join(d.sdpa_backends)))
    rows.append(("flash-attn", f"{d.flash_attn} ({d.flash_attn_version})" if d.flash_attn else "not installed (SDPA used)"))
    fp8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
    rows.append(("fp8 matmul", "available" if fp8 else "not available"))
    from streamgen.ops import fp8_attention, fused

    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    why = fp8_attention.why_unavailable("cuda" if cap else "cpu", cap)
    rows.append(("fp8 attention", "available (--attention fp8)" if why is None else f"not available: {why}"))
    why = fused.probe("cuda", torch.bfloat16) if cap else "CUDA only"
    rows.append(("FFN GELU epilogue", "on (bf16/fp16 on CUDA)" if why is None else f"off: {why}"))
    rows.append(("torch.compile", "available" if hasattr(torch, "compile") else "not available"))
    for mod in ("av", "aiohttp", "websockets", "msgpack", "safetensors", "huggingface_hub", "prometheus_client"):
        try:
            m = importlib.import_module(mod)
            rows.append((mod, getattr(m, "__version__", None) or _dist_version(mod)))
        except ImportError:
            rows.append((mod, "MISSING"))
    from streamgen import hub
    from streamgen.download import status
    from streamgen.media.interpolate import default_weights_path
    from streamgen.pipeline import MODELS

    rows.append(("hub cache", str(hub.cache_dir())))
    for name in MODELS:
        rows.append((f"model {name}", status(name)))
    rife = default_weights_path()
    rows.append(("rife", str(rife) if rife else status("rife")))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "installed"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage block is left to --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="streamgen", description="Streaming video generation engine")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _parser=p)
    return parser


# `serve` on the CPU: libgomp's spin between parallel regions (default 300000 pauses, ~6 ms) cut to ~0.2 ms.
# The busy thread's small ops follow each other within microseconds, so they still find their workers
# awake, and a worker whose partner was preempted (a browser on the same cores) gives its core back sooner.
# On two cores with Chromium beside the server: 8 stalls in 72 prompt changes, against 31 in 96 at the
# default spin (bench/BENCHMARKS.md, "the busy thread owns the CPU's threads").
SERVE_ENV = {"GOMP_SPINCOUNT": "10000"}


def command_env(argv: list[str], environ, loaded: bool) -> dict[str, str]:
    """The environment settings ``main`` adds for this command line: SERVE_ENV for `serve`, each only
    where the user has not set it, and none once torch is ``loaded`` (libgomp reads them as it loads)."""
    command = next((a for a in argv if not a.startswith("-")), None)  # the global options take no values
    if loaded or command != "serve":
        return {}
    return {k: v for k, v in SERVE_ENV.items() if k not in environ}


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.update(command_env(sys.argv[1:] if argv is None else argv, os.environ, "torch" in sys.modules))
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the subcommand they were given to: `streamgen serve: error: ...`
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    quiet = getattr(args, "quiet", False) and not args.verbose
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from streamgen.pipeline import UsageError

    try:
        return int(args._run(args) or 0)
    except UsageError as e:
        print(f"streamgen {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
