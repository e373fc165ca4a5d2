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

from dataclasses import dataclass

import torch
from torch import Tensor


def descriptor_moments(r: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """Sums over descriptors: B_sum = r^T r (C, C) and A_sum = z~^T z~ (d+1, d+1), float64.

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
    return b_sum, a_sum


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
    out = V_B (scale * (V_B^T G V_A)) V_A^T with scale = S (C, d+1).
    """

    left: Tensor
    right: Tensor
    scale: Tensor | None

    @classmethod
    def build(cls, b: Tensor, a: Tensor, t_bar: float, damping: float) -> KroneckerWhitener:
        """From B (C, C), A (d+1, d+1) float64 (descriptor means), T_bar and the relative damping."""
        e_b, v_b = _eigh_psd(b)
        e_a, v_a = _eigh_psd(a)
        lam = t_bar * torch.outer(e_b, e_a)  # eigenvalues of T_bar B (x) A          (C, d+1)
        floor = damping * t_bar * float(b.diagonal().mean() * a.diagonal().mean())  # damping x mean diag
        if floor == 0 or bool((lam >= floor).all()):  # S is an outer product: two GEMMs
            left = (v_b * _inv_sqrt_or_zero(t_bar * e_b)) @ v_b.t()
            right = (v_a * _inv_sqrt_or_zero(e_a)) @ v_a.t()
            return cls(left, right, None)
        return cls(v_b, v_a, _inv_sqrt_or_zero(lam.clamp_min(floor)))

    def to(self, dtype: torch.dtype, device: torch.device) -> KroneckerWhitener:
        cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return KroneckerWhitener(cast(self.left), cast(self.right), cast(self.scale))

    def apply(self, g: Tensor) -> Tensor:
        """g (S, C, d+1) -> (S, C*(d+1)) whitened, in g's dtype."""
        if self.scale is None:
            out = torch.matmul(self.left, torch.matmul(g, self.right))
        else:
            rot = torch.matmul(self.left.t(), torch.matmul(g, self.right))  # V_B^T G V_A
            rot.mul_(self.scale)
            out = torch.matmul(self.left, torch.matmul(rot, self.right.t()))
        return out.reshape(g.shape[0], -1)
