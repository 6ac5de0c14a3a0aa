"""Weights shipped inside the package (see README.md here for how each file was made).

``shapes.safetensors``: the built-in trained model of ``--model shapes``: a small block-causal
Wan DiT (``dit.*`` keys, native Wan2.1 names) and a small Wan VAE (``vae.*``), stored in float16.
The safetensors metadata holds ``wan_config`` and ``vae_config`` (JSON of the config dataclasses,
the VAE's with its own latent mean/std) and ``training`` (how it was made).

    model, vae, meta = load_builtin("shapes", device="cpu", dtype=torch.float32)
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
