"""Shared by the RIFE tests: the real weights, the CC0 test photo (tests/data/README.md), PSNR."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from streamgen.models.rife import IFNet, load_rife

WEIGHTS = Path(os.environ.get("STREAMGEN_TEST_RIFE")
               or Path(__file__).resolve().parents[2] / "shared/weights/rife-v4.26/flownet.pkl")  # checked in conftest
PHOTO = Path(__file__).parent / "data" / "coffee.jpg"


def load_photo() -> torch.Tensor:
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(PHOTO).convert("RGB"))).permute(2, 0, 1).float() / 255  # (3, 400, 600)


def psnr(a: torch.Tensor, b: torch.Tensor, border: int) -> float:
    """PSNR on the interior (content that moves in across the border is unknowable)."""
    if border:
        a, b = a[..., border:-border, border:-border], b[..., border:-border, border:-border]
    return float(10 * torch.log10(1 / ((a.float() - b.float()) ** 2).mean()))


def real_model() -> IFNet:
    return load_rife(WEIGHTS)
