"""Procedural "shapes" videos with captions, and measurements of generated ones.

A clip is one coloured shape (circle, square, triangle) on a plain background, moving at constant
speed left/right/up/down (leaving one edge it comes back at the opposite one, so a stream never
runs out of motion) or bouncing diagonally off the edges. Captions follow one template::

    a {colour} {shape} moving {left|right|up|down} on a {background} background
    a {colour} {shape} bouncing on a {background} background

with the motion and/or background clause left out at random in training (the attribute is then
random), so that ``a red circle`` is a valid prompt too. ``VOCABULARY`` lists the words.

Frames are rendered with torch (any device) from closed-form positions, so a clip can start at
any frame index ``tau`` (``render(batch, start=tau, ...)``) with the motion it would have there;
edges are anti-aliased with a one-pixel ramp of the shape's signed distance. Pixel values are in
[-1, 1], layout (B, 3, T, H, W) as the Wan VAE takes them.

``analyse(frames)`` measures a video (uint8 (T, H, W, 3)): background and object colour, the
object's area and velocity, how much of the image is neither; ``nearest_colour`` names a colour.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "white": (0.95, 0.95, 0.95),
    "orange": (1.00, 0.55, 0.05),
    "purple": (0.60, 0.20, 0.85),
    "cyan": (0.10, 0.85, 0.90),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.03, 0.03, 0.03),
    "white": (0.93, 0.93, 0.93),
    "gray": (0.45, 0.45, 0.45),
    "blue": (0.10, 0.16, 0.45),
    "green": (0.08, 0.35, 0.12),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "bouncing")
_DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
VOCABULARY = sorted(set(COLOURS) | set(BACKGROUNDS) | set(SHAPES) | set(MOTIONS) | {"a", "moving", "on", "background"})


def caption(colour: str, shape: str, motion: str | None, background: str | None) -> str:
    """The template caption; ``None`` leaves that clause out."""
    text = f"a {colour} {shape}"
    if motion is not None:
        text += " bouncing" if motion == "bouncing" else f" moving {motion}"
    if background is not None:
        text += f" on a {background} background"
    return text


def parse_caption(text: str) -> dict[str, str | None]:
    """Attributes named by a prompt: {"colour", "shape", "motion", "background"}, None where absent.
    Reads the first colour word before the shape as the object's, a colour word before
    "background" as the background's."""
    words = re.findall(r"[a-z]+", text.lower())
    out: dict[str, str | None] = {"colour": None, "shape": None, "motion": None, "background": None}
    for i, w in enumerate(words):
        if w == "background" and i > 0 and words[i - 1] in BACKGROUNDS:
            out["background"] = words[i - 1]
        elif w in SHAPES and out["shape"] is None:
            out["shape"] = w
        elif w in COLOURS and out["colour"] is None and out["shape"] is None:
            out["colour"] = w
        elif w in MOTIONS and out["motion"] is None:
            out["motion"] = w
    return out


@dataclass
class ShapeBatch:
    """B clips: shape (B,) index into SHAPES; colour / background (B, 3) in [0, 1]; radius (B,)
    pixels; start (B, 2) x, y at frame 0; velocity (B, 2) pixels per frame; bounce (B,) bool."""

    shape: torch.Tensor
    colour: torch.Tensor
    background: torch.Tensor
    radius: torch.Tensor
    start: torch.Tensor
    velocity: torch.Tensor
    bounce: torch.Tensor
    captions: list[str]
    size: int

    def to(self, device) -> "ShapeBatch":
        t = {k: getattr(self, k).to(device) for k in ("shape", "colour", "background", "radius", "start", "velocity", "bounce")}
        return ShapeBatch(**t, captions=self.captions, size=self.size)


def sample_batch(n: int, size: int, generator: torch.Generator, *, drop_clauses: bool = True,
                 empty_prob: float = 0.0, attributes: list[dict] | None = None) -> ShapeBatch:
    """n random clips at ``size`` x ``size``. ``drop_clauses``: leave the motion / background clause
    out of some captions; ``empty_prob``: fraction of empty captions; ``attributes``: per clip,
    attributes to force (dicts as ``parse_caption`` returns; None values stay random)."""
    g = generator
    colours, bgs = list(COLOURS), list(BACKGROUNDS)
    rnd = torch.rand(n, 12, generator=g, dtype=torch.float64).tolist()
    shape_i, colour_v, bg_v, radius, start, vel, bounce, caps = [], [], [], [], [], [], [], []
    for i in range(n):
        r = rnd[i]
        want = attributes[i] if attributes is not None else {}
        c = want.get("colour") or colours[int(r[0] * len(colours))]
        s = want.get("shape") or SHAPES[int(r[1] * len(SHAPES))]
        m = want.get("motion") or MOTIONS[int(r[2] * len(MOTIONS))]
        b = want.get("background")
        if b is None:
            options = [x for x in bgs if x != c]
            b = options[int(r[3] * len(options))]
        rad = size * (0.08 + 0.08 * r[4])
        speed = size * (0.008 + 0.016 * r[5])  # 1..3 px per frame at 128
        if m == "bouncing":
            ang = math.radians(25 + 40 * r[6]) + math.pi / 2 * int(r[7] * 4)
            v = (speed * math.cos(ang), speed * math.sin(ang))
        else:
            dx, dy = _DIRECTIONS[m]
            v = (speed * dx, speed * dy)
        shape_i.append(SHAPES.index(s))
        colour_v.append(COLOURS[c])
        bg_v.append(BACKGROUNDS[b])
        radius.append(rad)
        start.append((rad + (size - 2 * rad) * r[8], rad + (size - 2 * rad) * r[9]))
        vel.append(v)
        bounce.append(m == "bouncing")
        if attributes is not None:
            caps.append(caption(c, s, want.get("motion"), want.get("background")))
        elif r[10] < empty_prob:
            caps.append("")
        else:
            u = r[11] if drop_clauses else 0.0
            caps.append(caption(c, s, None if 0.6 <= u < 0.8 or u >= 0.9 else m, None if 0.8 <= u else b))
    f = torch.float32
    return ShapeBatch(torch.tensor(shape_i), torch.tensor(colour_v, dtype=f), torch.tensor(bg_v, dtype=f),
                      torch.tensor(radius, dtype=f), torch.tensor(start, dtype=f), torch.tensor(vel, dtype=f),
                      torch.tensor(bounce), caps, size)


def positions(batch: ShapeBatch, start: torch.Tensor, frames: int) -> torch.Tensor:
    """Shape centres (B, T, 2) at frames start .. start+frames-1 (start: (B,) frame indices)."""
    tau = start.to(batch.start).view(-1, 1) + torch.arange(frames, device=batch.start.device, dtype=torch.float32)
    p = batch.start[:, None, :] + batch.velocity[:, None, :] * tau[..., None]  # (B, T, 2)
    r = batch.radius.view(-1, 1, 1)
    span = batch.size - 2 * r
    q = torch.remainder(p - r, 2 * span)
    bounced = r + span - (q - span).abs()
    wrapped = torch.remainder(p, batch.size)
    return torch.where(batch.bounce.view(-1, 1, 1), bounced, wrapped)


def render(batch: ShapeBatch, start: torch.Tensor | int = 0, frames: int = 17) -> torch.Tensor:
    """(B, 3, frames, size, size) in [-1, 1], frames ``start .. start+frames-1`` of each clip."""
    n, size, dev = batch.shape.shape[0], batch.size, batch.start.device
    if not isinstance(start, torch.Tensor):
        start = torch.full((n,), int(start), device=dev)
    c = positions(batch, start, frames)  # (B, T, 2)
    grid = torch.arange(size, device=dev, dtype=torch.float32) + 0.5
    half = size / 2
    dx = torch.remainder(grid.view(1, 1, 1, -1) - c[..., 0, None, None] + half, size) - half  # (B, T, 1, W)
    dy = torch.remainder(grid.view(1, 1, -1, 1) - c[..., 1, None, None] + half, size) - half  # (B, T, H, 1)
    r = batch.radius.view(-1, 1, 1, 1)
    circle = torch.sqrt(dx * dx + dy * dy) - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.85 * r
    # equilateral triangle, apex up (image y grows downwards): three edge normals, inradius R/2
    tri_r = 1.25 * r
    s3 = math.sqrt(3) / 2
    triangle = torch.maximum(torch.maximum(dy, s3 * dx - 0.5 * dy), -s3 * dx - 0.5 * dy) - tri_r / 2
    k = batch.shape.view(-1, 1, 1, 1)
    sdf = torch.where(k == 0, circle, torch.where(k == 1, square, triangle))  # (B, T, H, W)
    alpha = (0.5 - sdf).clamp(0.0, 1.0).unsqueeze(1)  # (B, 1, T, H, W)
    col = batch.colour.view(n, 3, 1, 1, 1)
    bg = batch.background.view(n, 3, 1, 1, 1)
    return (bg + (col - bg) * alpha) * 2.0 - 1.0


# -- measuring generated videos ----------------------------------------------------------------


def nearest_colour(rgb, table: dict[str, tuple[float, float, float]] = COLOURS) -> str:
    """Name of the table colour nearest to ``rgb`` (3 floats in [0, 1])."""
    rgb = [float(v) for v in rgb]
    return min(table, key=lambda k: sum((a - b) ** 2 for a, b in zip(table[k], rgb)))


def analyse(frames, threshold: float = 0.25) -> dict:
    """Measure a video of one object on a plain background.

    frames: uint8 (T, H, W, 3) (numpy or tensor). Returns background (3,) (median pixel),
    object (3,) (mean of the pixels farther than ``threshold`` from the background, max channel
    difference in [0, 1]; nan if none), area (mean object fraction of the image), velocity (vx, vy)
    pixels per frame (median over frames of the wrapped change of the object's circular centroid)
    and speed (the medians of its absolute values),
    stray (mean distance in [0, 1] of every pixel to the nearer of background and object colour:
    0 for a clean two-colour picture, larger for blur and noise)."""
    x = torch.as_tensor(frames).float() / 255.0  # (T, H, W, 3)
    t, h, w, _ = x.shape
    bg = x.reshape(-1, 3).median(dim=0).values
    diff = (x - bg).abs().amax(dim=-1)  # (T, H, W)
    mask = diff > threshold
    obj = x[mask].mean(dim=0) if mask.any() else torch.full((3,), float("nan"))
    if mask.any():
        stray = torch.minimum((x - bg).abs().amax(-1), (x - obj).abs().amax(-1)).mean()
    else:
        stray = diff.mean()
    # circular centroid per frame (objects wrap around the edges)
    vel, spd = [0.0, 0.0], [0.0, 0.0]
    m = mask.float()
    for axis, n_pix in ((2, w), (1, h)):
        ang = (torch.arange(n_pix, dtype=torch.float32) + 0.5) * (2 * math.pi / n_pix)
        shape = [1, 1, 1]
        shape[axis] = n_pix
        ang = ang.view(shape)
        s = (m * torch.sin(ang)).sum(dim=(1, 2))
        c = (m * torch.cos(ang)).sum(dim=(1, 2))
        pos = torch.atan2(s, c) * (n_pix / (2 * math.pi))  # (T,)
        ok = m.sum(dim=(1, 2)) > 0
        d = torch.remainder(pos[1:] - pos[:-1] + n_pix / 2, n_pix) - n_pix / 2
        d = d[ok[1:] & ok[:-1]]
        k = 0 if axis == 2 else 1
        vel[k] = float(d.median()) if d.numel() else 0.0
        spd[k] = float(d.abs().median()) if d.numel() else 0.0
    return {"background": bg.tolist(), "object": obj.tolist(), "area": float(m.mean()),
            "velocity": tuple(vel), "speed": tuple(spd), "stray": float(stray)}


def motion_of(stats: dict, min_speed: float = 0.3) -> str | None:
    """From ``analyse``'s result: "left" / "right" / "up" / "down" for a mostly axis-aligned
    motion, "bouncing" for a diagonal one, None when (nearly) still."""
    vx, vy = stats["velocity"]
    sx, sy = stats["speed"]
    if max(sx, sy) < min_speed:
        return None
    if min(sx, sy) > 0.4 * max(sx, sy):
        return "bouncing"
    if abs(vx) > abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"
