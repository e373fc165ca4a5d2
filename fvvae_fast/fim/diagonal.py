"""The exact diagonal of F (paper Eq. 12) and its damped inverse square root.

    diag F = mean over training sets X of vec(G_X) * vec(G_X)       (D,)

kept as a float64 running sum of squares plus a set count, so merging two
estimates is an exact sum (up to float64 rounding order).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements per float64 temporary in the chunked update: 1 Mi elements = 8 MiB (8 rows at
# D = 131,072). Few large ops rather than one per row: each op is one parallel region, and on
# a busy machine every region can wait a scheduler time slice for its threads.
_CHUNK_ELEMS = 1 << 20


def sum_of_squares(g: Tensor) -> Tensor:
    """sum_s g[s]^2 of g (S, D) float: (D,) float64 on g's device.

    Reads g once in row chunks; the only temporary is one float64 chunk (about
    8 MiB, or one row when D is larger), never a full float64 copy of g.
    """
    s, dim = g.shape
    out = torch.zeros(dim, dtype=torch.float64, device=g.device)
    step = max(1, _CHUNK_ELEMS // max(dim, 1))
    for lo in range(0, s, step):
        out += g[lo : lo + step].to(torch.float64, copy=True).square_().sum(0)
    return out


def inverse_sqrt(values: Tensor, floor: float) -> Tensor:
    """1 / sqrt(max(values, floor)) elementwise, float64; 0 where max(values, floor) <= 0.

    values: (D,) float64 variances; floor: absolute floor (damping * mean diagonal).
    The zero case is the pseudo-inverse of a coordinate with no training variance,
    reached only with damping = 0 (the release's ``normalize_raw_fv`` maps an all-zero
    column to 0 as well: 0 / max(0, 1e-10)).
    """
    v = values.clamp_min(floor)
    return torch.where(v > 0, v.rsqrt(), torch.zeros_like(v))
