"""The manifest of a store (:mod:`fvvae_fast.store`): its SQLite schema, the seals that show whether its rows
changed since they were written, writing it whole, transactions on it, and the store's lock."""

from __future__ import annotations

import contextlib
import errno
import filecmp
import hashlib
import json
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UserError
from .io import try_lock

MANIFEST = "manifest.sqlite"

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
    idx INTEGER PRIMARY KEY,
    item_id TEXT NOT NULL UNIQUE,
    label INTEGER NOT NULL,
    split TEXT NOT NULL,
    shard INTEGER NOT NULL,
    row INTEGER,
    rows INTEGER,
    status TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed')),
    error TEXT
);
CREATE INDEX items_shard ON items (shard);
CREATE TABLE shards (
    shard INTEGER PRIMARY KEY,
    file TEXT NOT NULL,
    rows INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'done')),
    sha256 TEXT,
    seal TEXT NOT NULL
);
"""
_ITEM_COLUMNS = "idx, item_id, label, split, shard, row, rows, status, error"
_SHARD_COLUMNS = "shard, file, rows, status, sha256"


class StoreError(UserError, ValueError):
    """A store that cannot be used as asked (wrong kind, other configuration, locked, damaged)."""


def shard_file(shard: int, suffix: str = ".npy") -> str:
    """The path of shard ``shard``'s array (or, with ``suffix='.journal.json'``, its journal) in a store."""
    return f"shards/shard-{shard:05d}{suffix}"


def _seal(*values: Any) -> str:
    """SHA-256 of manifest values (as JSON): recorded beside them, it shows whether they changed since."""
    return hashlib.sha256(json.dumps(values, separators=(",", ":")).encode()).hexdigest()


def _meta_seal(meta: dict[str, str], items: int, shards: int) -> str:
    return _seal(sorted((k, v) for k, v in meta.items() if k != "seal"), items, shards)


def _shard_seal(db: sqlite3.Connection, shard: int, shard_items: int) -> str:
    """The seal of shard ``shard``'s row and of the rows of the items it holds, as they are now."""
    row = db.execute(f"SELECT {_SHARD_COLUMNS} FROM shards WHERE shard = ?", (shard,)).fetchone()
    items = db.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE idx >= ? AND idx < ? ORDER BY idx",
                       (shard * shard_items, (shard + 1) * shard_items)).fetchall()
    return _seal(row, items)


def _reseal(db: sqlite3.Connection, shard: int, shard_items: int) -> None:
    db.execute("UPDATE shards SET seal = ? WHERE shard = ?", (_shard_seal(db, shard, shard_items), shard))


def _check_manifest(db: sqlite3.Connection, path: Path, meta: dict[str, str]) -> dict[int, str]:
    """The shards whose manifest rows changed since they were written, each with why; a StoreError when the
    rest changed (the settings, the numbers of items or shards), which no rerun can tell how to repair."""
    items, first, last = db.execute("SELECT COUNT(*), MIN(idx), MAX(idx) FROM items").fetchone()
    shards = db.execute("SELECT shard, file, seal FROM shards ORDER BY shard").fetchall()
    if meta.get("seal") != _meta_seal(meta, items, len(shards)) or (items and (first, last) != (0, items - 1)) \
            or [s[0] for s in shards] != list(range(len(shards))):
        raise StoreError(f"{path}: the manifest {MANIFEST} is damaged (its settings or its numbers of items or "
                         f"shards changed after it was written); rerun the stage that wrote it with --overwrite")
    damaged = {}
    for shard, file, seal in shards:
        if file != shard_file(shard):
            damaged[shard] = f"its file is {file!r}, not {shard_file(shard)}"
        elif seal != _shard_seal(db, shard, int(meta["shard_items"])):
            damaged[shard] = "its rows changed after they were written: checksum mismatch"
    return damaged


def _write_manifest(path: Path, meta: dict[str, str], items: Sequence[Sequence], shards: Sequence[Sequence]) -> None:
    """Write the manifest of a store from its rows (``_ITEM_COLUMNS``, ``_SHARD_COLUMNS``), sealed, into a new file
    and put that in place atomically, unless the manifest there has the same bytes. The same rows give the same
    bytes, whatever the history of the store."""
    tmp = path / f".{MANIFEST}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            # a private file until it is renamed into place: no rollback journal and no sync per statement, one
            # fsync below (a failure leaves a temporary file, removed, and the old manifest)
            db.execute("PRAGMA journal_mode = OFF")
            db.execute("PRAGMA synchronous = OFF")
            db.executescript(_SCHEMA)
            with _transaction(db, path):
                db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", items)
                db.executemany("INSERT INTO shards VALUES (?, ?, ?, ?, ?, '')", shards)
                for shard in range(len(shards)):
                    _reseal(db, shard, int(meta["shard_items"]))
                meta = {**meta, "seal": _meta_seal(meta, len(items), len(shards))}
                db.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
        finally:
            db.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if (path / MANIFEST).is_file() and filecmp.cmp(tmp, path / MANIFEST, shallow=False):
            tmp.unlink()
        else:
            os.replace(tmp, path / MANIFEST)  # the manifest appears whole or not at all
    except sqlite3.OperationalError as err:  # the schema's statements, outside the transaction
        raise _unwritable(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)


def _unwritable(path: Path, err: sqlite3.OperationalError) -> StoreError:
    return StoreError(f"{path}: could not write the manifest {MANIFEST} ({err}); the store keeps its last recorded "
                      f"state, and rerunning the stage resumes it")


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection, path: Path):
    """One transaction on the manifest of the store at ``path``: all of it or, on any error, none of it. A full
    disk (or another failure to write) is one StoreError."""
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.rollback()
            raise
        db.commit()
    except sqlite3.OperationalError as err:
        if db.in_transaction:
            db.rollback()
        raise _unwritable(path, err) from None


class _LockFile:
    """A store's ``lock`` file as this process holds it. Writers hold it exclusively, readers shared, so
    that no writer changes a store under a reader of another process. POSIX record locks belong to a
    process (a second descriptor would convert or drop the lock), so each process keeps one descriptor
    per store and counts its own readers and writer. Forked DataLoader workers do not inherit the lock,
    and it is released the moment the process dies (even by SIGKILL)."""

    def __init__(self, path: Path) -> None:
        self.readers, self.writer = 0, False
        try:
            self.f = open(path / "lock", "a+")
        except OSError as err:  # another user's store, or read-only media: a shared lock needs only reading
            if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            self.f = open(path / "lock")

    def lock(self, exclusive: bool) -> bool:
        """Take the lock without waiting; False when another process holds it."""
        return try_lock(self.f, exclusive)


_LOCKS: dict[str, _LockFile] = {}  # real path of a store -> this process's hold on it


def _acquire(path: Path, exclusive: bool) -> str:
    key = os.path.realpath(path)
    held = _LOCKS.get(key)
    if held is not None and held.writer and exclusive:
        raise StoreError(f"{path}: the store is already open for writing in this process")
    if held is None:
        try:
            held = _LockFile(path)
        except FileNotFoundError:  # a read-only folder without a lock file: nothing can write it either
            return key
    if held.readers == 0 and not held.writer or exclusive:
        if not held.lock(exclusive):
            busy = "read" if exclusive and held.lock(False) else "written"
            if held.readers == 0 and not held.writer:
                held.f.close()
            raise StoreError(f"{path}: the store is being {busy} by another process (lock held)")
    _LOCKS[key] = held
    held.writer |= exclusive
    held.readers += not exclusive
    return key


def _release(key: str, exclusive: bool) -> None:
    held = _LOCKS.get(key)
    if held is None:
        return
    if exclusive:
        held.writer = False
    else:
        held.readers -= 1
    if not held.writer and held.readers == 0:
        del _LOCKS[key]
        held.f.close()
    elif exclusive:
        held.lock(False)  # this process's readers keep the store from other writers
