"""umT5 text encoder (HF folder and Wan2.1 original layout), zero padding, prompt cache, tiny encoder."""

import math

import pytest
import torch

from streamgen.models.text import (
    TEXT_LEN,
    PromptCache,
    TinyTextEncoder,
    UMT5TextEncoder,
    convert_umt5_original_state_dict,
    load_text_encoder,
)

transformers = pytest.importorskip("transformers")

WORDS = "a cat dog runs on the beach at sunset red car over hills , . city night rain neon".split()
D, HEADS, D_KV, D_FF, LAYERS, BUCKETS = 32, 4, 8, 48, 2, 32
PROMPTS = ["a red car runs over the hills at sunset", "a cat", "neon city at night , rain ."]


def _save_tokenizer(folder):
    """A small word-level tokenizer with umT5's special ids (<pad>=0, </s>=1, <unk>=2), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return len(vocab)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("umt5_tok")
    _save_tokenizer(d)
    return d


def _original_sd(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under Wan2.1 t5.py's T5Encoder names."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=None):
        return torch.randn(*shape, generator=g) * (s if s is not None else shape[-1] ** -0.5)

    sd = {"token_embedding.weight": r(vocab, D, s=1.0), "norm.weight": 1 + 0.1 * r(D, s=1.0)}
    inner = HEADS * D_KV
    for i in range(LAYERS):
        p = f"blocks.{i}."
        sd |= {
            p + "norm1.weight": 1 + 0.1 * r(D, s=1.0),
            p + "attn.q.weight": r(inner, D),
            p + "attn.k.weight": r(inner, D),
            p + "attn.v.weight": r(inner, D),
            p + "attn.o.weight": r(D, inner),
            p + "norm2.weight": 1 + 0.1 * r(D, s=1.0),
            p + "ffn.gate.0.weight": r(D_FF, D),
            p + "ffn.fc1.weight": r(D_FF, D),
            p + "ffn.fc2.weight": r(D, D_FF),
            p + "pos_embedding.embedding.weight": r(BUCKETS, HEADS, s=1.0),
        }
    return sd


def _reference_t5(sd, ids, mask, max_dist=128):
    """Wan2.1 T5Encoder forward, written from its formulas (per-layer relative bias, unscaled attention)."""
    b, length = ids.shape
    x = sd["token_embedding.weight"][ids]

    def norm(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # key - query
    nb = BUCKETS // 2
    exact = nb // 2
    dist = rel.abs()
    far = exact + (torch.log(dist.clamp(min=1).float() / exact) / math.log(max_dist / exact) * (nb - exact)).long()
    bucket = (rel > 0).long() * nb + torch.where(dist < exact, dist, far.clamp(max=nb - 1))
    gelu = lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3)))  # noqa: E731
    for i in range(LAYERS):
        p = f"blocks.{i}."
        h = norm(x, sd[p + "norm1.weight"])
        q, k, v = (
            (h @ sd[p + f"attn.{n}.weight"].T).view(b, length, HEADS, D_KV) for n in "qkv"
        )
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) + sd[p + "pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)
        att = att.masked_fill(mask[:, None, None, :] == 0, float("-inf")).softmax(-1)
        x = x + torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, length, -1) @ sd[p + "attn.o.weight"].T
        h = norm(x, sd[p + "norm2.weight"])
        x = x + (gelu(h @ sd[p + "ffn.gate.0.weight"].T) * (h @ sd[p + "ffn.fc1.weight"].T)) @ sd[p + "ffn.fc2.weight"].T
    return norm(x, sd["norm.weight"])


def _full_tokens(enc, prompts):
    t = enc.tokenizer(prompts, padding="max_length", max_length=TEXT_LEN, truncation=True,
                      add_special_tokens=True, return_tensors="pt")  # fmt: skip
    return t["input_ids"], t["attention_mask"]


def _check_padded(ctx, mask):
    lens = mask.sum(1)
    for i, n in enumerate(lens.tolist()):
        assert ctx[i, n:].abs().max() == 0
        assert (ctx[i, :n].abs().sum(-1) > 0).all()


def test_original_layout_matches_reference(tok_dir):
    vocab = len(dict.fromkeys(WORDS)) + 3
    sd = _original_sd(vocab)
    enc = UMT5TextEncoder.from_original(sd, tok_dir, dtype=torch.float32)
    assert enc.model.config.d_kv == D_KV and enc.model.config.num_heads == HEADS
    ctx = enc.encode(PROMPTS)
    assert ctx.shape == (3, TEXT_LEN, D) and ctx.dtype == torch.float32
    ids, mask = _full_tokens(enc, PROMPTS)
    assert mask.sum(1).tolist() == [10, 3, 8]  # words + </s>
    want = _reference_t5(sd, ids, mask)  # Wan pads to 512 before the encoder; we run on the longest prompt
    for i, n in enumerate(mask.sum(1).tolist()):
        torch.testing.assert_close(ctx[i, :n], want[i, :n], rtol=1e-4, atol=1e-5)
    _check_padded(ctx, mask)


def test_hf_folder_and_padding(tok_dir, tmp_path):
    from transformers import UMT5Config, UMT5EncoderModel

    vocab = len(dict.fromkeys(WORDS)) + 3
    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=vocab, d_model=D, d_kv=D_KV, d_ff=D_FF, num_layers=LAYERS, num_heads=HEADS,
                     relative_attention_num_buckets=BUCKETS, feed_forward_proj="gated-gelu")  # fmt: skip
    hf = UMT5EncoderModel(cfg).eval()
    folder = tmp_path / "umt5"
    hf.save_pretrained(folder)
    _save_tokenizer(folder)  # tokenizer in the same folder
    enc = UMT5TextEncoder.from_pretrained(folder, dtype=torch.float32)
    ctx = enc.encode(PROMPTS)
    ids, mask = _full_tokens(enc, PROMPTS)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state  # 512-token padding, as Wan
    for i, n in enumerate(mask.sum(1).tolist()):
        torch.testing.assert_close(ctx[i, :n], want[i, :n], rtol=1e-5, atol=1e-5)
    _check_padded(ctx, mask)

    # the same weights in the original layout load to the same outputs
    inv = {"shared.weight": "token_embedding.weight", "encoder.final_layer_norm.weight": "norm.weight"}
    names = {"layer.0.layer_norm": "norm1", "layer.0.SelfAttention.q": "attn.q", "layer.0.SelfAttention.k": "attn.k",
             "layer.0.SelfAttention.v": "attn.v", "layer.0.SelfAttention.o": "attn.o",
             "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
             "layer.1.layer_norm": "norm2", "layer.1.DenseReluDense.wi_0": "ffn.gate.0",
             "layer.1.DenseReluDense.wi_1": "ffn.fc1", "layer.1.DenseReluDense.wo": "ffn.fc2"}  # fmt: skip
    orig = {}
    for k, v in hf.state_dict().items():
        if k in inv:
            orig[inv[k]] = v
        elif k.startswith("encoder.block."):
            _, _, i, rest = k.split(".", 3)
            orig[f"blocks.{i}.{names[rest.removesuffix('.weight')]}.weight"] = v
    assert torch.equal(convert_umt5_original_state_dict(orig, cfg)["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"],
                       hf.state_dict()["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"])  # fmt: skip
    from_orig = UMT5TextEncoder.from_original(orig, folder, dtype=torch.float32)
    torch.testing.assert_close(from_orig.encode(PROMPTS), ctx, rtol=1e-5, atol=1e-6)

    # Wan2.1 checkpoint folder layout through load_text_encoder
    wan_dir = tmp_path / "wan"
    (wan_dir / "google").mkdir(parents=True)
    torch.save(orig, wan_dir / "models_t5_umt5-xxl-enc-bf16.pth")
    _save_tokenizer(wan_dir / "google" / "umt5-xxl")
    cached = load_text_encoder(wan_dir, dim=D, dtype=torch.float32)
    torch.testing.assert_close(cached.encode(PROMPTS), ctx, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="text_dim"):
        load_text_encoder(wan_dir, dim=D + 1, dtype=torch.float32)


def test_original_layout_errors(tok_dir):
    sd = _original_sd(20)
    bad = dict(sd)
    bad.pop("blocks.1.ffn.fc1.weight")
    bad["blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected keys in umT5 checkpoint: blocks.0.extra.weight"):
        convert_umt5_original_state_dict(bad)
    bad.pop("blocks.0.extra.weight")
    with pytest.raises(ValueError, match=r"missing keys \(1\): encoder.block.1.layer.1.DenseReluDense.wi_1.weight"):
        UMT5TextEncoder.from_original(bad, tok_dir)
    with pytest.raises(ValueError, match="not a Wan2.1 umT5 encoder checkpoint"):
        convert_umt5_original_state_dict({"foo": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="text encoder not found"):
        load_text_encoder("/nonexistent/umt5")


class CountingTiny(TinyTextEncoder):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls: list[list[str]] = []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return super().encode(prompts)


def test_prompt_cache():
    enc = CountingTiny(16)
    cache = PromptCache(enc, capacity=2)
    a = cache.encode(["a cat", "a dog", "a cat"])
    assert enc.calls == [["a cat", "a dog"]]  # duplicates in one batch are encoded once
    torch.testing.assert_close(a, TinyTextEncoder(16).encode(["a cat", "a dog", "a cat"]))
    b = cache.encode(["a dog", "a cat"])
    assert len(enc.calls) == 1 and cache.hits == 3 and cache.misses == 2
    torch.testing.assert_close(b, a[[1, 0]])
    cache.encode(["red car"])  # evicts the least recently used ("a dog")
    assert "a dog" not in cache and "a cat" in cache and len(cache) == 2
    cache.encode(["a dog"])
    assert enc.calls[-1] == ["a dog"]
    with pytest.raises(TypeError):
        cache.encode("a cat")


def test_tiny_encoder_deterministic():
    e1, e2 = TinyTextEncoder(24), TinyTextEncoder(24)
    x = e1.encode(["A  cat on the beach", "neon city"])
    assert x.shape == (2, TEXT_LEN, 24)
    torch.testing.assert_close(x, e2.encode(["a cat on the beach", "neon city"]))  # cleaned + lowercased
    n = len(TinyTextEncoder.words("a cat on the beach"))
    assert n == 6 and x[0, n:].abs().max() == 0 and (x[0, :n].abs().sum(-1) > 0).all()
    assert not torch.allclose(x[0, :2], e1.encode(["a dog"])[0, :2])
    # fixed across processes/versions: the hash is blake2b, not Python's salted hash()
    assert abs(e1.encode(["cat"])[0, 0, 0].item() - TinyTextEncoder(24).encode(["cat"])[0, 0, 0].item()) == 0
