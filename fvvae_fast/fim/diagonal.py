"""The exact diagonal of F (paper Eq. 12) and its damped inverse square root.

    diag F = mean over training sets X of vec(G_X) * vec(G_X)       (D,)

kept as a float64 running sum of squares (:func:`fvvae_fast.ops.sum_of_squares`) plus the
estimator's set count, so merging two estimates is an exact sum (up to float64 rounding order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import distributed
from ..ops import sum_of_squares
from ..ops.validate import opmath_dtype
from .statistics import Statistics


def inverse_sqrt(values: Tensor, floor: float) -> Tensor:
    """1 / sqrt(max(values, floor)) elementwise, float64; 0 where max(values, floor) <= 0.

    values: (D,) float64 variances; floor: absolute floor (damping * mean diagonal).
    The zero case is the pseudo-inverse of a coordinate with no training variance,
    reached only with damping = 0 (the release's ``normalize_raw_fv`` maps an all-zero
    column to 0 as well: 0 / max(0, 1e-10)).
    """
    v = values.clamp_min(floor)
    return torch.where(v > 0, v.rsqrt(), torch.zeros_like(v))


@dataclass
class DiagonalWhitener:
    """F_hat^(-1/2) = diag(F)^(-1/2), floored: ``scale`` (D,)."""

    scale: Tensor

    def to(self, dtype: torch.dtype, device: torch.device) -> DiagonalWhitener:
        return DiagonalWhitener(self.scale.to(device=device, dtype=dtype))

    def apply(self, g: Tensor) -> Tensor:
        """g (S, D) -> (S, D) = g * scale per row."""
        return g * self.scale


class DiagonalStatistics(Statistics):
    """``mode="diagonal"``: sumsq (D,) float64 = sum_X vec(G_X)^2. File key: ``sumsq``."""

    mode = "diagonal"

    def __init__(self, rank: int | None = None, sketch: int | None = None) -> None:
        super().__init__(rank, sketch)
        self.sumsq: Tensor | None = None

    @property
    def tensors(self) -> list[Tensor]:
        return [] if self.sumsq is None else [self.sumsq]

    def start(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Zero statistics for D = dim (``dtype``: the opmath dtype of the rows, for the low-rank sketch)."""
        self.sumsq = torch.zeros(dim, dtype=torch.float64, device=device)

    def update(self, rows: Tensor) -> None:
        sq = sum_of_squares(rows)  # sum_X vec(G_X)^2 of this batch   (diagonal of Eq. 12)
        if not math.isfinite(float(sq.sum())):
            raise ValueError("FisherInformation.update: G has NaN or Inf values")
        if self.sumsq is None:
            self.start(rows.shape[1], opmath_dtype(rows.dtype), rows.device)
        self.sumsq += sq.to(self.sumsq.device)

    def merge(self, other: DiagonalStatistics) -> None:
        self.sumsq += other.sumsq.to(self.sumsq.device)

    def all_reduce(self, dim: int, shape: tuple[int, int] | None) -> None:
        if self.sumsq is None:
            self.start(dim, torch.float32, torch.device("cpu"))
        distributed.all_reduce_sum(self.sumsq)

    def state(self) -> dict[str, Any]:
        return {"sumsq": self.sumsq.cpu()}

    def load(self, state: dict[str, Any], device: torch.device) -> None:
        self.sumsq = state["sumsq"].to(device).clone() if "sumsq" in state else None

    def diagonal(self, num_sets: int) -> Tensor:
        return self.sumsq / num_sets

    def whitener(self, num_sets: int, damping: float) -> DiagonalWhitener:
        diag = self.diagonal(num_sets)
        return DiagonalWhitener(inverse_sqrt(diag, damping * float(diag.mean())))  # floor: damping x mean diagonal
