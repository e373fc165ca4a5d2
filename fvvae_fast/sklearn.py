"""scikit-learn transformers of sets of descriptors: ``FVVAEEncoder``, and ``SetTransformer``, its base and the
baselines'.

Samples are sets of descriptors, not rows of a 2-D array: ``X`` is a list of S (n_i, C) arrays or
tensors (the form that ``cross_val_score`` and ``GridSearchCV`` can index; a set may be a pandas
DataFrame, whose columns then name the features), an (S, T, C) array of equal-length sets, a tuple
(x (N, C), offsets (S+1,)) or a torch nested tensor; see :func:`fvvae_fast.sets.pack_sets`.

    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.svm import LinearSVC
    >>> clf = make_pipeline(FVVAEEncoder(latent_dim=31), LinearSVC())   # doctest: +SKIP
    >>> clf.fit(train_sets, train_labels).score(test_sets, test_labels)  # doctest: +SKIP

The baselines :class:`fvvae_fast.baselines.GMMFisherVector`, :class:`~fvvae_fast.baselines.VLAD`,
:class:`~fvvae_fast.baselines.AveragePooling`, ... take the same ``X`` and swap in for ``FVVAEEncoder``.
scikit-learn's ``check_estimator`` skips estimators whose input is not a 2-D array: ``tests/test_sklearn.py``
runs its checks with each row of the checks' arrays as a one-descriptor set.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

try:
    from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as err:
    raise ImportError("fvvae_fast.FVVAEEncoder and the baselines need scikit-learn: pip install scikit-learn") from err

from .encode import degenerate_message, degenerate_rows, fisher_encode
from .fim import FisherInformation
from .fim.estimator import MODES
from .model import FVVAE
from .sets import DescriptorSets, pack_sets
from .threads import limit_torch_threads
from .train import CollapseWarning, TrainConfig, train


def _default(owner: Callable, name: str) -> Any:
    """The default of parameter ``name`` of ``owner`` (a class or function): each default is written once."""
    return inspect.signature(owner).parameters[name].default


def _named_set(X: Any) -> Any:
    """The first set of a list of pandas DataFrames with the same columns (which name the features), else None."""
    if not (isinstance(X, list) and X and hasattr(X[0], "columns")):
        return None
    for i, frame in enumerate(X):
        if not (hasattr(frame, "columns") and list(frame.columns) == list(X[0].columns)):
            raise ValueError(f"X[{i}]: the sets are DataFrames whose columns name the features: X[{i}] needs the "
                             f"columns of X[0]")
    return X[0]


class SetTransformer(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Base of the scikit-learn transformers of sets of descriptors (``X`` as in this module's docstring).

    A subclass implements ``_fit(x, offsets, y)`` (x (N, C) float32, offsets (S+1,) int64; may return the
    training sets' vectors, which ``fit_transform`` then reuses), ``encode(x, offsets)`` -> (S, D) float32
    tensor, and ``_n_features_out`` (D). ``transform`` returns float32 NumPy whatever the input dtype (the
    tags say so); ``get_feature_names_out`` names the D outputs after the class. Fit and transform run with
    torch's threads at this process's share (:func:`fvvae_fast.threads.limit_torch_threads`: in a joblib
    worker of ``cross_val_score(..., n_jobs=k)``, the worker's share).
    """

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False  # samples are sets of descriptors
        tags.input_tags.three_d_array = True
        tags.target_tags.required = False
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags

    def _sets(self, X: Any, reset: bool) -> tuple[Tensor, Tensor]:
        """X -> x (N, C) float32, offsets (S+1,); sets (reset) or checks n_features_in_ and feature_names_in_."""
        named = _named_set(X)
        if named is not None:  # feature names first, as scikit-learn does: other names fill a DataFrame with NaN
            validate_data(self, named, skip_check_array=True, reset=reset)
        x, offsets = pack_sets(X, "X")
        if named is None:
            validate_data(self, x, skip_check_array=True, reset=reset)
        return x, offsets

    def _fit(self, x: Tensor, offsets: Tensor, y: Any) -> Tensor | None:
        raise NotImplementedError

    def encode(self, x: Tensor, offsets: Tensor) -> Tensor:
        raise NotImplementedError

    def fit(self, X: Any, y: Any = None) -> SetTransformer:
        """Fit on the sets X (labels y (S,) optional); returns self."""
        with limit_torch_threads():
            self._fit(*self._sets(X, reset=True), y)
        return self

    def fit_transform(self, X: Any, y: Any = None) -> np.ndarray:
        """``fit(X, y).transform(X)``, without encoding the sets twice where ``fit`` already did."""
        with limit_torch_threads():
            x, offsets = self._sets(X, reset=True)
            vectors = self._fit(x, offsets, y)
            return (self.encode(x, offsets) if vectors is None else vectors).cpu().numpy()

    def transform(self, X: Any) -> np.ndarray:
        """The vectors of the sets X: (S, D) float32."""
        check_is_fitted(self)
        with limit_torch_threads():
            return self.encode(*self._sets(X, reset=False)).cpu().numpy()


class FVVAEEncoder(SetTransformer):
    """Train FV-VAE on sets of descriptors, estimate its Fisher information, encode sets as Fisher vectors.

    ``fit(X, y)`` trains :class:`fvvae_fast.FVVAE` with :func:`fvvae_fast.train` (with a classifier on
    the labels y when given and ``lambda3 > 0``), then estimates F with
    :class:`fvvae_fast.FisherInformation` on the same sets and encodes them once, to check them (``fit_transform``
    returns those vectors). ``transform(X)`` returns
    :func:`fvvae_fast.fisher_encode` (signed sqrt + L2): (S, C*(d+1)) float32 NumPy.

    The defaults are the paper's (d = 255, 5,000 iterations of 128 sets), and so is their cost: at the paper's
    size (C = 512, 50 descriptors per set, 101 classes) one iteration took 83 ms on a 2-core CPU
    (``bench/RESULTS.md``), so a default fit trains for about 7 minutes there before its F and encoding passes
    (and for longer on a busy machine). On little data a small ``latent_dim`` (15-31) fits in seconds and can
    classify better: a large one leaves many sets with all-zero vectors, and ``fit`` then says so in one
    :class:`fvvae_fast.train.CollapseWarning` (above ``fvvae_fast.encode.DEGENERATE_SHARE``, 10%, of the training
    sets all zero or constant).

    Args:
        latent_dim, hidden_dim, norm, dropout: those of :class:`fvvae_fast.FVVAE` (d, encoder layers, ...).
        lambda3, iterations, batch_sets, descriptors_per_set, seed, device: those of
            :class:`fvvae_fast.TrainConfig`; ``batch_sets`` is also the batch of the F and encoding passes,
            ``seed`` also seeds the initial weights.
        fim: ``"diagonal"``, ``"lowrank"`` (with ``rank``), ``"kronecker"``, or None / ``"none"`` for F = I.
        rank, damping: those of :class:`fvvae_fast.FisherInformation`.
        progress: training's progress bar and time estimate: None shows them on a terminal, True always, False never.

    Attributes (after ``fit``): ``model_`` (the trained FVVAE, eval mode), ``fim_`` (FisherInformation
    or None), ``n_features_in_`` (C), ``feature_names_in_`` (when the sets are DataFrames), ``classes_`` (the
    distinct labels, when y was given).
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
        progress: bool | None = _default(train, "progress"),
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

    @property
    def _n_features_out(self) -> int:
        return self.model_.in_dim * (self.model_.latent_dim + 1)

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

    def _fit(self, x: Tensor, offsets: Tensor, y: Any) -> Tensor:
        """Train, estimate F, and return the training sets' Fisher vectors (S, D) (checked for degenerate ones)."""
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
        vectors = self.encode(x, offsets)
        self._warn_degenerate(vectors[offsets.diff().cpu() > 0])
        return vectors

    def _warn_degenerate(self, vectors: Tensor) -> None:
        zero, constant = degenerate_rows(vectors)
        message = degenerate_message(zero, constant, vectors.shape[0], self.latent_dim)
        if message is not None:
            warnings.warn(f"FVVAEEncoder: training sets: {message}", CollapseWarning, stacklevel=4)

    def encode(self, x: Tensor, offsets: Tensor) -> Tensor:
        """Fisher vectors of packed sets x (N, C), offsets (S+1,): (S, C*(d+1)) float32 (on the CPU),
        -F^(-1/2) vec(G_X) then signed sqrt and L2."""
        with torch.inference_mode():
            parts = [fisher_encode(self.model_, xb, ob, fim=self.fim_, normalize=True).cpu()
                     for xb, ob in self._batches(DescriptorSets(x.cpu(), offsets.cpu()))]
        return torch.cat(parts)
