"""Pooling baselines of Table 2: AVE, Concatenation and bilinear pooling (BP), as functions of tensors x (N, C)
+ offsets (S+1,) and as scikit-learn transformers of sets (:class:`AveragePooling`, :class:`Concatenation`,
:class:`BilinearPooling`; :mod:`fvvae_fast.sklearn`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..ops.validate import check_offsets
from ..ops.padding import pad_sets
from ..sklearn import SetTransformer


def check_sets(x: Tensor, offsets: Tensor, where: str) -> None:
    """Raise ValueError unless x is a floating (N, C) tensor and offsets a valid (S+1,) int64 partition of it."""
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{where}: x must be a floating (N, C) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(offsets, Tensor) or offsets.dtype != torch.int64:
        raise ValueError(f"{where}: offsets must be an (S+1,) int64 tensor")
    check_offsets(offsets, x.shape[0], where)


def average_pool(x: Tensor, offsets: Tensor) -> Tensor:
    """AVE: the mean descriptor of each set, (S, C) float32 (zeros for an empty set)."""
    check_sets(x, offsets, "average_pool")
    pad, lengths = pad_sets(x.float(), offsets)
    return pad.sum(1) / lengths.clamp_min(1)[:, None].to(pad.dtype)


def concatenate(x: Tensor, offsets: Tensor) -> Tensor:
    """Concatenation: the T descriptors of each set flattened in order, (S, T*C) float32.

    Every set must have the same number of descriptors T (one conv map per item).
    """
    check_sets(x, offsets, "concatenate")
    lengths = offsets.diff()
    if lengths.numel() and bool((lengths != lengths[0]).any()):
        raise ValueError(f"concatenate: every set needs the same number of descriptors, got lengths "
                         f"{int(lengths.min())}..{int(lengths.max())}")
    return x.float().reshape(lengths.numel(), -1)


def bilinear_pool(x: Tensor, offsets: Tensor) -> Tensor:
    """BP: the mean outer product (1/T) sum_t x_t x_t^T of each set, flattened: (S, C*C) float32."""
    check_sets(x, offsets, "bilinear_pool")
    pad, lengths = pad_sets(x.float(), offsets)
    outer = torch.bmm(pad.transpose(1, 2), pad) / lengths.clamp_min(1)[:, None, None].to(pad.dtype)
    return outer.reshape(lengths.numel(), -1)


class _Pooling(SetTransformer):
    """A pooling with nothing to learn: ``fit`` only records C (``n_features_in_``)."""

    def _fit(self, x: Tensor, offsets: Tensor, y: Any = None) -> None:
        pass


class AveragePooling(_Pooling):
    """AVE (:func:`average_pool`) as a transformer of sets: (S, C) float32."""

    @property
    def _n_features_out(self) -> int:
        return self.n_features_in_

    def encode(self, x: Tensor, offsets: Tensor) -> Tensor:
        return average_pool(x, offsets)


class BilinearPooling(_Pooling):
    """BP (:func:`bilinear_pool`) as a transformer of sets: (S, C*C) float32."""

    @property
    def _n_features_out(self) -> int:
        return self.n_features_in_**2

    def encode(self, x: Tensor, offsets: Tensor) -> Tensor:
        return bilinear_pool(x, offsets)


class Concatenation(_Pooling):
    """Concatenation (:func:`concatenate`) as a transformer of sets of T descriptors each: (S, T*C) float32.

    ``fit`` records T (``length_``); ``transform`` refuses sets of another length.
    """

    @property
    def _n_features_out(self) -> int:
        return self.length_ * self.n_features_in_

    def _fit(self, x: Tensor, offsets: Tensor, y: Any = None) -> None:
        self.length_ = int(concatenate(x, offsets).shape[1]) // x.shape[1]

    def encode(self, x: Tensor, offsets: Tensor) -> Tensor:
        out = concatenate(x, offsets)
        if out.shape[1] != self._n_features_out:
            raise ValueError(f"Concatenation: X has sets of {out.shape[1] // x.shape[1]} descriptors, the "
                             f"transformer was fit on sets of {self.length_}")
        return out
