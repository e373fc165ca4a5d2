"""Diagonal plus rank-k estimate of F: a Frequent Directions sketch and its whitening.

Frequent Directions (Liberty 2013, "Simple and deterministic matrix sketching";
the fast, mergeable form of Ghashami, Liberty, Phillips, Woodruff 2016) keeps a
sketch B of the rows of A = [vec(G_X)]_X (n, D) in a (2l, D) buffer. Rows are
appended; when the buffer is full its SVD B = P diag(sqrt(e)) V^T is shrunk,

    B <- diag(sqrt(max(e_i - delta, 0))) V^T,     delta = e_l (the l-th largest)

which leaves at most l - 1 rows. With Delta the sum of every delta so far, after
any sequence of updates and merges (a merge appends the other sketch's rows and
adds its Delta):

    0  <=  A^T A - B^T B  <=  Delta I                        (PSD order)
    Delta <= (||A||_F^2 - ||B||_F^2) / l                    (each shrink removes >= l delta)
    Delta <= ||A - A_j||_F^2 / (l - j)   for every j < l     (A_j: best rank-j approximation)

so the sketch of F = A^T A / n is off by at most Delta / n in spectral norm, and
it is exact whenever the data has rank < l. The SVD is taken through the small
(2l, 2l) Gram matrix in float64; nothing of size (D, D) is ever formed.

The estimate (issue 6):

    F_hat = U L U^T + diag(max(diag F - diag(U L U^T), floor))       U (D, k), L (k,)

with U L U^T the top k of B^T B / n and diag F exact. Writing Delta_d for the
diagonal term and Y = Delta_d^(-1/2) U L^(1/2) = Q Sigma^(1/2) P^T (k x k eigenproblem
of Y^T Y), F_hat = Delta_d^(1/2) (I + Q Sigma Q^T) Delta_d^(1/2) and

    A = (I + Q ((1 + Sigma)^(-1/2) - 1) Q^T) Delta_d^(-1/2)

satisfies A F_hat A^T = I and A^T A = F_hat^(-1): the symmetric (ZCA) whitening of
the diagonally normalised F_hat. It costs O(k D) per set and reduces to the
diagonal mode when k = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import distributed
from .diagonal import DiagonalStatistics, inverse_sqrt

# Columns per float64 chunk when reading the buffer exactly (Gram, final basis).
_COL_CHUNK = 1 << 14
# The whitening needs an invertible diagonal term: its floor is never below this (relative to
# the mean diagonal), even with damping = 0.
_MIN_FLOOR = 1e-12


def _gram64(b: Tensor) -> Tensor:
    """b b^T of b (m, D) in float64, in column chunks (no float64 copy of b): (m, m)."""
    m, dim = b.shape
    out = torch.zeros((m, m), dtype=torch.float64, device=b.device)
    for lo in range(0, dim, _COL_CHUNK):
        c = b[:, lo : lo + _COL_CHUNK].to(torch.float64)
        out.addmm_(c, c.t())
    return out


def _eigh_desc(sym: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors of a small symmetric float64 matrix."""
    e, v = torch.linalg.eigh(sym)
    return e.flip(0), v.flip(1)


class FrequentDirections:
    """Fast Frequent Directions sketch of the rows of A (n, D) with l rows kept.

    Args:
        dim: D, the row length.
        rows: l, the sketch size (the buffer holds 2l rows: O(l D) memory).
        dtype: storage dtype of the buffer (float32 or float64); Gram matrices and
            eigenproblems are always float64.
        device: where the buffer lives.
    """

    def __init__(self, dim: int, rows: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.dim, self.rows, self.dtype = dim, rows, dtype
        self.buffer = torch.zeros((2 * rows, dim), dtype=dtype, device=device)
        self.filled = 0  # rows of buffer in use
        self.shrunk = 0.0  # Delta: the sum of every shrink delta, the spectral error bound of B^T B
        # The rows the last shrink left are orthogonal with squared norms e_i - delta: the next
        # Gram's block for them is this diagonal, not a product.
        self.orthogonal = torch.zeros(0, dtype=torch.float64, device=device)

    @property
    def sketch(self) -> Tensor:
        """B: (filled, D) rows in use, a view of the buffer."""
        return self.buffer[: self.filled]

    def update(self, a: Tensor) -> None:
        """Append rows a (m, D) (any float dtype, copied into the buffer as they come)."""
        lo, m = 0, a.shape[0]
        while lo < m:
            take = min(m - lo, self.buffer.shape[0] - self.filled)
            self.buffer[self.filled : self.filled + take].copy_(a[lo : lo + take])
            self.filled += take
            lo += take
            if self.filled == self.buffer.shape[0]:
                self._shrink()

    def merge(self, other: FrequentDirections) -> None:
        """Absorb another sketch: its rows are appended like data and its Delta added."""
        rows = other.sketch.to(self.buffer.device)
        self.update(rows.clone() if other is self else rows)
        self.shrunk += other.shrunk

    def _shrink(self) -> None:
        """SVD of the full buffer through its (2l, 2l) Gram; keep at most l - 1 rows.

        Only the rows added since the last shrink are multiplied: about 4 l^2 D flops for the
        Gram instead of 8 l^2 D, plus 4 l^2 D to form the rows kept.
        """
        b, r0 = self.sketch, len(self.orthogonal)
        gram = torch.zeros((self.filled, self.filled), dtype=torch.float64, device=b.device)
        gram[:r0, :r0] = torch.diag(self.orthogonal)
        added = (b[r0:] @ b.t()).to(torch.float64)  # in the buffer dtype: the hot path
        gram[r0:] = added
        gram[:r0, r0:] = added[:, :r0].t()
        e, p = _eigh_desc(gram)
        delta = max(float(e[self.rows - 1]), 0.0)  # e_l, the l-th largest
        # Components below rounding carry no information; dropping them costs at most tol.
        tol = float(e[0]) * gram.shape[0] * torch.finfo(b.dtype).eps
        keep = e[: self.rows - 1] > max(delta, tol)
        r = int(keep.sum())
        # B' = diag(sqrt(1 - delta / e_i)) P_r^T B = diag(sqrt(e_i - delta)) V_r^T: B^T B - B'^T B' <= delta I.
        coef = p[:, :r] * (1.0 - delta / e[:r]).sqrt()
        new = coef.t().to(b.dtype) @ b
        self.buffer[:r].copy_(new)
        self.filled = r
        self.orthogonal = e[:r] - delta
        self.shrunk += max(delta, tol) if r < self.rows - 1 else delta

    def top(self, k: int) -> tuple[Tensor, Tensor, float]:
        """Top k eigenpairs of B^T B: U (D, k') float64 with orthonormal columns, e (k',) float64, and tol.

        tol is the resolution of the float64 Gram (eigenvalues below it are rounding noise):
        those are dropped, so k' < k when B has lower (numerical) rank.
        """
        b = self.sketch
        if self.filled == 0:
            empty = b.new_zeros((0,), dtype=torch.float64)
            return b.new_zeros((self.dim, 0), dtype=torch.float64), empty, 0.0
        e, p = _eigh_desc(_gram64(b))
        tol = max(float(e[0]), 0.0) * self.filled * torch.finfo(torch.float64).eps * 10
        k = int((e[:k] > tol).sum())
        e, p = e[:k], p[:, :k]
        u = torch.empty((self.dim, k), dtype=torch.float64, device=b.device)
        for lo in range(0, self.dim, _COL_CHUNK):
            # U = B^T P e^(-1/2): the right singular vectors of B.
            u[lo : lo + _COL_CHUNK] = (b[:, lo : lo + _COL_CHUNK].t().to(torch.float64) @ p) / e.sqrt()
        return u, e, tol


@dataclass
class LowRankWhitener:
    """The whitening A of F_hat (module docstring): whiten(g) = g * s + ((g * s) Q) c Q^T.

    scale: (D,) Delta_d^(-1/2); basis: (D, k) Q orthonormal; coef: (k,) (1 + Sigma)^(-1/2) - 1.
    """

    scale: Tensor
    basis: Tensor
    coef: Tensor

    @classmethod
    def build(cls, diag: Tensor, u: Tensor, lam: Tensor, floor: float) -> LowRankWhitener:
        """From diag F (D,), U (D, k) orthonormal, L (k,) (all float64) and the absolute floor."""
        resid = diag - (u.square() @ lam)  # diag(F) - diag(U L U^T) >= 0 up to rounding
        scale = inverse_sqrt(resid, floor)  # Delta_d^(-1/2); 0 only where the coordinate is dead
        y = u * lam.sqrt()[None, :] * scale[:, None]  # Y = Delta_d^(-1/2) U L^(1/2)   (D, k)
        sig, p = _eigh_desc(y.t() @ y)  # Y^T Y = P Sigma P^T                                  (k, k)
        if sig.numel():  # drop directions at rounding level (Y of lower rank than k)
            live = sig > float(sig[0]) * sig.numel() * torch.finfo(torch.float64).eps
            sig, p = sig[live], p[:, live]
        basis = (y @ p) / sig.sqrt()  # Q = Y P Sigma^(-1/2), orthonormal                      (D, k)
        coef = (1.0 + sig).rsqrt() - 1.0  # (I + Q Sigma Q^T)^(-1/2) = I + Q coef Q^T
        return cls(scale, basis, coef)

    def to(self, dtype: torch.dtype, device: torch.device) -> LowRankWhitener:
        return LowRankWhitener(*(t.to(device=device, dtype=dtype) for t in (self.scale, self.basis, self.coef)))

    def apply(self, g: Tensor) -> Tensor:
        """g (S, D) -> (S, D) = A g per row, in O(k D) per set."""
        out = g * self.scale
        if self.coef.numel():
            proj = (out @ self.basis) * self.coef
            # in place unless autograd records this (it saved ``out`` for the product's backward)
            out = out.addmm(proj, self.basis.t()) if out.requires_grad else out.addmm_(proj, self.basis.t())
        return out


class LowRankStatistics(DiagonalStatistics):
    """``mode="lowrank"``: the exact diagonal plus a Frequent Directions sketch of the vec(G_X) rows.

    File keys: ``sumsq`` and the sketch, ``sketch_rows`` (its rows in use) and ``sketch_shrunk`` (Delta).
    """

    mode = "lowrank"

    def __init__(self, rank: int | None, sketch: int | None = None) -> None:
        if rank is None or rank < 1:
            raise ValueError(f"FisherInformation: mode='lowrank' needs rank=k >= 1, got rank={rank}")
        sketch = 2 * rank if sketch is None else sketch
        if sketch < rank:
            raise ValueError(f"FisherInformation: sketch must be >= rank={rank}, got sketch={sketch}")
        super().__init__()
        self.rank, self.sketch_rows = rank, sketch
        self.fd: FrequentDirections | None = None

    @property
    def tensors(self) -> list[Tensor]:
        return [] if self.fd is None else [*super().tensors, self.fd.buffer]

    def start(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Zero statistics for D = dim and an empty (2l, D) sketch buffer of ``dtype``."""
        super().start(dim, dtype, device)
        self.fd = FrequentDirections(dim, self.sketch_rows, dtype, device)

    def update(self, rows: Tensor) -> None:
        super().update(rows)
        self.fd.update(rows.to(self.fd.buffer.device))

    def merge(self, other: LowRankStatistics) -> None:
        super().merge(other)
        self.fd.merge(other.fd)

    def all_reduce(self, dim: int, shape: tuple[int, int] | None) -> None:
        """Sums of squares all-reduced; the sketches all-gathered and merged in rank order."""
        fd = self.fd
        mine = [0.0, 0.0, 0.0, 0.0] if fd is None else [1.0, fd.filled, fd.shrunk, fd.dtype == torch.float64]
        infos = torch.stack(distributed.all_gather(torch.tensor(mine, dtype=torch.float64)))
        if fd is None:  # join with an empty sketch of the dtype of the ranks that hold one
            float64 = bool(infos[infos[:, 0] > 0][0, 3])
            self.start(dim, torch.float64 if float64 else torch.float32, torch.device("cpu"))
        super().all_reduce(dim, shape)
        buffers = distributed.all_gather(self.fd.buffer)
        merged = FrequentDirections(dim, self.sketch_rows, self.fd.dtype, self.fd.buffer.device)
        for buf, (_, filled, shrunk, _) in zip(buffers, infos.tolist()):
            merged.update(buf[: int(filled)])
            merged.shrunk += shrunk
        self.fd = merged

    def state(self) -> dict[str, Any]:
        return {**super().state(), "sketch_rows": self.fd.sketch.cpu().clone(), "sketch_shrunk": self.fd.shrunk}

    def load(self, state: dict[str, Any], device: torch.device) -> None:
        super().load(state, device)
        self.fd = None
        if "sketch_rows" in state:
            rows = state["sketch_rows"]
            self.fd = FrequentDirections(self.sumsq.numel(), self.sketch_rows, rows.dtype, device)
            self.fd.update(rows.to(device))
            self.fd.shrunk = float(state["sketch_shrunk"])

    def sketch_error(self, num_sets: int) -> float:
        """Delta / n: 0 <= F - B^T B / n <= sketch_error * I for the sketch B."""
        return self.fd.shrunk / num_sets

    def low_rank(self, num_sets: int) -> tuple[Tensor, Tensor]:
        """U (D, k') orthonormal and L (k',) float64, k' <= k: the low-rank part U L U^T of F_hat."""
        u, e, _ = self.fd.top(self.rank)
        return u, e / num_sets

    def whitener(self, num_sets: int, damping: float) -> LowRankWhitener:
        diag = self.diagonal(num_sets)
        u, e, tol = self.fd.top(self.rank)
        mean = float(diag.mean())
        # damping x mean diagonal, never below what the float64 Gram resolves (directions under it are
        # not in U L U^T)
        floor = max(damping * mean, tol / num_sets, _MIN_FLOOR * mean)
        whitener = LowRankWhitener.build(diag, u, e / num_sets, floor)
        if damping == 0:  # pseudo-inverse, as in the diagonal mode: dead coordinates map to 0
            whitener.scale[diag == 0] = 0
        return whitener
