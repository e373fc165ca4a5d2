"""FVVAEEncoder (scikit-learn transformer), pack_sets (the three forms of sets) and the baselines' transform."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.svm import LinearSVC
from sklearn.utils import estimator_checks

import fvvae_fast as fv
from fvvae_fast.baselines import VLAD, GMMFisherVector
from fvvae_fast.sets import pack_sets
from fvvae_fast.train import CollapseWarning

from .cases import SEED

C, D, CLASSES, SETS = 8, 3, 3, 30
SMALL = {"latent_dim": D, "iterations": 30}  # trains in about a second


@pytest.fixture(scope="module")
def data() -> tuple[list[np.ndarray], np.ndarray]:
    """SETS sets of 5-12 non-negative descriptors (C,) around one of CLASSES prototypes; labels (SETS,)."""
    rng = np.random.default_rng(SEED)
    prototypes = np.abs(rng.normal(size=(CLASSES, C)))
    labels = np.arange(SETS) % CLASSES
    sets = [(prototypes[k] + 0.3 * np.abs(rng.normal(size=(rng.integers(5, 13), C)))).astype(np.float32)
            for k in labels]
    return sets, labels


@pytest.fixture(scope="module")
def fitted(data) -> tuple[fv.FVVAEEncoder, np.ndarray]:
    sets, labels = data
    enc = fv.FVVAEEncoder(**SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)  # a healthy fit says nothing
        return enc, enc.fit_transform(sets, labels)


def test_a_fit_with_mostly_zero_vectors_warns(data, monkeypatch):
    """A decoder whose units are off (here: turned off after training) gives all-zero vectors: one warning names the
    share, the cause and the fix."""
    sets, labels = data
    real_train = fv.sklearn.train

    def train_then_turn_off(model, *args, **kwargs):
        result = real_train(model, *args, **kwargs)
        with torch.no_grad():
            result.model.decoder.bias.fill_(-1e6)  # every unit off on every descriptor
        return result

    monkeypatch.setattr(fv.sklearn, "train", train_then_turn_off)
    with pytest.warns(CollapseWarning) as caught:
        vectors = fv.FVVAEEncoder(**SMALL).fit_transform(sets, labels)
    assert len(caught) == 1
    message = str(caught[0].message)
    zero, constant = fv.encode.degenerate_rows(torch.from_numpy(vectors))
    assert f"{constant} of {SETS} Fisher vectors" in message and f"{zero} of them all zero" in message
    assert "latent_dim=3" in message and "smaller latent_dim" in message and "more iterations" in message
    assert "\n" not in message


@pytest.mark.parametrize("constant, warns", [(0, False), (3, False), (4, True), (30, True)])
def test_the_warning_starts_above_its_share(constant, warns):
    assert (fv.encode.degenerate_message(constant, constant, 30, 255) is not None) == warns  # share 0.1 of 30: 3


def test_fit_transform(data, fitted):
    sets, labels = data
    enc, vectors = fitted
    assert vectors.shape == (SETS, C * (D + 1)) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert enc.n_features_in_ == C and enc.model_.num_classes == CLASSES and not enc.model_.training
    assert isinstance(enc.fim_, fv.FisherInformation) and enc.fim_.num_sets == SETS
    np.testing.assert_array_equal(enc.classes_, np.arange(CLASSES))


def test_the_three_forms_of_sets_agree(data, fitted):
    sets, _ = data
    enc, _ = fitted
    sets = [*sets[:3], np.zeros((0, C), np.float32)]  # an empty set too
    x = np.concatenate(sets)
    offsets = np.cumsum([0, *map(len, sets)])
    want = enc.transform(sets)
    np.testing.assert_array_equal(want[-1], 0.0)
    tensors = [torch.from_numpy(s) for s in sets]
    for form in ((x, offsets), (torch.from_numpy(x), torch.from_numpy(offsets)), tensors,
                 torch.nested.nested_tensor(tensors, layout=torch.jagged)):
        np.testing.assert_array_equal(enc.transform(form), want)


def test_dense_sets_are_equal_length_sets(data, fitted):
    sets, _ = data
    enc, _ = fitted
    dense = np.stack([s[:5] for s in sets[:4]])  # (S, T, C)
    want = enc.transform(list(dense))
    np.testing.assert_array_equal(enc.transform(dense), want)
    np.testing.assert_array_equal(enc.transform(torch.from_numpy(dense)), want)


def test_seeded(data, fitted):
    sets, labels = data
    _, vectors = fitted
    rng_state = torch.random.get_rng_state()
    np.testing.assert_array_equal(fv.FVVAEEncoder(**SMALL).fit(sets, labels).transform(sets), vectors)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the global RNG is left alone
    other = fv.FVVAEEncoder(**SMALL, seed=1).fit(sets, labels).transform(sets)
    assert not np.array_equal(other, vectors)


@pytest.mark.parametrize("fim", [None, "none", "lowrank", "kronecker"])
def test_fim_modes(data, fim):
    sets, _ = data
    enc = fv.FVVAEEncoder(**SMALL, fim=fim, rank=2 if fim == "lowrank" else None).fit(sets)  # no labels
    assert (enc.fim_ is None) == (fim in (None, "none")) and enc.model_.num_classes == 0
    assert enc.transform(sets[:4]).shape == (4, C * (D + 1))


def test_params_clone_and_pickle(data, fitted):
    sets, _ = data
    enc, vectors = fitted
    params = enc.get_params()
    assert params == {**fv.FVVAEEncoder().get_params(), **SMALL}
    copy = clone(enc)
    assert copy.get_params() == params and not hasattr(copy, "model_")
    assert copy.set_params(latent_dim=5, fim="kronecker") is copy
    assert copy.get_params() == {**params, "latent_dim": 5, "fim": "kronecker"}
    assert enc.get_params() == params  # fitting and cloning changed no parameter
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(enc)).transform(sets), vectors)


def test_pipeline_cross_validation(data):
    sets, labels = data
    scores = cross_val_score(make_pipeline(fv.FVVAEEncoder(**SMALL), LinearSVC()), sets, labels, cv=3)
    assert scores.mean() > 0.6, scores  # chance is 1/3; the classes are well apart


# The checks of sklearn.utils.estimator_checks that need no 2-D input (check_estimator skips an estimator
# whose samples are not rows of a 2-D array; the input-driven checks are re-done on sets above and below).
API_CHECKS = ["check_estimator_cloneable", "check_estimator_tags_renamed", "check_valid_tag_types",
              "check_estimator_repr", "check_no_attributes_set_in_init", "check_get_params_invariance",
              "check_set_params", "check_parameters_default_constructible", "check_mixin_order",
              "check_do_not_raise_errors_in_init_or_set_params", "check_estimators_unfitted",
              "check_transformers_unfitted"]


@pytest.mark.parametrize("check", API_CHECKS)
def test_sklearn_api_checks(check):
    getattr(estimator_checks, check)("FVVAEEncoder", fv.FVVAEEncoder(**SMALL))


def test_fit_sets_only_fitted_attributes(data):
    sets, labels = data
    enc = fv.FVVAEEncoder(**SMALL)
    before = dict(vars(enc))
    added = set(enc.fit(sets, labels).__dict__) - set(before)
    assert all(name.endswith("_") and not name.startswith("_") for name in added), added
    assert {k: vars(enc)[k] for k in before} == before


BAD_SETS = {  # id: (sets, error, message)
    "empty-list": ([], ValueError, "no sets"),
    "ragged-C": ([np.ones((3, C)), np.ones((2, C + 1))], ValueError, r"X\[1\]: descriptors have C=9"),
    "1-d-set": ([np.ones((3, C)), np.ones(C)], ValueError, r"X\[1\]: descriptors must be \(n, C\)"),
    "nan": ([np.ones((3, C)), np.full((2, C), np.nan)], ValueError, r"X\[1\]: descriptors contain NaN or Inf"),
    "inf": ((np.full((2, C), np.inf), np.array([0, 2])), ValueError, r"X\[0\]: descriptors contain NaN or Inf"),
    "strings": ([np.array([["a"] * C])], TypeError, "real numbers"),
    "2-d-array": (np.ones((4, C)), ValueError, r"got ndarray of shape \(4, 8\)"),
    "4-d-tensor": (torch.ones(2, 3, 4, C), ValueError, r"got Tensor of shape \(2, 3, 4, 8\)"),
    "empty-dense": (np.ones((0, 3, C)), ValueError, r"no sets \(an array of shape \(0, 3, 8\)\)"),
    "dict": ({"x": np.ones((4, C))}, TypeError, "got dict"),
    "offsets-past-N": ((np.ones((4, C)), np.array([0, 2, 5])), ValueError,
                       r"X\[1\]: offsets must be non-decreasing from 0 to N=4"),
    "float-offsets": ((np.ones((4, C)), np.array([0.0, 4.0])), TypeError, "offsets must be integers"),
    "1-tuple": ((np.ones((4, C)),), TypeError, "a tuple must be"),
}


@pytest.mark.parametrize("sets, error, message", BAD_SETS.values(), ids=BAD_SETS.keys())
def test_bad_sets(sets, error, message):
    with pytest.raises(error, match=message):
        pack_sets(sets, "X")


def test_bad_inputs_of_the_encoder(data, fitted):
    sets, labels = data
    enc, _ = fitted
    with pytest.raises(ValueError, match=r"one label per set: X has 30 sets, y has shape \(29,\)"):
        fv.FVVAEEncoder(**SMALL).fit(sets, labels[:-1])
    with pytest.raises(ValueError, match="X has 9 features, but FVVAEEncoder is expecting 8 features as input"):
        enc.transform([np.ones((2, C + 1))])
    with pytest.raises(NotFittedError):
        fv.FVVAEEncoder().transform(sets)
    with pytest.raises(ValueError, match="fim must be None, 'none' or one of"):
        fv.FVVAEEncoder(**SMALL, fim="full").fit(sets)
    with pytest.raises(ValueError, match=r"X\[0\]: descriptors contain NaN"):
        enc.transform([np.full((2, C), np.nan)])


@pytest.mark.parametrize("baseline", [GMMFisherVector(components=2), VLAD(centres=3)], ids=["gmm", "vlad"])
def test_baseline_transform_is_encode(data, baseline):
    sets, _ = data
    x = np.concatenate(sets)
    offsets = np.cumsum([0, *map(len, sets)])
    baseline.fit(sets)
    want = baseline.encode(torch.from_numpy(x), torch.from_numpy(offsets)).numpy()
    tensors = [torch.from_numpy(s) for s in sets]
    for form in (sets, (x, offsets), torch.nested.nested_tensor(tensors, layout=torch.jagged)):
        np.testing.assert_array_equal(baseline.transform(form), want)
    with pytest.raises(ValueError, match="X: no sets"):
        baseline.transform([])
