"""What a user would write in an afternoon: the baselines that tests and benchmarks share.

- :func:`autograd_accumulate`: the paper's recipe, per set a backward of the summed
  reconstruction NLL with respect to the decoder's W and b (Eq. 9, 11).
- :func:`vmap_accumulate`: per-descriptor ``torch.func.vmap(grad)``; materialises
  (N, C, d+1), small sizes only.
- :func:`padded_bmm_accumulate`: the best plain-torch version: one GEMM for the decoder
  over all rows, the mask, then one batched GEMM over sets padded to the longest (also a design the
  CUDA op may choose, with :func:`padded_bmm_vectors`, see :mod:`fvvae_fast.ops.dispatch`).

All take the arguments of :func:`fvvae_fast.fisher_accumulate` and return (S, C, d+1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .padding import pad_sets
from .reference import normalized
from .validate import opmath_dtype


def _rec_nll(x: Tensor, z: Tensor, weight: Tensor, bias: Tensor, inv_var: Tensor) -> Tensor:
    """Summed L_rec of rows x given z (Algorithm 1 line 9; log sigma_x does not depend on W, b)."""
    mu = torch.relu(z @ weight.t() + bias)
    return ((x - mu) ** 2 * inv_var).sum() / 2


def autograd_accumulate(x: Tensor, z: Tensor, weight: Tensor, bias: Tensor, inv_var: Tensor, offsets: Tensor) -> Tensor:
    """Per-set autograd of the summed L_rec with respect to (W, b): (S, C, d+1)."""
    w = weight.detach().requires_grad_()
    b = bias.detach().requires_grad_()
    out = []
    bounds = offsets.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        gw, gb = torch.autograd.grad(_rec_nll(x[lo:hi], z[lo:hi], w, b, inv_var), (w, b))
        out.append(torch.cat([gw, gb[:, None]], dim=1))
    if not out:
        return x.new_zeros((0, weight.shape[0], weight.shape[1] + 1))
    return torch.stack(out)


def vmap_accumulate(x: Tensor, z: Tensor, weight: Tensor, bias: Tensor, inv_var: Tensor, offsets: Tensor) -> Tensor:
    """Per-descriptor gradients by ``vmap(grad)`` (materialises (N, C, d+1)), summed per set."""
    if x.shape[0] == 0:  # vmap cannot map over an empty batch
        return x.new_zeros((offsets.numel() - 1, weight.shape[0], weight.shape[1] + 1))
    per_row = torch.func.vmap(torch.func.grad(_rec_nll, argnums=(2, 3)), in_dims=(0, 0, None, None, None))
    gw, gb = per_row(x, z, weight, bias, inv_var)
    full = torch.cat([gw, gb[..., None]], dim=2)  # (N, C, d+1)
    owner = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=x.device), offsets.diff())
    out = full.new_zeros((offsets.numel() - 1, *full.shape[1:]))
    return out.index_add_(0, owner, full)


def padded_bmm_accumulate(
    x: Tensor, z: Tensor, weight: Tensor, bias: Tensor, inv_var: Tensor, offsets: Tensor, *,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Decoder GEMM over all rows, mask, then one bmm over sets padded to the longest: (S, C, d+1) in
    ``out_dtype`` (default float32; float64 for float64 inputs).

    Operands at an aligned stride: z_aug = [z | 1 | 0...] and W padded with zero columns to a multiple of
    16, so cuBLAS runs both GEMMs on 16-byte aligned rows (d = 255 is odd), and the bias column of G
    comes out of the bmm. 16-bit inputs: GEMMs in their dtype (fp32 accumulation), the bmm's result in
    fp32 where torch offers it (CUDA); inv_var multiplies that result (v * diff may overflow fp16).
    Reads the longest set's length on the host (a sync: not for CUDA-graph capture).
    """
    acc = opmath_dtype(x.dtype)
    (n, c), d = x.shape, z.shape[1]
    k = -(-(d + 1) // 16) * 16
    z_aug = z.new_zeros((n, k))
    z_aug[:, :d] = z
    z_aug[:, d] = 1
    w_aug = weight.new_zeros((c, k))
    w_aug[:, :d] = weight
    a = torch.addmm(bias, z_aug, w_aug.t())  # a_t = W z_t + b (Eq. 10)
    diff = (a.clamp_min(0) - x) * (a > 0)  # r_t / inv_var (Eq. 11)
    diff_pad, _ = pad_sets(diff, offsets)
    z_pad, _ = pad_sets(z_aug, offsets)
    if x.is_cuda and acc != x.dtype:
        g = torch.bmm(diff_pad.transpose(1, 2), z_pad, out_dtype=acc)
    else:
        g = torch.bmm(diff_pad.transpose(1, 2), z_pad).to(acc)
    g = g[:, :, : d + 1] * inv_var.to(acc)[:, None]  # sum_t r_t [z_t; 1]^T (Eq. 13)
    return g if out_dtype is None else g.to(out_dtype)


def padded_bmm_vectors(
    x: Tensor, z: Tensor, weight: Tensor, bias: Tensor, inv_var: Tensor, offsets: Tensor, scale: Tensor | None,
    eps: float, *, out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Normalised Fisher vectors (S, C*(d+1)) of :func:`padded_bmm_accumulate`'s G, as ``fisher_vectors``."""
    return normalized(padded_bmm_accumulate(x, z, weight, bias, inv_var, offsets), scale, eps, out_dtype=out_dtype)
