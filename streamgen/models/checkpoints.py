"""Wan2.1 DiT checkpoints: every on-disk layout -> native (original Wan2.1) keys.

(work in progress: key maps first)
"""

from __future__ import annotations

import re

__all__ = ["native_to_diffusers_key", "diffusers_to_native_key", "native_to_diffusers", "diffusers_to_native"]

# per-block sub-keys, native -> diffusers (attention projections handled separately)
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


def _split_param(key: str) -> tuple[str, str]:
    mod, _, param = key.rpartition(".")
    return mod, param


def native_to_diffusers_key(key: str) -> str:
    """One native Wan key -> diffusers ``WanTransformer3DModel`` key (KeyError if unknown)."""
    if key in _TOP_PARAM_MAP:
        return _TOP_PARAM_MAP[key]
    m = _BLOCK_RE.match(key)
    if m:
        idx, rest = m.groups()
        if rest in _BLOCK_MAP:
            return f"blocks.{idx}.{_BLOCK_MAP[rest]}"
        mod, param = _split_param(rest)
        if mod in _BLOCK_MAP:
            return f"blocks.{idx}.{_BLOCK_MAP[mod]}.{param}"
        parts = mod.split(".")
        if len(parts) == 2 and parts[0] in _ATTN_MAP and parts[1] in _PROJ_MAP:
            return f"blocks.{idx}.{_ATTN_MAP[parts[0]]}.{_PROJ_MAP[parts[1]]}.{param}"
        raise KeyError(key)
    mod, param = _split_param(key)
    if mod in _TOP_MAP:
        return f"{_TOP_MAP[mod]}.{param}"
    raise KeyError(key)


_INV_TOP_PARAM = {v: k for k, v in _TOP_PARAM_MAP.items()}
_INV_BLOCK = {v: k for k, v in _BLOCK_MAP.items()}
_INV_ATTN = {v: k for k, v in _ATTN_MAP.items()}
_INV_PROJ = {v: k for k, v in _PROJ_MAP.items()}
_INV_TOP = {v: k for k, v in _TOP_MAP.items()}


def diffusers_to_native_key(key: str) -> str:
    """One diffusers ``WanTransformer3DModel`` key -> native Wan key (KeyError if unknown)."""
    if key in _INV_TOP_PARAM:
        return _INV_TOP_PARAM[key]
    m = _BLOCK_RE.match(key)
    if m:
        idx, rest = m.groups()
        if rest in _INV_BLOCK:
            return f"blocks.{idx}.{_INV_BLOCK[rest]}"
        mod, param = _split_param(rest)
        if mod in _INV_BLOCK:
            return f"blocks.{idx}.{_INV_BLOCK[mod]}.{param}"
        attn, _, proj = mod.partition(".")
        if attn in _INV_ATTN and proj in _INV_PROJ:
            return f"blocks.{idx}.{_INV_ATTN[attn]}.{_INV_PROJ[proj]}.{param}"
        raise KeyError(key)
    mod, param = _split_param(key)
    if mod in _INV_TOP:
        return f"{_INV_TOP[mod]}.{param}"
    raise KeyError(key)


def native_to_diffusers(sd: dict) -> dict:
    return {native_to_diffusers_key(k): v for k, v in sd.items()}


def diffusers_to_native(sd: dict) -> dict:
    return {diffusers_to_native_key(k): v for k, v in sd.items()}
