"""Wan2.1 DiT checkpoints: every on-disk layout -> native (original Wan2.1) keys, with clear errors.

API summary
-----------
``load_wan_model(path, cfg=None, *, device="cpu", dtype=None) -> WanModel`` (alias
``load_wan_checkpoint``): builds the model on the meta device and assigns the checkpoint's tensors,
moved one at a time to ``device``/``dtype``, so loading never holds two copies of the weights.
``load_wan_state_dict(path, cfg=None, *, device="cpu", dtype=None) -> (state_dict, cfg, info)``.
``inspect_wan_checkpoint(path) -> CheckpointInfo`` (format, native key -> shape; loads nothing).
``infer_wan_config(shapes) -> WanConfig`` from native key shapes (presets matched first; otherwise
head_dim 128, as in every released Wan2.1 model).
``native_to_diffusers(sd)`` / ``diffusers_to_native(sd)`` and the per-key versions.

Shared by every model's loader (VAE, TAEHV, RIFE, umT5): ``read_state_dict(path, what=...,
names=...)`` (safetensors / memory-mapped torch file / folder), ``strip_prefixes(sd, prefixes)``,
and ``check_keys(expected, got, what=...)`` / ``diff_keys`` (one report format: missing,
unexpected and mis-shaped keys, first few and counts), raising ``CheckpointError`` (a ValueError).

Formats read (detected, named in every error):
- original Wan2.1: ``diffusion_pytorch_model.safetensors``, or shards listed by
  ``diffusion_pytorch_model.safetensors.index.json`` (pass the index, a shard's directory, or a
  diffusers pipeline root holding ``transformer/``);
- diffusers ``WanTransformer3DModel`` (``attn1.to_q``, ``scale_shift_table``, ``proj_out``,
  ``condition_embedder.*``; its ``norm2`` is Wan's ``norm3``, the affine cross-attention norm);
- Self-Forcing / CausVid ``.pt`` / ``.pth`` (``generator_ema`` preferred over ``generator``
  unless ``state_key=`` names one; ``model.`` prefix), any ``torch.save`` state dict (loaded with ``weights_only=True, mmap=True``);
- prefixes ``model.diffusion_model.`` (ComfyUI), ``model.``, ``module.``, and
  ``_fsdp_wrapped_module.`` / ``_orig_mod.`` anywhere in a key;
- LightX2V quantized files: int8 / float8 ``X.weight`` with a per-output-channel
  ``X.weight_scale`` ``[out, 1]``, dequantized on load (``weight.float() * scale``) to ``dtype``,
  or kept as stored with ``load_wan_state_dict(..., keep_quantized=True)`` (used by
  ``streamgen.ops.quant.from_lightx2v``, which loads them into fp8/int8 linear layers).

``dtype=None`` keeps the checkpoint's float dtype (of ``blocks.0.self_attn.q.weight``), or bfloat16
for quantized files; every tensor is cast to that one dtype.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from streamgen.models.wan import PRESETS, WanConfig, WanModel

__all__ = [
    "CheckpointError",
    "KeyDiff",
    "diff_keys",
    "check_keys",
    "read_state_dict",
    "strip_prefixes",
    "CheckpointInfo",
    "inspect_wan_checkpoint",
    "infer_wan_config",
    "load_wan_state_dict",
    "load_wan_model",
    "load_wan_checkpoint",
    "native_to_diffusers_key",
    "diffusers_to_native_key",
    "native_to_diffusers",
    "diffusers_to_native",
]


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not match the model; the message says why."""


# ----------------------------------------------------------------------------- shared by every loader


def _shape(v) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def _first(items, n: int = 8, sep: str = ", ") -> str:
    items = list(items)
    return sep.join(items[:n]) + (f"{sep}... (+{len(items) - n} more)" if len(items) > n else "")


@dataclass
class KeyDiff:
    """How a state dict differs from a model's: sorted missing and unexpected keys, and
    ``(key, checkpoint shape, model shape)`` for every shape mismatch. False when they match."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def lines(self, show: Callable[[str], str] = str) -> list[str]:
        """The report, one indented line per kind (first few keys and the counts); ``show`` renders
        an unexpected key (e.g. with the raw name it was mapped from)."""
        out = []
        if self.missing:
            out.append(f"  missing keys ({len(self.missing)}): {_first(self.missing)}")
        if self.unexpected:
            out.append(f"  unexpected keys ({len(self.unexpected)}): {_first(map(show, self.unexpected))}")
        if self.mismatched:
            shown = [f"{k}: checkpoint {got} vs model {want}" for k, got, want in self.mismatched]
            out.append(f"  shape mismatches ({len(shown)}): {_first(shown, 6, '; ')}")
        return out


def diff_keys(expected: Mapping, got: Mapping, *, unexpected: Iterable[str] = ()) -> KeyDiff:
    """Compare ``got`` with ``expected`` (both key -> tensor or shape). ``unexpected``: keys a
    converter already set aside (no native name) to report with the rest."""
    return KeyDiff(
        missing=sorted(k for k in expected if k not in got),
        unexpected=sorted({*unexpected, *(k for k in got if k not in expected)}),
        mismatched=sorted(
            (k, _shape(got[k]), _shape(v)) for k, v in expected.items() if k in got and _shape(got[k]) != _shape(v)
        ),
    )


def check_keys(
    expected: Mapping, got: Mapping, *, what: str, unexpected: Iterable[str] = (), notes: Iterable[str] = ()
) -> None:
    """Raise a CheckpointError ``what`` + the key report (:class:`KeyDiff`) + ``notes`` (hint lines)
    unless ``got`` has exactly the keys and shapes of ``expected``."""
    diff = diff_keys(expected, got, unexpected=unexpected)
    if diff:
        raise CheckpointError("\n".join([what, *diff.lines(), *notes]))


def strip_prefixes(sd: Mapping[str, torch.Tensor], prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """Remove each of ``prefixes`` in turn from every key, where *all* keys carry it (wrappers such
    as ``module.`` from DataParallel); a new dict, tensors shared."""
    sd = dict(sd)
    for prefix in prefixes:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def read_state_dict(
    path: str | os.PathLike, *, what: str, names: Sequence[str] = (), hint: str = ""
) -> dict[str, torch.Tensor]:
    """One state dict, read to the CPU: a ``.safetensors`` file, a ``torch.save`` file (weights only,
    memory-mapped when it is in the zip format; a top-level ``{"state_dict": {...}}`` is unwrapped),
    a folder holding one of ``names`` (paths relative to it, tried in order), or a ``.zip`` archive
    holding one of ``names``.

    A missing file raises FileNotFoundError naming ``what`` (e.g. "Wan VAE") and ``hint``; an
    unreadable one a CheckpointError naming the file."""
    p = Path(path)
    if p.is_dir():
        found = next((p / n for n in names if (p / n).is_file()), None)
        if found is None:
            raise FileNotFoundError(f"no {what} weights in folder {p}: expected one of {', '.join(names)}")
        p = found
    if not p.is_file():
        raise FileNotFoundError(f"{what} checkpoint not found: {p}" + (f" ({hint})" if hint else ""))
    if p.suffix == ".zip":  # a release archive (e.g. Practical-RIFE's) holding one of ``names``
        return _read_zip_member(p, what=what, names=names)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(p)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{p}: corrupt or not a safetensors file ({e})") from None
    sd = _torch_load(p)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{p}: holds a {type(sd).__name__}, not a state dict")
    return sd


def _read_zip_member(p: Path, *, what: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The state dict in a .zip archive: the one member whose file name is in ``names`` (any
    .pkl/.pth/.pt/.safetensors member when ``names`` is empty), read weights-only into memory."""
    import io
    import zipfile

    try:
        with zipfile.ZipFile(p) as z:
            wanted = {Path(n).name for n in names}
            members = [m for m in z.namelist() if not m.endswith("/") and "__MACOSX" not in m
                       and (Path(m).name in wanted if wanted else Path(m).suffix in (".pkl", ".pth", ".pt", ".safetensors"))]
            if len(members) != 1:
                raise CheckpointError(f"{p}: expected one {what} weights file ({', '.join(sorted(wanted)) or 'any'}) in "
                                      f"the archive, found {members or 'none'}")
            data = z.read(members[0])
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{p}: corrupt or not a zip archive ({e})") from None
    if members[0].endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    try:
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise _torch_load_error(Path(f"{p}!{members[0]}"), e) from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{p}!{members[0]}: holds a {type(sd).__name__}, not a state dict")
    return sd


# ----------------------------------------------------------------------------- key maps

# per-block sub-modules, native -> diffusers (attention projections handled separately)
_BLOCK_MAP = {
    "norm3": "norm2",  # affine cross-attention norm: norm3 in Wan, norm2 in diffusers
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
}
_ATTN_MAP = {"self_attn": "attn1", "cross_attn": "attn2"}
_PROJ_MAP = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "norm_q": "norm_q", "norm_k": "norm_k"}
_TOP_MAP = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "patch_embedding": "patch_embedding",
}
_TOP_PARAM_MAP = {"head.modulation": "scale_shift_table"}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _inverse(d: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in d.items()}


def _map_key(key: str, top_param: dict, block: dict, attn: dict, proj: dict, top: dict) -> str:
    if key in top_param:
        return top_param[key]
    m = _BLOCK_RE.match(key)
    if m:
        idx, rest = m.groups()
        if rest in block:
            return f"blocks.{idx}.{block[rest]}"
        mod, _, param = rest.rpartition(".")
        if mod in block:
            return f"blocks.{idx}.{block[mod]}.{param}"
        a, _, p = mod.partition(".")
        if a in attn and p in proj:
            return f"blocks.{idx}.{attn[a]}.{proj[p]}.{param}"
        raise KeyError(key)
    mod, _, param = key.rpartition(".")
    if mod in top:
        return f"{top[mod]}.{param}"
    raise KeyError(key)


def native_to_diffusers_key(key: str) -> str:
    """One native Wan key -> diffusers ``WanTransformer3DModel`` key (KeyError if it has none)."""
    return _map_key(key, _TOP_PARAM_MAP, _BLOCK_MAP, _ATTN_MAP, _PROJ_MAP, _TOP_MAP)


def diffusers_to_native_key(key: str) -> str:
    """One diffusers ``WanTransformer3DModel`` key -> native Wan key (KeyError if it has none)."""
    return _map_key(
        key, _inverse(_TOP_PARAM_MAP), _inverse(_BLOCK_MAP), _inverse(_ATTN_MAP), _inverse(_PROJ_MAP), _inverse(_TOP_MAP)
    )


def native_to_diffusers(sd: dict) -> dict:
    return {native_to_diffusers_key(k): v for k, v in sd.items()}


def diffusers_to_native(sd: dict) -> dict:
    return {diffusers_to_native_key(k): v for k, v in sd.items()}


# ----------------------------------------------------------------------------- raw readers

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_PT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_CONTAINER_KEYS = ("generator_ema", "generator", "ema", "state_dict", "model", "module")


@dataclass
class _Entry:
    load: Callable[[], torch.Tensor]
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class CheckpointInfo:
    """What a checkpoint is, without its tensors loaded."""

    path: str
    format: str  # human-readable, e.g. "diffusers WanTransformer3DModel (safetensors, 2 shards)"
    shapes: dict[str, tuple[int, ...]]  # native key -> shape (quantized weights: stored shape)
    quantized: str | None = None  # dtype name of quantized weights, or None
    unmapped: dict[str, str] = field(default_factory=dict)  # native-ish key -> raw key it came from
    entries: dict[str, _Entry] = field(default_factory=dict, repr=False)
    scales: dict[str, _Entry] = field(default_factory=dict, repr=False)  # native weight key -> scale
    _handles: list = field(default_factory=list, repr=False)

    def close(self) -> None:
        for h in self._handles:
            h.__exit__(None, None, None)
        self._handles.clear()


def _err(path, fmt: str | None, msg: str) -> CheckpointError:
    where = f"{path}" + (f" (detected format: {fmt})" if fmt else "")
    return CheckpointError(f"{where}: {msg}")


def _safetensors_entries(files: list[Path], handles: list, path) -> dict[str, _Entry]:
    from safetensors import safe_open

    out: dict[str, _Entry] = {}
    for fpath in files:
        if not fpath.exists():
            raise _err(path, None, f"shard {fpath.name} listed in the index is missing from {fpath.parent}")
        try:
            h = safe_open(str(fpath), framework="pt", device="cpu")
            h.__enter__()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            what = "corrupt or not a safetensors file" if fpath == Path(path) else f"{fpath.name} is corrupt or not a safetensors file"
            raise _err(path, None, f"{what} ({e})") from None
        handles.append(h)
        for k in h.keys():
            sl = h.get_slice(k)
            st_dtype = sl.get_dtype()
            if st_dtype not in _ST_DTYPES:
                raise _err(path, None, f"{fpath.name}: tensor {k} has unsupported dtype {st_dtype}")
            out[k] = _Entry(
                load=(lambda h=h, k=k, name=fpath.name: _st_get(h, k, name, path)),
                shape=tuple(sl.get_shape()),
                dtype=_ST_DTYPES[st_dtype],
            )
    return out


def _st_get(handle, key: str, name: str, path) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except Exception as e:  # noqa: BLE001
        raise _err(path, None, f"{name}: reading tensor {key} failed, the file may be truncated ({e})") from e


def _resolve_safetensors(p: Path) -> tuple[list[Path], str]:
    """File or directory -> (safetensors files, container description)."""
    if p.is_dir():
        if (p / "transformer").is_dir() and not any(p.glob("*.safetensors")):
            p = p / "transformer"
        indexes = sorted(p.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(f"{p}: several index files {[i.name for i in indexes]}; pass one of them")
        if indexes:
            return _resolve_safetensors(indexes[0])
        files = sorted(p.glob("*.safetensors"))
        if len(files) == 1:
            return files, "safetensors, 1 file"
        if not files:
            pts = sorted(f.name for f in p.iterdir() if f.suffix in _PT_SUFFIXES)
            hint = f"; found {pts}, pass the file itself" if pts else ""
            raise CheckpointError(f"{p}: no *.safetensors file or *.safetensors.index.json in this directory{hint}")
        raise CheckpointError(
            f"{p}: {len(files)} safetensors files but no *.safetensors.index.json; pass one file or add the index"
        )
    if p.name.endswith(".index.json"):
        try:
            index = json.loads(p.read_text())
            weight_map = index["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{p}: not a valid safetensors index (needs a 'weight_map'): {e}") from e
        shards = sorted(set(weight_map.values()))
        return [p.parent / s for s in shards], f"safetensors, {len(shards)} shards via {p.name}"
    return [p], "safetensors, 1 file"


def _torch_load(p: Path):
    """``torch.load`` on the CPU, weights only, memory-mapped (zip format) or read (legacy format).

    Any failure is a one-line CheckpointError naming ``p``: a file that is no torch checkpoint, or a
    damaged one, is reported as corrupt; one that pickles Python objects besides tensors names the
    object (weights-only loading never runs pickled code, and no advice to turn it off is passed on)."""
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise _torch_load_error(p, e) from None
    except Exception as e:  # noqa: BLE001 - pickle/zip errors of every kind
        raise _torch_load_error(p, e) from None
    try:  # legacy (non-zip) torch.save format cannot be memory-mapped
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise _torch_load_error(p, e) from None


def _torch_load_error(p: Path, e: Exception) -> CheckpointError:
    text = str(e)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return CheckpointError(
            f"{p}: the checkpoint pickles a Python object ({m.group(1)}) besides tensors; streamgen reads "
            "tensors only and never runs pickled code: re-save its state dict (torch.save or safetensors)")
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    reason = m.group(1).strip() if m else next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    reason = reason or type(e).__name__
    if reason.isdigit():  # the unpickler names a byte it does not know
        reason = f"unknown pickle opcode {reason}"
    if "zip archive" in reason or "central directory" in reason:
        reason = "damaged zip archive, e.g. an interrupted download"
    return CheckpointError(f"{p}: corrupt or not a torch checkpoint ({reason[:120]})")


def _torch_entries(p: Path, state_key: str | None) -> tuple[dict[str, _Entry], str]:
    obj = _torch_load(p)
    desc = "torch .pt"
    if state_key is not None:
        if not isinstance(obj, dict) or not isinstance(obj.get(state_key), dict):
            top = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"{p}: state_key={state_key!r} requested but the checkpoint holds {top}")
        desc += f", '{state_key}'"
        obj = obj[state_key]
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if not isinstance(obj, dict):
            raise CheckpointError(f"{p}: torch checkpoint holds a {type(obj).__name__}, not a state dict")
        inner = next((k for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise CheckpointError(
                f"{p}: torch checkpoint with top-level keys {sorted(obj)[:8]} and none of {list(_CONTAINER_KEYS)} "
                "holding a state dict"
            )
        desc += f", '{inner}'"
        obj = obj[inner]
    entries = {
        k: _Entry(load=(lambda v=v: v), shape=tuple(v.shape), dtype=v.dtype)
        for k, v in obj.items()
        if isinstance(v, torch.Tensor)
    }
    return entries, desc


# ----------------------------------------------------------------------------- detection

_INFIX_WRAPPERS = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "module.", "model.")
_QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)


def _strip_wrappers(entries: dict[str, _Entry]) -> tuple[dict[str, _Entry], list[str]]:
    notes = []
    if any(w in k for k in entries for w in _INFIX_WRAPPERS):
        found = sorted({w.rstrip(".") for k in entries for w in _INFIX_WRAPPERS if w in k})
        notes += found
        cleaned = {}
        for k, v in entries.items():
            for w in _INFIX_WRAPPERS:
                k = k.replace(w, "")
            cleaned[k] = v
        entries = cleaned
    for _ in range(3):  # e.g. "module.model." from DDP around a wrapper
        for prefix in _PREFIXES:
            if entries and all(k.startswith(prefix) for k in entries):
                entries = {k[len(prefix) :]: v for k, v in entries.items()}
                notes.append(f"prefix '{prefix}'")
                break
        else:
            break
    return entries, notes


def _is_diffusers(keys) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k or k == "scale_shift_table" for k in keys)


def inspect_wan_checkpoint(path: str | os.PathLike, *, state_key: str | None = None) -> CheckpointInfo:
    """Open a checkpoint (mmap / lazily), detect its format and map its keys to native names.

    ``state_key`` picks the state dict inside a torch checkpoint (default: the first of
    ``generator_ema, generator, ema, state_dict, model, module`` present)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    handles: list = []
    if p.is_file() and p.suffix in _PT_SUFFIXES:
        raw, container = _torch_entries(p, state_key)
        kind = "torch"
    else:
        files, container = _resolve_safetensors(p)
        raw = _safetensors_entries(files, handles, p)
        kind = "safetensors"
    if not raw:
        raise CheckpointError(f"{p}: the checkpoint contains no tensors ({container})")
    entries, notes = _strip_wrappers(raw)

    diffusers = _is_diffusers(entries)
    if diffusers:
        layout = "diffusers WanTransformer3DModel"
    elif kind == "torch" and ("'generator" in container):
        layout = "Self-Forcing/CausVid"
    else:
        layout = "original Wan2.1"

    # LightX2V-style quantization: X.weight (int8/fp8) + X.weight_scale
    scales_raw = {k[: -len("_scale")]: v for k, v in entries.items() if k.endswith(".weight_scale")}
    entries = {k: v for k, v in entries.items() if not k.endswith(".weight_scale")}
    qdtypes = sorted({str(entries[k].dtype).replace("torch.", "") for k in scales_raw if k in entries})

    native: dict[str, _Entry] = {}
    scales: dict[str, _Entry] = {}
    unmapped: dict[str, str] = {}
    for k, v in entries.items():
        nk = k
        if diffusers:
            try:
                nk = diffusers_to_native_key(k)
            except KeyError:
                unmapped[k] = k
        native[nk] = v
        if k in scales_raw:
            scales[nk] = scales_raw[k]
    for k in scales_raw:
        if k not in entries:
            unmapped[k + "_scale"] = k + "_scale"
            native[k + "_scale"] = scales_raw[k]

    fmt = f"{layout} ({container}"
    if notes:
        fmt += "; " + ", ".join(notes)
    fmt += ")"
    if qdtypes:
        fmt += f" + LightX2V {'/'.join(qdtypes)} quantized weights"
    info = CheckpointInfo(
        path=str(p),
        format=fmt,
        shapes={k: v.shape for k, v in native.items()},
        quantized="/".join(qdtypes) or None,
        unmapped=unmapped,
        entries=native,
        scales=scales,
        _handles=handles,
    )
    return info


# ----------------------------------------------------------------------------- config + checks


def infer_wan_config(shapes: dict[str, tuple[int, ...]], **overrides) -> WanConfig:
    """A WanConfig from native key shapes (raises CheckpointError when essential keys are absent)."""
    need = ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight", "blocks.0.ffn.0.weight")
    missing = [k for k in need if k not in shapes]
    if missing:
        raise CheckpointError(f"cannot infer the Wan config: keys {missing} are absent")
    dim, in_dim, *patch = shapes["patch_embedding.weight"]
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := _BLOCK_RE.match(k)))
    ffn_dim = shapes["blocks.0.ffn.0.weight"][0]
    text_dim = shapes["text_embedding.0.weight"][1]
    freq_dim = shapes["time_embedding.0.weight"][1]
    out = shapes.get("head.head.weight", (16 * math.prod(patch),))[0] // math.prod(patch)
    found = dict(
        dim=dim,
        ffn_dim=ffn_dim,
        freq_dim=freq_dim,
        num_layers=layers,
        patch_size=tuple(patch),
        in_dim=in_dim,
        out_dim=out,
        text_dim=text_dim,
        qk_norm="blocks.0.self_attn.norm_q.weight" in shapes,
        cross_attn_norm="blocks.0.norm3.weight" in shapes,
    )
    heads = None
    for preset in PRESETS.values():
        if all(getattr(preset, k) == v for k, v in found.items()):
            heads = preset.num_heads
            break
    if heads is None:
        heads = dim // 128 if dim % 128 == 0 else max(1, dim // 64)
    params = {**found, "num_heads": heads, **overrides}
    try:
        return WanConfig(**params)
    except ValueError as e:
        raise CheckpointError(f"inferred Wan config is invalid ({e}): {params}") from e


def _expected_shapes(cfg: WanConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = WanModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check(info: CheckpointInfo, cfg: WanConfig) -> None:
    diff = diff_keys(_expected_shapes(cfg), info.shapes)
    if not diff:
        return
    lines = [f"{info.path}: checkpoint does not match the model", f"  detected format: {info.format}"]
    lines.append(
        f"  model config: dim={cfg.dim} ffn_dim={cfg.ffn_dim} num_heads={cfg.num_heads} "
        f"num_layers={cfg.num_layers} text_dim={cfg.text_dim}"
    )
    raw = info.unmapped
    lines += diff.lines(lambda k: f"{k} (from {raw[k]})" if raw.get(k, k) != k else k)
    if any(w in k for k in diff.unexpected for w in ("img", "add_k_proj", "add_v_proj", "image_embedder")):
        lines.append("  (image-to-video keys: only text-to-video Wan2.1 checkpoints are supported)")
    raise CheckpointError("\n".join(lines))


# ----------------------------------------------------------------------------- loading


def _target_dtype(info: CheckpointInfo, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    if info.quantized:
        return torch.bfloat16
    probe = info.entries.get("blocks.0.self_attn.q.weight") or next(iter(info.entries.values()))
    return probe.dtype if probe.dtype.is_floating_point else torch.float32


def _load_scale(info: CheckpointInfo, key: str, t: torch.Tensor) -> torch.Tensor:
    s = info.scales[key].load()
    if s.shape not in ((t.shape[0], 1), (t.shape[0],)):
        raise CheckpointError(
            f"{info.path} (detected format: {info.format}): {key}_scale has shape {tuple(s.shape)}, "
            f"expected ({t.shape[0]}, 1)"
        )
    return s


def _materialize(info: CheckpointInfo, key: str, device, dtype: torch.dtype) -> torch.Tensor:
    t = info.entries[key].load()
    scale = info.scales.get(key)
    if scale is not None:
        s = _load_scale(info, key, t)
        t = t.to(device)
        w = t.float() * s.to(device).float().reshape(t.shape[0], *([1] * (t.ndim - 1)))
        return w.to(dtype)
    if t.dtype in _QUANT_DTYPES and key.endswith(".weight"):
        raise CheckpointError(
            f"{info.path} (detected format: {info.format}): {key} is {t.dtype} without a {key}_scale; "
            "cannot dequantize"
        )
    return t.to(device=device, dtype=dtype)


def load_wan_state_dict(
    path: str | os.PathLike,
    cfg: WanConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    state_key: str | None = None,
    keep_quantized: bool = False,
) -> tuple[dict[str, torch.Tensor], WanConfig, CheckpointInfo]:
    """Read and validate a checkpoint -> (native state dict on device/dtype, config, info).

    ``cfg=None`` infers the config from the tensor shapes. Tensors are moved one at a time.
    ``keep_quantized=True``: LightX2V quantized weights are returned as stored (only moved to
    ``device``), each with its scale as ``X.weight_scale`` float32 ``[out, 1]``
    (for ``streamgen.ops.quant.from_lightx2v``)."""
    info = inspect_wan_checkpoint(path, state_key=state_key)
    try:
        if cfg is None:
            try:
                cfg = infer_wan_config(info.shapes)
            except CheckpointError as e:
                raise CheckpointError(f"{info.path} (detected format: {info.format}): {e}") from e
        _check(info, cfg)
        target = _target_dtype(info, dtype)
        sd = {}
        for k in info.entries:
            if keep_quantized and k in info.scales:
                t = info.entries[k].load()
                s = _load_scale(info, k, t)
                sd[k] = t.to(device)
                sd[k + "_scale"] = s.to(device=device, dtype=torch.float32).reshape(-1, 1)
            else:
                sd[k] = _materialize(info, k, device, target)
    finally:
        info.close()
    return sd, cfg, info


def load_wan_model(
    path: str | os.PathLike,
    cfg: WanConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    state_key: str | None = None,
) -> WanModel:
    """Build a WanModel from any supported checkpoint, without a second copy of the weights."""
    sd, cfg, _ = load_wan_state_dict(path, cfg, device=device, dtype=dtype, state_key=state_key)
    with torch.device("meta"):
        model = WanModel(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


load_wan_checkpoint = load_wan_model
