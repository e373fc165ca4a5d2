"""Kronecker-factored F (K-FAC style) from per-descriptor statistics.

With the per-descriptor gradient g_t = vec(r_t [z_t; 1]^T) = r_t (x) z~_t (row-major vec,
r_t of Eq. 11, z~_t = [z_t; 1]) and descriptors treated as independent with r_t
independent of z_t,

    F = E_X[G_X G_X^T] ~ T_bar * E[r r^T] (x) E[z~ z~^T] = T_bar * B (x) A        (Eq. 12)

where T_bar is the mean number of descriptors per set (the i.i.d. scale of a sum of
T_X terms). Then, for symmetric B and A and row-major vec,

    F^(-1/2) vec(G) = T_bar^(-1/2) vec(B^(-1/2) G A^(-1/2))                      (Eq. 13)

two small GEMMs per set: O((C + d + 1) D). Only B (C, C) and A (d+1, d+1) are
stored, as float64 sums; merging two estimates adds them exactly.

The mean term. Independent descriptors whose gradients have a non-zero mean m = E[g_t]
(always, for sparse non-negative descriptors: r_t is biased) add the pairs t != t' of the
set: E[G G^T] = T E[g g^T] + T (T - 1) m m^T, so

    F = T_bar B (x) A + c u u^T,   u = vec(E[r z~^T]),   c = mean over sets of T (T - 1)

(c u u^T can be most of ||F||). With K = T_bar B (x) A (damped as below) and
w = K^(-1/2) sqrt(c) u, F = K^(1/2) (I + w w^T) K^(1/2), and

    A_F = (I + (1/sqrt(1 + |w|^2) - 1) w^ w^T) K^(-1/2)        (w^ = w / |w|)

satisfies A_F^T A_F = F^(-1) (the Fisher kernel is exact) and A_F F A_F^T = I: the whitening of
the Kronecker part followed by a rank-one shrink along w, O(D) more per set. It is not the
symmetric F^(-1/2) (which would need an eigendecomposition of size D); without the mean
term (u = 0) it is the symmetric K^(-1/2).

Damping floors the spectrum of F_k = T_bar B (x) A itself, as in the other modes:
its eigenvalues are the products lambda_ij = T_bar e_B,i e_A,j of the factors'
eigenvalues, with eigenvectors v_B,i (x) v_A,j, so with the floor
f = damping * mean diag(F_k) = damping * T_bar * mean diag(B) * mean diag(A),

    F_k,damped^(-1/2) vec(G) = vec(V_B [S * (V_B^T G V_A)] V_A^T),   S_ij = max(lambda_ij, f)^(-1/2)

four small GEMMs per set. When no product lies under the floor (always when
damping = 0), S is the outer product T_bar^(-1/2) e_B^(-1/2) e_A^(-1/2) and this is
the two-GEMM form above. With damping = 0, factor eigenvalues at rounding level
are treated as zero (pseudo-inverse), like dead coordinates in the diagonal mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import distributed
from .statistics import Statistics


def descriptor_moments(r: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sums over descriptors: B_sum = r^T r (C, C), A_sum = z~^T z~ (d+1, d+1) and M_sum = r^T z~
    (C, d+1), float64.

    r: (n, C) residuals (Eq. 11); z: (n, d) latents. The GEMMs run in the inputs' dtype
    (float32 for float32 models) and are accumulated in float64 by the caller.
    """
    n, d = z.shape
    b_sum = (r.t() @ r).to(torch.float64)
    zz = (z.t() @ z).to(torch.float64)
    zs = z.sum(0, dtype=torch.float64)
    a_sum = torch.empty((d + 1, d + 1), dtype=torch.float64, device=z.device)
    a_sum[:d, :d] = zz
    a_sum[:d, d] = zs
    a_sum[d, :d] = zs
    a_sum[d, d] = n
    m_sum = torch.cat([(r.t() @ z).to(torch.float64), r.sum(0, dtype=torch.float64)[:, None]], dim=1)
    return b_sum, a_sum, m_sum


def _eigh_psd(m: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of a PSD float64 matrix; eigenvalues at rounding level (or negative) set to 0."""
    e, v = torch.linalg.eigh(m)
    tol = float(e.max().clamp_min(0)) * m.shape[0] * torch.finfo(torch.float64).eps * 10
    return torch.where(e > tol, e, torch.zeros_like(e)), v


def _inv_sqrt_or_zero(e: Tensor) -> Tensor:
    return torch.where(e > 0, e.clamp_min(torch.finfo(e.dtype).tiny).rsqrt(), torch.zeros_like(e))


@dataclass
class KroneckerWhitener:
    """F_k,damped^(-1/2) applied per set (module docstring).

    Factored form (``scale`` None): out = left G right with left = T_bar^(-1/2) B^(-1/2) (C, C),
    right = A^(-1/2) (d+1, d+1). Rotated form: left = V_B, right = V_A and
    out = V_B (scale * (V_B^T G V_A)) V_A^T with scale = S (C, d+1). Then the mean term's
    rank-one shrink: out += shrink * (out . w^) w^ (``direction`` w^ (D,), None without it).
    """

    left: Tensor
    right: Tensor
    scale: Tensor | None
    direction: Tensor | None = None
    shrink: float = 0.0

    @classmethod
    def build(cls, b: Tensor, a: Tensor, t_bar: float, damping: float, u: Tensor | None = None) -> KroneckerWhitener:
        """From B (C, C), A (d+1, d+1) float64 (descriptor means), T_bar, the relative damping and
        the mean term sqrt(c) m (C, d+1) float64 (module docstring; None: no mean term)."""
        e_b, v_b = _eigh_psd(b)
        e_a, v_a = _eigh_psd(a)
        lam = t_bar * torch.outer(e_b, e_a)  # eigenvalues of T_bar B (x) A          (C, d+1)
        floor = damping * t_bar * float(b.diagonal().mean() * a.diagonal().mean())  # damping x mean diag
        if floor == 0 or bool((lam >= floor).all()):  # S is an outer product: two GEMMs
            left = (v_b * _inv_sqrt_or_zero(t_bar * e_b)) @ v_b.t()
            right = (v_a * _inv_sqrt_or_zero(e_a)) @ v_a.t()
            whitener = cls(left, right, None)
        else:
            whitener = cls(v_b, v_a, _inv_sqrt_or_zero(lam.clamp_min(floor)))
        if u is not None:
            w = whitener.apply(u.reshape(1, -1))[0]  # K^(-1/2) sqrt(c) u
            norm2 = float(w @ w)
            if norm2 > 0:
                whitener.direction, whitener.shrink = w / math.sqrt(norm2), 1.0 / math.sqrt(1.0 + norm2) - 1.0
        return whitener

    def to(self, dtype: torch.dtype, device: torch.device) -> KroneckerWhitener:
        cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return KroneckerWhitener(cast(self.left), cast(self.right), cast(self.scale), cast(self.direction), self.shrink)

    def apply(self, g: Tensor) -> Tensor:
        """g (S, C*(d+1)) row-major vec(G) -> (S, C*(d+1)) whitened, in g's dtype."""
        g = g.reshape(g.shape[0], self.left.shape[0], self.right.shape[0])
        if self.scale is None:
            out = torch.matmul(self.left, torch.matmul(g, self.right))
        else:
            rot = torch.matmul(self.left.t(), torch.matmul(g, self.right))  # V_B^T G V_A
            rot.mul_(self.scale)
            out = torch.matmul(self.left, torch.matmul(rot, self.right.t()))
        out = out.reshape(g.shape[0], -1)
        if self.direction is not None:  # rank-one shrink along w^ (mean term)
            out = out + self.shrink * (out @ self.direction)[:, None] * self.direction
        return out


class KroneckerStatistics(Statistics):
    """``mode="kronecker"``: per-descriptor sums, fed by descriptors only (G has no per-descriptor terms).

    File keys: ``b_sum`` (C, C) = sum_t r_t r_t^T, ``a_sum`` (d+1, d+1) = sum_t z~_t z~_t^T,
    ``m_sum`` (C, d+1) = sum_t r_t z~_t^T (float64) and ``pairs`` = sum over sets of T (T - 1);
    the count of descriptors is the file's ``num_descriptors``. Version 1 files have no mean term.
    """

    mode = "kronecker"

    def __init__(self, rank: int | None = None, sketch: int | None = None) -> None:
        super().__init__(rank, sketch)
        self.b_sum: Tensor | None = None
        self.a_sum: Tensor | None = None
        self.m_sum: Tensor | None = None
        self.pairs = 0.0  # ordered pairs of distinct descriptors of a set, summed over sets
        self.num_descriptors = 0

    @property
    def tensors(self) -> list[Tensor]:
        return [] if self.b_sum is None else [self.b_sum, self.a_sum, self.m_sum]

    def start(self, shape: tuple[int, int], device: torch.device) -> None:
        """Zero sums for (C, d+1) = shape."""
        c, j = shape
        self.b_sum = torch.zeros((c, c), dtype=torch.float64, device=device)
        self.a_sum = torch.zeros((j, j), dtype=torch.float64, device=device)
        self.m_sum = torch.zeros(shape, dtype=torch.float64, device=device)

    def update(self, rows: Tensor) -> None:
        raise ValueError(
            "FisherInformation.update: mode='kronecker' needs per-descriptor statistics (residuals r_t "
            "and latents z_t), which G (S, C, d+1) does not contain; use update_descriptors(model, x, "
            "offsets) or estimate(model, loader)"
        )

    def update_descriptors(self, model: Any, x: Tensor, offsets: Tensor, backend: str | None) -> None:
        """r_t (Eq. 11) and z~_t = [mu_z(x_t); 1] give the sums; no per-descriptor gradient is formed."""
        from ..ops.reference import residual

        weight = model.decoder.weight
        xp, z = model.preprocess(x), model.encode(x)
        r = residual(xp, z, weight, model.decoder.bias, model.inv_var())  # (N, C)   Eq. 11
        sums = descriptor_moments(r, z)
        if not all(math.isfinite(float(t.sum())) for t in sums):
            raise ValueError("FisherInformation.update_descriptors: NaN or Inf in the residuals or latents")
        if self.b_sum is None:
            self.start(tuple(sums[2].shape), sums[0].device)
        for total, part in zip(self.tensors, sums):
            total += part.to(total.device)
        lengths = offsets.diff().double()
        self.pairs += float((lengths * (lengths - 1)).sum())
        self.num_descriptors += x.shape[0]

    def merge(self, other: KroneckerStatistics) -> None:
        for total, part in zip(self.tensors, other.tensors):
            total += part.to(total.device)
        self.pairs += other.pairs
        self.num_descriptors += other.num_descriptors

    def all_reduce(self, dim: int, shape: tuple[int, int] | None) -> None:
        if self.b_sum is None:
            self.start(shape, torch.device("cpu"))
        for t in self.tensors:
            distributed.all_reduce_sum(t)
        counts = distributed.all_reduce_sum(torch.tensor([self.num_descriptors, self.pairs], dtype=torch.float64))
        self.num_descriptors, self.pairs = int(counts[0]), float(counts[1])

    def state(self) -> dict[str, Any]:
        return {"b_sum": self.b_sum.cpu(), "a_sum": self.a_sum.cpu(), "m_sum": self.m_sum.cpu(), "pairs": self.pairs}

    def load(self, state: dict[str, Any], device: torch.device) -> None:
        self.num_descriptors, self.pairs = state["num_descriptors"], float(state.get("pairs", 0.0))
        self.b_sum = self.a_sum = self.m_sum = None
        if "b_sum" in state:
            self.start((state["b_sum"].shape[0], state["a_sum"].shape[0]), device)  # a version 1 file: m = 0
            for name, t in zip(("b_sum", "a_sum", "m_sum"), self.tensors):
                if name in state:
                    t.copy_(state[name])

    def factors(self, num_sets: int) -> tuple[Tensor, Tensor, float]:
        """B = E[r r^T] (C, C), A = E[z~ z~^T] (d+1, d+1) float64 and T_bar: F ~ T_bar B (x) A."""
        n = max(self.num_descriptors, 1)
        return self.b_sum / n, self.a_sum / n, self.num_descriptors / num_sets

    def mean_term(self, num_sets: int) -> tuple[Tensor, float]:
        """m = E[r z~^T] (C, d+1) float64 and c = mean over sets of T (T - 1)."""
        return self.m_sum / max(self.num_descriptors, 1), self.pairs / num_sets

    def diagonal(self, num_sets: int) -> Tensor:
        b, a, t_bar = self.factors(num_sets)
        m, c = self.mean_term(num_sets)
        return t_bar * torch.outer(b.diagonal(), a.diagonal()).reshape(-1) + c * m.reshape(-1) ** 2

    def whitener(self, num_sets: int, damping: float) -> KroneckerWhitener:
        b, a, t_bar = self.factors(num_sets)
        m, c = self.mean_term(num_sets)
        return KroneckerWhitener.build(b, a, t_bar, damping, math.sqrt(c) * m)
