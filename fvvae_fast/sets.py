"""Sets of descriptors in memory: (N, C) rows, (S+1,) offsets, (S,) labels."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class DescriptorSets:
    """Descriptors of S sets: ``x`` (N, C) float tensor or array (a NumPy memmap works),
    ``offsets`` (S+1,) int64, optional ``labels`` (S,) int64.
    """

    x: Tensor | np.ndarray
    offsets: Tensor
    labels: Tensor | None = None

    def __post_init__(self) -> None:
        self.offsets = torch.as_tensor(np.asarray(self.offsets), dtype=torch.int64)
        if self.x.ndim != 2:
            raise ValueError(f"DescriptorSets: x must be (N, C), got shape {tuple(self.x.shape)}")
        if self.offsets.dim() != 1 or self.offsets.numel() < 1:
            raise ValueError(f"DescriptorSets: offsets must be (S+1,), got shape {tuple(self.offsets.shape)}")
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != self.x.shape[0]:
            raise ValueError(
                f"DescriptorSets: offsets must start at 0 and end at N={self.x.shape[0]}, "
                f"got {int(self.offsets[0])}..{int(self.offsets[-1])}"
            )
        if bool((self.offsets[1:] < self.offsets[:-1]).any()):
            raise ValueError("DescriptorSets: offsets must be non-decreasing")
        if self.labels is not None:
            self.labels = torch.as_tensor(np.asarray(self.labels), dtype=torch.int64)
            if self.labels.shape != (len(self),):
                raise ValueError(f"DescriptorSets: labels must be (S={len(self)},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    @classmethod
    def from_dense(cls, x: Tensor | np.ndarray, labels: Tensor | None = None) -> DescriptorSets:
        """From (S, T, C): S sets of T descriptors each."""
        s, t, c = x.shape
        return cls(x.reshape(s * t, c), torch.arange(s + 1, dtype=torch.int64) * t, labels)

    def batches(self, batch_sets: int) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """Consecutive groups of ``batch_sets`` sets: (x (n, C) float32, offsets (k+1,) int64, labels (k,) or None),
        read lazily (a memory-mapped x is read one group at a time)."""
        for lo in range(0, len(self), batch_sets):
            hi = min(lo + batch_sets, len(self))
            a, b = int(self.offsets[lo]), int(self.offsets[hi])
            chunk = self.x[a:b]
            x = chunk.float() if isinstance(chunk, Tensor) else torch.from_numpy(np.array(chunk, dtype=np.float32))
            yield x, self.offsets[lo : hi + 1] - a, None if self.labels is None else self.labels[lo:hi]

    def gather(
        self, set_ids: Tensor, per_set: int | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Rows of the sets ``set_ids`` (optionally ``per_set`` random rows of each, like the
        paper's one-frame-per-video training): x (n, C) float32, offsets (k+1,), set index of each row (n,).
        """
        starts = self.offsets[set_ids]
        lengths = self.offsets[set_ids + 1] - starts
        counts = lengths if per_set is None else lengths.clamp_max(per_set)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        owners = torch.repeat_interleave(torch.arange(len(set_ids)), counts)
        if per_set is not None and bool((lengths > per_set).any()):
            # per_set rows of each set without replacement: the smallest of uniform keys (padding last).
            span = torch.arange(int(lengths.max()))
            keys = torch.rand((len(set_ids), span.numel()), generator=generator).masked_fill_(
                span >= lengths[:, None], 2.0)
            picked = keys.topk(per_set, dim=1, largest=False).indices  # (k, per_set)
            local = picked[torch.arange(per_set) < counts[:, None]]
        else:
            local = torch.arange(int(offsets[-1])) - torch.repeat_interleave(offsets[:-1], counts)
        rows = starts[owners] + local
        x = torch.as_tensor(np.asarray(self.x[rows.numpy()]) if isinstance(self.x, np.ndarray) else self.x[rows])
        return x.float(), offsets, owners


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
