"""The classification protocol of section 5.2, the same for every representation.

Signed square root and L2 on every vector, then a one-vs-all linear SVM with C = 100 (hinge loss,
unregularised bias: libsvm's formulation). Up to ``GRAM_MAX_SAMPLES`` training vectors it is solved in
the dual on the Gram matrix (``SVC(kernel="precomputed")``), the same classifier in seconds where the
primal on 10^4-10^5 dimensions takes minutes at C = 100; beyond, ``LinearSVC`` (liblinear) solves it.
Top-1 and top-3 accuracy and mean average precision over classes come from the SVM's decision
values. A liblinear solve that stops at ``max_iter`` is reported in the scores (``svm_converged``).
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from ..encode import power_l2_normalize
from ..sets import integer_values

GRAM_MAX_SAMPLES = 20000
GRAM_BLOCK = 4096  # columns per float32 GEMM of the Gram matrix; the blocks add up in float64


def gram(a: Tensor, b: Tensor) -> Tensor:
    """a b^T of float32 a (n, D) and b (m, D): (n, m) float64, float32 GEMMs over column blocks of
    ``GRAM_BLOCK`` summed in float64 (rounding of a 4096-term dot product, not of a 131,072-term one;
    2-3x faster than a float64 GEMM, and no float64 copy of the vectors)."""
    out = torch.zeros((a.shape[0], b.shape[0]), dtype=torch.float64)
    for lo in range(0, a.shape[1], GRAM_BLOCK):
        out += (a[:, lo : lo + GRAM_BLOCK] @ b[:, lo : lo + GRAM_BLOCK].t()).double()
    return out


@dataclass(frozen=True)
class Scores:
    """Test-set figures of one representation: accuracies and mAP in [0, 1], SVM seconds."""

    top1: float
    top3: float
    mean_ap: float
    svm_seconds: float
    svm_converged: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _array(v: Tensor | np.ndarray) -> np.ndarray:
    # A read-only array (a memory-mapped store) is copied: torch does not wrap read-only memory.
    return v.detach().float().cpu().numpy() if isinstance(v, Tensor) else np.require(v, np.float32, ["W"])


def check_C(C: float, where: str) -> None:
    """The SVM's C is a finite real > 0; ValueError naming ``where`` otherwise."""
    if isinstance(C, bool) or not isinstance(C, numbers.Real) or not (math.isfinite(C) and C > 0):
        raise ValueError(f"{where}: C must be a finite number > 0, got {C!r}")


def gram_svm(k_train: Tensor, train_y: np.ndarray, k_test: Tensor, C: float) -> np.ndarray:
    """The protocol's one-vs-all linear SVM solved in the dual on the (n, n) float64 Gram matrix of the
    training vectors (exact, and fast when D >> n); decision values on the test vectors whose (m, n)
    Gram matrix against the training vectors is ``k_test``."""
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.svm import SVC

    svm = OneVsRestClassifier(SVC(kernel="precomputed", C=C))
    svm.fit(k_train.numpy(), train_y)
    return svm.decision_function(k_test.numpy())


@dataclass(frozen=True)
class Decisions:
    """The one-vs-all SVM's decision values on test vectors: ``values`` (m, K) float64, one column per
    class of ``classes`` (K,) int64 (the sorted training labels), SVM seconds and convergence."""

    values: np.ndarray
    classes: np.ndarray
    seconds: float
    converged: bool


def svm_decisions(
    train_x: Tensor | np.ndarray,
    train_y: Tensor | np.ndarray,
    test_x: Tensor | np.ndarray,
    *,
    C: float = 100.0,
    normalize: bool = True,
    max_iter: int = 2000,
) -> Decisions:
    """Train the protocol's one-vs-all linear SVM on (n, D) float vectors with (n,) int labels and
    return its decision values on the (m, D) test vectors (``normalize``: as in :func:`evaluate_vectors`)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    check_C(C, "evaluate_vectors")
    xs = [torch.as_tensor(_array(v)) for v in (train_x, test_x)]
    if xs[0].dim() != 2 or xs[1].dim() != 2 or xs[0].shape[1] != xs[1].shape[1]:
        raise ValueError(f"evaluate_vectors: train and test vectors must be (n, D) with one D, got "
                         f"{tuple(xs[0].shape)} and {tuple(xs[1].shape)}")
    if normalize:
        xs = [power_l2_normalize(v) for v in xs]
    train_x, test_x = (v.numpy() for v in xs)
    train_y = integer_values(train_y, "train_y", "evaluate_vectors")
    if len(train_y) != len(train_x):
        raise ValueError("evaluate_vectors: one label per vector is needed")
    classes = np.unique(train_y)
    if len(classes) < 2:
        raise ValueError(f"evaluate_vectors: the training labels hold {len(classes)} class; need >= 2")
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        if len(train_x) <= GRAM_MAX_SAMPLES:
            tr = torch.from_numpy(train_x)
            values = gram_svm(gram(tr, tr), train_y, gram(torch.from_numpy(test_x), tr), C)
        else:
            svm = LinearSVC(C=C, loss="hinge", dual=True, max_iter=max_iter, random_state=0).fit(train_x, train_y)
            values = svm.decision_function(test_x)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    seconds = time.perf_counter() - t0
    if values.ndim == 1:  # two classes: one decision value for classes[1]
        values = np.stack([-values, values], axis=1)
    return Decisions(np.asarray(values, dtype=np.float64), classes, seconds, converged)


def rank_scores(values: np.ndarray, classes: np.ndarray, test_y: Tensor | np.ndarray) -> tuple[float, float, float]:
    """Top-1, top-3 accuracy and mAP over the classes present in (m,) int ``test_y`` of decision
    values (m, K) with columns ``classes`` (K,)."""
    from sklearn.metrics import average_precision_score

    test_y = integer_values(test_y, "test_y", "evaluate_vectors")
    if len(test_y) != len(values):
        raise ValueError("evaluate_vectors: one label per vector is needed")
    top1 = float((classes[values.argmax(1)] == test_y).mean())
    top3 = float((classes[np.argsort(-values, axis=1)[:, :3]] == test_y[:, None]).any(1).mean())
    present = [i for i, c in enumerate(classes) if (test_y == c).any()]
    mean_ap = float(np.mean([average_precision_score(test_y == classes[i], values[:, i]) for i in present]))
    return top1, top3, mean_ap


def evaluate_vectors(
    train_x: Tensor | np.ndarray,
    train_y: Tensor | np.ndarray,
    test_x: Tensor | np.ndarray,
    test_y: Tensor | np.ndarray,
    *,
    C: float = 100.0,
    normalize: bool = True,
    max_iter: int = 2000,
) -> Scores:
    """Train a one-vs-all linear SVM on (n, D) float vectors with (n,) int labels, score the test set.

    ``normalize``: apply the signed square root and L2 first (the paper's protocol; pass False
    for vectors that already had it, such as ``fisher_encode(..., normalize=True)``).
    """
    d = svm_decisions(train_x, train_y, test_x, C=C, normalize=normalize, max_iter=max_iter)
    return Scores(*rank_scores(d.values, d.classes, test_y), d.seconds, d.converged)
