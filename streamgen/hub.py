"""Hugging Face Hub references in weight options, resolved from the local hub cache without network.

``--checkpoint``, ``--vae``, ``--text-encoder`` and ``--rife`` take a local path, or a hub reference::

    ORG/NAME                  the snapshot folder of the repo's main branch
    ORG/NAME@REV              a branch, tag or commit (refs/REV, or snapshots/REV for a commit hash)
    ORG/NAME:path/in/repo     one file (or folder) of the snapshot; also ORG/NAME@REV:path

A path that exists on disk always wins. The cache is the one ``hf download`` (``huggingface_hub``)
fills: ``$HF_HUB_CACHE``, else ``$HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``, laid out as
``models--ORG--NAME/{refs/main, snapshots/<commit>/...}``. Nothing is downloaded here: a reference
that is not in the cache is a :class:`streamgen.pipeline.UsageError` that names the folder looked
in and the command that fetches it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# ORG/NAME as the hub spells repo ids: letters, digits, '-', '_', '.'; no '--' or '..' inside
_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w.-]+))?(?::(?P<file>[^:]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HubRef:
    repo: str
    revision: str | None = None
    file: str | None = None

    def download_command(self) -> str:
        cmd = f"hf download {self.repo}" + (f" {self.file}" if self.file else "")
        return cmd + (f" --revision {self.revision}" if self.revision else "")


def parse(spec: str) -> HubRef | None:
    """``ORG/NAME[@REV][:FILE]`` -> HubRef; None for anything else (absolute or ./ paths, Windows drives)."""
    if spec.startswith(("/", ".", "~")) or "\\" in spec:
        return None
    m = _REF.match(spec)
    if m is None or "--" in m["repo"] or ".." in m["repo"] or (m["file"] and ".." in Path(m["file"]).parts):
        return None
    return HubRef(m["repo"], m["rev"], m["file"].strip("/") if m["file"] else None)


def cache_dir() -> Path:
    """The local hub cache, from the environment as huggingface_hub reads it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def find(ref: HubRef) -> tuple[Path | None, str]:
    """The cached path of ``ref`` (None when absent) and, when absent, why."""
    root = cache_dir()
    repo_dir = root / ("models--" + ref.repo.replace("/", "--"))
    if not repo_dir.is_dir():
        return None, f"{ref.repo} is not in the Hugging Face cache {root}"
    rev = ref.revision or "main"
    ref_file = repo_dir / "refs" / rev
    if ref_file.is_file():
        commit = ref_file.read_text().strip()
    elif _COMMIT.match(rev) and (repo_dir / "snapshots" / rev).is_dir():
        commit = rev
    else:
        have = sorted(p.name for p in (repo_dir / "refs").glob("*")) if (repo_dir / "refs").is_dir() else []
        return None, f"revision {rev} of {ref.repo} is not in the cache {repo_dir} (cached refs: {', '.join(have) or 'none'})"
    snapshot = repo_dir / "snapshots" / commit
    target = snapshot / ref.file if ref.file else snapshot
    if not target.exists():  # a snapshot file is a symlink into blobs/: a missing blob is a missing file
        what = ref.file if ref.file else "the snapshot"
        return None, f"{what} of {ref.repo} is not in the cache (looked in {snapshot})"
    return target, ""


def resolve(flag: str, spec: str | None, *, hint: str | None = None) -> str | None:
    """A weights option's value -> a local path: existing paths unchanged, hub references looked up
    in the cache (see the module docstring); anything else unchanged (the caller reports it missing).
    ``hint``: the download command the error names (default: the ``hf download`` of the reference)."""
    if spec is None or os.path.exists(spec):
        return spec
    ref = parse(spec)
    if ref is None:
        return spec
    path, why = find(ref)
    if path is None:
        from streamgen.pipeline import UsageError

        how = hint or f"{ref.download_command()} (huggingface_hub's CLI; `huggingface-cli download` in older versions)"
        raise UsageError(f"{flag} {spec}: no such file, and {why}; download it with: {how}")
    return str(path)


def missing_files(ref: HubRef, patterns: tuple[str, ...]) -> list[str]:
    """The ``patterns`` (globs relative to the repo) with no cached file of ``ref``'s snapshot; all of
    them when the snapshot is not cached."""
    import fnmatch

    path, _ = find(HubRef(ref.repo, ref.revision))
    if path is None:
        return list(patterns)
    names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]  # is_file follows the link
    return [pat for pat in patterns if not any(fnmatch.fnmatch(n, pat) for n in names)]
