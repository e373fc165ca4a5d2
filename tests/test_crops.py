"""10-crop geometry: every crop is exactly the slice (and mirror) it should be."""

from __future__ import annotations

import pytest
import torch

from fvvae_fast.official import center_crop
from fvvae_fast.pipelines.crops import CROP_NAMES, NUM_CROPS, ten_crop

from .cases import generator


@pytest.mark.parametrize("shape,size", [((2, 3, 7, 9), (4, 5)), ((1, 3, 5, 5), 5), ((3, 3, 10, 6), 1),
                                        ((4, 8), (3, 8)), ((3, 240, 320), 224)])
def test_ten_crop_slices(shape, size):
    frames = torch.randint(0, 256, shape, generator=generator(21), dtype=torch.uint8)
    h, w = (size, size) if isinstance(size, int) else size
    H, W = shape[-2:]
    crops = ten_crop(frames, size)
    assert crops.shape == (NUM_CROPS, *shape[:-2], h, w) and crops.dtype == frames.dtype
    top, left = (H - h) // 2, (W - w) // 2
    origins = {"top-left": (0, 0), "top-right": (0, W - w), "bottom-left": (H - h, 0),
               "bottom-right": (H - h, W - w), "centre": (top, left)}
    for k, name in enumerate(CROP_NAMES):
        y, x = origins[name]
        want = frames[..., y : y + h, x : x + w]
        assert torch.equal(crops[k], want), name
        assert torch.equal(crops[5 + k], want.flip(-1)), f"{name} mirrored"
    if h == w:
        assert torch.equal(crops[4], center_crop(frames, h))


def test_mirrored_corner_crops_are_the_mirrored_frame_corners():
    frames = torch.rand(2, 3, 11, 13, generator=generator(22))
    crops, mirrored = ten_crop(frames, (6, 8)), ten_crop(frames.flip(-1), (6, 8))
    # the mirror of the frame's top-left crop is the mirrored frame's top-right crop, and so on (the
    # centre differs by a pixel when W - w is odd: both take the floor of the offset)
    for k, j in enumerate((1, 0, 3, 2)):
        assert torch.equal(crops[5 + k], mirrored[j])


def test_ten_crop_refuses_crops_larger_than_the_frame():
    frames = torch.zeros(2, 3, 7, 9)
    for size in (8, (7, 10), 0, (-1, 3)):
        with pytest.raises(ValueError, match=r"size: the crop .* must be positive and fit"):
            ten_crop(frames, size)
    with pytest.raises(ValueError, match="frames"):
        ten_crop(torch.zeros(5), 2)


def test_the_crops_of_one_video_in_one_shard_share_a_load():
    from fvvae_fast.pipelines.datasets import Item
    from fvvae_fast.pipelines.extract import _loads_of

    def crop(name, k):
        return Item(id=f"{name}#crop{k}", path=f"{name}.avi", label=0, split="test", crop=k)

    plain = Item(id="c", path="c.avi", label=0, split="train")
    work = [(0, 0, plain), (0, 1, crop("a", 0)), (0, 2, crop("a", 1)), (1, 3, crop("a", 2)), (1, 4, crop("b", 0)),
            (1, 5, crop("b", 1))]
    assert [(shard, idxs, item.id) for shard, idxs, item in _loads_of(work)] == [
        (0, [0], "c"), (0, [1, 2], "a#crop0"), (1, [3], "a#crop2"), (1, [4, 5], "b#crop0")]
