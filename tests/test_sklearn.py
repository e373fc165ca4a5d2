"""scikit-learn conformance of every transformer of sets: scikit-learn's own estimator checks, run on sets.

``check_estimator`` skips an estimator whose samples are not rows of a 2-D array. Here each estimator is
subclassed so that the rows of the checks' arrays become sets of one descriptor each (a DataFrame a list of
one-row DataFrames, keeping its column names): every check of ``parametrize_with_checks`` and the checks of
output containers and feature names then run on the estimators' own code. The few that cannot apply to
sets are listed in ``NOT_FOR_SETS`` with the reason (they run, as expected failures).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch
from joblib import parallel_config
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.svm import LinearSVC
from sklearn.utils import estimator_checks
from sklearn.utils.estimator_checks import parametrize_with_checks

import fvvae_fast as fv
from fvvae_fast.baselines import VLAD, AveragePooling, BilinearPooling, Concatenation, GMMFisherVector

from .cases import SEED


def rows_as_sets(X):
    """A 2-D array or DataFrame (n, C) -> n sets of one descriptor (an (n, 1, C) array, or one-row DataFrames);
    anything else (1-D, sparse, lists) unchanged, for the estimator to refuse or take."""
    if hasattr(X, "iloc") and getattr(X, "ndim", 0) == 2:
        return [X.iloc[i : i + 1] for i in range(len(X))]
    if isinstance(X, list) and X and np.ndim(X[0]) == 1:  # rows as lists of numbers
        return np.asarray(X)[:, None, :]
    if scipy.sparse.issparse(X) or isinstance(X, (list, tuple)):
        return X
    a = np.asarray(X)
    return a[:, None, :] if a.ndim == 2 else a


def _same_index(out, X):
    """A DataFrame output indexed as the checks' DataFrame X was (a list of sets has no index to carry)."""
    if hasattr(out, "index") and hasattr(X, "index"):
        out.index = X.index
    return out


class RowSets:
    """Mixin: the estimator's fit, transform and fit_transform on :func:`rows_as_sets`, tagged for 2-D input."""

    def fit(self, X, y=None):
        return super().fit(rows_as_sets(X), y)

    def transform(self, X):
        return _same_index(super().transform(rows_as_sets(X)), X)

    def fit_transform(self, X, y=None):
        return _same_index(super().fit_transform(rows_as_sets(X), y), X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = True
        return tags


# Module-level classes, so that the pickling checks can find them by name.
class FVVAEEncoderRows(RowSets, fv.FVVAEEncoder):
    pass


class GMMFisherVectorRows(RowSets, GMMFisherVector):
    pass


class VLADRows(RowSets, VLAD):
    pass


class AveragePoolingRows(RowSets, AveragePooling):
    pass


class BilinearPoolingRows(RowSets, BilinearPooling):
    pass


class ConcatenationRows(RowSets, Concatenation):
    pass


ESTIMATORS = [
    # one set per batch: a set's vector then never depends on which sets share its batch (with 16, a row moved
    # between a full batch and the tail one came out 1 ulp apart, failing sample-order invariance now and then)
    FVVAEEncoderRows(latent_dim=2, iterations=4, batch_sets=1),
    GMMFisherVectorRows(components=1, max_iter=5),  # one component: the checks fit on a single sample too
    VLADRows(centres=1),
    AveragePoolingRows(),
    BilinearPoolingRows(),
    ConcatenationRows(),
]

NOT_FOR_SETS = {  # check: why it does not apply to estimators of sets
    "check_complex_data": "complex descriptors are refused with a TypeError naming the dtype (the project's "
                          "rule: a wrong type is a TypeError), the check wants a ValueError",
}


def _expected_failures(estimator) -> dict[str, str]:
    return NOT_FOR_SETS


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=_expected_failures, xfail_strict=True)
def test_sklearn_checks(estimator, check):
    check(estimator)


OUTPUT_CHECKS = ["check_set_output_transform", "check_set_output_transform_pandas",
                 "check_global_output_transform_pandas", "check_transformer_get_feature_names_out",
                 "check_transformer_get_feature_names_out_pandas", "check_get_feature_names_out_error",
                 "check_dataframe_column_names_consistency"]


@pytest.mark.parametrize("check", OUTPUT_CHECKS)
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: repr(e))
def test_output_and_feature_name_checks(estimator, check):
    getattr(estimator_checks, check)(type(estimator).__name__, estimator)


# On sets proper: sets of several descriptors, of different lengths (equal lengths for Concatenation).
C, CLASSES, SETS = 4, 2, 16
SET_ESTIMATORS = [fv.FVVAEEncoder(latent_dim=2, iterations=10, batch_sets=8), GMMFisherVector(components=2),
                  VLAD(centres=3), AveragePooling(), BilinearPooling(), Concatenation()]
IDS = ["fvvae", "gmm", "vlad", "ave", "bp", "concat"]


def tiny_sets(equal: bool = False, salt: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """SETS sets of 3-7 (or 5) non-negative descriptors (C,) around one of CLASSES prototypes, and their labels."""
    rng = np.random.default_rng(SEED + salt)
    prototypes = 3 * rng.random((CLASSES, C))
    labels = np.arange(SETS) % CLASSES
    sets = [(prototypes[k] + 0.3 * rng.random((5 if equal else rng.integers(3, 8), C))).astype(np.float32)
            for k in labels]
    return sets, labels


@pytest.mark.parametrize("estimator", SET_ESTIMATORS, ids=IDS)
def test_sets_order_equivariance_and_inputs_left_alone(estimator):
    sets, labels = tiny_sets(equal=isinstance(estimator, Concatenation))
    copies = [s.copy() for s in sets]
    vectors = clone(estimator).fit_transform(sets, labels)
    assert vectors.dtype == np.float32 and vectors.shape[0] == SETS
    for s, c in zip(sets, copies):
        np.testing.assert_array_equal(s, c)
    fitted = clone(estimator).fit(sets, labels)
    np.testing.assert_allclose(fitted.transform(sets), vectors, rtol=1e-5, atol=1e-6)  # fit_transform = fit.transform
    order = np.random.default_rng(SEED).permutation(SETS)
    np.testing.assert_allclose(fitted.transform([sets[i] for i in order]), vectors[order], rtol=1e-5, atol=1e-6)
    if not isinstance(estimator, Concatenation):  # the others pool: a set's descriptors in any order
        # (GMM: its sigma terms expand (x - mu)^2 into sums of x^2, x and 1, which cancel in float32 at ~1e-3)
        tol = 2e-3 if isinstance(estimator, GMMFisherVector) else 1e-5
        np.testing.assert_allclose(fitted.transform([s[::-1].copy() for s in sets]), vectors, rtol=tol, atol=tol)
    assert len(fitted.get_feature_names_out()) == vectors.shape[1]
    assert "object at 0x" not in repr(fitted) and len(repr(fitted)) < 80


@pytest.mark.parametrize("estimator", SET_ESTIMATORS, ids=IDS)
def test_dense_sets(estimator):
    sets, labels = tiny_sets(equal=True)
    dense = np.stack(sets)  # (S, T, C)
    fitted = clone(estimator).fit(dense, labels)
    np.testing.assert_array_equal(fitted.transform(dense), clone(estimator).fit(sets, labels).transform(sets))


def test_baselines_swap_into_one_pipeline():
    sets, labels = tiny_sets()
    pipe = Pipeline([("encode", fv.FVVAEEncoder(latent_dim=2, iterations=10, batch_sets=8)),
                     ("svm", LinearSVC())])
    # (GMM and VLAD with one component: with a component per class each set's vector is ~zero (the deviations
    # from its own component's mean), as neither encoding says which component the descriptors fell in)
    for encoder in (GMMFisherVector(components=1), VLAD(centres=1), AveragePooling(), BilinearPooling()):
        scores = cross_val_score(clone(pipe).set_params(encode=encoder), sets, labels, cv=2)
        assert scores.mean() > 0.8, (encoder, scores)  # chance is 1/2; the classes are well apart
    grid = GridSearchCV(pipe, {"encode": [fv.FVVAEEncoder(latent_dim=2, iterations=10, batch_sets=8),
                                          GMMFisherVector(components=1), GMMFisherVector(components=2),
                                          VLAD(centres=3), AveragePooling()]}, cv=2).fit(sets, labels)
    assert len(grid.cv_results_["params"]) == 5 and grid.best_score_ > 0.8
    assert grid.predict(sets[:3]).shape == (3,)


def test_joblib_workers_run_torch_on_their_share():
    """cross_val_score(n_jobs=2) in threads: each worker's torch on one thread, not all of the process's."""
    seen = []

    class Spy(AveragePooling):
        def encode(self, x, offsets):
            seen.append(torch.get_num_threads())
            return super().encode(x, offsets)

    sets, labels = tiny_sets()
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what a worker thread would run with, unlimited
    try:
        with parallel_config(backend="threading"):
            cross_val_score(Pipeline([("encode", Spy()), ("svm", LinearSVC())]), sets, labels, cv=2, n_jobs=2)
        assert seen and set(seen) == {1}, seen
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
