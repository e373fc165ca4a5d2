"""Compression of a finished representation (Fig. 4(c)): PCA and Random Maclaurin."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class PCACompression:
    """PCA (scikit-learn) to ``dim`` dimensions, fit on training vectors (n >= dim, D).

    Example:
        >>> PCACompression(3).fit(torch.rand(10, 8)).transform(torch.rand(4, 8)).shape
        torch.Size([4, 3])
    """

    def __init__(self, dim: int, *, seed: int = 0) -> None:
        if dim < 1:
            raise ValueError(f"PCACompression: dim must be >= 1, got {dim}")
        self.dim, self.seed = dim, seed
        self._pca = None

    def fit(self, v: Tensor | np.ndarray) -> PCACompression:
        from sklearn.decomposition import PCA

        v = np.asarray(v, dtype=np.float32)
        if v.ndim != 2 or min(v.shape) < self.dim:
            raise ValueError(f"PCACompression.fit: needs (n, D) vectors with n, D >= dim={self.dim}, got {v.shape}")
        self._pca = PCA(self.dim, random_state=self.seed).fit(v)
        return self

    def transform(self, v: Tensor | np.ndarray) -> Tensor:
        """(S, D) -> (S, dim) float32."""
        if self._pca is None:
            raise RuntimeError("PCACompression: call fit() first")
        return torch.as_tensor(self._pca.transform(np.asarray(v, dtype=np.float32)), dtype=torch.float32)


class RandomMaclaurin:
    """Random Maclaurin features of the degree-2 polynomial kernel (Kar and Karnick 2012).

    phi(v) = (v W1) * (v W2) / sqrt(dim), with W1, W2 (D, dim) of independent Rademacher entries,
    so E[<phi(u), phi(v)>] = <u, v>^2: no fitting, data-independent.

    Example:
        >>> RandomMaclaurin(5, in_dim=8).transform(torch.rand(4, 8)).shape
        torch.Size([4, 5])
    """

    def __init__(self, dim: int, *, in_dim: int, seed: int = 0) -> None:
        if dim < 1 or in_dim < 1:
            raise ValueError(f"RandomMaclaurin: dim and in_dim must be >= 1, got {dim}, {in_dim}")
        g = torch.Generator().manual_seed(seed)
        self.dim, self.in_dim = dim, in_dim
        self.w1 = torch.randint(0, 2, (in_dim, dim), generator=g).float() * 2 - 1
        self.w2 = torch.randint(0, 2, (in_dim, dim), generator=g).float() * 2 - 1

    def transform(self, v: Tensor | np.ndarray) -> Tensor:
        """(S, D) -> (S, dim) float32."""
        v = torch.as_tensor(np.asarray(v, dtype=np.float32))
        if v.dim() != 2 or v.shape[1] != self.in_dim:
            raise ValueError(f"RandomMaclaurin.transform: expected (S, {self.in_dim}) vectors, got {tuple(v.shape)}")
        return (v @ self.w1) * (v @ self.w2) / self.dim**0.5
