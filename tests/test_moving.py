"""Synthetic two-stream clips: layout, determinism, and that each clip moves as its class says
(centroid shifts, growing mass, a turn checked against torchvision's own rotation)."""

from __future__ import annotations

import pytest
import torch

from fvvae_fast.evaluation.moving import MOTIONS, moving_clips

from .cases import SEED


def test_layout_and_determinism():
    kw = {"animals": ("cat", "zebra"), "motions": ("left", "zoom_out", "rotate_cw"), "frames": 5, "size": 40,
          "seed": SEED}
    m = moving_clips(3, **kw)
    assert m.clips.shape == (18, 5, 3, 40, 40) and m.clips.dtype == torch.uint8
    assert m.poses.shape == (18, 5, 4) and m.labels.dtype == torch.int64
    assert torch.bincount(m.labels).tolist() == [3] * 6
    assert m.classes == ("cat left", "cat zoom_out", "cat rotate_cw", "zebra left", "zebra zoom_out",
                         "zebra rotate_cw")
    assert torch.equal(m.clips[:, :, 0], m.clips[:, :, 1]) and torch.equal(m.clips[:, :, 0], m.clips[:, :, 2])
    again = moving_clips(3, **kw)
    assert torch.equal(again.clips, m.clips) and torch.equal(again.poses, m.poses)
    assert not torch.equal(moving_clips(3, **{**kw, "seed": SEED + 1}).clips, m.clips)
    assert not torch.equal(moving_clips(3, **kw, split="test").clips, m.clips)


def test_bad_arguments():
    with pytest.raises(ValueError, match="animals"):
        moving_clips(1, animals=("unicorn",))
    with pytest.raises(ValueError, match="motions"):
        moving_clips(1, motions=("left", "left"))
    with pytest.raises(ValueError, match="split"):
        moving_clips(1, split="val")
    with pytest.raises(ValueError, match="frames >= 2"):
        moving_clips(1, frames=1)


def _foreground(frames: torch.Tensor) -> torch.Tensor:
    """(T, size, size) weights: grey level above the clip's flat background."""
    grey = frames[:, 0].double()
    return grey - grey.amin()


def _centroids(w: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(w.shape[1]), torch.arange(w.shape[2]), indexing="ij")
    mass = w.sum((1, 2))
    return torch.stack([(w * xs).sum((1, 2)) / mass, (w * ys).sum((1, 2)) / mass], 1)


@pytest.mark.parametrize("salt", range(2))
def test_each_clip_moves_as_its_class_says(salt):
    from torchvision.transforms.v2 import functional as TF

    m = moving_clips(2, animals=("dog", "horse"), motions=MOTIONS, frames=6, size=64, seed=SEED + salt)
    for clip, label, pose in zip(m.clips, m.labels, m.poses):
        motion = m.motions[int(label) % len(m.motions)]
        w = _foreground(clip)
        c = _centroids(w)
        if motion in ("left", "right", "up", "down"):
            axis, sign = (0, -1) if motion == "left" else (0, 1) if motion == "right" else \
                (1, -1) if motion == "up" else (1, 1)
            step = c[1:, axis] - c[:-1, axis]
            assert (sign * step > 0).all(), motion
            moved = c[-1] - c[0]
            assert moved[axis] == pytest.approx(float(pose[-1, axis] - pose[0, axis]), abs=1.0)
            assert abs(moved[1 - axis]) < 1.0
        elif motion.startswith("zoom"):
            mass = w.sum((1, 2))
            ratio = float(mass[-1] / mass[0])
            assert (ratio > 2.5) if motion == "zoom_in" else (ratio < 0.4), (motion, ratio)
            # about a fixed centre: the centroid's offset from it scales with the side
            offset = (c + 0.5 - pose[:, :2]) / pose[:, 2:3]  # pixel i covers [i, i + 1)
            assert (offset[-1] - offset[0]).abs().max() < 0.03
        else:  # a quarter turn: the last frame is the first turned by +-90 degrees about the centre
            first = w[0][None]
            centre = [float(pose[0, 0]), float(pose[0, 1])]
            turned = {a: TF.rotate(first, a, TF.InterpolationMode.BILINEAR, center=centre)[0] for a in (90, -90)}
            err = {a: float((turned[a] - w[-1]).abs().sum()) for a in turned}
            want, other = (90, -90) if motion == "rotate_ccw" else (-90, 90)
            assert err[want] < 0.25 * err[other], (motion, err)
            assert float(pose[-1, 3] - pose[0, 3]) == pytest.approx(want)
