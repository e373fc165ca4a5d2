"""Late fusion of several streams and averaging over test crops (paper Table 4).

Each stream (RGB frames, optical-flow images, another layer...) gets the protocol's own classifier
(:func:`.protocol.svm_decisions`: signed sqrt + L2, one-vs-all linear SVM, C = 100); the fused
classifier ranks the weighted sum of the streams' decision values ("late fusion is used to combine
classifier scores on the two modalities", section 5.3). With ``test_items``, a test item stored as
several vectors (10 crops, :mod:`fvvae_fast.pipelines.crops`) is scored by the mean of its vectors'
decision values before ranking. :func:`fuse_decisions` fuses decisions made elsewhere (the
store's block-by-block SVMs of ``fvvae evaluate``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from .protocol import Decisions, Scores, _array, rank_scores, svm_decisions

Vectors = Tensor | np.ndarray


@dataclass(frozen=True)
class FusionScores:
    """Each stream's :class:`Scores` alone and the fused classifier's (SVM seconds: their sum)."""

    streams: tuple[Scores, ...]
    fused: Scores
    weights: tuple[float, ...]

    def as_dict(self) -> dict:
        return {"streams": [s.as_dict() for s in self.streams], "fused": self.fused.as_dict(),
                "weights": list(self.weights)}


def _ids(items: Vectors, m: int) -> np.ndarray:
    ids = np.asarray(items.detach().cpu() if isinstance(items, Tensor) else items)
    if ids.shape != (m,) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"test_items must be ({m},) integer ids, one per test vector, got {ids.dtype} {ids.shape}")
    return ids


def average_items(values: np.ndarray, items: Vectors) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the rows of ``values`` (m, K) float that share an id of ``items`` (m,) int:
    (unique ids (n,) sorted, means (n, K) float64)."""
    ids, inverse = np.unique(_ids(items, len(values)), return_inverse=True)
    sums = np.zeros((len(ids), values.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, values)
    return ids, sums / np.bincount(inverse, minlength=len(ids))[:, None]


def _item_labels(test_y: np.ndarray, items: Vectors) -> np.ndarray:
    _, first, inverse = np.unique(_ids(items, len(test_y)), return_index=True, return_inverse=True)
    if np.any(test_y[first][inverse] != test_y):
        raise ValueError("test_labels must be the same for every vector (crop) of one test item")
    return test_y[first]


def evaluate_fusion(
    streams: Sequence[tuple[Vectors, Vectors]],
    train_labels: Vectors,
    test_labels: Vectors,
    weights: Sequence[float] | None = None,
    *,
    test_items: Vectors | None = None,
    C: float = 100.0,
    normalize: bool = True,
    max_iter: int = 2000,
) -> FusionScores:
    """Score each stream with the protocol and their late fusion.

    streams: S pairs (train vectors (n, D_s) float, test vectors (m, D_s) float), row i of every
        stream the same item (any D_s per stream).
    train_labels: (n,) int; test_labels: (m,) int.
    weights: S finite fusion weights, not all 0 (default: 1 each); the fused decision values are
        sum_s weights[s] * values_s.
    test_items: None (each test vector is an item) or (m,) int ids: the vectors of one id (its crops)
        share a label and are scored by their mean decision values.
    C, normalize, max_iter: as in :func:`.protocol.evaluate_vectors`.
    """
    if len(streams) == 0:
        raise ValueError("streams: at least one (train vectors, test vectors) pair is needed")
    weights = fusion_weights(weights, len(streams))
    train_y = np.asarray(_array(train_labels), dtype=np.int64)
    test_y = np.asarray(_array(test_labels), dtype=np.int64)
    for s, (tr, te) in enumerate(streams):
        if len(tr) != len(train_y) or len(te) != len(test_y):
            raise ValueError(f"streams[{s}]: expected {len(train_y)} train and {len(test_y)} test vectors (one "
                             f"per label, the same items in every stream), got {len(tr)} and {len(te)}")
    decisions = [svm_decisions(tr, train_y, te, C=C, normalize=normalize, max_iter=max_iter) for tr, te in streams]
    return fuse_decisions(decisions, test_y, weights, test_items)


def fusion_weights(weights: Sequence[float] | None, streams: int) -> tuple[float, ...]:
    """The fusion weights as floats (default: 1 each), checked: one per stream, finite, not all 0."""
    weights = tuple(float(w) for w in (weights if weights is not None else [1.0] * streams))
    if len(weights) != streams or not all(math.isfinite(w) for w in weights) or not any(weights):
        raise ValueError(f"weights: expected {streams} finite numbers, not all 0, one per stream, got {weights}")
    return weights


def fuse_decisions(decisions: Sequence[Decisions], test_y: np.ndarray, weights: tuple[float, ...],
                   test_items: Vectors | None = None) -> FusionScores:
    """Each stream's scores and the late fusion's from the streams' SVM decisions on the same (m,) int
    ``test_y`` (``weights`` from :func:`fusion_weights`; ``test_items`` as in :func:`evaluate_fusion`)."""
    if test_items is not None:
        test_y = _item_labels(test_y, test_items)
    values = [d.values if test_items is None else average_items(d.values, test_items)[1] for d in decisions]
    classes = decisions[0].classes
    per_stream = tuple(Scores(*rank_scores(v, classes, test_y), d.seconds, d.converged)
                       for v, d in zip(values, decisions))
    fused_values = sum(w * v for w, v in zip(weights, values))
    fused = Scores(*rank_scores(fused_values, classes, test_y), sum(d.seconds for d in decisions),
                   all(d.converged for d in decisions))
    return FusionScores(per_stream, fused, weights)
