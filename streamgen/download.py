"""`streamgen download PRESET`: fetch the weights a model preset names into the local Hugging Face cache.

    streamgen download self-forcing-1.3b      # the DiT, VAE and umT5 files of the preset, and RIFE
    streamgen download rife                   # Practical-RIFE v4.26 only

Each preset lists its files (``pipeline.ModelPreset.files``: repo, revision, file patterns); they go
into the standard cache (``streamgen.hub.cache_dir()``) through ``huggingface_hub.snapshot_download``,
with its progress bars, so that the preset's default hub references resolve afterwards, offline.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from streamgen.pipeline import MODELS

    names = [n for n, m in MODELS.items() if m.files] + ["rife"]
    p.add_argument("preset", choices=names, help="model preset whose weights to fetch, or 'rife'")
    p.add_argument("--no-rife", action="store_true", help="skip the RIFE weights (fetched with every preset)")


def sources(name: str, *, rife: bool = True):
    from streamgen.pipeline import MODELS, RIFE_SOURCE

    files = () if name == "rife" else MODELS[name].files
    return files + ((RIFE_SOURCE,) if rife or name == "rife" else ())


def run(args: argparse.Namespace) -> int:
    from streamgen import hub
    from streamgen.pipeline import UsageError

    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError("download needs huggingface_hub: pip install huggingface_hub") from None
    cache = hub.cache_dir()
    for src in sources(args.preset, rife=not args.no_rife):
        ref = hub.parse(src.ref)
        todo = hub.missing_files(ref, src.patterns)
        if not todo:
            print(f"{src.flag.lstrip('-')}: {ref.repo} {' '.join(src.patterns)} already in {cache}", file=sys.stderr)
            continue
        print(f"{src.flag.lstrip('-')}: {ref.repo} {' '.join(todo)} -> {cache}", file=sys.stderr)
        try:
            snapshot_download(ref.repo, revision=ref.revision, allow_patterns=list(todo), cache_dir=cache)
        except Exception as e:  # noqa: BLE001 - network, auth and offline-mode errors of huggingface_hub
            print(f"streamgen download: error: {ref.repo}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                  f" (HF_HUB_OFFLINE=1 forbids downloads; gated repos need `hf auth login`)", file=sys.stderr)
            return 1
        left = hub.missing_files(ref, src.patterns)
        if left:
            print(f"streamgen download: error: {ref.repo} has no file matching {', '.join(left)}", file=sys.stderr)
            return 1
    print(f"ready: {args.preset} (hub cache {cache})")
    return 0


def status(name: str) -> str:
    """One word or line for `streamgen info`: built in / ready / what is missing."""
    from streamgen import hub
    from streamgen.pipeline import MODELS

    if name != "rife" and MODELS[name].builtin:
        return "built in"
    missing = [f"{s.ref.split(':')[0]} {p}" for s in sources(name, rife=name == "rife")
               for p in hub.missing_files(hub.parse(s.ref), s.patterns)]
    return "ready" if not missing else f"missing {len(missing)} file(s): streamgen download {name}"
