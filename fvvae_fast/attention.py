"""Which descriptors a Fisher vector listens to (paper section 5.4, Fig. 5 and 6).

The FV of a set is linear in its descriptors (Eq. 13): FV_X = -sum_t F^(-1/2) vec(r_t [z_t; 1]^T).
The attention of descriptor t is the L1 mass of its own term, sum |F^(-1/2) vec(r_t [z_t; 1]^T)|:
over the positions of a frame it is a spatial map, summed per frame a temporal curve.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .encode import Whitener, fisher_gradients
from .model import FVVAE


@torch.inference_mode()
def descriptor_attention(model: FVVAE, x: Tensor, fim: Whitener | None = None, *, chunk: int = 1024) -> Tensor:
    """Attention of each raw descriptor x (N, C) float: (N,) float32, the sum of |its FV term|.

    Each descriptor is a set of its own (its (C, d+1) gradient is whitened by ``fim`` when given),
    ``chunk`` descriptors at a time, so memory stays at chunk x C (d+1).
    """
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"descriptor_attention: x must be (N, C), got {getattr(x, 'shape', type(x).__name__)}")
    out = []
    for lo in range(0, x.shape[0], chunk):
        xc = x[lo:lo + chunk]
        g = fisher_gradients(model, xc, torch.arange(xc.shape[0] + 1, device=xc.device))  # (n, C, d+1)
        v = g.flatten(1) if fim is None else fim.whiten(g)
        out.append(v.abs().sum(1).float())
    return torch.cat(out) if out else x.new_zeros(0, dtype=torch.float32)
