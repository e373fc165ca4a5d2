"""Improved Fisher vectors on a diagonal GMM (Perronnin et al. 2010; the paper's "FV" baseline).

For K components with weights w_k, means mu_k and standard deviations sigma_k (all (C,)),
posteriors gamma_tk, and a set of T descriptors:

    G_mu_k    = 1 / (T sqrt(w_k))   sum_t gamma_tk (x_t - mu_k) / sigma_k
    G_sigma_k = 1 / (T sqrt(2 w_k)) sum_t gamma_tk ((x_t - mu_k)^2 / sigma_k^2 - 1)

computed from the sufficient statistics S0 = sum_t gamma_t (K,), S1 = sum_t gamma_t x_t^T (K, C)
and S2 = sum_t gamma_t (x_t^2)^T (K, C) of each set: never an (N, K, C) tensor. 2 K C dimensions.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..sets import pack_sets, pad_sets
from .pooling import check_sets


class GMMFisherVector:
    """Fit a diagonal GMM on descriptors, then encode sets into (S, 2 K C) float32 Fisher vectors.

    Args:
        components: K.
        seed: seed of scikit-learn's initialisation.
        max_iter: EM iterations.
        reg_covar: variance floor added by scikit-learn (descriptors are L2-normalised, so small).

    Example:
        >>> enc = GMMFisherVector(components=2).fit(torch.rand(100, 4))
        >>> enc.encode(torch.rand(10, 4), torch.tensor([0, 4, 10])).shape
        torch.Size([2, 16])
    """

    def __init__(self, components: int, *, seed: int = 0, max_iter: int = 100, reg_covar: float = 1e-6) -> None:
        if components < 1:
            raise ValueError(f"GMMFisherVector: components must be >= 1, got {components}")
        self.components, self.seed, self.max_iter, self.reg_covar = components, seed, max_iter, reg_covar
        self.weights: Tensor | None = None  # (K,)
        self.means: Tensor | None = None  # (K, C)
        self.sigmas: Tensor | None = None  # (K, C)

    @property
    def dim(self) -> int:
        if self.means is None:
            raise RuntimeError("GMMFisherVector: call fit() first")
        return 2 * self.means.numel()

    def fit(self, x: Tensor | np.ndarray) -> GMMFisherVector:
        """Fit the GMM on descriptors x (n, C) (a sample of the training descriptors); returns self."""
        from sklearn.mixture import GaussianMixture

        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < self.components:
            raise ValueError(f"GMMFisherVector.fit: x must be (n >= K={self.components}, C), got {x.shape}")
        gmm = GaussianMixture(self.components, covariance_type="diag", max_iter=self.max_iter,
                              reg_covar=self.reg_covar, random_state=self.seed).fit(x)
        self.weights = torch.as_tensor(gmm.weights_, dtype=torch.float32)
        self.means = torch.as_tensor(gmm.means_, dtype=torch.float32)
        self.sigmas = torch.as_tensor(np.sqrt(gmm.covariances_), dtype=torch.float32)
        return self

    def posteriors(self, x: Tensor) -> Tensor:
        """gamma (N, K) float32: the components' posterior probabilities of each descriptor."""
        if self.means is None:
            raise RuntimeError("GMMFisherVector: call fit() first")
        x = x.float()
        inv_var = self.sigmas.pow(-2)  # (K, C)
        # log N(x | mu_k, sigma_k) expanded so that only (N, K) is formed
        quad = (x * x) @ inv_var.t() - 2 * x @ (self.means * inv_var).t() + (self.means.pow(2) * inv_var).sum(1)
        log_det = 2 * self.sigmas.log().sum(1)
        log_p = self.weights.log() - 0.5 * (quad + log_det + x.shape[1] * math.log(2 * math.pi))
        return torch.softmax(log_p, dim=1)

    def encode(self, x: Tensor, offsets: Tensor) -> Tensor:
        """Fisher vectors of the sets: x (N, C) float, offsets (S+1,) int64 -> (S, 2 K C) float32."""
        check_sets(x, offsets, "GMMFisherVector.encode")
        if self.means is None:
            raise RuntimeError("GMMFisherVector: call fit() first")
        if x.shape[1] != self.means.shape[1]:
            raise ValueError(f"GMMFisherVector.encode: x has C={x.shape[1]}, the GMM was fit on C={self.means.shape[1]}")
        x = x.float()
        gamma_pad, lengths = pad_sets(self.posteriors(x), offsets)  # (S, T, K)
        x_pad, _ = pad_sets(x, offsets)  # (S, T, C)
        s0 = gamma_pad.sum(1)  # (S, K)
        s1 = torch.bmm(gamma_pad.transpose(1, 2), x_pad)  # (S, K, C)
        s2 = torch.bmm(gamma_pad.transpose(1, 2), x_pad * x_pad)  # (S, K, C)
        mu, sigma, w = self.means, self.sigmas, self.weights
        t = lengths.clamp_min(1).to(x.dtype)[:, None, None]
        g_mu = (s1 - s0[..., None] * mu) / sigma / (t * w.sqrt()[:, None])
        g_sigma = (s2 - 2 * mu * s1 + (mu * mu - sigma * sigma) * s0[..., None]) / sigma.pow(2)
        g_sigma = g_sigma / (t * (2 * w).sqrt()[:, None])
        return torch.cat([g_mu.flatten(1), g_sigma.flatten(1)], dim=1)

    def transform(self, X: Any) -> Tensor:
        """:meth:`encode` of sets X given as a list of (n_i, C) arrays, (x, offsets) or a nested tensor
        (:func:`fvvae_fast.sets.pack_sets`): (S, D) float32."""
        return self.encode(*pack_sets(X, "GMMFisherVector.transform: X"))
