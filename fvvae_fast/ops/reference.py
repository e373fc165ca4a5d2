"""The float64-capable references of the ops (``fisher_accumulate``, ``fisher_vectors``, ``sum_of_squares``):
plain torch, the oracles.

Reads like the paper. For descriptor t of set X with latent z_t (Eq. 10, 11):

    a_t  = W z_t + b,        mu_x,t = ReLU(a_t)
    r_t  = (mu_x,t - x_t) * inv_var * [a_t > 0]             dL_rec/d mu_x, masked (Eq. 11)
    G_X  = sum_t r_t [z_t ; 1]^T                            (C, d+1)        (Eq. 13, before F)

Rows are processed per set in chunks, so peak memory stays near inputs + output:
nothing of size (N, C, d+1) is ever formed. Half inputs are computed in float32; G is
accumulated in float32 (float64 for float64 inputs) and converted to ``out_dtype`` at the end.
"""

from __future__ import annotations

import torch

from .validate import opmath_dtype

# Rows per chunk: keeps each (rows, C) temporary to about 4 M elements.
_CHUNK_ELEMS = 1 << 22
# Elements per float64 temporary of sum_of_squares: 1 Mi elements = 8 MiB (8 rows at D = 131,072).
# Few large ops rather than one per row: each op is one parallel region, and on a busy machine
# every region can wait a scheduler time slice for its threads.
_SQUARES_CHUNK_ELEMS = 1 << 20


def _chunks(offsets: torch.Tensor, c: int):
    step = max(1, _CHUNK_ELEMS // max(c, 1))
    bounds = offsets.tolist()
    for s in range(len(bounds) - 1):
        for lo in range(bounds[s], bounds[s + 1], step):
            yield s, lo, min(lo + step, bounds[s + 1])


def _pre_activation(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.addmm(bias, z, weight.t())  # a_t = W z_t + b   (Eq. 10)


def residual(
    x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, inv_var: torch.Tensor
) -> torch.Tensor:
    """r_t = (ReLU(W z_t + b) - x_t) * inv_var * [W z_t + b > 0] (Eq. 11): (n, C) from x (n, C), z (n, d).

    Computed in the dtype of the inputs; callers cast first (no chunking here).
    """
    a = _pre_activation(z, weight, bias)
    return (a.clamp_min(0) - x) * inv_var * (a > 0)


def forward(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    inv_var: torch.Tensor,
    offsets: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """G: (S, C, d+1) in ``out_dtype``, default float32 (float64 for float64 inputs). Inputs already validated."""
    dt = opmath_dtype(x.dtype)
    c, d = weight.shape
    w, b, v = weight.to(dt), bias.to(dt), inv_var.to(dt)
    out = torch.zeros((offsets.shape[0] - 1, c, d + 1), dtype=dt, device=x.device)
    for s, lo, hi in _chunks(offsets, c):
        xc, zc = x[lo:hi].to(dt), z[lo:hi].to(dt)
        r = residual(xc, zc, w, b, v)
        out[s, :, :d] += r.t() @ zc  # sum_t r_t z_t^T   (Eq. 13)
        out[s, :, d] += r.sum(0)  # sum_t r_t         (the bias column)
    return out if out_dtype is None else out.to(out_dtype)


def vectors(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    inv_var: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor | None,
    eps: float,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Normalised Fisher vectors (S, C*(d+1)) in ``out_dtype``, default float32 (float64 for float64
    inputs): y = -scale * vec(G) (Eq. 13 with a diagonal F^(-1/2) = ``scale`` (C*(d+1),), None for 1),
    then sign(y) sqrt|y| / max(||sign(y) sqrt|y|||, eps). Inputs already validated."""
    return normalized(forward(x, z, weight, bias, inv_var, offsets), scale, eps, out_dtype=out_dtype)


def normalized(g: torch.Tensor, scale: torch.Tensor | None, eps: float, *,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(S, C*(d+1)) Fisher vectors from G (S, C, d+1) in its dtype: y = -scale * vec(G), then
    sign(y) sqrt|y| / max(||sign(y) sqrt|y|||, eps), converted to ``out_dtype`` at the end."""
    v = g.flatten(1)
    if scale is not None:
        v = v * scale.to(v.dtype)
    y = -v
    root = y.abs().sqrt().copysign(y)
    out = root / root.norm(dim=1, keepdim=True).clamp_min(eps)
    return out if out_dtype is None else out.to(out_dtype)


def backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    inv_var: torch.Tensor,
    offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (x, z, weight, bias, inv_var) of <grad, G>, each in its input's dtype; ``grad``
    (S, C, d+1) in any floating dtype (G's).

    With P = grad[s] (C, d+1), q_t = P [z_t; 1] = dL/dr_t and m_t = [a_t > 0]:
        dx_t   = -inv_var * m_t * q_t
        da_t   =  inv_var * m_t * q_t            (d ReLU(a)/da = 1 where m_t = 1)
        dz_t   =  W^T da_t + P[:, :d]^T r_t      (through a_t, and through the outer product)
        dW     =  sum_t da_t z_t^T,   db = sum_t da_t
        dinv_var = sum_t (mu_x,t - x_t) * m_t * q_t
    """
    dt = opmath_dtype(x.dtype)
    c, d = weight.shape
    w, b, v = weight.to(dt), bias.to(dt), inv_var.to(dt)
    g = grad.to(dt)
    gx = torch.zeros(x.shape, dtype=dt, device=x.device)
    gz = torch.zeros(z.shape, dtype=dt, device=x.device)
    gw = torch.zeros((c, d), dtype=dt, device=x.device)
    gb = torch.zeros((c,), dtype=dt, device=x.device)
    gv = torch.zeros((c,), dtype=dt, device=x.device)
    for s, lo, hi in _chunks(offsets, c):
        xc, zc = x[lo:hi].to(dt), z[lo:hi].to(dt)
        a = _pre_activation(zc, w, b)
        m = (a > 0).to(dt)
        diff = (a.clamp_min(0) - xc) * m
        q = torch.addmm(g[s, :, d], zc, g[s, :, :d].t())  # q_t = P [z_t; 1]
        da = v * m * q
        gx[lo:hi] = -da
        gv += (diff * q).sum(0)
        gb += da.sum(0)
        gw += da.t() @ zc
        gz[lo:hi] = da @ w + (diff * v) @ g[s, :, :d]
    return gx.to(x.dtype), gz.to(z.dtype), gw.to(weight.dtype), gb.to(bias.dtype), gv.to(inv_var.dtype)


def sum_of_squares(g: torch.Tensor) -> torch.Tensor:
    """sum_s g[s]^2: (D,) float64 from g (S, D) float, the sum behind diag F (Eq. 12).

    Squares float64 row chunks (about 8 MiB, or one row when D is larger): no float64 copy of g.
    """
    s, dim = g.shape
    out = torch.zeros(dim, dtype=torch.float64, device=g.device)
    step = max(1, _SQUARES_CHUNK_ELEMS // max(dim, 1))
    for lo in range(0, s, step):
        out += g[lo : lo + step].to(torch.float64, copy=True).square_().sum(0)  # sum_X vec(G_X)^2   (Eq. 12)
    return out
