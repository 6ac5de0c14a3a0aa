"""RIFE IFNet v4.25 / v4.26 (Practical-RIFE, hzwer; MIT), written from its published structure.

Architecture (per image pair, arbitrary timestep t in (0, 1)):

- ``encode``: a 4-conv head run once per *frame* (not per pair): 3 -> 16 (stride 2), 16 -> 16,
  16 -> 16, ConvTranspose 16 -> 4 (stride 2), giving 4 feature channels at full resolution.
- 5 ``IFBlock`` s at scales [16, 8, 4, 2, 1] (channels 192, 128, 96, 64, 32). Each block bilinearly
  resizes its input to 1/scale, runs two stride-2 convs (``conv0``), 8 residual 3x3 convs with a
  per-channel ``beta`` (``convblock``), and ``ConvTranspose2d(c, 52, 4, 2, 1) + PixelShuffle(2)``
  (``lastconv``) back to 1/scale, then resizes to full resolution: 4 flow channels (times scale),
  1 mask logit, 8 feature channels handed to the next block.
- Block 0 sees ``[img0, img1, f0, f1, t]`` (15 channels); blocks 1-4 see
  ``[warp(img0), warp(img1), warp(f0), warp(f1), t, mask, feat, flow / scale]`` (28 channels) and
  add their flow to the running flow; the mask logit is replaced, not accumulated.
- Backward warping with ``grid_sample`` (bilinear, border padding, align_corners=True) of both
  frames towards time t; the result is ``sigmoid(mask) * warp(img0) + (1 - sigmoid(mask)) * warp(img1)``.
- Inputs are zero-padded on the right/bottom to a multiple of 64 (``64 / scale`` when ``scale < 1``)
  and cropped back.

Precision: the convolutions, and the mask/feature maps they hand on, run in the parameters' dtype
(fp16/bf16 on the GPU, fp32 on the CPU); images, accumulated flows, sampling grids, warps and the
final blend stay in fp32, so sub-pixel accuracy does not depend on the conv dtype. Cast the model with ``model.to(dtype)``; inputs may be any float dtype.

Checkpoints: ``load_rife(path)`` reads ``flownet.pkl`` of v4.25/v4.26 with or without the
``module.`` prefix; the training-only ``teacher.*`` and ``caltime.*`` keys are dropped (one log
line); any other missing or unexpected key is an error that names the keys.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from streamgen.models.checkpoints import check_keys, read_state_dict

log = logging.getLogger(__name__)

_TRAINING_ONLY_PREFIXES = ("teacher.", "caltime.")


@dataclass(frozen=True)
class RIFEConfig:
    head_channels: int = 16
    feat_channels: int = 4  # encode head output per frame
    block_channels: tuple[int, ...] = (192, 128, 96, 64, 32)
    scales: tuple[int, ...] = (16, 8, 4, 2, 1)
    num_resconvs: int = 8
    carry_channels: int = 8  # feature channels one block hands to the next

    def __post_init__(self) -> None:
        if len(self.block_channels) != len(self.scales):
            raise ValueError(f"block_channels {self.block_channels} and scales {self.scales} differ in length")

    @property
    def pad_multiple(self) -> int:
        """Input sides must divide by this: the coarsest block downsamples by max(scale) * 4."""
        return 4 * max(self.scales)

    @classmethod
    def preset(cls, name: str) -> "RIFEConfig":
        presets = {
            "v4.26": cls(),
            "v4.25": cls(),
            # random-init model for tests without weights: same wiring, small widths
            "tiny": cls(head_channels=8, block_channels=(32, 24, 16, 16, 8), num_resconvs=2),
        }
        if name not in presets:
            raise ValueError(f"unknown RIFE preset {name!r}; choose one of {sorted(presets)}")
        return replace(presets[name])


def _conv_lrelu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.LeakyReLU(0.2, inplace=True))


class ResConv(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(torch.addcmul(x, self.conv(x), self.beta), 0.2)


class Head(nn.Module):
    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.cnn0 = nn.Conv2d(3, hidden, 3, 2, 1)
        self.cnn1 = nn.Conv2d(hidden, hidden, 3, 1, 1)
        self.cnn2 = nn.Conv2d(hidden, hidden, 3, 1, 1)
        self.cnn3 = nn.ConvTranspose2d(hidden, out, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.cnn0(x), 0.2)
        x = F.leaky_relu(self.cnn1(x), 0.2)
        x = F.leaky_relu(self.cnn2(x), 0.2)
        return self.cnn3(x)


class IFBlock(nn.Module):
    """Input at 1/scale resolution -> (flow(4) in units of that resolution's pixels, mask(1), feat(C))
    at the same resolution; the caller does the resizing (see module docstring)."""

    def __init__(self, in_planes: int, c: int, num_resconvs: int, carry_channels: int):
        super().__init__()
        self.conv0 = nn.Sequential(_conv_lrelu(in_planes, c // 2), _conv_lrelu(c // 2, c))
        self.convblock = nn.Sequential(*[ResConv(c) for _ in range(num_resconvs)])
        self.lastconv = nn.Sequential(nn.ConvTranspose2d(c, 4 * (5 + carry_channels), 4, 2, 1), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lastconv(self.convblock(self.conv0(x)))


def _resize(x: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 1:
        return x
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class IFNet(nn.Module):
    def __init__(self, cfg: RIFEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or RIFEConfig()
        f, k = cfg.feat_channels, cfg.carry_channels
        self.encode = Head(cfg.head_channels, f)
        first_in = 3 + 3 + 2 * f + 1
        later_in = 3 + 3 + 2 * f + 1 + 1 + k + 4
        for i, c in enumerate(cfg.block_channels):
            setattr(self, f"block{i}", IFBlock(first_in if i == 0 else later_in, c, cfg.num_resconvs, k))

    @property
    def blocks(self) -> list[IFBlock]:
        return [getattr(self, f"block{i}") for i in range(len(self.cfg.block_channels))]

    @property
    def dtype(self) -> torch.dtype:
        return self.encode.cnn0.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encode.cnn0.weight.device

    @property
    def memory_format(self) -> torch.memory_format:
        """channels_last after ``model.to(memory_format=torch.channels_last)``; conv inputs follow it."""
        w = self.encode.cnn1.weight
        cl = w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        return torch.channels_last if cl else torch.contiguous_format

    # ---- public API ---------------------------------------------------------------------------

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, timestep: float | torch.Tensor = 0.5,
                scale: float = 1.0) -> torch.Tensor:
        """Frame at time ``timestep`` between img0 (t=0) and img1 (t=1).

        img0, img1: (N, 3, H, W) in [0, 1], any H, W, any float dtype. timestep: float or (N,).
        Returns (N, 3, H, W) float32, not clamped. ``scale`` < 1 runs the flow at lower resolution
        (RIFE's option for 4K input).
        """
        if img0.shape != img1.shape or img0.ndim != 4 or img0.shape[1] != 3:
            raise ValueError(f"img0/img1 must both be (N, 3, H, W); got {tuple(img0.shape)} and {tuple(img1.shape)}")
        frames = torch.stack([img0, img1], 1).flatten(0, 1)  # (2N, 3, H, W): pair i = frames 2i, 2i+1
        n, dev = img0.shape[0], img0.device
        if isinstance(timestep, torch.Tensor):
            t = timestep.to(device=dev, dtype=torch.float32, non_blocking=True).reshape(-1)
            if t.numel() not in (1, n):
                raise ValueError(f"timestep must be a float or have N={n} entries, got {t.numel()}")
            t = t.expand(n)
        else:
            t = torch.full((n,), float(timestep), device=dev)
        i0 = torch.arange(0, 2 * n, 2, device=dev)
        return self.interpolate_pairs(frames, i0, i0 + 1, t, scale=scale)

    def interpolate_sequence(self, frames: torch.Tensor, timesteps: Sequence[float] | torch.Tensor,
                             scale: float = 1.0) -> torch.Tensor:
        """In-between frames of every consecutive pair of a sequence, in one batched forward.

        frames: (T+1, 3, H, W) in [0, 1]. timesteps: K floats or a (K,) tensor. Returns
        (T, K, 3, H, W) float32 where out[i, k] is the frame at ``timesteps[k]`` between frames[i]
        and frames[i+1]. Each frame is encoded once. No host sync.
        """
        dev = frames.device
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.tensor(list(timesteps), dtype=torch.float32)
        t = timesteps.to(device=dev, dtype=torch.float32, non_blocking=True).reshape(-1)
        n_pairs, k = frames.shape[0] - 1, t.numel()
        if n_pairs < 1 or k < 1:
            raise ValueError(f"need >= 2 frames and >= 1 timestep, got {frames.shape[0]} frames, {k} timesteps")
        i0 = torch.arange(n_pairs, device=dev).view(-1, 1).expand(-1, k).reshape(-1)  # (T*K,) pair-major
        out = self.interpolate_pairs(frames, i0, i0 + 1, t.repeat(n_pairs), scale=scale)
        return out.unflatten(0, (n_pairs, k))

    def interpolate_pairs(self, frames: torch.Tensor, idx0: torch.Tensor, idx1: torch.Tensor, t: torch.Tensor,
                          scale: float = 1.0) -> torch.Tensor:
        """out[j] = frame at time t[j] between frames[idx0[j]] and frames[idx1[j]].

        frames (M, 3, H, W) in [0, 1]; idx0, idx1 (N,) long; t (N,) float. Returns (N, 3, H, W) float32.
        """
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be (M, 3, H, W), got {tuple(frames.shape)}")
        h, w = frames.shape[-2:]
        mult = max(self.cfg.pad_multiple, int(self.cfg.pad_multiple / scale))
        ph, pw = math.ceil(h / mult) * mult, math.ceil(w / mult) * mult
        x = frames.to(torch.float32)
        if (ph, pw) != (h, w):
            x = F.pad(x, (0, pw - w, 0, ph - h))
        feats = self.encode(x.to(self.dtype, memory_format=self.memory_format)).to(torch.float32)  # (M, F, ph, pw)
        src = torch.cat([x, feats], 1)  # (M, 3+F, ph, pw)
        out = self._flow_and_merge(src, idx0, idx1, t.to(torch.float32), scale)
        return out[..., :h, :w]

    # ---- internals ----------------------------------------------------------------------------

    def _flow_and_merge(self, src: torch.Tensor, idx0: torch.Tensor, idx1: torch.Tensor, t: torch.Tensor,
                        scale: float) -> torch.Tensor:
        n = idx0.shape[0]
        _, c, hh, ww = src.shape
        cdt, mf = self.dtype, self.memory_format
        both = torch.cat([idx0, idx1])  # (2N,): side 0 then side 1
        pair_src = src.index_select(0, both)  # (2N, 3+F, ph, pw)
        # normalized sampling grid (align_corners=True: -1 and 1 are the outer pixel centres)
        gx = torch.linspace(-1.0, 1.0, ww, device=src.device, dtype=torch.float32)
        gy = torch.linspace(-1.0, 1.0, hh, device=src.device, dtype=torch.float32)
        base = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)  # (ph, pw, 2) as (x, y)
        # pixels -> grid units, (2/(W-1), 2/(H-1)); linspace keeps both ends exact and needs no H2D copy
        to_grid = torch.linspace(2.0 / (ww - 1), 2.0 / (hh - 1), 2, device=src.device, dtype=torch.float32)

        warped = pair_src
        flow = carried = None  # flow (N, 4, ph, pw) fp32; carried = [mask, feat] (N, 1+K, ph, pw) in cdt
        blocks = self.blocks
        for i, (block, s) in enumerate(zip(blocks, self.cfg.scales)):
            s = s / scale
            small = _resize(warped, 1.0 / s)  # (2N, 3+F, h, w)
            h, w = small.shape[-2:]
            imgs = small[:, :3].unflatten(0, (2, n)).transpose(0, 1).flatten(1, 2)  # (N, 6, h, w)
            fts = small[:, 3:].unflatten(0, (2, n)).transpose(0, 1).flatten(1, 2)  # (N, 2F, h, w)
            tplane = t.view(n, 1, 1, 1).expand(n, 1, h, w)
            parts = [imgs, fts, tplane]
            if flow is not None:
                parts += [_resize(carried, 1.0 / s), _resize(flow, 1.0 / s) / s]
            tmp = block(torch.cat([p.to(cdt) for p in parts], 1).contiguous(memory_format=mf))
            up = _resize(tmp, s)  # (N, 5+K, ph, pw), conv dtype: only the flow is kept in fp32
            dflow = up[:, :4].to(torch.float32) * s
            flow = dflow if flow is None else flow + dflow
            carried = up[:, 4:]
            # warp both sides towards t; after the last block only the images are needed
            grid = flow.unflatten(1, (2, 2)).transpose(0, 1).flatten(0, 1)  # (2N, 2, ph, pw)
            grid = torch.addcmul(base, grid.permute(0, 2, 3, 1), to_grid)  # (2N, ph, pw, 2)
            last = i == len(blocks) - 1
            warped = F.grid_sample(pair_src[:, :3] if last else pair_src, grid, mode="bilinear",
                                   padding_mode="border", align_corners=True)
        w0, w1 = warped[:n], warped[n:]
        m = torch.sigmoid(carried[:, :1].to(torch.float32))
        return w1 + m * (w0 - w1)


def compile_rife(model: IFNet, **compile_kwargs) -> IFNet:
    """Wrap the model's batched path in ``torch.compile`` (static shapes: one graph per chunk shape).

    A speed-up from outside: the module is unchanged, only ``model.interpolate_pairs`` (which
    ``forward`` and ``interpolate_sequence`` call) is replaced on this instance.
    """
    compile_kwargs.setdefault("dynamic", False)
    model.interpolate_pairs = torch.compile(model.interpolate_pairs, **compile_kwargs)
    return model


# ---- checkpoints --------------------------------------------------------------------------------

def convert_rife_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """flownet.pkl keys -> IFNet keys: strip ``module.``, drop training-only ``teacher.``/``caltime.``."""
    if not isinstance(sd, dict):
        raise TypeError(f"expected a state dict, got {type(sd).__name__}")
    out: dict[str, torch.Tensor] = {}
    dropped = 0
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if k.startswith(_TRAINING_ONLY_PREFIXES):
            dropped += 1
            continue
        out[k] = v
    if dropped:
        log.info("RIFE checkpoint: ignored %d training-only keys (teacher.*, caltime.*)", dropped)
    return out


def load_rife(path: str | Path, cfg: RIFEConfig | None = None, *, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> IFNet:
    """Build an IFNet and load ``flownet.pkl`` (v4.25/v4.26; or a release .zip holding it) into it, in eval mode."""
    sd = read_state_dict(path, what="RIFE", names=("flownet.pkl",),
                         hint="pass the path of flownet.pkl from Practical-RIFE v4.25/v4.26, or its release .zip")
    sd = convert_rife_state_dict(sd)
    model = IFNet(cfg or RIFEConfig.preset("v4.26"))
    check_keys(model.state_dict(), sd, what=f"{path} is not a RIFE v4.25/v4.26 IFNet checkpoint:")
    model.load_state_dict(sd)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
