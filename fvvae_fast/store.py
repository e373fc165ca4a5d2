"""A sharded, resumable on-disk store of per-item arrays (descriptor sets or Fisher vectors).

Layout of a store folder::

    manifest.sqlite        SQLite: tables meta, items, shards (below)
    shards/shard-00000.npy (rows, dim) array of the items of shard 0, concatenated in item order
    shards/shard-00001.npy ...
    shards/shard-00001.journal.json   only in a distributed run: a shard written by another rank,
                           not yet recorded in the manifest (:meth:`Store.join`, :meth:`Store.absorb_journals`)
    shards/shard-00001.inputs.json   descriptor stage: the contents of the inputs the shard was made from
                           (:mod:`fvvae_fast.pipelines.inputs`)
    lock                   advisory lock (POSIX lockf): held exclusively by the one process writing the
                           store, shared by the processes reading it

Items are assigned to shards up front: item i (in the order given when the store was
created) belongs to shard ``i // shard_items``. A shard is computed as a whole, written to a
temporary name beside its final one, fsynced and renamed (``fvvae_fast.io.atomic_open``),
and only then marked done, together with its items, in one SQLite transaction. A run killed
at any point therefore leaves finished shards (file present and marked done) and unfinished
ones (no file, or a file not yet marked done, recomputed on restart); the restarted run
redoes exactly the unfinished shards with the same inputs and batching, so its files are
byte-identical to those of an uninterrupted run. An item that cannot be read (a corrupt
video) is marked ``failed`` with its reason and takes no rows; the run goes on. When the last shard
is done, the writer writes the manifest afresh from its rows, so that it too is byte-identical to
an uninterrupted run's, whatever order the shards were recorded in (a rank killed under torchrun).

Nothing read from the manifest is trusted as it is: each shard's row and the rows of its items
are sealed by a SHA-256 of their values (``shards.seal``), and the settings with the numbers of
items and shards by ``meta.seal``; a shard's file must be its own ``shards/shard-NNNNN.npy``
inside the store (not a link out of it). A reader refuses a manifest changed after it was
written (one StoreError); rerunning the stage that wrote the store recomputes the shards whose
rows changed, and refuses changed settings (use ``overwrite``). Damaged shard files and
journals are recomputed likewise.

Readers take the shared lock through a read-only descriptor when they may not write the lock
file (read-only media, another user's store): a shared lock needs no write access. A folder
without a lock file (read-only, so nothing writes it either) is read without a lock.

Why this format: ``.npy`` is NumPy's own, documented, versioned format, and a shard is
memory-mapped as is (``np.load(f, mmap_mode="r")``), so training and scikit-learn read the
rows straight from the page cache without a copy or a conversion; SQLite (in the Python
standard library) gives atomic, crash-safe updates of the manifest and can be queried by
any tool. Nothing here is specific to fvvae_fast.

Reading with plain NumPy + sqlite3::

    import sqlite3, numpy as np
    db = sqlite3.connect("store/manifest.sqlite")
    for item_id, label, shard, row, rows in db.execute(
            "SELECT item_id, label, shard, row, rows FROM items WHERE status = 'done' ORDER BY idx"):
        x = np.load(f"store/shards/shard-{shard:05d}.npy", mmap_mode="r")[row : row + rows]
        # descriptors store: x is (rows, C), the item's set; Fisher-vector store: (1, D)

Tables::

    meta(key TEXT PRIMARY KEY, value TEXT)     format, version, kind, dim, dtype, shard_items,
                                               classes (JSON list), config (JSON object), seal
    items(idx, item_id, label, split, shard, row, rows, status, error)
                                               status: 'pending' | 'done' | 'failed'
    shards(shard, file, rows, status, sha256, seal)
                                               status: 'pending' | 'done'
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io import atomic_open, file_sha256
from .provenance import describe, descriptor_kind
from .sets import DescriptorSets
from .store_array import ShardedArray, _checked_map
from .store_manifest import (
    _ITEM_COLUMNS,
    _SHARD_COLUMNS,
    MANIFEST,
    StoreError,
    _acquire,
    _check_manifest,
    _release,
    _reseal,
    _seal,
    _transaction,
    _write_manifest,
    shard_file,
)

FORMAT = "fvvae_fast.store"
VERSION = 2  # 2: the manifest's rows are sealed
KINDS = ("descriptors", "fisher")


@dataclass(frozen=True)
class ItemRecord:
    """One item of a store: stable unique id, label (-1 = none), split name ('' = none)."""

    item_id: str
    label: int = -1
    split: str = ""


@dataclass(frozen=True)
class ShardResult:
    """What a stage produced for one item of a shard: an array (rows, dim), or the error text."""

    idx: int
    array: np.ndarray | None = None
    error: str | None = None


@dataclass
class StoreSummary:
    items: int
    done: int
    failed: int
    pending: int
    rows: int
    shards_done: int
    shards: int

    def line(self) -> str:
        return (f"{self.done} done, {self.failed} failed, {self.pending} pending of {self.items} items; "
                f"{self.rows} rows in {self.shards_done}/{self.shards} shards")


class _HashingWriter:
    """A write-only file wrapper that hashes what goes through it (np.save writes via .write)."""

    def __init__(self, f) -> None:
        self.f, self.hash = f, hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        return self.f.write(data)


class Store:
    """A store folder (module docstring). Use :meth:`create` to start or resume writing,
    :meth:`open` to read. ``dim``/``dtype`` of the rows are fixed at creation."""

    def __init__(self, path: Path, db: sqlite3.Connection, writable: bool, lock=None, journal: bool = False) -> None:
        self.path, self._db, self.writable, self._lock = path, db, writable, lock
        self._read_lock: str | None = None
        self.journal = journal  # write_shard leaves a journal file instead of touching the manifest
        meta = dict(db.execute("SELECT key, value FROM meta"))
        if meta.get("format") != FORMAT:
            raise StoreError(f"{path}: not an fvvae_fast store (meta.format={meta.get('format')!r})")
        version = meta.get("version", "")
        if version.isdigit() and int(version) > VERSION:
            raise StoreError(f"{path}: store version {version} is newer than this fvvae_fast reads ({VERSION})")
        if version != str(VERSION):
            raise StoreError(f"{path}: store version {version} has no manifest checksums (an older fvvae_fast wrote "
                             f"it); rerun the stage that wrote it with --overwrite")
        self._damaged = _check_manifest(db, path, meta)  # shard -> why its rows are not to be trusted
        self.kind: str = meta["kind"]
        self.dim: int = int(meta["dim"])
        self.dtype = np.dtype(meta["dtype"])
        self.shard_items: int = int(meta["shard_items"])
        self.classes: list[str] = json.loads(meta["classes"])
        self.config: dict = json.loads(meta["config"])

    # ------------------------------------------------------------------ opening

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        # the descriptor stage writes shards from a writer thread while its main thread leaves the
        # store alone (one thread at a time uses it): the connection may change threads
        db = sqlite3.connect(path / MANIFEST, isolation_level=None, timeout=30.0, check_same_thread=False)
        db.execute("PRAGMA synchronous = FULL")
        return db

    @classmethod
    def open(cls, path: str | os.PathLike, kind: str | None = None) -> Store:
        """Open an existing store for reading (``kind`` checks it holds 'descriptors' or 'fisher').

        The reader holds a shared lock until :meth:`close` (or until the object is collected): while it
        does, another process may not write the store, and a store another process is writing is refused.
        """
        store = cls._read(path)
        try:
            store._read_lock = _acquire(store.path, exclusive=False)
        except BaseException:
            store._db.close()
            raise
        if kind is not None and store.kind != kind:
            store.close()
            raise StoreError(f"{path}: holds {store.kind}, expected {kind}")
        return store

    @classmethod
    def _read(cls, path: str | os.PathLike) -> Store:
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise FileNotFoundError(f"{path}: not a store (no {MANIFEST})")
        db = None
        try:
            db = cls._connect(path)
            store = cls(path, db, writable=False)
        except sqlite3.DatabaseError as err:
            if db is not None:
                db.close()
            raise StoreError(f"{path}: the manifest {MANIFEST} is unreadable ({err}); rerun the stage that wrote "
                             f"this store with --overwrite") from None
        except BaseException:
            if db is not None:
                db.close()
            raise
        if store._damaged:
            db.close()
            shard, why = min(store._damaged.items())
            raise StoreError(f"{path}: the manifest's record of shard {shard} is damaged ({why}); rerun the stage "
                             f"that wrote this store to recompute it")
        return store

    @classmethod
    def join(cls, path: str | os.PathLike) -> Store:
        """Open a store that another process (rank 0) created, to write shards beside it.

        The manifest is only read: each :meth:`write_shard` writes the shard's array atomically,
        then its journal ``shards/shard-NNNNN.journal.json`` atomically; the process holding the
        store (rank 0) records the journals in the manifest with :meth:`absorb_journals`. A process
        killed at any point leaves whole shards with journals, or nothing that counts.
        """
        store = cls._read(path)  # rank 0 holds the store's lock for the whole run
        store.writable, store.journal = True, True
        return store

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        kind: str,
        dim: int,
        items: Sequence[ItemRecord],
        classes: Sequence[str] = (),
        dtype: str | np.dtype = "float32",
        shard_items: int = 32,
        config: dict | None = None,
        overwrite: bool = False,
        journal: bool = False,
    ) -> Store:
        """Create a store for ``items``, or reopen one written by the same command to resume it.

        ``journal=True`` (rank 0 of a distributed run): :meth:`write_shard` leaves journals like the
        other ranks' (:meth:`join`) and :meth:`absorb_journals` records them all at the end.

        An existing store is resumed only when its kind, dim, dtype, shard size, classes,
        config and item list (ids, labels, splits, order) are all the same; otherwise a
        StoreError names what differs (use another folder or ``overwrite=True``).
        Stale temporary files of a killed run are removed; done shards whose file is missing,
        damaged or changed, or whose manifest rows changed (their seal), are put back to pending
        (and recomputed), their items' rows rewritten from ``items``.
        """
        if kind not in KINDS:
            raise ValueError(f"Store.create: kind must be one of {KINDS}, got {kind!r}")
        if dim < 1 or shard_items < 1:
            raise ValueError(f"Store.create: dim and shard_items must be >= 1, got {dim}, {shard_items}")
        ids = [it.item_id for it in items]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"Store.create: item ids must be unique, {dup!r} appears twice")
        path = Path(path)
        if overwrite and path.is_dir() and not (path / MANIFEST).is_file() \
                and any(p.name not in ("lock", "shards", f".{MANIFEST}.tmp") for p in path.iterdir()):
            raise StoreError(f"{path}: exists and is not a store; refusing to overwrite it")
        path.mkdir(parents=True, exist_ok=True)
        lock = _acquire(path, exclusive=True)  # before anything is deleted or written
        db = None
        try:
            if overwrite:
                for p in path.iterdir():
                    if p.name != "lock":
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
            (path / "shards").mkdir(exist_ok=True)
            meta = {"format": FORMAT, "version": str(VERSION), "kind": kind, "dim": str(int(dim)),
                    "dtype": np.dtype(dtype).name, "shard_items": str(int(shard_items)),
                    "classes": json.dumps(list(classes)), "config": json.dumps(config or {}, sort_keys=True)}
            if (path / MANIFEST).is_file():
                db = cls._connect(path)
                store = cls(path, db, writable=True, lock=lock, journal=journal)
                cls._check_resume(path, db, meta, items, store._damaged)
            else:
                leftovers = [p for p in path.iterdir() if p.name not in ("lock", "shards", f".{MANIFEST}.tmp")]
                if leftovers or any((path / "shards").iterdir()):
                    raise StoreError(f"{path}: folder is not empty and holds no store; use an empty folder")
                db = cls._init(path, meta, items, shard_items)
                store = cls(path, db, writable=True, lock=lock, journal=journal)
            store._repair(items)
            store._recover()
            return store
        except sqlite3.DatabaseError as err:
            _release(lock, exclusive=True)
            if db is not None:
                db.close()
            raise StoreError(f"{path}: the manifest {MANIFEST} is unreadable ({err}); use another output folder "
                             f"or --overwrite") from None
        except BaseException:
            _release(lock, exclusive=True)
            if db is not None:
                db.close()
            raise

    @staticmethod
    def _init(path: Path, meta: dict, items: Sequence[ItemRecord], shard_items: int) -> sqlite3.Connection:
        _write_manifest(path, meta,
                        [(i, it.item_id, int(it.label), it.split, i // shard_items, None, None, "pending", None)
                         for i, it in enumerate(items)],
                        [(k, shard_file(k), 0, "pending", None) for k in range(-(-len(items) // shard_items))])
        return Store._connect(path)

    @staticmethod
    def _check_resume(path: Path, db: sqlite3.Connection, meta: dict, items: Sequence[ItemRecord],
                      damaged: dict[int, str]) -> None:
        """Refuse to resume a store of other settings or items; the items of ``damaged`` shards are not compared
        (their rows are rewritten from ``items``)."""
        old = dict(db.execute("SELECT key, value FROM meta"))
        for key in ("kind", "dim", "dtype", "shard_items", "classes"):
            if old.get(key) != meta[key]:
                raise StoreError(f"{path}: existing store has {key}={old.get(key)}, this run {meta[key]}; "
                                 f"use another output folder or --overwrite")
        if old["config"] != meta["config"]:
            a, b = json.loads(old["config"]), json.loads(meta["config"])
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:4])
            raise StoreError(f"{path}: existing store was written with other settings ({shown}); "
                             f"use another output folder or --overwrite")
        rows = db.execute("SELECT item_id, label, split FROM items ORDER BY idx").fetchall()
        new = [(it.item_id, int(it.label), it.split) for it in items]
        shard_items = int(meta["shard_items"])
        differ = [i for i, (a, b) in enumerate(zip(rows, new)) if a != b and i // shard_items not in damaged]
        if differ or len(rows) != len(new):
            where = differ[0] if differ else min(len(rows), len(new))
            raise StoreError(f"{path}: existing store holds other items ({len(rows)} vs {len(new)}; first "
                             f"difference at item {where}); use another output folder or --overwrite")

    def _repair(self, items: Sequence[ItemRecord]) -> None:
        """Put the shards whose manifest rows changed back to pending, their items' rows rewritten from ``items``."""
        if not self._damaged:
            return
        with _transaction(self._db, self.path):
            for shard in self._damaged:
                lo = shard * self.shard_items
                self._db.executemany("UPDATE items SET item_id = ?, label = ?, split = ?, shard = ? WHERE idx = ?",
                                     ((it.item_id, int(it.label), it.split, shard, i)
                                      for i, it in enumerate(items[lo : lo + self.shard_items], start=lo)))
                self._reset(shard)
        self._damaged = {}

    def _reset(self, shard: int) -> None:
        """Put ``shard`` and its items back to pending (inside a transaction)."""
        self._db.execute("UPDATE shards SET file = ?, rows = 0, status = 'pending', sha256 = NULL WHERE shard = ?",
                         (shard_file(shard), shard))
        self._db.execute("UPDATE items SET status = 'pending', row = NULL, rows = NULL, error = NULL WHERE shard = ?",
                         (shard,))
        _reseal(self._db, shard, self.shard_items)

    def _recover(self) -> None:
        for tmp in (self.path / "shards").glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        self.absorb_journals()
        bad = []
        for shard, rows, sha256 in self._db.execute(
                "SELECT shard, rows, sha256 FROM shards WHERE status = 'done'").fetchall():
            if not self._shard_ok(self.path / shard_file(shard), rows, sha256):
                bad.append(shard)
        if bad:
            with _transaction(self._db, self.path):
                for shard in bad:
                    self._reset(shard)

    def _shard_ok(self, file: Path, rows: int, sha256: str | None = None) -> bool:
        """The shard file is whole: inside the store (not a link out), its shape and dtype, and its bytes against
        ``sha256`` when given."""
        if not file.resolve().is_relative_to(self.path.resolve()):
            return False
        try:
            arr = np.load(file, mmap_mode="r")
        except Exception:  # noqa: BLE001 - a damaged file raises many types (EOFError when empty, TokenError, ...)
            return False
        whole = arr.shape == (rows, self.dim) and arr.dtype == self.dtype
        return whole and (sha256 is None or file_sha256(file) == sha256)

    def close(self) -> None:
        """Close the store; the process that created it writes the manifest afresh when every shard is done."""
        try:
            if self._lock is not None and not self.pending_shards():
                self._rewrite_manifest()
        finally:
            self._db.close()
            if self._lock is not None:
                _release(self._lock, exclusive=True)
                self._lock = None
            if self._read_lock is not None:
                _release(self._read_lock, exclusive=False)
                self._read_lock = None

    def _rewrite_manifest(self) -> None:
        """The manifest written afresh from its rows (:func:`_write_manifest`): a run interrupted and resumed, or one
        whose shards were recorded in another order (under torchrun), ends with the bytes of an uninterrupted run."""
        meta = dict(self._db.execute("SELECT key, value FROM meta"))
        items = self._db.execute(f"SELECT {_ITEM_COLUMNS} FROM items ORDER BY idx").fetchall()
        shards = self._db.execute(f"SELECT {_SHARD_COLUMNS} FROM shards ORDER BY shard").fetchall()
        self._db.close()  # before the file is replaced
        _write_manifest(self.path, meta, items, shards)

    def __del__(self) -> None:
        if getattr(self, "_read_lock", None) is not None:
            _release(self._read_lock, exclusive=False)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    @property
    def num_shards(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM shards").fetchone()[0]

    def pending_shards(self) -> list[int]:
        """Shards still to compute, in order."""
        return [r[0] for r in self._db.execute("SELECT shard FROM shards WHERE status = 'pending' ORDER BY shard")]

    def items_of_shard(self, shard: int) -> list[tuple[int, str, int, str]]:
        """(idx, item_id, label, split) of the items of ``shard``, in order."""
        return self._db.execute("SELECT idx, item_id, label, split FROM items WHERE shard = ? ORDER BY idx",
                                (shard,)).fetchall()

    def redo(self, shards: Iterable[int]) -> None:
        """Put done shards back to pending with their items (their inputs changed, or they hold failed items)."""
        if not self.writable:
            raise StoreError(f"{self.path}: opened read-only")
        with _transaction(self._db, self.path):
            for shard in shards:
                self._reset(shard)

    def write_shard(self, shard: int, results: Iterable[ShardResult]) -> int:
        """Write shard ``shard`` from one result per item (in item order); returns its row count.

        The array file is written atomically first, then the shard and its items are marked
        in one transaction.
        """
        if not self.writable:
            raise StoreError(f"{self.path}: opened read-only")
        expected = [r[0] for r in self.items_of_shard(shard)]
        results = list(results)
        if [r.idx for r in results] != expected:
            raise ValueError(f"Store.write_shard: shard {shard} holds items {expected}, got {[r.idx for r in results]}")
        parts, updates, row = [], [], 0
        for r in results:
            if r.error is not None or r.array is None:
                updates.append((None, None, "failed", r.error or "no output", r.idx))
                continue
            arr = np.asarray(r.array)
            if arr.ndim == 1:
                arr = arr[None]
            if arr.ndim != 2 or arr.shape[1] != self.dim:
                raise ValueError(f"Store.write_shard: item {r.idx} has shape {arr.shape}, expected (rows, {self.dim})")
            parts.append(arr.astype(self.dtype, copy=False))
            updates.append((row, arr.shape[0], "done", None, r.idx))
            row += arr.shape[0]
        data = np.ascontiguousarray(np.concatenate(parts) if parts else np.zeros((0, self.dim), self.dtype))
        file = shard_file(shard)
        with atomic_open(self.path / file, "wb") as f:
            hw = _HashingWriter(f)
            np.lib.format.write_array(hw, data, allow_pickle=False)
        if self.journal:
            with atomic_open(self.path / shard_file(shard, ".journal.json"), "w") as f:
                entry = {"shard": shard, "rows": row, "sha256": hw.hash.hexdigest(), "items": updates}
                json.dump({**entry, "seal": _seal(entry)}, f)
        else:
            self._record(shard, row, hw.hash.hexdigest(), updates)
        return row

    def _record(self, shard: int, rows: int, sha256: str, updates: Sequence[Sequence]) -> None:
        with _transaction(self._db, self.path):
            self._db.executemany("UPDATE items SET row = ?, rows = ?, status = ?, error = ? WHERE idx = ?", updates)
            self._db.execute("UPDATE shards SET rows = ?, status = 'done', sha256 = ? WHERE shard = ?",
                             (rows, sha256, shard))
            _reseal(self._db, shard, self.shard_items)

    def absorb_journals(self) -> int:
        """Record the shards that other processes journaled (:meth:`join`) in the manifest; returns how many.

        A journal counts only when it is as written (its seal), its shard is pending, its shard
        file is whole with the rows and the sha256 it names, and its items' rows lay the shard out
        as ``write_shard`` does; any other journal (of a shard already done, unreadable,
        changed, or whose file is missing or damaged) is dropped: the shard stays pending and is
        recomputed.
        """
        if self._lock is None:
            raise StoreError(f"{self.path}: only the process that created the store records journals")
        count = 0
        for file in sorted((self.path / "shards").glob("shard-*.journal.json")):
            entry = self._journal_entry(file)
            if entry is not None:
                self._record(*entry)
                count += 1
            file.unlink()
        return count

    def _journal_entry(self, file: Path) -> tuple[int, int, str, list[tuple]] | None:
        """(shard, rows, sha256, item rows) of the journal ``file`` when it counts (:meth:`absorb_journals`)."""
        try:
            entry = json.loads(file.read_text())
            seal = entry.pop("seal")
            shard, rows, sha256 = entry["shard"], entry["rows"], entry["sha256"]
            updates = [tuple(u) for u in entry["items"]]
        except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or not a journal
            return None
        if seal != _seal(entry) or not (isinstance(shard, int) and isinstance(rows, int) and isinstance(sha256, str)) \
                or file.name != Path(shard_file(shard, ".journal.json")).name \
                or self._db.execute("SELECT status FROM shards WHERE shard = ?", (shard,)).fetchone() != ("pending",):
            return None
        if [u[4] if len(u) == 5 else None for u in updates] != [r[0] for r in self.items_of_shard(shard)]:
            return None
        at = 0  # write_shard's layout: done items' rows one after another from 0, failed items with an error only
        for row, n, status, error, _ in updates:
            if status == "done" and row == at and isinstance(n, int) and n >= 0 and error is None:
                at += n
            elif not (status == "failed" and row is None and n is None and isinstance(error, str)):
                return None
        if at != rows:
            return None
        return (shard, rows, sha256, updates) if self._shard_ok(self.path / shard_file(shard), rows, sha256) else None

    # ------------------------------------------------------------------ reading

    def summary(self) -> StoreSummary:
        counts = dict(self._db.execute("SELECT status, COUNT(*) FROM items GROUP BY status"))
        rows = self._db.execute("SELECT COALESCE(SUM(rows), 0) FROM items WHERE status = 'done'").fetchone()[0]
        shards = dict(self._db.execute("SELECT status, COUNT(*) FROM shards GROUP BY status"))
        return StoreSummary(items=sum(counts.values()), done=counts.get("done", 0), failed=counts.get("failed", 0),
                            pending=counts.get("pending", 0), rows=int(rows), shards_done=shards.get("done", 0),
                            shards=sum(shards.values()))

    def failures(self) -> list[tuple[str, str]]:
        """(item_id, error) of every failed item, in item order."""
        return self._db.execute("SELECT item_id, error FROM items WHERE status = 'failed' ORDER BY idx").fetchall()

    def items(self, status: str | None = None, split: str | None = None) -> list[dict]:
        """The manifest rows (as dicts), in item order, optionally filtered by status and split."""
        sql, args = "SELECT idx, item_id, label, split, shard, row, rows, status, error FROM items", []
        conds = []
        if status is not None:
            conds.append("status = ?")
            args.append(status)
        if split is not None:
            conds.append("split = ?")
            args.append(split)
        if conds:
            sql += " WHERE " + " AND ".join(conds)
        keys = ("idx", "item_id", "label", "split", "shard", "row", "rows", "status", "error")
        return [dict(zip(keys, r)) for r in self._db.execute(sql + " ORDER BY idx", args)]

    def fingerprint(self) -> str:
        """SHA-256 (hex) of what the store holds: its settings, items (ids, labels, splits, status, rows) and
        shards' checksums, from the manifest. A store rebuilt from changed inputs gets another one."""
        h = hashlib.sha256()
        for sql in ("SELECT key, value FROM meta WHERE key IN ('kind', 'dim', 'dtype', 'classes', 'config') "
                    "ORDER BY key",
                    "SELECT item_id, label, split, shard, row, rows, status FROM items ORDER BY idx",
                    "SELECT shard, rows, status, sha256 FROM shards ORDER BY shard"):
            for row in self._db.execute(sql):
                h.update(json.dumps(row).encode())
        return h.hexdigest()

    def splits(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT split FROM items ORDER BY split")]

    def _segments(self, rows: list[dict]) -> list[tuple[Path, int, int]]:
        segs: list[list] = []
        for r in rows:
            file = self.path / shard_file(r["shard"])
            if segs and segs[-1][0] == file and segs[-1][1] + segs[-1][2] == r["row"]:
                segs[-1][2] += r["rows"]
            else:
                segs.append([file, r["row"], r["rows"]])
        return [tuple(s) for s in segs]

    def _done(self, split: str | None) -> list[dict]:
        rows = self.items(status="done", split=split)
        if self.summary().pending:
            raise StoreError(f"{self.path}: the store is incomplete ({self.summary().line()}); "
                             f"rerun the command that writes it to finish it")
        return rows

    def _digests(self) -> dict[Path, str]:
        return {self._shard_path(shard): sha256 for shard, sha256 in
                self._db.execute("SELECT shard, sha256 FROM shards WHERE status = 'done'")}

    def _shard_path(self, shard: int) -> Path:
        """Shard ``shard``'s file; refused when it resolves outside the store (a link out of it)."""
        path = self.path / shard_file(shard)
        if not path.resolve().is_relative_to(self.path.resolve()):
            raise StoreError(f"{path}: leads outside the store (to {path.resolve()}); rerun the stage that wrote "
                             f"this store to recompute it in place")
        return path

    def shard_array(self, shard: int) -> np.ndarray:
        """The rows of one done shard, memory-mapped, its bytes checked against the manifest: (rows, dim)."""
        row = self._db.execute("SELECT sha256 FROM shards WHERE shard = ? AND status = 'done'", (shard,)).fetchone()
        if row is None:
            raise StoreError(f"{self.path}: shard {shard} is not done")
        return _checked_map(self._shard_path(shard), row[0])

    def array(self, split: str | None = None) -> ShardedArray:
        """All rows of the done items (optionally of one split), in item order: (N, dim)."""
        return ShardedArray(self._segments(self._done(split)), self.dim, self.dtype, self._digests())

    def sets(self, split: str | None = None) -> DescriptorSets:
        """The done items as :class:`~fvvae_fast.DescriptorSets` (x memory-mapped, offsets, labels)."""
        rows = self._done(split)
        counts = np.array([r["rows"] for r in rows], dtype=np.int64)
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
        labels = torch.tensor([r["label"] for r in rows], dtype=torch.int64)
        origin = {"kind": descriptor_kind(self.config), "what": describe(self.config), "store": str(self.path)}
        x = ShardedArray(self._segments(rows), self.dim, self.dtype, self._digests(), origin)
        return DescriptorSets(x, offsets, labels)

    def vectors(self, split: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """One row per item (a Fisher-vector store): X (S, D), labels y (S,), item ids, for scikit-learn.

        X is the memory map itself when the rows are one whole shard, else an in-memory copy.
        """
        rows = self._done(split)
        if any(r["rows"] != 1 for r in rows):
            raise StoreError(f"{self.path}: holds sets of several rows per item ({self.kind}), not one vector per item")
        X = ShardedArray(self._segments(rows), self.dim, self.dtype, self._digests()).as_array()
        return X, np.array([r["label"] for r in rows], dtype=np.int64), [r["item_id"] for r in rows]


def item_records(items: Iterable[Any]) -> list[ItemRecord]:
    """ItemRecords from anything with ``id``/``item_id``, ``label`` and ``split`` attributes."""
    out = []
    for it in items:
        item_id = getattr(it, "item_id", None) or it.id
        label, split = int(getattr(it, "label", -1)), str(getattr(it, "split", ""))
        out.append(ItemRecord(item_id=str(item_id), label=label, split=split))
    return out
