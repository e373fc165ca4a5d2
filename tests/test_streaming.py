"""The protocol on vectors read block by block: the same scores as in memory (Gram path), liblinear's
classifier (dual coordinate descent path), memory maps and a store's ShardedArray as input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fvvae_fast.evaluation import evaluate_vectors
from fvvae_fast.evaluation.protocol import gram, rank_scores
from fvvae_fast.evaluation.streaming import blocked_gram, dual_cd_svm, evaluate_blocks

from .cases import generator


def _data(salt: int, n: int, d: int, k: int):
    rng = np.random.default_rng(generator(salt).initial_seed())
    y = rng.integers(0, k, n)
    x = (rng.normal(size=(n, d)) + 1.5 * np.eye(k, d)[y]).astype(np.float32)
    return x, y


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_blocked_gram_equals_the_gram_of_the_whole(rows):
    a, _ = _data(1, 23, 11, 3)
    b, _ = _data(2, 9, 11, 3)
    for normalize in (False, True):
        ta, tb = (torch.from_numpy(v) for v in (a, b))
        if normalize:
            ta, tb = (torch.nn.functional.normalize(v.sign() * v.abs().sqrt(), dim=1) for v in (ta, tb))
        torch.testing.assert_close(blocked_gram(a, normalize=normalize, rows=rows), gram(ta, ta), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(blocked_gram(b, a, normalize=normalize, rows=rows), gram(tb, ta), rtol=1e-6,
                                   atol=1e-6)
    assert blocked_gram(a[:0], a, normalize=False).shape == (0, 23)


def test_gram_path_gives_the_in_memory_scores(tmp_path):
    x, y = _data(3, 80, 40, 4)
    xt, yt = _data(4, 30, 40, 4)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    got = evaluate_blocks(mapped, y, xt, yt, C=100.0)
    want = evaluate_vectors(x, y, xt, yt, C=100.0)
    assert (got.top1, got.top3) == (want.top1, want.top3)
    assert got.mean_ap == pytest.approx(want.mean_ap, abs=1e-9)


@pytest.mark.parametrize("k", [2, 4])
def test_dual_coordinate_descent_is_liblinears_classifier(k):
    from sklearn.svm import LinearSVC

    x, y = _data(5 + k, 70, 13, k)
    # the default 2,000 passes stop short of the rule on about 1 draw in 40 (k = 4): converged is then False,
    # and the weights were up to 6.3e-3 of their scale off; run to the stopping rule
    w, b, classes, converged = dual_cd_svm(x, y, C=1.0, normalize=False, tol=1e-4, rows=16, max_iter=100_000)
    assert converged
    ref = LinearSVC(C=1.0, loss="hinge", dual=True, max_iter=100_000, tol=1e-8, random_state=0).fit(x, y)
    coef, intercept = (ref.coef_, ref.intercept_) if k > 2 else (np.r_[-ref.coef_, ref.coef_],
                                                                 np.r_[-ref.intercept_, ref.intercept_])
    # the stopping rule's tolerance leaves ~1e-4 of the weights' scale (4e-4 on the slowest of 240 draws)
    np.testing.assert_allclose(w.numpy(), coef, atol=5e-3 * np.abs(coef).max())
    np.testing.assert_allclose(b.numpy(), intercept, atol=5e-3 * max(1.0, np.abs(intercept).max()))
    np.testing.assert_array_equal(classes, np.arange(k))


def test_large_training_sets_take_the_streaming_solver(tmp_path):
    x, y = _data(11, 60, 12, 3)
    xt, yt = _data(12, 20, 12, 3)
    np.save(tmp_path / "x.npy", x)
    streamed = evaluate_blocks(np.load(tmp_path / "x.npy", mmap_mode="r"), y, xt, yt, C=1.0, gram_max_samples=10)
    w, b, classes, converged = dual_cd_svm(x, y, C=1.0, normalize=True)
    xn = torch.nn.functional.normalize(torch.from_numpy(xt).sign() * torch.from_numpy(xt).abs().sqrt(), dim=1)
    want = rank_scores((xn.double() @ w.t() + b).numpy(), classes, yt)
    assert (streamed.top1, streamed.top3) == want[:2] and streamed.mean_ap == pytest.approx(want[2], abs=1e-9)
    assert streamed.svm_converged == converged
    with pytest.raises(ValueError, match="fewer than 2 classes"):
        evaluate_blocks(x, np.zeros(60), xt, yt)
    with pytest.raises(ValueError, match="one label each"):
        evaluate_blocks(x, y[:-1], xt, yt)
