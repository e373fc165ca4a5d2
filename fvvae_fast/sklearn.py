"""``FVVAEEncoder``: FV-VAE Fisher vectors as a scikit-learn transformer (needs scikit-learn).

Samples are sets of descriptors, not rows of a 2-D array: ``X`` is a list of S (n_i, C) arrays or
tensors (the form that ``cross_val_score`` and ``GridSearchCV`` can index), a tuple
(x (N, C), offsets (S+1,)) or a torch nested tensor; see :func:`fvvae_fast.sets.pack_sets`.

    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.svm import LinearSVC
    >>> clf = make_pipeline(FVVAEEncoder(latent_dim=31), LinearSVC())   # doctest: +SKIP
    >>> clf.fit(train_sets, train_labels).score(test_sets, test_labels)  # doctest: +SKIP

scikit-learn's ``check_estimator`` skips estimators whose input is not a 2-D array: the checks of
the API that need no input (``get_params``, ``clone``, ``set_params``, repr, tags) run in
``tests/test_estimator.py``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

try:
    from sklearn.base import BaseEstimator, TransformerMixin
    from sklearn.utils.validation import check_is_fitted
except ImportError as err:
    raise ImportError("fvvae_fast.FVVAEEncoder needs scikit-learn: pip install scikit-learn") from err

from .encode import fisher_encode
from .fim import FisherInformation
from .fim.estimator import MODES
from .model import FVVAE
from .sets import DescriptorSets, pack_sets
from .train import TrainConfig, train


def _default(owner: Callable, name: str) -> Any:
    """The default of parameter ``name`` of ``owner`` (a class or function): each default is written once."""
    return inspect.signature(owner).parameters[name].default


class FVVAEEncoder(TransformerMixin, BaseEstimator):
    """Train FV-VAE on sets of descriptors, estimate its Fisher information, encode sets as Fisher vectors.

    ``fit(X, y)`` trains :class:`fvvae_fast.FVVAE` with :func:`fvvae_fast.train` (with a classifier on
    the labels y when given and ``lambda3 > 0``), then estimates F with
    :class:`fvvae_fast.FisherInformation` on the same sets. ``transform(X)`` returns
    :func:`fvvae_fast.fisher_encode` (signed sqrt + L2): (S, C*(d+1)) float32 NumPy.

    Args:
        latent_dim, hidden_dim, norm, dropout: those of :class:`fvvae_fast.FVVAE` (d, encoder layers, ...).
        lambda3, iterations, batch_sets, descriptors_per_set, seed, device: those of
            :class:`fvvae_fast.TrainConfig`; ``batch_sets`` is also the batch of the F and encoding passes,
            ``seed`` also seeds the initial weights.
        fim: ``"diagonal"``, ``"lowrank"`` (with ``rank``), ``"kronecker"``, or None / ``"none"`` for F = I.
        rank, damping: those of :class:`fvvae_fast.FisherInformation`.
        progress: show training's progress bar.

    Attributes (after ``fit``): ``model_`` (the trained FVVAE, eval mode), ``fim_`` (FisherInformation
    or None), ``n_features_in_`` (C), ``classes_`` (the distinct labels, when y was given).
    """

    def __init__(
        self,
        latent_dim: int = _default(FVVAE, "latent_dim"),
        hidden_dim: int | tuple[int, ...] | None = _default(FVVAE, "hidden_dim"),
        lambda3: float = _default(TrainConfig, "lambda3"),
        iterations: int = _default(TrainConfig, "iterations"),
        batch_sets: int = _default(TrainConfig, "batch_sets"),
        descriptors_per_set: int | None = _default(TrainConfig, "descriptors_per_set"),
        fim: str | None = _default(FisherInformation, "mode"),
        rank: int | None = _default(FisherInformation, "rank"),
        damping: float = _default(FisherInformation, "damping"),
        norm: str = _default(FVVAE, "norm"),
        dropout: float = _default(FVVAE, "dropout"),
        seed: int = _default(TrainConfig, "seed"),
        device: str = _default(TrainConfig, "device"),
        progress: bool = False,
    ) -> None:
        self.latent_dim = latent_dim
        self.hidden_dim = hidden_dim
        self.lambda3 = lambda3
        self.iterations = iterations
        self.batch_sets = batch_sets
        self.descriptors_per_set = descriptors_per_set
        self.fim = fim
        self.rank = rank
        self.damping = damping
        self.norm = norm
        self.dropout = dropout
        self.seed = seed
        self.device = device
        self.progress = progress

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False  # samples are sets of descriptors
        tags.target_tags.required = False
        return tags

    def _new_fim(self) -> FisherInformation | None:
        if self.fim not in (None, "none", *MODES):
            raise ValueError(f"FVVAEEncoder: fim must be None, 'none' or one of {MODES}, got {self.fim!r}")
        if self.fim in (None, "none"):
            return None
        return FisherInformation(self.fim, rank=self.rank, damping=self.damping)

    def _batches(self, data: DescriptorSets) -> Iterator[tuple[Tensor, Tensor]]:
        """Groups of ``batch_sets`` sets on the model's device: x (n, C) float32, offsets (k+1,) int64."""
        device = self.model_.decoder.weight.device
        for x, offsets, _ in data.batches(self.batch_sets):
            yield x.to(device), offsets.to(device)

    def fit(self, X: Any, y: Any = None) -> FVVAEEncoder:
        """Train on the sets X (labels y (S,), any values, optional) and estimate F; returns self."""
        x, offsets = pack_sets(X, "X")
        fim = self._new_fim()
        labels = None
        if y is not None:
            y = np.asarray(y)
            if y.shape != (offsets.numel() - 1,):
                raise ValueError(f"y must hold one label per set: X has {offsets.numel() - 1} sets, "
                                 f"y has shape {y.shape}")
            self.classes_, labels = np.unique(y, return_inverse=True)
        if self.lambda3 <= 0:
            labels = None
        config = TrainConfig(iterations=self.iterations, batch_sets=self.batch_sets, lambda3=self.lambda3,
                             descriptors_per_set=self.descriptors_per_set, seed=self.seed, device=self.device)
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, the global RNG left as it was
            torch.manual_seed(self.seed)
            model = FVVAE(in_dim=x.shape[1], latent_dim=self.latent_dim,
                          num_classes=0 if labels is None else len(self.classes_),
                          hidden_dim=self.hidden_dim, norm=self.norm, dropout=self.dropout)
        data = DescriptorSets(x.cpu(), offsets.cpu(), labels)
        self.model_ = train(model, data, config, progress=self.progress).model
        if fim is not None:
            with torch.inference_mode():
                for xb, ob in self._batches(data):
                    fim.update_descriptors(self.model_, xb, ob)
        self.fim_ = fim
        self.n_features_in_ = x.shape[1]
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Fisher vectors of the sets X: (S, C*(d+1)) float32, -F^(-1/2) vec(G_X) then signed sqrt and L2."""
        check_is_fitted(self)
        x, offsets = pack_sets(X, "X")
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"X has descriptors of C={x.shape[1]}, the encoder was fit on C={self.n_features_in_}")
        with torch.inference_mode():
            parts = [fisher_encode(self.model_, xb, ob, fim=self.fim_, normalize=True).cpu()
                     for xb, ob in self._batches(DescriptorSets(x.cpu(), offsets.cpu()))]
        return torch.cat(parts).numpy()
