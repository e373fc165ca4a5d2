"""The exact diagonal of F (paper Eq. 12) and its damped inverse square root.

    diag F = mean over training sets X of vec(G_X) * vec(G_X)       (D,)

kept as a float64 running sum of squares plus a set count, so merging two
estimates is an exact sum (up to float64 rounding order).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements per float64 temporary in the reference's chunked update: 1 Mi elements = 8 MiB (8 rows at
# D = 131,072). Few large ops rather than one per row: each op is one parallel region, and on
# a busy machine every region can wait a scheduler time slice for its threads.
_CHUNK_ELEMS = 1 << 20


_lib = torch.library.Library("fvvae_fast", "FRAGMENT")
_lib.define("sum_of_squares_cpu(Tensor g) -> Tensor")  # csrc/sum_of_squares.cpp, when the extension is built


def sum_of_squares(g: Tensor, *, backend: str | None = None) -> Tensor:
    """sum_s g[s]^2 of g (S, D) float: (D,) float64 on g's device, reading g once.

    ``backend``: None picks the fused kernel of the device through the one dispatcher
    (:func:`fvvae_fast.ops.dispatch.resolve`: Triton on CUDA, the C++ kernel on CPU), else
    ``"reference"``, ``"cpu"`` or ``"triton"``. Every backend accumulates in float64 and never
    forms a float64 copy of g.
    """
    from ..ops import dispatch

    name = dispatch.resolve(backend, g.device)
    if name != "reference" and g.dtype in (torch.float32, torch.float64):
        g = g.contiguous()
        if name == "cpu":
            return torch.ops.fvvae_fast.sum_of_squares_cpu(g)
        return dispatch.import_kernels("fim_update").sum_of_squares(g)
    return reference_sum_of_squares(g)


def reference_sum_of_squares(g: Tensor) -> Tensor:
    """Plain-torch :func:`sum_of_squares`: float64 row chunks (about 8 MiB, or one row when D is larger)."""
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
