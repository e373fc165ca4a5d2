"""What a user would write in an afternoon: the baselines that tests and benchmarks share.

- :func:`autograd_accumulate`: the paper's recipe, per set a backward of the summed
  reconstruction NLL with respect to the decoder's W and b (Eq. 9, 11).
- :func:`vmap_accumulate`: per-descriptor ``torch.func.vmap(grad)``; materialises
  (N, C, d+1), small sizes only.
- :func:`padded_bmm_accumulate`: the best plain-torch version: one GEMM for the decoder
  over all rows, the mask, then one batched GEMM over sets padded to the longest.

All take the arguments of :func:`fvvae_fast.fisher_accumulate` and return (S, C, d+1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sets import pad_sets
from .reference import residual


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
    x: Tensor, z: Tensor, weight: Tensor, bias: Tensor, inv_var: Tensor, offsets: Tensor
) -> Tensor:
    """Decoder GEMM over all rows, mask, then one bmm over sets padded to the longest: (S, C, d+1)."""
    r = residual(x, z, weight, bias, inv_var)  # (N, C)
    z1 = torch.cat([z, z.new_ones((z.shape[0], 1))], dim=1)  # [z; 1]
    r_pad, _ = pad_sets(r, offsets)
    z_pad, _ = pad_sets(z1, offsets)
    return torch.bmm(r_pad.transpose(1, 2), z_pad)
