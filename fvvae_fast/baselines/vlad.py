"""VLAD (Jegou et al. 2010): per k-means centre, the sum of the residuals of the descriptors assigned to it.

    V_k = sum_{t: NN(x_t) = k} (x_t - c_k) = S1_k - S0_k c_k

from the per-set statistics S0 (K,) (counts) and S1 (K, C) (sums of assigned descriptors): never an
(N, K, C) tensor. K C dimensions.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from sklearn.utils.validation import check_is_fitted
from torch import Tensor

from ..ops.padding import pad_sets
from ..sklearn import SetTransformer
from .pooling import check_sets


class VLAD(SetTransformer):
    """Fit k-means centres on the descriptors of sets, then encode sets into (S, K C) float32 VLAD vectors.

    A scikit-learn transformer of sets (:mod:`fvvae_fast.sklearn`): ``fit(X)`` runs k-means (scikit-learn) on
    every descriptor of the sets X, ``transform(X)`` returns NumPy; :meth:`encode` is the same on tensors.

    Attributes (after ``fit``): ``centres_`` (K, C) float32 tensor.

    Example:
        >>> enc = VLAD(centres=3).fit([np.random.rand(100, 4)])
        >>> enc.transform([np.random.rand(4, 4), np.random.rand(6, 4)]).shape
        (2, 12)
    """

    def __init__(self, centres: int = 32, *, seed: int = 0) -> None:
        self.centres = centres
        self.seed = seed

    @property
    def _n_features_out(self) -> int:
        return self.centres_.numel()

    def _fit(self, x: Tensor, offsets: Tensor, y: Any = None) -> None:
        from sklearn.cluster import KMeans

        if not isinstance(self.centres, numbers.Integral) or self.centres < 1:
            raise ValueError(f"VLAD: centres must be an int >= 1, got {self.centres!r}")
        if x.shape[0] < self.centres:
            raise ValueError(f"VLAD.fit: the sets hold {x.shape[0]} descriptors, fewer than centres={self.centres}")
        km = KMeans(self.centres, n_init=1, random_state=self.seed).fit(x.cpu().numpy())
        self.centres_ = torch.as_tensor(km.cluster_centers_, dtype=torch.float32)

    def assign(self, x: Tensor) -> Tensor:
        """Index (N,) int64 of each descriptor's nearest centre."""
        check_is_fitted(self)
        return torch.cdist(x.float(), self.centres_).argmin(1)

    def encode(self, x: Tensor, offsets: Tensor) -> Tensor:
        """VLAD of the sets: x (N, C) float, offsets (S+1,) int64 -> (S, K C) float32."""
        check_sets(x, offsets, "VLAD.encode")
        check_is_fitted(self)
        if x.shape[1] != self.centres_.shape[1]:
            raise ValueError(f"VLAD.encode: x has C={x.shape[1]}, the centres have C={self.centres_.shape[1]}")
        x = x.float()
        onehot = torch.nn.functional.one_hot(self.assign(x), self.centres_.shape[0]).float()  # (N, K)
        a_pad, _ = pad_sets(onehot, offsets)  # (S, T, K)
        x_pad, _ = pad_sets(x, offsets)  # (S, T, C)
        s1 = torch.bmm(a_pad.transpose(1, 2), x_pad)  # (S, K, C)
        return (s1 - a_pad.sum(1)[..., None] * self.centres_).flatten(1)
