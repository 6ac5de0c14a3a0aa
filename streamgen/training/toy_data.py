"""Procedural captioned clips for ``streamgen-toy``, with ground truth, and measurements of videos.

A scene is one or two objects (8 colours x 4 shapes, anti-aliased signed-distance shapes) on one
of 5 backgrounds (4 plain, 1 vertical gradient), each object with one of 8 motions:

    right, left, up, down, up-right, down-left (constant velocity on a torus: an object leaving
    one edge comes back at the opposite one, so a stream never runs out of motion), still,
    orbit (clockwise circles of radius 22 px, one turn every 4 s).

Positions are closed-form functions of the video time ``t`` (frames at 16 fps, any real ``t``,
negative too), so any frame of an endless stream renders directly: ``render(scene, times)``.

Prompt switches: a scene may change one attribute (object 0's colour, shape or motion, or the
background) at video frame ``t_switch``: colour / background / shape (signed distances) blend
with a smoothstep over ``dur`` frames, motion changes velocity with a continuous position. The
caption of the new state (``caption(scene, state=1)``) always names the switched attribute.

Captions: several templates and synonyms ("a crimson ball drifting left over a dark blue sky"),
with the motion / background / colour clauses left out at random (the attribute is then
random). ``VOCABULARY`` is every word the templates use.

Held-out set: a (colour, shape, motion, background) combination with ``is_heldout`` true never
appears in a training clip (``sample_scenes`` resamples it, before and after a switch, for every
object); ``heldout_prompts(n)`` gives evaluation prompts of such combinations.

Latent-time convention (the toy autoencoder): latent frame ``k`` covers video frames
``4k-3 .. 4k`` (``latent_times``); the decoder emits 4 frames per latent and a stream drops
the first 3, so a stream's video frame ``v`` is latent ``ceil(v/4)``'s.

Measurements (``analyse_frame``, ``classify_motion``, ``analyse_clip``) read a video back into
attributes with the renderer's own templates: background = the template with the smallest
median error, object pixels = far from it, colour = nearest palette colour of their median,
shape = best IoU of equal-area templates at the object's (torus) centroid, motion = the centroid
track's velocity (still / orbit / nearest direction).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

FPS = 16
# name -> (rgb in [0, 1], synonyms used in captions; the name itself first)
COLOURS: dict[str, tuple[tuple[float, float, float], tuple[str, ...]]] = {
    "red": ((0.90, 0.10, 0.10), ("red", "crimson", "scarlet")),
    "orange": ((1.00, 0.55, 0.05), ("orange", "tangerine")),
    "yellow": ((1.00, 0.90, 0.10), ("yellow", "golden")),
    "green": ((0.10, 0.80, 0.20), ("green", "emerald", "lime")),
    "cyan": ((0.10, 0.85, 0.90), ("cyan", "turquoise", "aqua")),
    "blue": ((0.15, 0.30, 1.00), ("blue", "azure", "cobalt")),
    "purple": ((0.60, 0.20, 0.90), ("purple", "violet")),
    "pink": ((1.00, 0.50, 0.75), ("pink", "rose")),
}
SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "ball", "disc"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge"),
    "diamond": ("diamond", "rhombus"),
}
# name -> (top rgb, bottom rgb, phrases)
BACKGROUNDS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float], tuple[str, ...]]] = {
    "black": ((0.03, 0.03, 0.03), (0.03, 0.03, 0.03),
              ("on a black background", "over a black backdrop", "on black", "in the dark")),
    "white": ((0.95, 0.95, 0.95), (0.95, 0.95, 0.95),
              ("on a white background", "over a white backdrop", "on white", "on a blank white page")),
    "navy": ((0.05, 0.08, 0.30), (0.05, 0.08, 0.30),
             ("over a dark blue sky", "on a navy background", "against a night sky", "on a dark blue background")),
    "gray": ((0.45, 0.45, 0.45), (0.45, 0.45, 0.45),
             ("on a gray background", "on a grey backdrop", "over concrete gray", "on gray")),
    "gradient": ((0.42, 0.24, 0.46), (0.04, 0.10, 0.20),
                 ("over a purple gradient", "on a dusk gradient background", "against a twilight gradient",
                  "on a gradient background")),
}
SPEED = 1.25 / 128  # frame heights per video frame
ORBIT_RADIUS = 22 / 128
ORBIT_OMEGA = 2 * math.pi / 64  # rad per frame, clockwise on screen (y down)
_D = 1 / math.sqrt(2)
# name -> (unit velocity (x, y) with y down, phrases)
MOTIONS: dict[str, tuple[tuple[float, float], tuple[str, ...]]] = {
    "right": ((1.0, 0.0), ("moving right", "drifting right", "sliding to the right", "heading right")),
    "left": ((-1.0, 0.0), ("moving left", "drifting left", "sliding to the left", "heading left")),
    "up": ((0.0, -1.0), ("moving up", "rising", "floating up", "drifting upward")),
    "down": ((0.0, 1.0), ("moving down", "falling", "sinking", "drifting downward")),
    "up-right": ((_D, -_D), ("moving up and to the right", "drifting diagonally up right", "rising to the right")),
    "down-left": ((-_D, _D), ("moving down and to the left", "drifting diagonally down left", "falling to the left")),
    "still": ((0.0, 0.0), ("standing still", "resting", "staying still", "not moving")),
    "orbit": ((0.0, 0.0), ("circling", "orbiting", "moving in a circle", "going round in circles")),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPE_NAMES = tuple(SHAPES)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
MOTION_NAMES = tuple(MOTIONS)
ORBIT = MOTION_NAMES.index("orbit")
LINEAR_MOTIONS = tuple(i for i, m in enumerate(MOTION_NAMES) if m != "orbit")
SIZE_RANGE = (15 / 128, 20 / 128)  # object "radius" in frame heights

_ARTICLES = ("a", "one", "")
_SWITCH_KINDS = ("colour", "shape", "motion", "background")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _all_phrases() -> list[str]:
    out = list(_ARTICLES) + ["an", "and", "with", "there", "is", "shape", "thing"]
    for _, syn in COLOURS.values():
        out += syn
    for syn in SHAPES.values():
        out += syn
    for *_, ph in BACKGROUNDS.values():
        out += ph
    for _, ph in MOTIONS.values():
        out += ph
    return out


VOCABULARY: tuple[str, ...] = tuple(sorted({w for p in _all_phrases() for w in _words(p)}))


def is_heldout(colour: int, shape: int, motion: int, background: int) -> bool:
    """The held-out (colour, shape, motion, background) combinations (about 1 in 9), never trained on.
    Every single attribute value and every pair of values still occurs in training."""
    return (3 * colour + 5 * shape + 7 * motion + 11 * background) % 9 == 4


# ----------------------------------------------------------------------------------------- scenes


@dataclass
class Scene:
    """A batch of scenes; O = 2 object slots (``n_obj`` says how many are drawn). Index ``0`` / ``1``
    of the attribute pairs: before / after ``t_switch`` (equal when nothing switches)."""

    n_obj: torch.Tensor  # (B,) long, 1 or 2
    colour: torch.Tensor  # (B, O, 2) long
    shape: torch.Tensor  # (B, O, 2) long
    motion: torch.Tensor  # (B, O, 2) long
    background: torch.Tensor  # (B, 2) long
    p0: torch.Tensor  # (B, O, 2) float: position at t=0 (x, y) in frame heights (orbit: circle centre)
    size: torch.Tensor  # (B, O) float, frame heights
    phase: torch.Tensor  # (B, O) float, orbit phase
    t_switch: torch.Tensor  # (B,) float video frame (inf: none)
    dur: torch.Tensor  # (B,) float frames of the blend
    switch_kind: list[str | None]  # per item: which attribute switches
    seed_words: list[int]  # per item: seed of the caption's random choices

    def to(self, device) -> "Scene":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return Scene(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})

    def __len__(self) -> int:
        return self.n_obj.shape[0]

    def item(self, i: int) -> "Scene":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return Scene(**{k: v[i : i + 1] for k, v in kw.items()})

    @staticmethod
    def cat(scenes: list["Scene"]) -> "Scene":
        out = {}
        for f in fields(Scene):
            vals = [getattr(s, f.name) for s in scenes]
            out[f.name] = torch.cat(vals) if isinstance(vals[0], torch.Tensor) else sum(vals, [])
        return Scene(**out)


def make_scene(colour: str, shape: str, motion: str, background: str, *, p0=(0.5, 0.5), size: float = 17.5 / 128,
               phase: float = 0.0, switch: tuple[str, str] | None = None, t_switch: float = math.inf,
               dur: float = 8.0, seed_words: int = 0) -> Scene:
    """One single-object scene by names; ``switch=(kind, new_name)`` changes one attribute at ``t_switch``."""
    c = COLOUR_NAMES.index(colour)
    s = SHAPE_NAMES.index(shape)
    m = MOTION_NAMES.index(motion)
    b = BACKGROUND_NAMES.index(background)
    c1, s1, m1, b1 = c, s, m, b
    kind = None
    if switch is not None:
        kind, new = switch
        if kind == "colour":
            c1 = COLOUR_NAMES.index(new)
        elif kind == "shape":
            s1 = SHAPE_NAMES.index(new)
        elif kind == "motion":
            m1 = MOTION_NAMES.index(new)
        elif kind == "background":
            b1 = BACKGROUND_NAMES.index(new)
        else:
            raise ValueError(f"switch kind must be one of {_SWITCH_KINDS}, got {kind!r}")
    return Scene(
        n_obj=torch.tensor([1]),
        colour=torch.tensor([[[c, c1], [0, 0]]]), shape=torch.tensor([[[s, s1], [0, 0]]]),
        motion=torch.tensor([[[m, m1], [0, 0]]]), background=torch.tensor([[b, b1]]),
        p0=torch.tensor([[list(p0), [0.0, 0.0]]], dtype=torch.float32), size=torch.tensor([[size, size]]),
        phase=torch.tensor([[phase, 0.0]]), t_switch=torch.tensor([float(t_switch)]), dur=torch.tensor([float(dur)]),
        switch_kind=[kind if switch is not None else None], seed_words=[seed_words],
    )  # fmt: skip


def sample_scenes(batch: int, gen: random.Random, *, two_prob: float = 0.2, switch_prob: float = 0.0,
                  switch_at: list[float] | None = None, aspect: float = 1.0,
                  switch_weights: dict[str, float] | None = None) -> Scene:
    """Random training scenes that avoid every held-out combination (before and after a switch).

    ``switch_at[i]``: the video frame of item i's switch when it gets one (``switch_prob``);
    ``switch_weights``: relative odds of the switch kinds of one-object scenes (default: equal)."""
    rows = []
    for i in range(batch):
        two = gen.random() < two_prob
        n = 2 if two else 1
        switch = None
        if switch_at is not None and gen.random() < switch_prob:
            if two:
                switch = "background"
            elif switch_weights:
                switch = gen.choices(_SWITCH_KINDS, [switch_weights.get(k, 0.0) for k in _SWITCH_KINDS])[0]
            else:
                switch = gen.choice(_SWITCH_KINDS)
        while True:
            b0 = gen.randrange(5)
            b1 = gen.randrange(5) if switch == "background" else b0
            if b1 == b0 and switch == "background":
                continue
            objs = []
            for o in range(n):
                c0, s0 = gen.randrange(8), gen.randrange(4)
                m0 = gen.randrange(8)
                c1, s1, m1 = c0, s0, m0
                if o == 0 and switch == "colour":
                    c1 = gen.choice([c for c in range(8) if c != c0])
                elif o == 0 and switch == "shape":
                    s1 = gen.choice([s for s in range(4) if s != s0])
                elif o == 0 and switch == "motion":
                    m0 = gen.choice(LINEAR_MOTIONS)
                    m1 = gen.choice([m for m in LINEAR_MOTIONS if m != m0])
                objs.append((c0, s0, m0, c1, s1, m1))
            if any(is_heldout(c0, s0, m0, b0) or is_heldout(c1, s1, m1, b1) for c0, s0, m0, c1, s1, m1 in objs):
                continue
            if two and objs[0][0] == objs[1][0]:
                continue  # two objects of one colour would make the caption ambiguous
            break
        if n == 1:
            objs.append((0, 0, 0, 0, 0, 0))
        pos = []
        for o in range(2):
            if two:  # keep the two apart: left / right halves, different heights
                pos.append([(0.25 + 0.5 * o + gen.uniform(-0.08, 0.08)) * aspect, gen.uniform(0.15, 0.85)])
            else:
                pos.append([gen.uniform(0, aspect), gen.uniform(0, 1)])
        t_sw = switch_at[i] if (switch is not None) else math.inf
        rows.append(dict(
            n=n, colour=[[o[0], o[3]] for o in objs], shape=[[o[1], o[4]] for o in objs],
            motion=[[o[2], o[5]] for o in objs], bg=[b0, b1], p0=pos,
            size=[gen.uniform(*SIZE_RANGE) for _ in range(2)], phase=[gen.uniform(0, 2 * math.pi) for _ in range(2)],
            t_switch=t_sw, dur=gen.uniform(4, 10), kind=switch, seed=gen.randrange(1 << 30),
        ))  # fmt: skip
    return Scene(
        n_obj=torch.tensor([r["n"] for r in rows]),
        colour=torch.tensor([r["colour"] for r in rows]), shape=torch.tensor([r["shape"] for r in rows]),
        motion=torch.tensor([r["motion"] for r in rows]), background=torch.tensor([r["bg"] for r in rows]),
        p0=torch.tensor([r["p0"] for r in rows], dtype=torch.float32),
        size=torch.tensor([r["size"] for r in rows], dtype=torch.float32),
        phase=torch.tensor([r["phase"] for r in rows], dtype=torch.float32),
        t_switch=torch.tensor([float(r["t_switch"]) for r in rows]), dur=torch.tensor([r["dur"] for r in rows]),
        switch_kind=[r["kind"] for r in rows], seed_words=[r["seed"] for r in rows],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- captions


def _obj_phrase(rng: random.Random, colour: int | None, shape: int | None) -> str:
    words = []
    if colour is not None:
        words.append(rng.choice(COLOURS[COLOUR_NAMES[colour]][1]))
    words.append(rng.choice(SHAPES[SHAPE_NAMES[shape]]) if shape is not None else rng.choice(("shape", "thing")))
    art = rng.choice(_ARTICLES)
    if art == "a" and words[0][0] in "aeiou":
        art = "an"
    return " ".join(([art] if art else []) + words)


def caption(scene: Scene, i: int = 0, *, state: int = 1, drop: bool = True) -> str:
    """Caption of item ``i`` in state 0 (before the switch) or 1 (after). ``drop``: leave clauses
    out at random (seeded by the item's ``seed_words``), never the one of the switched attribute."""
    rng = random.Random(scene.seed_words[i] * 2 + state)
    kind = scene.switch_kind[i]
    n = int(scene.n_obj[i])
    if drop and n == 1 and rng.random() < 0.03 and kind is None:
        return ""
    keep = {k: (not drop) or rng.random() > p for k, p in (("colour", 0.08), ("shape", 0.08), ("motion", 0.2),
                                                          ("background", 0.2))}  # fmt: skip
    if kind is not None:
        keep[kind] = True
    objs = []
    for o in range(n):
        c = int(scene.colour[i, o, state]) if keep["colour"] or n == 2 else None
        s = int(scene.shape[i, o, state]) if keep["shape"] or n == 2 else None
        text = _obj_phrase(rng, c, s)
        if keep["motion"]:
            text += " " + rng.choice(MOTIONS[MOTION_NAMES[int(scene.motion[i, o, state])]][1])
        objs.append(text)
    body = " and ".join(objs)
    if not keep["background"]:
        return body
    bg = rng.choice(BACKGROUNDS[BACKGROUND_NAMES[int(scene.background[i, state])]][2])
    if drop and rng.random() < 0.35:
        return f"{bg}, {body}"
    return f"{body} {bg}"


def prompt_for(colour: str, shape: str, motion: str, background: str, seed: int = 0) -> str:
    """A full caption (every clause) of one object, synonyms chosen by ``seed``."""
    return caption(make_scene(colour, shape, motion, background, seed_words=seed), 0, state=0, drop=False)


def heldout_combinations() -> list[tuple[str, str, str, str]]:
    return [(COLOUR_NAMES[c], SHAPE_NAMES[s], MOTION_NAMES[m], BACKGROUND_NAMES[b])
            for c in range(8) for s in range(4) for m in range(8) for b in range(5) if is_heldout(c, s, m, b)]


def heldout_prompts(n: int = 60, seed: int = 0) -> list[tuple[str, tuple[str, str, str, str]]]:
    """``n`` evaluation (prompt, (colour, shape, motion, background)) of held-out combinations,
    spread over the set (every value of every attribute occurs)."""
    combos = heldout_combinations()
    rng = random.Random(seed)
    rng.shuffle(combos)
    return [(prompt_for(*c, seed=seed * 1000 + i), c) for i, c in enumerate(combos[:n])]


# ---------------------------------------------------------------------------------------- rendering


def _palette(device) -> torch.Tensor:
    return torch.tensor([v[0] for v in COLOURS.values()], device=device)  # (8, 3)


def background_images(h: int, w: int, device=None) -> torch.Tensor:
    """(5, 3, h, w) in [0, 1]: the backgrounds (vertical gradient from top to bottom colour)."""
    top = torch.tensor([v[0] for v in BACKGROUNDS.values()], device=device)  # (5, 3)
    bot = torch.tensor([v[1] for v in BACKGROUNDS.values()], device=device)
    a = ((torch.arange(h, device=device) + 0.5) / h).view(1, 1, h, 1)
    return (top[:, :, None, None] * (1 - a) + bot[:, :, None, None] * a).expand(-1, -1, h, w).contiguous()


def _smooth(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0, 1)
    return x * x * (3 - 2 * x)


def switch_progress(scene: Scene, times: torch.Tensor) -> torch.Tensor:
    """(B, T) in [0, 1]: 0 before the switch, smoothstep to 1 over ``dur`` frames."""
    ts = scene.t_switch[:, None]
    a = (times - ts) / scene.dur[:, None]
    return torch.where(torch.isinf(ts), torch.zeros_like(times), _smooth(a))


def positions(scene: Scene, times: torch.Tensor, aspect: float = 1.0) -> torch.Tensor:
    """(B, O, T, 2) object centres (x, y) in frame heights, wrapped onto the frame (torus)."""
    dev = times.device
    vel = torch.tensor([v[0] for v in MOTIONS.values()], device=dev) * SPEED  # (8, 2)
    t = times[:, None, :, None]  # (B, 1, T, 1)
    ts = scene.t_switch.to(dev)[:, None, None, None]
    t_before = torch.where(torch.isinf(ts), t, torch.minimum(t, ts))
    t_after = torch.where(torch.isinf(ts), torch.zeros_like(t), (t - ts).clamp_min(0))
    v0 = vel[scene.motion[..., 0]][:, :, None, :]  # (B, O, 1, 2)
    v1 = vel[scene.motion[..., 1]][:, :, None, :]
    p = scene.p0[:, :, None, :] + v0 * t_before + v1 * t_after  # (B, O, T, 2)
    ang = ORBIT_OMEGA * t + scene.phase[:, :, None, None]  # (B, O, T, 1)
    orbit = scene.p0[:, :, None, :] + ORBIT_RADIUS * torch.cat([ang.cos(), ang.sin()], dim=-1)
    is_orbit = (scene.motion[..., 0] == ORBIT)[:, :, None, None]
    p = torch.where(is_orbit, orbit, p)
    period = torch.tensor([aspect, 1.0], device=dev)
    return torch.remainder(p, period)


def _shape_sdf(dx: torch.Tensor, dy: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """(..., 4) signed distances (frame heights) of the 4 shapes of 'radius' size at offset (dx, dy)."""
    ax, ay = dx.abs(), dy.abs()
    circle = torch.sqrt(dx * dx + dy * dy) - size
    square = torch.maximum(ax, ay) - 0.85 * size
    r = 0.62 * size  # inradius of the (upward) equilateral triangle
    tri = torch.maximum(dy, torch.maximum(0.866 * dx - 0.5 * dy, -0.866 * dx - 0.5 * dy)) - r
    diamond = (ax + ay - 1.18 * size) * _D
    return torch.stack([circle, square, tri, diamond], dim=-1)


def render(scene: Scene, times: torch.Tensor, h: int = 128, w: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames at video times ``times`` (B, T) -> (frames (B, 3, T, h, w) in [-1, 1], object
    coverage (B, T, h, w) in [0, 1]). Everything on ``times``' device."""
    dev = times.device
    scene = scene.to(dev)
    b, nt = times.shape
    aspect = w / h
    prog = switch_progress(scene, times)  # (B, T)
    pos = positions(scene, times, aspect)  # (B, O, T, 2)
    bgs = background_images(h, w, dev)
    bg = torch.lerp(bgs[scene.background[:, 0]][:, None], bgs[scene.background[:, 1]][:, None],
                    prog[:, :, None, None, None])  # (B, T, 3, h, w)
    pal = _palette(dev)
    yy = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h
    xx = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / h
    img = bg
    cover = torch.zeros(b, nt, h, w, device=dev)
    for o in range(scene.colour.shape[1]):
        on = (scene.n_obj > o).float()[:, None, None, None]  # (B, 1, 1, 1)
        # torus offsets pixel - centre, (B, T, h, w)
        dx = torch.remainder(xx.view(1, 1, 1, w) - pos[:, o, :, 0, None, None] + aspect / 2, aspect) - aspect / 2
        dy = torch.remainder(yy.view(1, 1, h, 1) - pos[:, o, :, 1, None, None] + 0.5, 1.0) - 0.5
        sdf = _shape_sdf(dx, dy, scene.size[:, o, None, None, None])  # (B, T, h, w, 4)
        w0 = F.one_hot(scene.shape[:, o, 0], 4).float()[:, None, :]  # (B, 1, 4)
        w1 = F.one_hot(scene.shape[:, o, 1], 4).float()[:, None, :]
        sw = torch.lerp(w0, w1, prog[:, :, None])  # (B, T, 4)
        d = (sdf * sw[:, :, None, None, :]).sum(-1)  # (B, T, h, w)
        alpha = (0.5 - d * h).clamp(0, 1) * on
        col = torch.lerp(pal[scene.colour[:, o, 0]][:, None], pal[scene.colour[:, o, 1]][:, None], prog[..., None])
        img = img * (1 - alpha[:, :, None]) + col[:, :, :, None, None] * alpha[:, :, None]
        cover = torch.maximum(cover, alpha)
    return img.transpose(1, 2).mul(2).sub(1), cover


def latent_times(first_latent: torch.Tensor, n_latents: int) -> torch.Tensor:
    """(B,) first latent index -> (B, 4 * n_latents) video times ``4k-3 .. 4k`` of latents k."""
    k = first_latent[:, None].float() + torch.arange(n_latents, device=first_latent.device).float()[None]
    return (4 * k[:, :, None] - 3 + torch.arange(4, device=first_latent.device).float()).flatten(1)


# ---------------------------------------------------------------------------------------- analysis


def _template_masks(h: int, w: int, area: float, device) -> torch.Tensor:
    """(4, h, w) coverage of the 4 shapes centred in an h x w patch, each of ``area`` pixels."""
    unit = {"circle": math.pi, "square": 4 * 0.85**2, "triangle": 3 * math.sqrt(3) * 0.62**2, "diamond": 2 * 1.18**2}
    yy = (torch.arange(h, device=device, dtype=torch.float32) + 0.5 - h / 2) / h
    xx = (torch.arange(w, device=device, dtype=torch.float32) + 0.5 - w / 2) / h
    out = []
    for k, name in enumerate(SHAPE_NAMES):
        size = torch.tensor(math.sqrt(area / unit[name]) / h, device=device)
        sdf = _shape_sdf(xx.view(1, w).expand(h, w), yy.view(h, 1).expand(h, w), size)[..., k]
        out.append((0.5 - sdf * h).clamp(0, 1))
    return torch.stack(out)


def torus_centroid(mask: torch.Tensor) -> tuple[float, float]:
    """(x, y) pixel centroid of a (h, w) weight map on the torus (circular means)."""
    h, w = mask.shape
    m = mask.sum().clamp_min(1e-6)
    ax = 2 * math.pi * (torch.arange(w, dtype=torch.float32) + 0.5) / w
    ay = 2 * math.pi * (torch.arange(h, dtype=torch.float32) + 0.5) / h
    mx, my = mask.sum(0), mask.sum(1)
    cx = math.atan2(float((mx * ax.sin()).sum() / m), float((mx * ax.cos()).sum() / m))
    cy = math.atan2(float((my * ay.sin()).sum() / m), float((my * ay.cos()).sum() / m))
    return (cx % (2 * math.pi)) / (2 * math.pi) * w - 0.5, (cy % (2 * math.pi)) / (2 * math.pi) * h - 0.5


def analyse_frame(frame: torch.Tensor, threshold: float = 0.3) -> dict:
    """One frame (3, h, w) in [-1, 1] -> {"background", "colour", "shape", "centroid" (x, y px),
    "area" (px), "mask" (h, w) bool}. colour / shape / centroid are None when no object shows."""
    x = frame.detach().float().cpu().add(1).div(2).clamp(0, 1)
    _, h, w = x.shape
    bgs = background_images(h, w)
    err = (x[None] - bgs).abs().sum(1)  # (5, h, w)
    bgi = int(err.flatten(1).median(dim=1).values.argmin())
    mask = err[bgi] > threshold
    out = {"background": BACKGROUND_NAMES[bgi], "colour": None, "shape": None, "centroid": None,
           "area": int(mask.sum()), "mask": mask}
    if out["area"] < 12:
        return out
    pix = x[:, mask]  # (3, n)
    med = pix.median(dim=1).values
    pal = _palette("cpu")
    out["colour"] = COLOUR_NAMES[int((pal - med[None]).pow(2).sum(1).argmin())]
    cx, cy = torus_centroid(mask.float())
    out["centroid"] = (cx, cy)
    # roll the object to the middle, compare with equal-area templates
    rolled = torch.roll(mask.float(), shifts=(round(h / 2 - 0.5 - cy), round(w / 2 - 0.5 - cx)), dims=(0, 1))
    tm = _template_masks(h, w, float(out["area"]), "cpu") > 0.5
    inter = (tm & (rolled[None] > 0.5)).flatten(1).sum(1).float()
    union = (tm | (rolled[None] > 0.5)).flatten(1).sum(1).float()
    out["shape"] = SHAPE_NAMES[int((inter / union.clamp_min(1)).argmax())]
    return out


def classify_motion(centroids: list[tuple[float, float] | None], h: int, w: int) -> str | None:
    """Motion name from a per-frame centroid track (pixels; None = no object), on the torus."""
    pts = [c for c in centroids if c is not None]
    if len(pts) < 6:
        return None
    p = torch.tensor(pts)
    d = p[1:] - p[:-1]
    period = torch.tensor([float(w), float(h)])
    d = torch.remainder(d + period / 2, period) - period / 2  # (n-1, 2) per-frame steps, unwrapped
    scale = h / 128
    mean = d.mean(0) / scale
    speed = d.norm(dim=1).mean() / scale
    if speed < 0.45:
        return "still"
    # orbit: the step direction turns steadily clockwise
    k = 3
    if d.shape[0] > 2 * k:
        v = torch.stack([d[i : i + k].mean(0) for i in range(d.shape[0] - k + 1)])
        ang = torch.atan2(v[:, 1], v[:, 0])
        turn = torch.remainder(ang[1:] - ang[:-1] + math.pi, 2 * math.pi) - math.pi
        if float(turn.mean()) > ORBIT_OMEGA * 0.4:
            return "orbit"
    if float(mean.norm()) < 0.45:
        return "still"
    best, name = -2.0, None
    for m, (vec, _) in MOTIONS.items():
        if m in ("still", "orbit"):
            continue
        cos = float((mean * torch.tensor(vec)).sum() / mean.norm())
        if cos > best:
            best, name = cos, m
    return name


def _vote(values: list) -> str | None:
    vals = [v for v in values if v is not None]
    return max(set(vals), key=vals.count) if vals else None


def analyse_clip(frames: torch.Tensor) -> dict:
    """A clip (3, T, h, w) in [-1, 1] -> majority "background", "colour", "shape" over its frames,
    "motion" of its centroid track, "present" (fraction of frames with an object)."""
    _, t, h, w = frames.shape
    per = [analyse_frame(frames[:, i]) for i in range(t)]
    return {"background": _vote([p["background"] for p in per]), "colour": _vote([p["colour"] for p in per]),
            "shape": _vote([p["shape"] for p in per]),
            "motion": classify_motion([p["centroid"] for p in per], h, w),
            "present": sum(p["colour"] is not None for p in per) / t}  # fmt: skip
