"""Sets of rows as one zero-padded batch, for the plain-torch forms of the ops and the baselines."""

from __future__ import annotations

import torch
from torch import Tensor


def pad_sets(x: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Sets as one zero-padded batch: x (N, C) + offsets (S+1,) -> (S, T_max, C) and lengths (S,) int64.

    Padding rows are zeros, so sums over a set's rows (and products summed over them) are unchanged.
    Equal-length sets are a view of ``x``, without a copy.
    """
    lengths = offsets.diff()
    s = lengths.numel()
    t_max = int(lengths.max()) if s else 0
    if s and bool((lengths == t_max).all()):
        return x.view(s, t_max, x.shape[1]), lengths
    row = torch.arange(x.shape[0], device=x.device) - torch.repeat_interleave(offsets[:-1], lengths)
    owner = torch.repeat_interleave(torch.arange(s, device=x.device), lengths)
    return x.new_zeros((s, t_max, x.shape[1])).index_put_((owner, row), x), lengths
