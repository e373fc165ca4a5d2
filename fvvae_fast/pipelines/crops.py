"""10-crop testing (paper Table 4, "x10 augmentation"; the release's reported accuracy uses it).

The four corner crops and the centre crop of every frame, then each of them mirrored left-right
(Caffe's ``oversample``). The centre crop is :func:`fvvae_fast.official.center_crop`'s
(offset floor((H - h) / 2)), so crop 4 is exactly the single-crop pipeline's input. Each crop of a
video or image becomes its own descriptor set with the item's id; the classifier's scores are
averaged over an item's crops (:func:`fvvae_fast.evaluation.fusion.evaluate_fusion`, ``test_items``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

CROP_NAMES = ("top-left", "top-right", "bottom-left", "bottom-right", "centre")
NUM_CROPS = 2 * len(CROP_NAMES)


def ten_crop(frames: Tensor, size: int | Sequence[int]) -> Tensor:
    """Frames (..., H, W) (e.g. (T, 3, H, W) uint8 or float) -> (10, ..., h, w), same dtype.

    size: h = w = size, or (h, w), at most the frame's size. Crops 0-4 are ``CROP_NAMES`` of the
    frames, crop 5 + k is crop k mirrored left-right.
    """
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if frames.dim() < 2:
        raise ValueError(f"frames: expected (..., H, W), got shape {tuple(frames.shape)}")
    big_h, big_w = frames.shape[-2:]
    if not (0 < h <= big_h and 0 < w <= big_w):
        raise ValueError(f"size: the crop ({h}, {w}) must be positive and fit in the frames ({big_h}, {big_w})")
    corners = [frames[..., :h, :w], frames[..., :h, big_w - w:], frames[..., big_h - h:, :w],
               frames[..., big_h - h:, big_w - w:]]
    top, left = (big_h - h) // 2, (big_w - w) // 2  # center_crop's offsets
    five = torch.stack([*corners, frames[..., top : top + h, left : left + w]])
    return torch.cat([five, five.flip(-1)])
