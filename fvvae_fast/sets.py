"""Sets of descriptors in memory: (N, C) rows, (S+1,) offsets, (S,) labels.

:func:`pack_sets` turns the forms users hold (a list of (n_i, C) arrays, (x, offsets), a nested
tensor, a dense (S, T, C) array) into (N, C) + offsets; :func:`~fvvae_fast.ops.padding.pad_sets` turns (N, C) + offsets into one padded batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .ops.validate import check_offsets


def integer_values(values: Any, name: str, where: str) -> np.ndarray:
    """``values`` (an array, tensor or list of integers; whole-valued floats pass) as an int64 array; a
    fractional, non-finite, boolean or non-numeric value is a ValueError/TypeError naming ``name`` and the
    value (never truncated)."""
    arr = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{where}: {name} must be integers, got {arr.dtype} values")
    if np.issubdtype(arr.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(arr) | (arr != np.round(arr)))
        if bad.size:
            raise ValueError(f"{where}: {name} must be integers, got {arr.flat[bad[0]].item()!r} at {bad[0]}")
    return arr.astype(np.int64)


@dataclass
class DescriptorSets:
    """Descriptors of S sets: ``x`` (N, C) float tensor or array (a NumPy memmap works),
    ``offsets`` (S+1,) int64, optional ``labels`` (S,) int64.
    """

    x: Tensor | np.ndarray
    offsets: Tensor
    labels: Tensor | None = None

    def __post_init__(self) -> None:
        self.offsets = torch.from_numpy(integer_values(self.offsets, "offsets", "DescriptorSets"))
        if self.x.ndim != 2:
            raise ValueError(f"DescriptorSets: x must be (N, C), got shape {tuple(self.x.shape)}")
        check_offsets(self.offsets, self.x.shape[0], "DescriptorSets")
        if self.labels is not None:
            self.labels = torch.from_numpy(integer_values(self.labels, "labels", "DescriptorSets"))
            if self.labels.shape != (len(self),):
                raise ValueError(f"DescriptorSets: labels must be (S={len(self)},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __repr__(self) -> str:
        return (f"DescriptorSets(sets={len(self)}, rows={self.x.shape[0]}, dim={self.dim}, dtype={self.x.dtype}, "
                f"labels={'no' if self.labels is None else 'yes'})")

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    @classmethod
    def from_dense(cls, x: Tensor | np.ndarray, labels: Tensor | None = None) -> DescriptorSets:
        """From (S, T, C): S sets of T descriptors each."""
        s, t, c = x.shape
        return cls(x.reshape(s * t, c), torch.arange(s + 1, dtype=torch.int64) * t, labels)

    def batches(self, batch_sets: int) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """Consecutive groups of ``batch_sets`` sets: (x (n, C) float32, offsets (k+1,) int64, labels (k,) or None),
        read lazily (a memory-mapped x is read one group at a time)."""
        for lo in range(0, len(self), batch_sets):
            hi = min(lo + batch_sets, len(self))
            a, b = int(self.offsets[lo]), int(self.offsets[hi])
            chunk = self.x[a:b]
            x = chunk.float() if isinstance(chunk, Tensor) else torch.from_numpy(np.array(chunk, dtype=np.float32))
            yield x, self.offsets[lo : hi + 1] - a, None if self.labels is None else self.labels[lo:hi]

    def sample(
        self, set_ids: Tensor, per_set: int | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The rows of the sets ``set_ids`` (optionally ``per_set`` random rows of each, like the paper's
        one-frame-per-video training), without reading them: row indices into x (n,) int64, offsets
        (k+1,), set index of each row (n,)."""
        starts = self.offsets[set_ids]
        lengths = self.offsets[set_ids + 1] - starts
        counts = lengths if per_set is None else lengths.clamp_max(per_set)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        owners = torch.repeat_interleave(torch.arange(len(set_ids)), counts)
        if per_set is not None and bool((lengths > per_set).any()):
            # per_set rows of each set without replacement: the smallest of uniform keys (padding last).
            span = torch.arange(int(lengths.max()))
            keys = torch.rand((len(set_ids), span.numel()), generator=generator).masked_fill_(
                span >= lengths[:, None], 2.0)
            picked = keys.topk(per_set, dim=1, largest=False).indices  # (k, per_set)
            local = picked[torch.arange(per_set) < counts[:, None]]
        else:
            local = torch.arange(int(offsets[-1])) - torch.repeat_interleave(offsets[:-1], counts)
        return starts[owners] + local, offsets, owners

    def rows(self, rows: Tensor) -> Tensor:
        """x[rows]: (len(rows), C) float32 (or x's floating dtype, for a tensor x)."""
        if isinstance(self.x, Tensor):
            x = torch.index_select(self.x, 0, rows.to(self.x.device))  # 2.6x faster than x[rows] on the CPU
        else:
            x = torch.as_tensor(np.asarray(self.x[rows.numpy()]) if isinstance(self.x, np.ndarray) else self.x[rows])
        return x.float()

    def gather(
        self, set_ids: Tensor, per_set: int | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Rows of the sets ``set_ids`` (as :meth:`sample` picks them): x (n, C) float32, offsets (k+1,), set
        index of each row (n,)."""
        rows, offsets, owners = self.sample(set_ids, per_set, generator)
        return self.rows(rows), offsets, owners


def _descriptors(a: Any, where: str) -> Tensor:
    """One (n, C) array or tensor of finite real numbers -> float32 tensor (on the tensor's device)."""
    if not isinstance(a, Tensor):
        try:
            a = np.asarray(a)
        except ValueError as err:  # ragged nested lists
            raise ValueError(f"{where}: not an (n, C) array: {err}") from None
        if a.dtype.kind == "O":  # numbers held as Python objects (as pandas gives them)
            try:
                a = a.astype(np.float32)
            except (TypeError, ValueError) as err:
                raise TypeError(f"{where}: descriptors must be real numbers, got dtype object ({err})") from None
        if a.dtype.kind not in "iuf":
            raise TypeError(f"{where}: descriptors must be real numbers, got dtype {a.dtype}")
        if not a.flags.writeable:  # a read-only array or memory map: torch needs memory it may write
            a = a.astype(np.float32)
        a = torch.from_numpy(a)
    elif a.dtype == torch.bool or a.is_complex():
        raise TypeError(f"{where}: descriptors must be real numbers, got dtype {a.dtype}")
    if a.dim() != 2:
        raise ValueError(f"{where}: descriptors must be (n, C) with C >= 1, got shape {tuple(a.shape)}")
    if a.shape[1] == 0:
        raise ValueError(f"{where}: descriptors have 0 feature(s) (shape={tuple(a.shape)}) while a minimum of 1 is "
                         f"required.")
    a = a.detach().to(torch.float32)
    if not bool(torch.isfinite(a).all()):
        raise ValueError(f"{where}: descriptors contain NaN or Inf")
    return a


def _offsets(a: Any, n: int, device: torch.device, where: str) -> Tensor:
    """(S+1,) integers, non-decreasing from 0 to n -> int64 tensor on ``device``."""
    o = a if isinstance(a, Tensor) else torch.from_numpy(np.asarray(a))
    if o.is_floating_point() or o.is_complex() or o.dtype == torch.bool:
        raise TypeError(f"{where}: offsets must be integers, got dtype {o.dtype}")
    if o.dim() != 1 or o.numel() < 2:
        raise ValueError(f"{where}: offsets must be (S+1,) with S >= 1, got shape {tuple(o.shape)}")
    o = o.to(device=device, dtype=torch.int64)
    check_offsets(o, n, where)
    return o


def pack_sets(sets: Any, where: str = "X") -> tuple[Tensor, Tensor]:
    """Sets in any of four forms -> x (N, C) float32 and offsets (S+1,) int64 (both on x's device).

    ``sets`` is a list of S arrays or tensors of shape (n_i, C) (an n_i may be 0), a tuple
    (x (N, C), offsets (S+1,) integers non-decreasing from 0 to N), a torch nested tensor
    (S, j, C) (jagged or strided layout), or an (S, T, C) array or tensor (S sets of T descriptors).
    Integer descriptors are converted to float32.
    Raises TypeError (another container, non-numeric values) or ValueError (no sets, wrong
    shapes (an array of another number of dimensions), sets of different C, bad offsets, NaN or Inf),
    naming ``where``.

    Example:
        >>> x, offsets = pack_sets([np.ones((2, 3)), np.zeros((0, 3))])
        >>> x.shape, offsets.tolist()
        (torch.Size([2, 3]), [0, 2, 2])
    """
    if isinstance(sets, Tensor) and sets.is_nested:
        sets = list(sets.unbind())
    if isinstance(sets, tuple):
        if len(sets) != 2:
            raise TypeError(f"{where}: a tuple must be (x (N, C), offsets (S+1,)), got {len(sets)} items")
        x = _descriptors(sets[0], f"{where}[0]")
        offsets = _offsets(sets[1], x.shape[0], x.device, f"{where}[1]")
    elif isinstance(sets, list):
        if not sets:
            raise ValueError(f"{where}: no sets (an empty list)")
        parts = [_descriptors(a, f"{where}[{i}]") for i, a in enumerate(sets)]
        c = parts[0].shape[1]
        for i, p in enumerate(parts):
            if p.shape[1] != c:
                raise ValueError(f"{where}[{i}]: descriptors have C={p.shape[1]}, those of {where}[0] C={c}")
        x = torch.cat(parts)
        offsets = torch.tensor([0] + [p.shape[0] for p in parts], device=x.device).cumsum(0)
    elif isinstance(sets, (np.ndarray, Tensor)) and sets.ndim == 3:
        s, t, c = sets.shape
        if s == 0:
            raise ValueError(f"{where}: no sets (an array of shape {tuple(sets.shape)})")
        x = _descriptors(sets.reshape(s * t, c), where)
        offsets = torch.arange(s + 1, device=x.device) * t
    else:
        shape = f" of shape {tuple(sets.shape)}" if hasattr(sets, "shape") else ""
        wrong_shape = isinstance(sets, (np.ndarray, Tensor))  # the right type of another shape: a ValueError
        sparse = " (sparse input is not supported)" if type(sets).__module__.startswith("scipy.sparse") else ""
        raise (ValueError if wrong_shape else TypeError)(
            f"{where}: sets must be a list of (n_i, C) arrays or tensors, a tuple (x (N, C), offsets (S+1,)), a torch "
            f"nested tensor or an (S, T, C) array or tensor of equal-length sets; got {type(sets).__name__}{shape}"
            f"{sparse}. Reshape your data: one set x (n, C): [x]; each row of x a set: x[:, None, :]")
    return x, offsets
