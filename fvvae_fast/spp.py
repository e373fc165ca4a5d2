"""Spatial pyramid max pooling of conv maps into local descriptors (paper section 4; docs/math.rst, "The released
model").

The release pools the 7 x 7 VGG-19 pool5 map with four max-pooling windows/strides,

    level  window  stride  grid   descriptors
    6x6    2x2     1       6 x 6  36
    3x3    3x3     2       3 x 3   9
    2x2    4x4     3       2 x 2   4
    1x1    7x7     6       1 x 1   1          (global max)
                                   --
                                   50

and for any other map size we use the paper's generic pyramid 6x6, 3x3, 2x2, 1x1 by
adaptive max pooling (window i of n over a side of length L covers
[floor(i L / n), ceil((i + 1) L / n))). On a 7 x 7 map the two coincide exactly. A map with a
side shorter than the finest grid (L < n) is refused (``PyramidError``), never padded out
with repeated cells: a 2 x 2 map would give only 9 distinct of the 50 descriptors. Ask for a
pyramid that fits instead (``levels``, e.g. (2, 1); ``--levels 2,1`` on the command line) or a
larger input.

Descriptor order, the same as the release's ``activations_spp.m`` (whose MATLAB blob is
(W, H, C), flattened column-major, so x varies fastest): finest level first
(6x6, then 3x3, 2x2, 1x1), and within a level row-major over the grid, i.e. descriptor
``offset(level) + row * n + col`` where row indexes the map's height and col its width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import UserError

PAPER_LEVELS: tuple[int, ...] = (6, 3, 2, 1)
# (grid n, window, stride) of the release on a 7 x 7 map; finest first.
RELEASE_WINDOWS: tuple[tuple[int, int, int], ...] = ((6, 2, 1), (3, 3, 2), (2, 4, 3), (1, 7, 6))


class PyramidError(UserError, ValueError):
    """A map too small for the pyramid's finest grid (its cells would repeat map positions)."""


def distinct_cells(height: int, width: int, levels: Sequence[int] = PAPER_LEVELS) -> int:
    """How many of the pyramid's sum n^2 cells pool distinct windows of a height x width map."""
    def windows(length: int, n: int) -> list[tuple[int, int]]:
        return [(i * length // n, -(-(i + 1) * length // n)) for i in range(n)]

    return len({(r, c) for n in levels for r in windows(height, n) for c in windows(width, n)})


def check_pyramid(height: int, width: int, levels: Sequence[int] = PAPER_LEVELS, where: str = "spp",
                  larger: str = "a larger input") -> None:
    """``PyramidError`` unless every grid of ``levels`` fits a height x width map (n <= min(H, W));
    ``larger`` says how to get a larger map."""
    side, finest = min(height, width), max(levels)
    if side >= finest:
        return
    fits = ",".join(str(n) for n in levels if n <= side) or "1"
    distinct, total = distinct_cells(height, width, levels), spp_size(levels)
    waste = (f"only {distinct} of its {total} descriptors would be distinct" if distinct < total else
             f"its {finest} cells a side would overlap on {side} map positions")
    raise PyramidError(f"{where}: a {height} x {width} map is smaller than the pyramid's {finest} x {finest} grid "
                       f"(levels {','.join(map(str, levels))}): {waste}; give {larger}, or levels of at "
                       f"most {side} (e.g. {fits})")


def spp_size(levels: Sequence[int] = PAPER_LEVELS) -> int:
    """Descriptors per map: sum of n^2 over the levels (50 for the paper's pyramid)."""
    return sum(n * n for n in levels)


def spp(maps: Tensor, levels: Sequence[int] = PAPER_LEVELS) -> Tensor:
    """Spatial pyramid max pooling: maps (B, C, H, W) -> descriptors (B, sum n^2, C).

    Args:
        maps: (B, C, H, W) floating conv maps (e.g. VGG-19 pool5 (B, 512, 7, 7)).
        levels: pyramid grid sizes, finest first; the paper's (6, 3, 2, 1) by default.

    A 7 x 7 map with the default levels uses the release's fixed windows/strides
    2/1, 3/2, 4/3, 7/6 (``RELEASE_WINDOWS``); other sizes use adaptive max pooling
    (identical to the release's windows on 7 x 7); a map with a side shorter than the finest grid
    raises ``PyramidError``. Order: finest level first,
    row-major within a level (module docstring). Deterministic, differentiable, batched.

    Example:
        >>> spp(torch.rand(2, 512, 7, 7)).shape
        torch.Size([2, 50, 512])
    """
    if not isinstance(maps, Tensor) or not maps.is_floating_point():
        raise TypeError(f"spp: maps must be a floating tensor, got {getattr(maps, 'dtype', type(maps).__name__)}")
    if maps.dim() != 4 or min(maps.shape[2:]) < 1:
        raise ValueError(f"spp: maps must be (B, C, H, W) with H, W >= 1, got shape {tuple(maps.shape)}")
    levels = tuple(int(n) for n in levels)
    if not levels or min(levels) < 1:
        raise ValueError(f"spp: levels must be positive grid sizes, got {levels}")
    check_pyramid(maps.shape[2], maps.shape[3], levels)
    b, c = maps.shape[:2]
    if tuple(maps.shape[2:]) == (7, 7) and levels == PAPER_LEVELS:
        pooled = [F.max_pool2d(maps, kernel_size=k, stride=s) for _, k, s in RELEASE_WINDOWS]
    else:
        pooled = [F.adaptive_max_pool2d(maps, n) for n in levels]
    # each (B, C, n, n) -> (B, C, n*n) row-major; concatenated finest first -> (B, sum n^2, C)
    return torch.cat([p.reshape(b, c, -1) for p in pooled], dim=2).transpose(1, 2).contiguous()


def dense_descriptors(maps: Tensor) -> Tensor:
    """Every position of the map as a descriptor: (B, C, H, W) -> (B, H*W, C), row-major.

    The image source's descriptors (VGG-19 conv5_4+ReLU at 448 x 448: 28 x 28 = 784 of C = 512).
    """
    if maps.dim() != 4:
        raise ValueError(f"dense_descriptors: maps must be (B, C, H, W), got shape {tuple(maps.shape)}")
    return maps.flatten(2).transpose(1, 2).contiguous()
