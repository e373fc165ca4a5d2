"""The rows of a store as one read-only array over its memory-mapped shards (:mod:`fvvae_fast.store`)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io import file_sha256
from .store_manifest import StoreError

# (shard file, sha256, mtime, size) checked in this process: a file is hashed again only when it changed
_VERIFIED: set[tuple[str, str, int, int]] = set()


def _checked_map(path: Path, sha256: str | None) -> np.ndarray:
    """The memory map of a shard whose bytes were checked against the manifest's sha256 (once per
    process and version of the file; None: nothing recorded to check)."""
    if sha256 is not None:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise StoreError(f"{path}: shard file missing; rerun the stage that wrote this store") from None
        key = (str(path), sha256, st.st_mtime_ns, st.st_size)
        if key not in _VERIFIED:
            found = file_sha256(path)
            if found != sha256:
                raise StoreError(f"{path}: checksum mismatch (sha256 {found[:16]}..., the manifest records "
                                 f"{sha256[:16]}...): the shard changed after it was written; rerun the stage "
                                 f"that wrote this store to recompute it")
            _VERIFIED.add(key)
    return np.load(path, mmap_mode="r")


class ShardedArray:
    """A read-only 2-D array over row ranges of memory-mapped ``.npy`` shards.

    Behaves like an (N, dim) NumPy array for what training and scikit-learn need:
    ``shape``, ``ndim``, ``dtype``, ``len``, indexing by int, slice, or an integer index array
    (or tensor), and ``np.asarray(a)`` (which copies everything into memory). Each row read
    touches only the shard pages it needs. Each shard's bytes are checked against its recorded
    sha256 (``digests``) when first mapped in the process. ``origin``: what the rows are (the store's descriptor
    kind, its name and folder: :func:`fvvae_fast.provenance.data_record`), recorded by training.
    """

    def __init__(self, segments: Sequence[tuple[Path, int, int]], dim: int, dtype: np.dtype,
                 digests: dict[Path, str] | None = None, origin: dict | None = None) -> None:
        self._segments = [(Path(p), int(lo), int(n)) for p, lo, n in segments if n > 0]
        self._digests = digests or {}
        self.origin = origin
        self._starts = np.cumsum([0] + [n for _, _, n in self._segments]).astype(np.int64)
        self._maps: dict[Path, np.ndarray] = {}
        self.dtype = np.dtype(dtype)
        self.shape = (int(self._starts[-1]), int(dim))
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, segments={len(self._segments)})"

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the rows from their shards' checksums and row ranges, without reading the shards
        (a shard with no recorded checksum is hashed)."""
        h = hashlib.sha256(f"{self.dtype}:{self.shape}".encode())
        for path, lo, n in self._segments:
            h.update(f"{path.name}:{self._digests.get(path) or file_sha256(path)}:{lo}:{n};".encode())
        return h.hexdigest()

    def _map(self, path: Path) -> np.ndarray:
        arr = self._maps.get(path)
        if arr is None:
            arr = self._maps[path] = _checked_map(path, self._digests.get(path))
        return arr

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        if len(rows) == 0:
            return out
        if rows.min() < 0 or rows.max() >= self.shape[0]:
            raise IndexError(f"ShardedArray: row index out of range for {self.shape[0]} rows")
        seg = np.searchsorted(self._starts, rows, side="right") - 1
        for s in np.unique(seg):
            mask = seg == s
            path, lo, _ = self._segments[s]
            out[mask] = self._map(path)[lo + (rows[mask] - self._starts[s])]
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            first, rest = key[0], key[1:]
            return self[first][(slice(None), *rest)] if not isinstance(first, (int, np.integer)) else self[first][rest]
        if isinstance(key, (int, np.integer)):
            k = int(key) + (self.shape[0] if key < 0 else 0)
            return self._rows(np.array([k]))[0]
        if isinstance(key, slice):
            return self._rows(np.arange(*key.indices(self.shape[0])))
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        key = np.asarray(key)
        if key.dtype == bool:
            key = np.flatnonzero(key)
        return self._rows(key.astype(np.int64).reshape(-1)).reshape(*key.shape, self.shape[1])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    def as_array(self) -> np.ndarray:
        """The rows as one array: the memory map itself when they are one whole shard, else a copy."""
        if len(self._segments) == 1:
            path, lo, n = self._segments[0]
            arr = self._map(path)
            return arr if (lo, n) == (0, arr.shape[0]) else arr[lo : lo + n]
        return np.asarray(self)
