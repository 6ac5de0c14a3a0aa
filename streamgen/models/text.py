"""Text encoders for the Wan DiT's cross-attention context, and an LRU prompt cache.

Contract (CONTRACTS.md, "Decoders + text"): every encoder has ``dim``, ``text_len`` (512),
``device`` and ``encode(prompts: list[str]) -> (B, text_len, dim)``; rows past each prompt's
token count (including its end-of-sequence token) are zero, as Wan's pipeline pads its
unpadded T5 outputs. The result lives on ``encoder.device`` in the encoder's dtype.

* ``UMT5TextEncoder``: umT5-XXL through transformers' ``UMT5EncoderModel``.
  ``from_pretrained(folder)`` takes an HF folder (config.json + weights, tokenizer files in the
  same folder, or a diffusers pipeline root with ``text_encoder/`` and ``tokenizer/``);
  ``from_original(pth, tokenizer_path)`` reads Wan2.1's ``models_t5_umt5-xxl-enc-bf16.pth``
  (keys ``token_embedding``, ``blocks.N.attn.q``, ``blocks.N.ffn.gate.0``,
  ``blocks.N.pos_embedding.embedding``, ``norm``...) mapped onto ``UMT5EncoderModel`` keys by
  ``convert_umt5_original_state_dict``; the config is read off the tensor shapes.
  Prompts are cleaned as Wan does (html unescape, ftfy when installed, whitespace collapsed),
  tokenized with the end token, truncated to 512. The model runs on the batch's longest
  prompt only (pad keys are masked and T5's position bias is relative, so the real tokens'
  outputs are the same as with 512-token padding) and the result is zero-padded to 512.
* ``TinyTextEncoder(dim)``: deterministic, download-free embeddings for the ``tiny`` model:
  each word gets a vector from a generator seeded by a hash of the word, plus a sinusoidal
  position term. Same prompt -> same tensor in every process.
* ``PromptCache(encoder, capacity)``: same interface; an exact-text LRU, so a prompt is encoded
  once while it stays in the cache (stored unpadded, padded on the way out). Thread-safe.
* ``load_text_encoder(path, dim=...)`` picks one of the above from a path (or ``None``/"tiny").
"""

from __future__ import annotations

import hashlib
import html
import math
import os
import re
import threading
from collections import OrderedDict
from typing import Protocol

import torch

from streamgen.models.checkpoints import check_keys, read_state_dict, strip_prefixes

TEXT_LEN = 512


class TextEncoder(Protocol):
    dim: int
    text_len: int
    device: torch.device

    def encode(self, prompts: list[str]) -> torch.Tensor: ...


def clean_prompt(text: str) -> str:
    """Wan's ``clean='whitespace'``: ftfy (if installed), html unescape twice, whitespace collapsed."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("encode() takes a list of prompt strings")
    return list(prompts)


# ---------------------------------------------------------------------------------------------
# umT5


def convert_umt5_original_state_dict(sd: dict[str, torch.Tensor], config=None) -> dict[str, torch.Tensor]:
    """Wan2.1 ``T5Encoder`` state dict -> ``UMT5EncoderModel`` state dict (checked against ``config`` if given)."""
    sd = strip_prefixes(sd, ("module.", "model.", "encoder."))
    if "token_embedding.weight" not in sd or not any(k.startswith("blocks.") for k in sd):
        raise ValueError(
            "not a Wan2.1 umT5 encoder checkpoint (models_t5_umt5-xxl-enc-bf16.pth): expected token_embedding.weight "
            f"and blocks.N.* keys, got e.g. {sorted(sd)[:5]}"
        )
    block_map = {
        "norm1.weight": "layer.0.layer_norm.weight",
        "attn.q.weight": "layer.0.SelfAttention.q.weight",
        "attn.k.weight": "layer.0.SelfAttention.k.weight",
        "attn.v.weight": "layer.0.SelfAttention.v.weight",
        "attn.o.weight": "layer.0.SelfAttention.o.weight",
        "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
        "norm2.weight": "layer.1.layer_norm.weight",
        "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # GELU branch
        "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # linear branch
        "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
    }
    out, unexpected = {}, []
    for k, v in sd.items():
        if k == "token_embedding.weight":
            out["shared.weight"] = v
            out["encoder.embed_tokens.weight"] = v
        elif k == "norm.weight":
            out["encoder.final_layer_norm.weight"] = v
        elif (m := re.match(r"blocks\.(\d+)\.(.*)", k)) and m[2] in block_map:
            out[f"encoder.block.{m[1]}.{block_map[m[2]]}"] = v
        else:
            unexpected.append(k)
    if config is not None:
        from transformers import UMT5EncoderModel

        with torch.device("meta"):
            expected = {k: v.shape for k, v in UMT5EncoderModel(config).state_dict().items()}
        check_keys(expected, out, unexpected=unexpected, what="umT5 checkpoint does not match the UMT5 config:")
    elif unexpected:
        raise ValueError(f"unexpected keys in umT5 checkpoint: {', '.join(sorted(unexpected)[:8])}")
    return out


def umt5_config_from_original(sd: dict[str, torch.Tensor]):
    """A ``UMT5Config`` read off the shapes of a Wan2.1 ``T5Encoder`` state dict (umT5-XXL for the real file)."""
    from transformers import UMT5Config

    sd = convert_umt5_original_state_dict(sd)
    vocab, d_model = sd["shared.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block."))
    p = "encoder.block.0.layer."
    inner = sd[p + "0.SelfAttention.q.weight"].shape[0]
    buckets, heads = sd[p + "0.SelfAttention.relative_attention_bias.weight"].shape
    d_ff = sd[p + "1.DenseReluDense.wi_0.weight"].shape[0]
    return UMT5Config(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=layers, num_heads=heads,
        relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip


class UMT5TextEncoder:
    def __init__(self, model, tokenizer, *, text_len: int = TEXT_LEN):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.dim = model.config.d_model

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        tokenizer_path: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        text_len: int = TEXT_LEN,
    ) -> "UMT5TextEncoder":
        from transformers import AutoTokenizer, UMT5EncoderModel

        path = os.fspath(path)
        if os.path.isdir(os.path.join(path, "text_encoder")):  # diffusers pipeline root
            tokenizer_path = tokenizer_path or os.path.join(path, "tokenizer")
            path = os.path.join(path, "text_encoder")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"no umT5 model folder at {path}: expected config.json and weights (HF layout)")
        model = UMT5EncoderModel.from_pretrained(path, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer_path or path))
        return cls(model, tokenizer, text_len=text_len)

    @classmethod
    def from_original(
        cls,
        checkpoint: str | os.PathLike,
        tokenizer_path: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        text_len: int = TEXT_LEN,
    ) -> "UMT5TextEncoder":
        """Wan2.1's ``models_t5_umt5-xxl-enc-bf16.pth`` (or a state dict) + its tokenizer folder (``google/umt5-xxl``)."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        if isinstance(checkpoint, dict):
            sd = checkpoint
        else:
            sd = read_state_dict(checkpoint, what="umT5")
        config = umt5_config_from_original(sd)
        hf = convert_umt5_original_state_dict(sd, config)
        with torch.device("meta"):
            model = UMT5EncoderModel(config)
        model.load_state_dict(hf, strict=True, assign=True)
        model.encoder.embed_tokens = model.shared
        model = model.to(device=device, dtype=dtype)
        if not os.path.isdir(tokenizer_path):
            raise FileNotFoundError(f"umT5 tokenizer folder not found: {tokenizer_path} (Wan ships it as google/umt5-xxl)")
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer_path))
        return cls(model, tokenizer, text_len=text_len)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer([clean_prompt(p) for p in prompts], padding="longest", truncation=True,
                             max_length=self.text_len, add_special_tokens=True, return_tensors="pt")  # fmt: skip
        return tok["input_ids"], tok["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        prompts = _check_prompts(prompts)
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, dim), L = longest prompt
        out = h.new_zeros(len(prompts), self.text_len, self.dim)
        out[:, : h.shape[1]] = h * mask.unsqueeze(-1).to(h.dtype)
        return out


# ---------------------------------------------------------------------------------------------
# Tiny deterministic encoder


class TinyTextEncoder:
    """Hash-seeded word embeddings + sinusoidal positions; no weights, no downloads."""

    def __init__(self, dim: int, *, text_len: int = TEXT_LEN, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):  # fmt: skip
        if dim % 2:
            raise ValueError(f"TinyTextEncoder needs an even dim, got {dim}")
        self.dim, self.text_len = dim, text_len
        self.device, self.dtype = torch.device(device), dtype
        self._words: dict[str, torch.Tensor] = {}
        pos = torch.arange(text_len, dtype=torch.float64)[:, None]
        freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        self._pos = torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=1).float() * 0.5  # (text_len, dim)

    @staticmethod
    def words(prompt: str) -> list[str]:
        return re.findall(r"\w+|[^\w\s]", clean_prompt(prompt).lower()) + ["</s>"]

    def _word(self, w: str) -> torch.Tensor:
        v = self._words.get(w)
        if v is None:
            seed = int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little") >> 1
            v = self._words[w] = torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))
        return v

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        prompts = _check_prompts(prompts)
        out = torch.zeros(len(prompts), self.text_len, self.dim)
        for i, p in enumerate(prompts):
            ws = self.words(p)[: self.text_len]
            out[i, : len(ws)] = torch.stack([self._word(w) for w in ws]) + self._pos[: len(ws)]
        return out.to(self.device, self.dtype)


# ---------------------------------------------------------------------------------------------
# Prompt cache


class PromptCache:
    """Exact-text LRU over any encoder: each prompt is encoded at most once while cached."""

    def __init__(self, encoder: TextEncoder, capacity: int = 32):
        if capacity < 1:
            raise ValueError(f"PromptCache capacity must be >= 1, got {capacity}")
        self.encoder, self.capacity = encoder, capacity
        self.dim, self.text_len = encoder.dim, encoder.text_len
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()  # prompt -> (tokens, dim), unpadded
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._entries

    def encode(self, prompts: list[str]) -> torch.Tensor:
        prompts = _check_prompts(prompts)
        found: dict[str, torch.Tensor] = {}
        with self._lock:
            for p in prompts:
                if p in self._entries:
                    self._entries.move_to_end(p)
                    found[p] = self._entries[p]
        todo = list(dict.fromkeys(p for p in prompts if p not in found))
        self.hits += len(prompts) - len(todo)
        self.misses += len(todo)
        if todo:
            ctx = self.encoder.encode(todo)  # (n, text_len, dim)
            for p, c in zip(todo, ctx):
                n = int((c != 0).any(dim=-1).nonzero().max().item()) + 1 if c.any() else 0
                found[p] = c[:n].clone()
            with self._lock:
                for p in todo:
                    self._entries[p] = found[p]
                    self._entries.move_to_end(p)
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        first = found[prompts[0]]
        out = first.new_zeros(len(prompts), self.text_len, self.dim)
        for i, p in enumerate(prompts):
            out[i, : found[p].shape[0]] = found[p]
        return out


def load_text_encoder(
    path: str | os.PathLike | None,
    *,
    dim: int | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    cache_size: int = 32,
) -> PromptCache:
    """Pick the encoder for ``path`` and wrap it in a ``PromptCache``.

    ``None`` or ``"tiny"``: ``TinyTextEncoder(dim)``. A ``.pth`` file: Wan2.1's original umT5
    checkpoint (tokenizer from ``tokenizer_path`` or a ``google/umt5-xxl`` folder beside it).
    A folder: a Wan2.1 checkpoint folder (``models_t5_umt5-xxl-enc-bf16.pth`` + ``google/umt5-xxl``),
    a diffusers pipeline root, or an HF ``UMT5EncoderModel`` folder.
    """
    if path is None or os.fspath(path) == "tiny":
        if dim is None:
            raise ValueError("the tiny text encoder needs dim (the model's text_dim)")
        enc: TextEncoder = TinyTextEncoder(dim, device=device, dtype=torch.float32 if dtype is None else dtype)
        return PromptCache(enc, cache_size)
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "models_t5_umt5-xxl-enc-bf16.pth")):
        path = os.path.join(path, "models_t5_umt5-xxl-enc-bf16.pth")
    if os.path.isfile(path):
        tok = tokenizer_path or os.path.join(os.path.dirname(path), "google", "umt5-xxl")
        enc = UMT5TextEncoder.from_original(path, tok, device=device, dtype=dtype)
    elif os.path.isdir(path):
        enc = UMT5TextEncoder.from_pretrained(path, tokenizer_path=tokenizer_path, device=device, dtype=dtype)
    else:
        raise FileNotFoundError(
            f"text encoder not found: {path} (expected models_t5_umt5-xxl-enc-bf16.pth, a folder holding it, "
            "a diffusers pipeline folder, or an HF umT5 folder)"
        )
    if dim is not None and enc.dim != dim:
        raise ValueError(f"text encoder width {enc.dim} != model text_dim {dim}")
    return PromptCache(enc, cache_size)
