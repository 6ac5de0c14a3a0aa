"""Tiny video decoder in the TAEHV layout (madebyollin/taehv, ``taew2_1.pth`` for Wan2.1), streaming.

Contract (CONTRACTS.md, "Decoders + text"), the same as ``WanVAE``:

    dec = load_taehv(path, TAEHVConfig.preset("taew2.1"), device=..., dtype=...)  # or TAEHV(cfg): random init
    state = dec.new_state()                      # one per stream/session
    frames = dec.decode_chunk(latents, state)    # latents (B,16,f,h,w) in the DiT latent space
                                                 # -> (B,3,T,8h,8w) in [-1,1]
                                                 # T = 1+4(f-1) on the first chunk, 4f afterwards
    frames = dec.decode_video(latents)           # whole video at once (reference), same shapes

TAEHV decodes exactly the latents the diffusion model uses (no mean/std), i.e. the
normalized Wan latents. Its own output range [0, 1] is mapped to [-1, 1].

Architecture (the decoder is an ``nn.Sequential``; parameter names ``decoder.<index>.*`` as in
the checkpoint): Clamp, conv, ReLU, then three stages of [3 x MemBlock, Upsample(2x space),
TGrow(time stride 1/2/2), conv], then ReLU, conv. A MemBlock mixes each frame with the
previous frame's input to that block (zeros before the first frame): a one-frame memory per
block, which is the whole streaming state. TGrow turns each frame into ``stride`` frames
with a 1x1 conv. The decoder emits 4 frames per latent; the first ``frames_to_trim = 3``
frames of a stream are dropped, which aligns the frame count with the Wan VAE.

Checkpoint keys ``encoder.*`` are accepted and ignored (only the decoder is built). A TGrow
whose checkpoint weight has more output channels than the model (a stride-2 weight for a
stride-1 layer) keeps its last-timestep channels, as TAEHV does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from streamgen.models.checkpoints import check_keys, read_state_dict, strip_prefixes
from streamgen.models.wan_vae import DecoderState


@dataclass(frozen=True)
class TAEHVConfig:
    latent_channels: int = 16
    channels: tuple[int, int, int, int] = (256, 128, 64, 64)
    time_upscale: tuple[bool, bool, bool] = (False, True, True)
    space_upscale: tuple[bool, bool, bool] = (True, True, True)
    patch_size: int = 1
    image_channels: int = 3

    PRESETS = ("taew2.1", "tiny")

    @classmethod
    def preset(cls, name: str, **overrides) -> "TAEHVConfig":
        if name == "taew2.1":
            cfg = cls()
        elif name == "tiny":
            cfg = cls(channels=(16, 16, 8, 8))
        else:
            raise ValueError(f"unknown TAEHV preset {name!r}; allowed: {', '.join(cls.PRESETS)}")
        return replace(cfg, **overrides)

    @property
    def time_factor(self) -> int:
        return 2 ** sum(map(bool, self.time_upscale))

    @property
    def space_factor(self) -> int:
        return 2 ** sum(map(bool, self.space_upscale)) * self.patch_size

    @property
    def frames_to_trim(self) -> int:
        return self.time_factor - 1


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """``relu(conv(cat(x, past)) + skip(x))``; ``past`` is the previous frame's input to this block."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in * 2, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TGrow(nn.Module):
    """Each frame -> ``stride`` frames (1x1 conv to stride*C channels, split in time order)."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nt, c, h, w = x.shape
        return self.conv(x).reshape(nt * self.stride, c, h, w)  # (nt, stride*c, ..) -> stride frames per frame


class TAEHVState(DecoderState):
    """Per-stream memory: the last input frame of every MemBlock, (B, C, H, W) each, written in place."""

    name = "TAEHV"


class TAEHV(nn.Module):
    """TAEHV decoder (random init unless loaded)."""

    def __init__(self, cfg: TAEHVConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or TAEHVConfig()
        n = cfg.channels
        layers: list[nn.Module] = [Clamp(), _conv(cfg.latent_channels, n[0]), nn.ReLU()]
        for i in range(3):
            layers += [MemBlock(n[i], n[i]), MemBlock(n[i], n[i]), MemBlock(n[i], n[i]),
                       nn.Upsample(scale_factor=2 if cfg.space_upscale[i] else 1),
                       TGrow(n[i], 2 if cfg.time_upscale[i] else 1),
                       _conv(n[i], n[i + 1], bias=False)]  # fmt: skip
        layers += [nn.ReLU(), _conv(n[3], cfg.image_channels * cfg.patch_size**2)]
        self.decoder = nn.Sequential(*layers)
        # Execution order: a TGrow (1x1 conv) commutes with the nearest Upsample before it, so it
        # runs first, on a quarter of the pixels. Same result, fewer FLOPs.
        order = list(range(len(layers)))
        for i in range(len(layers) - 1):
            if isinstance(layers[i], nn.Upsample) and isinstance(layers[i + 1], TGrow):
                order[i], order[i + 1] = i + 1, i
        self._order = order
        self.init_random_()

    @torch.no_grad()
    def init_random_(self, seed: int | None = None) -> "TAEHV":
        """Random weights that keep activations O(1) through the stack (He init), output around mid-gray.

        For tests and the ``tiny`` model; a checkpoint overwrites all of it.
        """
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for m in self.decoder.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.zero_()
        last = self.decoder[-1]
        last.weight.mul_(0.02)
        last.bias.fill_(0.5)
        return self

    def new_state(self) -> TAEHVState:
        return TAEHVState()

    def _check(self, latents: torch.Tensor) -> None:
        c = self.cfg.latent_channels
        if latents.ndim != 5 or latents.shape[1] != c or latents.shape[2] < 1:
            raise ValueError(f"latents must be (B, {c}, f>=1, h, w), got {tuple(latents.shape)}")

    def _finish(self, x: torch.Tensor, batch: int, trim: int) -> torch.Tensor:
        x = F.pixel_shuffle(x, self.cfg.patch_size) if self.cfg.patch_size > 1 else x
        x = x.reshape(batch, -1, *x.shape[1:]).transpose(1, 2)  # (B, 3, T, H, W)
        x = x[:, :, trim:]
        return x.float().clamp_(0, 1).mul_(2).sub_(1)

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, state: TAEHVState) -> torch.Tensor:
        """Decode the next ``f`` latent frames of a stream; see the module docstring for shapes."""
        self._check(latents)
        p = self.decoder[1].weight
        b, _, t = latents.shape[:3]
        x = latents.to(p.device, p.dtype).transpose(1, 2).flatten(0, 1)  # (B*t, C, h, w), frames of a batch item contiguous
        for i in self._order:
            layer = self.decoder[i]
            if isinstance(layer, MemBlock):
                xs = x.reshape(b, t, *x.shape[1:])  # (B, t, C, H, W)
                mem = state.buffer(i, xs[:, 0].shape, xs)  # (B, C, H, W): the previous chunk's last frame
                past = torch.cat([mem.unsqueeze(1), xs[:, :-1]], dim=1).flatten(0, 1)  # (B*t, C, H, W), one frame back
                mem.copy_(xs[:, -1])
                x = layer(x, past)
            else:
                x = layer(x)
                if isinstance(layer, TGrow):
                    t *= layer.stride
        trim = 0 if state.started else self.cfg.frames_to_trim
        state.started = True
        return self._finish(x, b, trim)

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Whole latent video at once (TAEHV's parallel mode): the reference for ``decode_chunk``."""
        self._check(latents)
        p = self.decoder[1].weight
        b = latents.shape[0]
        x = latents.to(p.device, p.dtype).transpose(1, 2)  # (B, T, C, h, w)
        for i in self._order:
            layer = self.decoder[i]
            if isinstance(layer, MemBlock):
                past = F.pad(x, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1]  # shift by one frame, zeros first
                x = layer(x.flatten(0, 1), past.flatten(0, 1)).reshape(b, -1, *x.shape[2:])  # (B, T, C, H, W)
            else:
                y = layer(x.flatten(0, 1))  # (B*T', C', H', W'); T' = stride*T after a TGrow
                x = y.reshape(b, -1, *y.shape[1:])
        return self._finish(x.flatten(0, 1), b, self.cfg.frames_to_trim)

    def output_frames(self, f: int, first: bool) -> int:
        return self.cfg.time_factor * f - (self.cfg.frames_to_trim if first else 0)


def convert_taehv_state_dict(sd: dict[str, torch.Tensor], cfg: TAEHVConfig | None = None) -> dict[str, torch.Tensor]:
    """TAEHV checkpoint (``taew2_1.pth`` / ``.safetensors``) -> this module's decoder state dict, checked."""
    cfg = cfg or TAEHVConfig()
    sd = strip_prefixes(sd, ("module.", "taehv."))
    with torch.device("meta"):
        model = TAEHV(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if not any(k.startswith("decoder.") for k in sd):
        raise ValueError(f"not a TAEHV checkpoint: no decoder.* keys (got e.g. {sorted(sd)[:5]})")
    out = {k: v for k, v in sd.items() if k.startswith("decoder.")}
    for i, layer in enumerate(model.decoder):
        key = f"decoder.{i}.conv.weight"
        if isinstance(layer, TGrow) and key in out and out[key].shape[0] > expected[key][0]:
            out[key] = out[key][-expected[key][0] :]
    check_keys(expected, out,
               what=f"TAEHV checkpoint does not match config (latent_channels={cfg.latent_channels}, channels={cfg.channels}):",
               notes=["  (Wan2.1 needs taew2_1.pth; taew2_2 / taehv1_5 are other latent spaces)"])  # fmt: skip
    return out


def load_taehv(
    path: str | os.PathLike,
    cfg: TAEHVConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float16,
) -> TAEHV:
    sd = read_state_dict(path, what="TAEHV", names=("taew2_1.pth", "taew2_1.safetensors"),
                         hint="expected taew2_1.pth or .safetensors")
    cfg = cfg or TAEHVConfig()
    sd = convert_taehv_state_dict(sd, cfg)
    with torch.device("meta"):
        model = TAEHV(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
