"""Weights shipped inside the package (see README.md here for how each file was made).

``shapes.safetensors``: the built-in trained model of ``--model shapes``: a small block-causal
Wan DiT (``dit.*`` keys, native Wan2.1 names) and a small Wan VAE (``vae.*``), stored in float16.
The safetensors metadata holds ``wan_config`` and ``vae_config`` (JSON of the config dataclasses,
the VAE's with its own latent mean/std) and ``training`` (how it was made).

    model, vae, meta = load_builtin("shapes", device="cpu", dtype=torch.float32)

``toy.safetensors``: ``streamgen-toy``, the default built-in model (``--model toy``): a block-causal
Wan DiT (``dit.*``), its trained caption encoder (``text.*``) and a TAEHV-layout decoder
(``decoder.*``), float16; metadata ``wan_config``, ``text_config``, ``decoder_channels``,
``sampling`` (recommended SessionState settings, also ``TOY_SAMPLING``) and ``training``.

    model, text_encoder, decoder = load_toy(device="cpu", dtype=torch.float32)
    # text_encoder.encode(list[str]) -> (B, 32, 64); decoder.new_state() / decode_chunk(latents, state)
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

WEIGHTS_DIR = os.path.dirname(os.path.abspath(__file__))


def builtin_path(name: str) -> str:
    return os.path.join(WEIGHTS_DIR, f"{name}.safetensors")


def _config_json(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg))


def save_builtin(path: str, model, vae, training: dict | None = None, dtype: torch.dtype = torch.float16) -> None:
    """Write a WanModel and a WanVAE into one safetensors file (``dit.*`` / ``vae.*``) with their configs."""
    from safetensors.torch import save_file

    tensors = {f"dit.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"vae.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in vae.state_dict().items()})
    meta = {"format": "streamgen-builtin-1", "wan_config": _config_json(model.cfg), "vae_config": _config_json(vae.cfg),
            "training": json.dumps(training or {})}
    save_file(tensors, path, metadata=meta)


def load_builtin(name_or_path: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """(WanModel, WanVAE, training info dict) from a file written by ``save_builtin``; a bare name
    ("shapes") is looked up in this package. Both models come back in eval mode without grads."""
    from safetensors import safe_open

    from streamgen.models.checkpoints import check_keys
    from streamgen.models.wan import WanConfig, WanModel
    from streamgen.models.wan_vae import WanVAE, WanVAEConfig

    path = name_or_path if name_or_path.endswith(".safetensors") else builtin_path(name_or_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"built-in weights {path} are missing: the package was installed without its data files "
            "(reinstall streamgen from a checkout that has streamgen/weights/*.safetensors) "
            "or remake them with scripts/train_builtin.py")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "streamgen-builtin-1":
            raise ValueError(f"{path} is not a streamgen built-in weights file (metadata format "
                             f"{meta.get('format')!r}, expected 'streamgen-builtin-1')")
        sd = {k: f.get_tensor(k) for k in f.keys()}
    wcfg = json.loads(meta["wan_config"])
    wcfg["patch_size"] = tuple(wcfg["patch_size"])
    vcfg = json.loads(meta["vae_config"])
    vcfg = {k: tuple(v) if isinstance(v, list) else v for k, v in vcfg.items()}
    with torch.device("meta"):
        model, vae = WanModel(WanConfig(**wcfg)), WanVAE(WanVAEConfig(**vcfg))
    parts = {}
    for prefix, module in (("dit.", model), ("vae.", vae)):
        part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        check_keys({k: v.shape for k, v in module.state_dict().items()}, part,
                   unexpected=[k for k in sd if not k.startswith(("dit.", "vae."))], what=f"{path} ({prefix[:-1]}):")
        parts[prefix] = part
    model.load_state_dict(parts["dit."], strict=True, assign=True)
    vae.load_state_dict(parts["vae."], strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, vae, json.loads(meta.get("training", "{}"))


TOY_FORMAT = "streamgen-toy-1"
# recommended sampling settings of toy.safetensors (StreamConfig + frame size); also in its metadata
TOY_SAMPLING = {"num_steps": 4, "shift": 5.0, "frames_per_chunk": 3, "local_frames": 12, "sink_frames": 3,
                "width": 128, "height": 128}


def save_toy(path: str, model, text_encoder, decoder, *, sampling: dict | None = None, training: dict | None = None,
             dtype: torch.dtype = torch.float16) -> None:
    """Write the toy model (WanModel, ToyTextEncoder, ToyDecoder) into one safetensors file."""
    from safetensors.torch import save_file

    from streamgen.training.toy import _text_config

    tensors = {}
    for prefix, m in (("dit", model), ("text", text_encoder), ("decoder", decoder)):
        tensors.update({f"{prefix}.{k}": v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
                        for k, v in m.state_dict().items()})
    tensors["decoder.latent_scale"] = decoder.latent_scale.detach().float().cpu().reshape(())
    meta = {"format": TOY_FORMAT, "wan_config": _config_json(model.cfg),
            "text_config": json.dumps(_text_config(text_encoder)),
            "decoder_channels": json.dumps(list(decoder.cfg.channels)),
            "sampling": json.dumps(sampling or TOY_SAMPLING), "training": json.dumps(training or {})}
    save_file(tensors, path, metadata=meta)


def toy_metadata(path: str | None = None) -> dict:
    """The metadata of toy.safetensors, JSON fields decoded (``sampling``, ``training``, configs)."""
    from safetensors import safe_open

    path = path or builtin_path("toy")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return {k: (json.loads(v) if k != "format" else v) for k, v in meta.items()}


def load_toy(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, path: str | None = None):
    """``streamgen-toy``: (WanModel, ToyTextEncoder, ToyDecoder), eval mode, no grads, on ``device``.

    The text encoder's ``encode(list[str])`` returns ``(B, text_len=32, 64)`` in ``dtype`` on
    ``device``; the decoder is ``new_state()`` / ``decode_chunk((B, 16, f, h, w), state) ->
    (B, 3, T, 8h, 8w)`` in [-1, 1] (T = 4f, minus 3 on a stream's first chunk). Sample with
    ``SessionState`` and ``TOY_SAMPLING`` (4 self-forcing steps at shift 5, no CFG)."""
    from safetensors import safe_open

    from streamgen.models.checkpoints import check_keys
    from streamgen.models.wan import WanConfig, WanModel
    from streamgen.training.toy import ToyDecoder, ToyTextEncoder

    path = path or builtin_path("toy")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"built-in weights {path} are missing: the package was installed without its data files "
            "(reinstall streamgen from a checkout that has streamgen/weights/toy.safetensors) "
            "or remake them with scripts/train_toy.py (streamgen/weights/README.md)")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != TOY_FORMAT:
            raise ValueError(f"{path} is not a streamgen-toy weights file (metadata format {meta.get('format')!r}, "
                             f"expected {TOY_FORMAT!r})")
        sd = {k: f.get_tensor(k) for k in f.keys()}
    wcfg = json.loads(meta["wan_config"])
    wcfg["patch_size"] = tuple(wcfg["patch_size"])
    tcfg = json.loads(meta["text_config"])
    model = WanModel(WanConfig(**wcfg))
    text = ToyTextEncoder(tuple(tcfg["vocab"]), tcfg["dim"], tcfg["text_len"], tcfg["layers"], tcfg["heads"])
    decoder = ToyDecoder(tuple(json.loads(meta["decoder_channels"])))
    for prefix, m in (("dit.", model), ("text.", text), ("decoder.", decoder)):
        part = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
        check_keys({k: v.shape for k, v in m.state_dict().items()}, part,
                   unexpected=[k for k in sd if not k.startswith(("dit.", "text.", "decoder."))],
                   what=f"{path} ({prefix[:-1]}):")
        m.load_state_dict(part, strict=True)
    return tuple(m.to(device=device, dtype=dtype).eval().requires_grad_(False) for m in (model, text, decoder))
