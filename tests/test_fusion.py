"""Late fusion and crop averaging on top of the protocol's SVM: fused scores are the weighted sum of
the streams' decision values, (1, 0) is stream 1, crop means rank items, bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest

from fvvae_fast.evaluation.fusion import FusionScores, average_items, evaluate_fusion
from fvvae_fast.evaluation.protocol import evaluate_vectors, rank_scores, svm_decisions

from .cases import SEED


def _streams(g, n_train=48, n_test=30, classes=4, dims=(20, 7)):
    y_tr, y_te = g.integers(0, classes, n_train), g.integers(0, classes, n_test)
    y_tr[:classes] = np.arange(classes)
    streams = []
    for d in dims:  # each stream separates the classes weakly (centres at distance ~ noise)
        centres = g.normal(size=(classes, d))
        streams.append((centres[y_tr] + 1.5 * g.normal(size=(n_train, d)) + 3,
                        centres[y_te] + 1.5 * g.normal(size=(n_test, d)) + 3))
    return streams, y_tr, y_te


def _same(a, b):
    return (a.top1, a.top3, a.mean_ap, a.svm_converged) == (b.top1, b.top3, b.mean_ap, b.svm_converged)


@pytest.mark.parametrize("salt", range(3))
def test_fusion_is_the_weighted_sum_of_stream_scores(salt):
    g = np.random.default_rng(SEED + salt)
    streams, y_tr, y_te = _streams(g)
    w = tuple(g.uniform(0.1, 2.0, 2))
    out = evaluate_fusion(streams, y_tr, y_te, w)
    assert isinstance(out, FusionScores) and out.weights == w and len(out.streams) == 2
    values = []
    for (tr, te), s in zip(streams, out.streams):
        assert _same(s, evaluate_vectors(tr, y_tr, te, y_te))
        d = svm_decisions(tr, y_tr, te)
        values.append(d.values)
    want = rank_scores(w[0] * values[0] + w[1] * values[1], d.classes, y_te)
    assert (out.fused.top1, out.fused.top3, out.fused.mean_ap) == want
    assert out.fused.svm_seconds == pytest.approx(sum(s.svm_seconds for s in out.streams))
    assert out.as_dict()["weights"] == list(w)


def test_weights_one_zero_reproduce_stream_one():
    g = np.random.default_rng(SEED + 10)
    streams, y_tr, y_te = _streams(g)
    out = evaluate_fusion(streams, y_tr, y_te, (1, 0))
    assert _same(out.fused, out.streams[0])
    assert _same(evaluate_fusion(streams, y_tr, y_te, (0, 2.5)).fused, out.streams[1])


def test_crop_averaging_ranks_the_mean_of_each_items_crops():
    g = np.random.default_rng(SEED + 20)
    streams, y_tr, _ = _streams(g, n_test=12)
    crops = 3
    items = np.repeat(g.permutation(12) + 100, crops)  # ids in any order, each item's crops together
    y_item = g.integers(0, 4, 12)
    y_crop = np.repeat(y_item, crops)
    test = [(tr, np.repeat(te, crops, axis=0) + 0.5 * g.normal(size=(12 * crops, te.shape[1])))
            for tr, te in streams]
    out = evaluate_fusion(test, y_tr, y_crop, (1, 2), test_items=items)
    order = np.argsort(items[::crops])
    vals = [svm_decisions(tr, y_tr, te).values.reshape(12, crops, -1).mean(1)[order] for tr, te in test]
    classes = np.unique(y_tr)
    assert (out.fused.top1, out.fused.top3, out.fused.mean_ap) == rank_scores(vals[0] + 2 * vals[1], classes,
                                                                               y_item[order])
    s0 = out.streams[0]
    assert (s0.top1, s0.top3, s0.mean_ap) == rank_scores(vals[0], classes, y_item[order])


def test_average_items():
    g = np.random.default_rng(SEED + 30)
    values = g.normal(size=(7, 3))
    items = np.array([5, 2, 5, 9, 2, 5, 0])
    ids, means = average_items(values, items)
    assert ids.tolist() == [0, 2, 5, 9]
    np.testing.assert_allclose(means, [values[6], values[[1, 4]].mean(0), values[[0, 2, 5]].mean(0), values[3]])
    with pytest.raises(ValueError, match="test_items must be"):
        average_items(values, items[:-1])
    with pytest.raises(ValueError, match="test_items must be"):
        average_items(values, items.astype(float))


def test_bad_input_is_refused():
    g = np.random.default_rng(SEED + 40)
    streams, y_tr, y_te = _streams(g)
    (tr0, te0), (tr1, te1) = streams
    with pytest.raises(ValueError, match=r"streams\[1\].*test vectors"):
        evaluate_fusion([(tr0, te0), (tr1, te1[:-1])], y_tr, y_te)
    with pytest.raises(ValueError, match=r"streams\[0\].*train"):
        evaluate_fusion([(tr0[1:], te0), (tr1, te1)], y_tr, y_te)
    with pytest.raises(ValueError, match="weights"):
        evaluate_fusion(streams, y_tr, y_te, (1.0,))
    with pytest.raises(ValueError, match="weights"):
        evaluate_fusion(streams, y_tr, y_te, (0, 0))
    with pytest.raises(ValueError, match="weights"):
        evaluate_fusion(streams, y_tr, y_te, (1, float("nan")))
    with pytest.raises(ValueError, match="streams"):
        evaluate_fusion([], y_tr, y_te)
    items = np.arange(len(y_te)) // 2
    labels = y_te.copy()
    labels[0], labels[1] = 0, 1
    with pytest.raises(ValueError, match="same for every vector"):
        evaluate_fusion(streams, y_tr, labels, test_items=items)
