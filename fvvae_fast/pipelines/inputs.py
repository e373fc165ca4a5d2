"""What the descriptor stage read: each item's input file (size, modification time, SHA-256), or for
precomputed arrays the SHA-256 of its rows, recorded beside each shard (``shards/shard-NNNNN.inputs.json``)
before the shard is written. A rerun redoes the done shards whose items' inputs changed, and those
holding failed items (an unreadable file may have been fixed): see :func:`stale_shards`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..io import atomic_open, file_sha256
from ..store import Store, shard_file
from .datasets import Item

SUFFIX = ".inputs.json"
Signature = list | None  # [size, mtime_ns, sha256] of a file, ["rows", sha256] of precomputed rows, None: no file


class Signer:
    """Signatures of items' inputs; a file shared by several items (ten crops) is hashed once."""

    def __init__(self, source) -> None:
        self.source = source
        self._hashes: dict[tuple[str, int, int], str] = {}

    def __call__(self, item: Item) -> Signature:
        if getattr(self.source, "arrays", None) is not None:
            return ["rows", hashlib.sha256(self.source.load(item).numpy().tobytes()).hexdigest()]
        path = Path(item.path)
        try:
            st = path.stat()
        except OSError:
            return None
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = file_sha256(path)
        return [st.st_size, st.st_mtime_ns, self._hashes[key]]

    def same(self, item: Item, recorded: Signature) -> bool:
        """Whether ``item``'s input still has the ``recorded`` contents (a file whose size and time are as
        recorded is not read again)."""
        if recorded is None or getattr(self.source, "arrays", None) is not None:
            return self(item) == recorded
        try:
            st = Path(item.path).stat()
        except OSError:
            return False
        if [st.st_size, st.st_mtime_ns] == recorded[:2]:
            return True
        now = self(item)
        return now is not None and now[2] == recorded[2]


def record(store: Store, shard: int, signatures: dict[str, Signature]) -> None:
    """Write the signatures of a shard's items (item id -> signature), atomically."""
    with atomic_open(store.path / shard_file(shard, SUFFIX), "w") as f:
        json.dump(signatures, f)


def _recorded(store: Store, shard: int) -> dict | None:
    try:
        data = json.loads((store.path / shard_file(shard, SUFFIX)).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stale_shards(store: Store, signer: Signer, items: dict[str, Item]) -> list[int]:
    """The done shards to redo: one of their items failed, or its input changed since the shard was written.
    A done shard without a readable record (a store of an earlier version) is taken as it is, and its
    items' current signatures recorded."""
    by_shard: dict[int, list[dict]] = {}
    for row in store.items():
        by_shard.setdefault(row["shard"], []).append(row)
    stale = []
    for shard, rows in sorted(by_shard.items()):
        if any(r["status"] == "pending" for r in rows):
            continue
        if any(r["status"] == "failed" for r in rows):
            stale.append(shard)
            continue
        recorded = _recorded(store, shard)
        if recorded is None:
            record(store, shard, {r["item_id"]: signer(items[r["item_id"]]) for r in rows})
        elif not all(signer.same(items[r["item_id"]], recorded.get(r["item_id"])) for r in rows):
            stale.append(shard)
    return stale
