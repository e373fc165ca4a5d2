"""The protocol of :mod:`.protocol` on vectors read block by block (a memory-mapped store), so that the
memory does not grow with the vectors: 10^5 Fisher vectors of 131,072 dimensions are 52 GB.

Up to ``GRAM_MAX_SAMPLES`` training vectors, the same dual solve on the Gram matrix as in memory, the
Gram matrix accumulated from pairs of row blocks: memory 8 (n^2 + m n) bytes for n training and m test
vectors, plus two blocks of at most ``BLOCK_BYTES``. Beyond, liblinear's own algorithm for the same
classifier as the in-memory ``LinearSVC`` (dual coordinate descent for the hinge loss, bias as a
constant feature; Hsieh et al., ICML 2008), run over the rows in blocks: memory 8 K (D + 2 n) bytes
for K classes, plus a block of rows (``BLOCK_BYTES`` in float64, and its float32 read).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..encode import power_l2_normalize
from .protocol import GRAM_MAX_SAMPLES, Decisions, Scores, check_C, gram, gram_svm, rank_scores

BLOCK_BYTES = 1 << 30  # float32 bytes of one block of rows in memory


def _rows_per_block(dim: int, itemsize: int = 4) -> int:
    return max(1, BLOCK_BYTES // (dim * itemsize))


def row_blocks(x: Any, normalize: bool, rows: int | None = None, dtype: torch.dtype = torch.float32
               ) -> Iterator[tuple[int, Tensor]]:
    """(first row, block (b, D)) of a row-sliceable (N, D) array (an ndarray, a memory map, a store's
    ShardedArray), in order, copied to ``dtype``, with signed sqrt + L2 when ``normalize``."""
    rows = rows or _rows_per_block(x.shape[1], torch.finfo(dtype).bits // 8)
    for lo in range(0, len(x), rows):
        yield lo, _block(x, lo, rows, normalize).to(dtype)


def _block(x: Any, lo: int, rows: int, normalize: bool) -> Tensor:
    block = torch.from_numpy(np.array(x[lo : lo + rows], dtype=np.float32))
    return power_l2_normalize(block) if normalize else block


def blocked_gram(a: Any, b: Any | None = None, *, normalize: bool, rows: int | None = None) -> Tensor:
    """a b^T (float64 (len(a), len(b))) of row-sliceable float arrays read block by block; ``b=None``:
    a a^T, each pair of blocks once."""
    other = a if b is None else b
    out = torch.empty((len(a), len(other)), dtype=torch.float64)
    for lo_a, xa in row_blocks(a, normalize, rows):
        for lo_b, xb in row_blocks(other, normalize, rows):
            if b is None and lo_b > lo_a:
                break
            k = gram(xa, xb)
            out[lo_a : lo_a + len(xa), lo_b : lo_b + len(xb)] = k
            if b is None:
                out[lo_b : lo_b + len(xb), lo_a : lo_a + len(xa)] = k.t()
    return out


def dual_cd_svm(x: Any, y: np.ndarray, *, C: float, normalize: bool, max_iter: int = 2000, tol: float = 1e-4,
                rows: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor, np.ndarray, bool]:
    """One-vs-all hinge-loss linear SVMs min 1/2 |w|^2 + C sum_i max(0, 1 - y_i (w.x_i + b)), the bias b a
    weight on a constant feature 1 (liblinear's, as ``LinearSVC``), by dual coordinate descent over the
    rows of ``x`` (N, D) read in blocks; all classes step together on each row.

    Returns W (K, D) and b (K,) float64, the classes (K,) and whether every class met liblinear's stopping
    rule (the spread of projected gradients in a pass below ``tol``) within ``max_iter`` passes.
    """
    classes = np.unique(y)
    sign = torch.from_numpy(np.where(y[:, None] == classes[None, :], 1.0, -1.0))  # (N, K)
    n, k = sign.shape
    w = torch.zeros((k, x.shape[1]), dtype=torch.float64)
    b = torch.zeros(k, dtype=torch.float64)
    alpha = torch.zeros((n, k), dtype=torch.float64)
    rows = rows or _rows_per_block(x.shape[1], 8)
    starts = np.arange(0, n, rows)
    rng = np.random.default_rng(seed)
    active = torch.ones(k, dtype=torch.bool)
    for _ in range(max_iter):
        pg_max = torch.full((k,), -torch.inf, dtype=torch.float64)
        pg_min = torch.full((k,), torch.inf, dtype=torch.float64)
        for lo in rng.permutation(starts):
            block = _block(x, lo, rows, normalize).double()
            q = block.square().sum(1) + 1.0
            for j in rng.permutation(len(block)):
                i = lo + j
                s = sign[i]
                g = s * (w @ block[j] + b) - 1.0
                a = alpha[i]
                pg = torch.where(a <= 0, g.clamp_max(0), torch.where(a >= C, g.clamp_min(0), g))
                pg_max = torch.maximum(pg_max, pg)
                pg_min = torch.minimum(pg_min, pg)
                new = torch.where(active & (pg != 0), (a - g / q[j]).clamp(0, C), a)
                step = (new - a) * s
                alpha[i] = new
                w.addr_(step, block[j])
                b += step
        active &= (pg_max - pg_min) > tol
        if not active.any():
            return w, b, classes, True
    return w, b, classes, False


def block_decisions(train_x: Any, train_y: np.ndarray, test_x: Any, *, C: float = 100.0, normalize: bool = True,
                    max_iter: int = 2000, gram_max_samples: int = GRAM_MAX_SAMPLES) -> Decisions:
    """:func:`~.protocol.svm_decisions` on row-sliceable (n, D) and (m, D) float arrays (memory maps, a
    store's ShardedArray) read block by block, with the memory bound of the module's docstring."""
    check_C(C, "block_decisions")
    train_y = np.asarray(train_y, dtype=np.int64)
    if train_x.shape[1] != test_x.shape[1] or len(train_y) != len(train_x):
        raise ValueError(f"block_decisions: need (n, D) training vectors with one label each and (m, D) test "
                         f"vectors, got {tuple(train_x.shape)}, {len(train_y)} labels and {tuple(test_x.shape)}")
    classes = np.unique(train_y)
    if len(classes) < 2:
        raise ValueError("block_decisions: the training labels hold fewer than 2 classes")
    t0 = time.perf_counter()
    if len(train_x) <= gram_max_samples:
        values = gram_svm(blocked_gram(train_x, normalize=normalize), train_y,
                          blocked_gram(test_x, train_x, normalize=normalize), C)
        converged = True
        if values.ndim == 1:
            values = np.stack([-values, values], axis=1)
    else:
        w, b, classes, converged = dual_cd_svm(train_x, train_y, C=C, normalize=normalize, max_iter=max_iter)
        values = torch.cat([blk.double() @ w.t() + b for _, blk in row_blocks(test_x, normalize)]).numpy()
    return Decisions(np.asarray(values, dtype=np.float64), classes, time.perf_counter() - t0, converged)


def evaluate_blocks(train_x: Any, train_y: np.ndarray, test_x: Any, test_y: np.ndarray, *, C: float = 100.0,
                    normalize: bool = True, max_iter: int = 2000, gram_max_samples: int = GRAM_MAX_SAMPLES) -> Scores:
    """:func:`~.protocol.evaluate_vectors` on row-sliceable arrays read block by block (:func:`block_decisions`)."""
    test_y = np.asarray(test_y, dtype=np.int64)
    if len(test_y) != len(test_x):
        raise ValueError(f"evaluate_blocks: need test vectors with one label each, got {len(test_y)} for {len(test_x)}")
    d = block_decisions(train_x, train_y, test_x, C=C, normalize=normalize, max_iter=max_iter,
                        gram_max_samples=gram_max_samples)
    return Scores(*rank_scores(d.values, d.classes, test_y), d.seconds, d.converged)
