"""Synthetic two-stream action clips: a real Animal-MNIST silhouette moving with a class's motion.

A class is an (animal, motion) pair, so the classes split both ways: clips of one animal share
their appearance and differ only by motion (what optical flow sees), clips of one motion differ only
by the animal (what the frames see). Frames alone cannot tell "cat, left" from "cat, right" (the
start positions and orientations are random, and a set of frames is orderless); flow alone has a
harder time with the animal than with the motion. The fusion of the two streams should beat both.

Each clip: a silhouette (a different Animal-MNIST image per clip; the ``"train"`` and ``"test"``
splits draw from disjoint halves of each class) textured with a smooth random pattern that moves
with it, on a flat background, with a random start position, size, orientation and brightness.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .builtin import ANIMAL_CLASSES, load_animal_mnist

MOTIONS = ("left", "right", "up", "down", "zoom_in", "zoom_out", "rotate_cw", "rotate_ccw")
# The direction (x right, y down) of each translation, the scale range of each zoom, the turn of each rotation.
_SHIFT = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_ZOOM = {"zoom_in": (0.6, 1.2), "zoom_out": (1.2, 0.6)}
_TURN = {"rotate_cw": -90.0, "rotate_ccw": 90.0}  # degrees over the clip, counter-clockwise on screen > 0
TRAVEL = 0.3  # a translation's path, as a fraction of the frame's side
SIDE = 0.45  # the silhouette's side at scale 1, as a fraction of the frame's side


@dataclass(frozen=True)
class MovingClips:
    """clips (S, T, 3, size, size) uint8 RGB (grey); labels (S,) int64 = animal index x len(motions) +
    motion index; poses (S, T, 4) float64: the silhouette's centre x, y (pixels from the top-left
    corner of the frame), side (pixels) and counter-clockwise angle (degrees) in every frame."""

    clips: Tensor
    labels: Tensor
    poses: Tensor
    animals: tuple[str, ...]
    motions: tuple[str, ...]

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names, ``"<animal> <motion>"``, in label order."""
        return tuple(f"{a} {m}" for a in self.animals for m in self.motions)


def _texture(rng: np.random.Generator, n: int, side: int = 28) -> Tensor:
    """(n, 1, side, side) smooth random patterns in [0.55, 1]."""
    coarse = torch.from_numpy(rng.uniform(size=(n, 1, 5, 5)))
    return 0.55 + 0.45 * F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=True).clamp(0, 1)


def moving_clips(
    per_class: int,
    *,
    animals: Sequence[str] = ("bird", "elephant", "giraffe"),
    motions: Sequence[str] = ("left", "right", "up", "down", "zoom_in", "rotate_ccw"),
    frames: int = 8,
    size: int = 64,
    split: str = "train",
    seed: int = 0,
) -> MovingClips:
    """``per_class`` clips of each (animal, motion) class, ``frames`` frames of ``size`` x ``size``,
    seeded (the same arguments give the same clips). See :class:`MovingClips` for the layout.

    animals: names from ``builtin.ANIMAL_CLASSES``; motions: names from ``MOTIONS``; split:
    ``"train"`` or ``"test"`` (disjoint silhouettes, 500 per animal each).
    """
    animals, motions = tuple(animals), tuple(motions)
    for name, given, allowed in (("animals", animals, ANIMAL_CLASSES), ("motions", motions, MOTIONS)):
        if not given or len(set(given)) != len(given) or not set(given) <= set(allowed):
            raise ValueError(f"{name}: expected distinct names from {allowed}, got {given}")
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    if per_class < 1 or per_class > 500 or frames < 2 or size < 16:
        raise ValueError(f"need 1 <= per_class <= 500, frames >= 2 and size >= 16, got per_class={per_class}, "
                         f"frames={frames}, size={size}")
    images, labels = load_animal_mnist()
    rng = np.random.default_rng([seed, ("train", "test").index(split)])
    n = len(animals) * len(motions) * per_class
    animal = np.repeat(np.arange(len(animals)), len(motions) * per_class)
    motion = np.tile(np.repeat(np.arange(len(motions)), per_class), len(animals))
    picks = np.empty(n, dtype=np.int64)
    for a, name in enumerate(animals):
        pool = np.flatnonzero(labels == ANIMAL_CLASSES.index(name))[("train", "test").index(split)::2]
        picks[animal == a] = rng.choice(pool, size=(animal == a).sum(), replace=False)
    sprites = torch.from_numpy(images[picks]).double()[:, None] / 255 * _texture(rng, n)
    poses = torch.from_numpy(_poses(rng, [motions[m] for m in motion], frames, size))
    canvas = _render(sprites, poses, size)
    background = torch.from_numpy(rng.uniform(0, 40, (n, 1, 1, 1)))
    contrast = torch.from_numpy(rng.uniform(0.7, 1.0, (n, 1, 1, 1)))
    clips = (background + (255 * contrast - background) * canvas).round().clamp(0, 255).to(torch.uint8)
    return MovingClips(clips[:, :, None].expand(-1, -1, 3, -1, -1).contiguous(),
                       torch.from_numpy(animal * len(motions) + motion), poses, animals, motions)


def _poses(rng: np.random.Generator, motions: list[str], frames: int, size: int) -> np.ndarray:
    """(S, T, 4) centre x, y, side, angle of each clip's silhouette over time (see MovingClips)."""
    u = np.linspace(0.0, 1.0, frames)
    out = np.empty((len(motions), frames, 4))
    for s, motion in enumerate(motions):
        side = SIDE * size * rng.uniform(0.8, 1.2)
        angle = rng.uniform(0, 360)
        lo_zoom, hi_zoom = _ZOOM.get(motion, (1.0, 1.0))
        scale = lo_zoom + (hi_zoom - lo_zoom) * u
        margin = side * max(lo_zoom, hi_zoom) / 2  # the sprite's box stays inside (its empty corners may not)
        dx, dy = _SHIFT.get(motion, (0, 0))
        travel = TRAVEL * size * rng.uniform(0.8, 1.2)
        # the start is drawn so that the whole path stays within [margin, size - margin]
        x0 = rng.uniform(margin - min(dx, 0) * travel, size - margin - max(dx, 0) * travel)
        y0 = rng.uniform(margin - min(dy, 0) * travel, size - margin - max(dy, 0) * travel)
        out[s, :, 0] = x0 + dx * travel * u
        out[s, :, 1] = y0 + dy * travel * u
        out[s, :, 2] = side * scale
        out[s, :, 3] = angle + _TURN.get(motion, 0.0) * u
    return out


def _render(sprites: Tensor, poses: Tensor, size: int) -> Tensor:
    """Sprites (S, 1, h, w) in [0, 1] drawn at poses (S, T, 4) on (S, T, size, size) float64 canvases."""
    s, t = poses.shape[:2]
    p = poses.reshape(-1, 4)
    # affine_grid maps output coordinates in [-1, 1] (align_corners=False) to sprite coordinates:
    # q = R(-angle) (p - centre) / half-side, R(a) the counter-clockwise turn on screen (y down).
    centre = p[:, :2] * (2.0 / size) - 1.0
    half = p[:, 2] / size
    a = torch.deg2rad(p[:, 3])
    cos, sin = torch.cos(a) / half, torch.sin(a) / half
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (N, 2, 2)
    theta = torch.cat([rot, -(rot @ centre[:, :, None])], 2)
    grid = F.affine_grid(theta, [s * t, 1, size, size], align_corners=False)
    src = sprites[:, None].expand(-1, t, -1, -1, -1).reshape(s * t, *sprites.shape[1:])
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(s, t, size, size)
