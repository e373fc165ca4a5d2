"""spp: the release's windows on 7 x 7, adaptive pyramids elsewhere, order, batching, errors."""

from __future__ import annotations

import math

import pytest
import torch

from fvvae_fast.spp import PAPER_LEVELS, RELEASE_WINDOWS, PyramidError, dense_descriptors, distinct_cells, spp, spp_size


def direct_release_spp(m: torch.Tensor) -> torch.Tensor:
    """(C, 7, 7) -> (50, C) by explicit loops over the release's windows/strides."""
    rows = []
    for n, k, s in RELEASE_WINDOWS:  # finest first
        for i in range(n):  # row
            for j in range(n):  # column
                rows.append(m[:, i * s : i * s + k, j * s : j * s + k].amax(dim=(1, 2)))
    return torch.stack(rows)


def direct_adaptive_spp(m: torch.Tensor, levels) -> torch.Tensor:
    """(C, H, W) -> (sum n^2, C) with windows [floor(i L / n), ceil((i + 1) L / n))."""
    _, h, w = m.shape
    rows = []
    for n in levels:
        for i in range(n):
            r0, r1 = (i * h) // n, math.ceil((i + 1) * h / n)
            for j in range(n):
                c0, c1 = (j * w) // n, math.ceil((j + 1) * w / n)
                rows.append(m[:, r0:r1, c0:c1].amax(dim=(1, 2)))
    return torch.stack(rows)


def test_release_windows_match_direct_loops():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 5, 7, 7, generator=g, dtype=torch.float64)
    out = spp(maps)
    assert out.shape == (3, 50, 5) and out.dtype == torch.float64
    for b in range(3):
        assert torch.equal(out[b], direct_release_spp(maps[b]))


def test_release_windows_equal_the_adaptive_pyramid_on_7x7():
    maps = torch.rand(2, 4, 7, 7)
    assert torch.equal(spp(maps), torch.stack([direct_adaptive_spp(m, PAPER_LEVELS) for m in maps]))
    assert [n * n for n, _, _ in RELEASE_WINDOWS] == [36, 9, 4, 1] and spp_size() == 50


@pytest.mark.parametrize("hw", [(6, 6), (6, 9), (13, 13), (10, 7), (14, 14)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_adaptive_pyramid_other_sizes(hw):
    maps = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(1))
    out = spp(maps)
    assert out.shape == (2, 50, 3)
    for b in range(2):
        assert torch.equal(out[b], direct_adaptive_spp(maps[b], PAPER_LEVELS))


def test_custom_levels():
    maps = torch.rand(1, 2, 8, 8)
    out = spp(maps, levels=(4, 1))
    assert out.shape == (1, 17, 2)
    assert torch.equal(out[0], direct_adaptive_spp(maps[0], (4, 1)))


def test_order_is_finest_first_row_major():
    # one channel whose value is a unique position code: the max of a window is its bottom-right cell
    pos = torch.arange(49, dtype=torch.float32).view(1, 1, 7, 7)
    out = spp(pos)[0, :, 0]
    assert out[0] == 8 and out[1] == 9 and out[6] == 15  # 6x6 level: row 0 col 0, row 0 col 1, row 1 col 0
    assert out[36] == 16 and out[37] == 18 and out[39] == 30  # 3x3 level, windows 3 stride 2
    assert out[45] == 24 and out[46] == 27 and out[47] == 45  # 2x2 level, windows 4 stride 3
    assert out[49] == 48  # global max


def test_batched_equals_one_by_one_and_channels_independent():
    maps = torch.rand(4, 6, 7, 7)
    out = spp(maps)
    for b in range(4):
        assert torch.equal(out[b], spp(maps[b : b + 1])[0])
    assert torch.equal(out[:, :, 2], spp(maps[:, 2:3])[:, :, 0])


def test_gradient_flows_to_the_max_cells():
    maps = torch.rand(1, 2, 7, 7, requires_grad=True)
    spp(maps).sum().backward()
    assert maps.grad is not None and maps.grad.sum() == 2 * 50  # each window passes 1 to its max


def test_dense_descriptors_row_major():
    maps = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    out = dense_descriptors(maps)
    assert out.shape == (1, 12, 2)
    assert torch.equal(out[0, 5], maps[0, :, 1, 1])


def test_bad_input():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        spp(torch.rand(3, 7, 7))
    with pytest.raises(TypeError, match="floating"):
        spp(torch.ones(1, 1, 7, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="levels"):
        spp(torch.rand(1, 1, 7, 7), levels=(0,))


@pytest.mark.parametrize("hw,distinct,waste", [((2, 2), 9, "only 9 of its 50 descriptors would be distinct"),
                                               ((4, 4), 42, "only 42 of its 50"), ((1, 1), 1, "only 1 of its 50"),
                                               ((5, 9), 50, "its 6 cells a side would overlap on 5 map positions")],
                         ids=["2x2", "4x4", "1x1", "5x9"])
def test_maps_smaller_than_the_pyramid_are_refused_not_padded(hw, distinct, waste):
    """A side shorter than the finest grid repeats or overlaps map cells (a 2 x 2 map: 9 distinct of 50):
    refused with what it would waste and the levels that fit; such levels are taken."""
    maps = torch.rand(1, 256, *hw, generator=torch.Generator().manual_seed(3))  # distinct windows, distinct maxima
    assert distinct_cells(*hw) == distinct == len(torch.unique(direct_adaptive_spp(maps[0], PAPER_LEVELS), dim=0))
    with pytest.raises(PyramidError, match=rf"a {hw[0]} x {hw[1]} map is smaller than the pyramid's 6 x 6 grid "
                                           rf"\(levels 6,3,2,1\): {waste}"):
        spp(maps)
    fits = tuple(n for n in PAPER_LEVELS if n <= min(hw))
    assert torch.equal(spp(maps, fits)[0], direct_adaptive_spp(maps[0], fits))
