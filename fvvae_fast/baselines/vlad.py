"""VLAD (Jegou et al. 2010): per k-means centre, the sum of the residuals of the descriptors assigned to it.

    V_k = sum_{t: NN(x_t) = k} (x_t - c_k) = S1_k - S0_k c_k

from the per-set statistics S0 (K,) (counts) and S1 (K, C) (sums of assigned descriptors): never an
(N, K, C) tensor. K C dimensions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..sets import pack_sets, pad_sets
from .pooling import check_sets


class VLAD:
    """Fit k-means centres on descriptors, then encode sets into (S, K C) float32 VLAD vectors.

    Example:
        >>> enc = VLAD(centres=3).fit(torch.rand(100, 4))
        >>> enc.encode(torch.rand(10, 4), torch.tensor([0, 4, 10])).shape
        torch.Size([2, 12])
    """

    def __init__(self, centres: int, *, seed: int = 0) -> None:
        if centres < 1:
            raise ValueError(f"VLAD: centres must be >= 1, got {centres}")
        self.k, self.seed = centres, seed
        self.centres: Tensor | None = None  # (K, C)

    @property
    def dim(self) -> int:
        if self.centres is None:
            raise RuntimeError("VLAD: call fit() first")
        return self.centres.numel()

    def fit(self, x: Tensor | np.ndarray) -> VLAD:
        """k-means (scikit-learn) on descriptors x (n, C), n >= K; returns self."""
        from sklearn.cluster import KMeans

        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] < self.k:
            raise ValueError(f"VLAD.fit: x must be (n >= K={self.k}, C), got {x.shape}")
        km = KMeans(self.k, n_init=1, random_state=self.seed).fit(x)
        self.centres = torch.as_tensor(km.cluster_centers_, dtype=torch.float32)
        return self

    def assign(self, x: Tensor) -> Tensor:
        """Index (N,) int64 of each descriptor's nearest centre."""
        if self.centres is None:
            raise RuntimeError("VLAD: call fit() first")
        return torch.cdist(x.float(), self.centres).argmin(1)

    def encode(self, x: Tensor, offsets: Tensor) -> Tensor:
        """VLAD of the sets: x (N, C) float, offsets (S+1,) int64 -> (S, K C) float32."""
        check_sets(x, offsets, "VLAD.encode")
        if self.centres is None:
            raise RuntimeError("VLAD: call fit() first")
        if x.shape[1] != self.centres.shape[1]:
            raise ValueError(f"VLAD.encode: x has C={x.shape[1]}, the centres have C={self.centres.shape[1]}")
        x = x.float()
        onehot = torch.nn.functional.one_hot(self.assign(x), self.k).float()  # (N, K)
        a_pad, _ = pad_sets(onehot, offsets)  # (S, T, K)
        x_pad, _ = pad_sets(x, offsets)  # (S, T, C)
        s1 = torch.bmm(a_pad.transpose(1, 2), x_pad)  # (S, K, C)
        return (s1 - a_pad.sum(1)[..., None] * self.centres).flatten(1)

    def transform(self, X: Any) -> Tensor:
        """:meth:`encode` of sets X given as a list of (n_i, C) arrays, (x, offsets) or a nested tensor
        (:func:`fvvae_fast.sets.pack_sets`): (S, D) float32."""
        return self.encode(*pack_sets(X, "VLAD.transform: X"))
