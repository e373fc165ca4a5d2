"""What one mode of :class:`~fvvae_fast.fim.FisherInformation` implements: its running statistics.

A mode class (:class:`.diagonal.DiagonalStatistics`, :class:`.lowrank.LowRankStatistics`,
:class:`.kronecker.KroneckerStatistics`) holds the float64 sums of its estimate of F (on the device
of the first update) and knows how to add data to them, merge and all-reduce them, write and read
its keys of the file format, and build its whitening. The estimator keeps what the modes share:
input and configuration checks, damping, the set count, cached whitening factors and file I/O.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor


class Whitener(Protocol):
    """Whitening factors of one mode: float64 when built, cast once per (dtype, device)."""

    def to(self, dtype: torch.dtype, device: torch.device) -> Whitener: ...

    def apply(self, g: Tensor) -> Tensor:
        """g (S, D) -> (S, D) whitened rows, in g's dtype."""


class Statistics(ABC):
    """The statistics of one mode; empty (no tensors) until the first data.

    ``rank`` and ``sketch`` are the estimator's arguments: only the low-rank mode takes them.
    """

    mode: ClassVar[str]
    rank: int = 0
    sketch_rows: int = 0
    num_descriptors: int = 0  # descriptors seen (counted by the modes fed per descriptor)

    def __init__(self, rank: int | None = None, sketch: int | None = None) -> None:
        if rank not in (None, 0):
            raise ValueError(f"FisherInformation: rank={rank} needs mode='lowrank', got mode={self.mode!r}")
        if sketch is not None:
            raise ValueError(f"FisherInformation: sketch={sketch} needs mode='lowrank', got mode={self.mode!r}")

    @property
    @abstractmethod
    def tensors(self) -> list[Tensor]:
        """The statistics' tensors (empty before any data)."""

    @property
    def started(self) -> bool:
        return bool(self.tensors)

    @property
    def device(self) -> torch.device | None:
        return self.tensors[0].device if self.tensors else None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @abstractmethod
    def update(self, rows: Tensor) -> None:
        """Add training sets given by their gradients rows (S, D) float (already checked against D)."""

    def update_descriptors(self, model: Any, x: Tensor, offsets: Tensor, backend: str | None) -> None:
        """Add the sets of raw descriptors x (N, C) with offsets (S+1,) int64 (checked): through their G."""
        from ..encode import fisher_gradients

        g = fisher_gradients(model, x, offsets, backend=backend)
        self.update(g.reshape(g.shape[0], -1))

    @abstractmethod
    def merge(self, other: Statistics) -> None:
        """Add another estimator's statistics of the same mode and size (both hold data)."""

    @abstractmethod
    def all_reduce(self, dim: int, shape: tuple[int, int] | None) -> None:
        """Sum the statistics over the ranks (every rank calls it; an empty one starts at D = dim)."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """This mode's keys of the file format: plain values and CPU tensors (called once there is data)."""

    @abstractmethod
    def load(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore from a file's state onto ``device`` (empty when the file holds no data)."""

    def sketch_error(self, num_sets: int) -> float:
        """The spectral error bound of a sketched part of F (0: none)."""
        return 0.0

    @abstractmethod
    def diagonal(self, num_sets: int) -> Tensor:
        """diag F_hat without damping: (D,) float64."""

    @abstractmethod
    def whitener(self, num_sets: int, damping: float) -> Whitener:
        """float64 whitening factors of F_hat floored by ``damping`` x its mean diagonal."""
