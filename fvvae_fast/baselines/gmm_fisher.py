"""Improved Fisher vectors on a diagonal GMM (Perronnin et al. 2010; the paper's "FV" baseline).

For K components with weights w_k, means mu_k and standard deviations sigma_k (all (C,)),
posteriors gamma_tk, and a set of T descriptors:

    G_mu_k    = 1 / (T sqrt(w_k))   sum_t gamma_tk (x_t - mu_k) / sigma_k
    G_sigma_k = 1 / (T sqrt(2 w_k)) sum_t gamma_tk ((x_t - mu_k)^2 / sigma_k^2 - 1)

computed from the sufficient statistics S0 = sum_t gamma_t (K,), S1 = sum_t gamma_t x_t^T (K, C)
and S2 = sum_t gamma_t (x_t^2)^T (K, C) of each set: never an (N, K, C) tensor. 2 K C dimensions.

With ``weights=True`` the mixture-weight terms come first (as in scikit-image's ``fisher_vector``),
K more dimensions (0 for an empty set, as its other terms):

    G_w_k     = 1 / (T sqrt(w_k))   sum_t (gamma_tk - w_k)

The default leaves them out, as the paper's FV baseline does: Perronnin et al.'s improved FV (and
VLFeat's ``vl_fisher``, which the paper's settings follow) keeps the mean and variance terms only, 2 K C
dimensions (K = 128 gives the paper's 256 C); the K weight terms carry little (Sanchez et al. 2013).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted
from torch import Tensor

from ..ops.padding import pad_sets
from ..sklearn import SetTransformer
from .pooling import check_sets


class GMMFisherVector(SetTransformer):
    """Fit a diagonal GMM on the descriptors of sets, then encode sets into (S, 2 K C) float32 Fisher vectors
    (K + 2 K C with ``weights=True``).

    A scikit-learn transformer of sets (:mod:`fvvae_fast.sklearn`): ``fit(X)`` fits the GMM on every descriptor
    of the sets X, ``transform(X)`` returns NumPy; :meth:`encode` is the same on tensors x (N, C) + offsets.

    Args:
        components: K.
        weights: add the K mixture-weight terms (module docstring; default False: the paper's 2 K C).
        seed: seed of scikit-learn's initialisation.
        max_iter: EM iterations.
        reg_covar: variance floor added by scikit-learn (descriptors are L2-normalised, so small).

    Attributes (after ``fit``): ``weights_`` (K,), ``means_`` (K, C), ``sigmas_`` (K, C) float32 tensors;
    ``n_iter_`` (the EM iterations run).

    Example:
        >>> enc = GMMFisherVector(components=2).fit([np.random.rand(100, 4)])
        >>> enc.transform([np.random.rand(4, 4), np.random.rand(6, 4)]).shape
        (2, 16)
    """

    def __init__(self, components: int = 16, *, weights: bool = False, seed: int = 0, max_iter: int = 100,
                 reg_covar: float = 1e-6) -> None:
        self.components = components
        self.weights = weights
        self.seed = seed
        self.max_iter = max_iter
        self.reg_covar = reg_covar

    @property
    def _n_features_out(self) -> int:
        return 2 * self.means_.numel() + (self.means_.shape[0] if self.weights else 0)

    def _fit(self, x: Tensor, offsets: Tensor, y: Any = None) -> None:
        from sklearn.mixture import GaussianMixture

        if not isinstance(self.components, numbers.Integral) or self.components < 1:
            raise ValueError(f"GMMFisherVector: components must be an int >= 1, got {self.components!r}")
        if not isinstance(self.weights, bool):
            raise TypeError(f"GMMFisherVector: weights must be True or False, got {self.weights!r}")
        if x.shape[0] < self.components:
            raise ValueError(f"GMMFisherVector.fit: the sets hold {x.shape[0]} descriptors, fewer than "
                             f"components={self.components}")
        gmm = GaussianMixture(self.components, covariance_type="diag", max_iter=self.max_iter,
                              reg_covar=self.reg_covar, random_state=self.seed).fit(x.cpu().double().numpy())
        self.weights_ = torch.as_tensor(gmm.weights_, dtype=torch.float32)
        self.means_ = torch.as_tensor(gmm.means_, dtype=torch.float32)
        self.sigmas_ = torch.as_tensor(np.sqrt(gmm.covariances_), dtype=torch.float32)
        self.n_iter_ = gmm.n_iter_

    def posteriors(self, x: Tensor) -> Tensor:
        """gamma (N, K) float32: the components' posterior probabilities of each descriptor."""
        check_is_fitted(self)
        x = x.float()
        inv_var = self.sigmas_.pow(-2)  # (K, C)
        # log N(x | mu_k, sigma_k) expanded so that only (N, K) is formed
        quad = (x * x) @ inv_var.t() - 2 * x @ (self.means_ * inv_var).t() + (self.means_.pow(2) * inv_var).sum(1)
        log_det = 2 * self.sigmas_.log().sum(1)
        log_p = self.weights_.log() - 0.5 * (quad + log_det + x.shape[1] * math.log(2 * math.pi))
        return torch.softmax(log_p, dim=1)

    def encode(self, x: Tensor, offsets: Tensor) -> Tensor:
        """Fisher vectors of the sets: x (N, C) float, offsets (S+1,) int64 -> (S, 2 K C) float32, or
        (S, K + 2 K C) with ``weights=True``."""
        check_sets(x, offsets, "GMMFisherVector.encode")
        check_is_fitted(self)
        if x.shape[1] != self.means_.shape[1]:
            raise ValueError(f"GMMFisherVector.encode: x has C={x.shape[1]}, the GMM was fit on "
                             f"C={self.means_.shape[1]}")
        x = x.float()
        gamma_pad, lengths = pad_sets(self.posteriors(x), offsets)  # (S, T, K)
        x_pad, _ = pad_sets(x, offsets)  # (S, T, C)
        s0 = gamma_pad.sum(1)  # (S, K)
        s1 = torch.bmm(gamma_pad.transpose(1, 2), x_pad)  # (S, K, C)
        s2 = torch.bmm(gamma_pad.transpose(1, 2), x_pad * x_pad)  # (S, K, C)
        mu, sigma, w = self.means_, self.sigmas_, self.weights_
        t = lengths.clamp_min(1).to(x.dtype)[:, None, None]
        g_mu = (s1 - s0[..., None] * mu) / sigma / (t * w.sqrt()[:, None])
        g_sigma = (s2 - 2 * mu * s1 + (mu * mu - sigma * sigma) * s0[..., None]) / sigma.pow(2)
        g_sigma = g_sigma / (t * (2 * w).sqrt()[:, None])
        parts = [g_mu.flatten(1), g_sigma.flatten(1)]
        if self.weights:
            parts.insert(0, (s0 - lengths.to(x.dtype)[:, None] * w) / (t[:, :, 0] * w.sqrt()))
        return torch.cat(parts, dim=1)
