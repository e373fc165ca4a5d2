"""The sharded store: write, resume, recover, read (memory maps, DescriptorSets, plain NumPy + sqlite3); a damaged
manifest, shard or journal, read-only media and a full disk."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fvvae_fast.sets import DescriptorSets
from fvvae_fast.store import ItemRecord, ShardedArray, ShardResult, Store, StoreError

DIM = 3


def records(n: int) -> list[ItemRecord]:
    return [ItemRecord(f"item{i}", label=i % 2, split="train" if i % 3 else "test") for i in range(n)]


def item_array(i: int) -> np.ndarray:
    rows = 1 + i % 3
    return (np.arange(rows * DIM, dtype=np.float32).reshape(rows, DIM) + 100 * i).astype(np.float32)


def fill(store: Store, fail: set[int] = frozenset(), shards=None) -> None:
    for shard in shards if shards is not None else store.pending_shards():
        results = []
        for idx, *_ in store.items_of_shard(shard):
            if idx in fail:
                results.append(ShardResult(idx, error=f"broken {idx}"))
            else:
                results.append(ShardResult(idx, array=item_array(idx)))
        store.write_shard(shard, results)


def make(tmp_path, n=7, shard_items=3, **kw) -> Store:
    return Store.create(tmp_path / "s", kind="descriptors", dim=DIM, items=records(n), classes=["a", "b"],
                        shard_items=shard_items, config={"x": 1}, **kw)


def test_write_and_read_back(tmp_path):
    with make(tmp_path) as store:
        assert store.pending_shards() == [0, 1, 2]
        fill(store, fail={4})
        s = store.summary()
        assert (s.items, s.done, s.failed, s.pending, s.shards_done, s.shards) == (7, 6, 1, 0, 3, 3)
        assert store.failures() == [("item4", "broken 4")]
    store = Store.open(tmp_path / "s", kind="descriptors")
    sets = store.sets()
    assert isinstance(sets, DescriptorSets) and len(sets) == 6
    expected = [item_array(i) for i in range(7) if i != 4]
    for k, arr in enumerate(expected):
        a, b = int(sets.offsets[k]), int(sets.offsets[k + 1])
        np.testing.assert_array_equal(sets.x[a:b], arr)
    assert sets.labels.tolist() == [i % 2 for i in range(7) if i != 4]
    assert store.classes == ["a", "b"] and store.config == {"x": 1}


def test_plain_numpy_and_sqlite_recipe(tmp_path):
    with make(tmp_path) as store:
        fill(store)
    root = tmp_path / "s"
    db = sqlite3.connect(root / "manifest.sqlite")
    got = {}
    for item_id, label, shard, row, rows in db.execute(
            "SELECT item_id, label, shard, row, rows FROM items WHERE status = 'done' ORDER BY idx"):
        got[item_id] = np.load(root / f"shards/shard-{shard:05d}.npy", mmap_mode="r")[row : row + rows]
    assert len(got) == 7
    for i in range(7):
        np.testing.assert_array_equal(got[f"item{i}"], item_array(i))


def test_splits_interleaved(tmp_path):
    with make(tmp_path) as store:
        fill(store)
        train = store.sets("train")
        test = store.sets("test")
    train_ids = [i for i in range(7) if i % 3]
    assert len(train) == len(train_ids) and len(test) == 7 - len(train_ids)
    np.testing.assert_array_equal(np.asarray(train.x), np.concatenate([item_array(i) for i in train_ids]))


def test_sharded_array_indexing_and_gather(tmp_path):
    with make(tmp_path) as store:
        fill(store)
        x = store.array()
    full = np.concatenate([item_array(i) for i in range(7)])
    assert isinstance(x, ShardedArray) and x.shape == full.shape and x.ndim == 2 and len(x) == len(full)
    np.testing.assert_array_equal(np.asarray(x), full)
    np.testing.assert_array_equal(x[3], full[3])
    np.testing.assert_array_equal(x[-1], full[-1])
    np.testing.assert_array_equal(x[2:9:2], full[2:9:2])
    idx = np.array([11, 0, 5, 5])
    np.testing.assert_array_equal(x[idx], full[idx])
    np.testing.assert_array_equal(x[torch.tensor(idx)], full[idx])
    np.testing.assert_array_equal(x[full[:, 0] > 300], full[full[:, 0] > 300])
    np.testing.assert_array_equal(x[1:4, 1], full[1:4, 1])
    with pytest.raises(IndexError):
        x[np.array([len(full)])]
    sets = DescriptorSets(x, torch.tensor([0, 1, 3, len(full)]))
    xb, off, owner = sets.gather(torch.tensor([2, 0]))
    np.testing.assert_array_equal(xb.numpy(), np.concatenate([full[3:], full[:1]]))


def test_vectors_one_row_per_item(tmp_path):
    store = Store.create(tmp_path / "fv", kind="fisher", dim=4, items=records(5), shard_items=10)
    store.write_shard(0, [ShardResult(i, array=np.full(4, i, np.float32)) for i in range(5)])
    X, y, ids = store.vectors()
    assert isinstance(X, np.memmap) and X.shape == (5, 4)  # one whole shard: the memory map itself
    assert y.tolist() == [0, 1, 0, 1, 0] and ids[2] == "item2"
    X_train, _, _ = store.vectors("train")
    np.testing.assert_array_equal(X_train[:, 0], [1, 2, 4])
    store.close()


def test_resume_only_pending_shards_and_identical_bytes(tmp_path):
    with make(tmp_path) as store:
        fill(store, shards=[0])
    first = (tmp_path / "s/shards/shard-00000.npy").read_bytes()
    with make(tmp_path) as store:
        assert store.pending_shards() == [1, 2]
        fill(store)
    with make(tmp_path / "again") as other:
        fill(other)
    for k in range(3):
        a = (tmp_path / f"s/shards/shard-{k:05d}.npy").read_bytes()
        assert a == (tmp_path / f"again/s/shards/shard-{k:05d}.npy").read_bytes()
    assert first == (tmp_path / "s/shards/shard-00000.npy").read_bytes()


def test_recover_missing_or_damaged_shard_and_stale_temp(tmp_path):
    with make(tmp_path) as store:
        fill(store)
    (tmp_path / "s/shards/shard-00001.npy").unlink()
    (tmp_path / "s/shards/shard-00002.npy").write_bytes(b"\x93NUMPY garbage")
    (tmp_path / "s/shards/.shard-00000.npy.abc.tmp").write_bytes(b"half")
    with make(tmp_path) as store:
        assert store.pending_shards() == [1, 2]
        assert not list((tmp_path / "s/shards").glob(".*.tmp"))
        assert store.summary().pending == 7 - 3
        with pytest.raises(StoreError, match="incomplete"):
            store.sets()


def test_resume_refuses_other_settings_or_items(tmp_path):
    make(tmp_path).close()
    with pytest.raises(StoreError, match=r"other settings \(x: 1 -> 2\)"):
        Store.create(tmp_path / "s", kind="descriptors", dim=DIM, items=records(7), classes=["a", "b"],
                     shard_items=3, config={"x": 2})
    with pytest.raises(StoreError, match="dim"):
        Store.create(tmp_path / "s", kind="descriptors", dim=5, items=records(7), classes=["a", "b"],
                     shard_items=3, config={"x": 1})
    with pytest.raises(StoreError, match="other items"):
        make(tmp_path, n=8)
    make(tmp_path, n=8, overwrite=True).close()  # --overwrite starts again
    assert Store.open(tmp_path / "s").summary().items == 8


def test_lock_and_read_only(tmp_path):
    store = make(tmp_path)
    with pytest.raises(StoreError, match="already open for writing"):
        make(tmp_path)
    store.close()
    reader = Store.open(tmp_path / "s")
    with pytest.raises(StoreError, match="read-only"):
        reader.write_shard(0, [])


def test_refuses_non_store_folders(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        make(tmp_path)
    with pytest.raises(StoreError, match="not a store"):
        make(tmp_path, overwrite=True)
    with pytest.raises(FileNotFoundError, match="not a store"):
        Store.open(tmp_path / "s")


def test_write_shard_checks(tmp_path):
    with make(tmp_path) as store:
        with pytest.raises(ValueError, match="holds items"):
            store.write_shard(0, [ShardResult(0, array=item_array(0))])
        with pytest.raises(ValueError, match="expected"):
            store.write_shard(0, [ShardResult(i, array=np.zeros((1, DIM + 1))) for i in range(3)])
        store.write_shard(0, [ShardResult(i, error="x") for i in range(3)])  # all failed: an empty shard
        assert np.load(tmp_path / "s/shards/shard-00000.npy").shape == (0, DIM)


@pytest.mark.parametrize("who", ["writer", "reader"])
def test_a_store_is_not_written_while_another_process_reads_or_writes_it(tmp_path, who):
    import subprocess
    import sys

    make(tmp_path).close()
    code = "make(root)" if who == "writer" else "Store.open(root / 's')"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from tests.test_store import make, "
         f"Store; root = Path(sys.argv[1]); h = {code}; print('held', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreError, match=f"being {'written' if who == 'writer' else 'read'} by another process"):
            make(tmp_path)
        if who == "writer":
            with pytest.raises(StoreError, match="being written by another process"):
                Store.open(tmp_path / "s")
        else:
            Store.open(tmp_path / "s").close()  # readers share
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    make(tmp_path).close()  # the lock went with the process


def test_readers_and_a_writer_in_one_process_keep_the_lock(tmp_path):
    """POSIX locks belong to the process: closing a reader must not drop the writer's lock, and the
    process's readers keep other writers out after its writer closes."""
    import subprocess
    import sys

    def other(code: str) -> str:  # what another process gets
        script = ("import sys; from pathlib import Path; from tests.test_store import make, Store; "
                  f"root = Path(sys.argv[1])\ntry:\n    {code}.close(); print('ok')\n"
                  "except Exception as err:\n    print(err)")
        return subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                              check=True).stdout

    writer = make(tmp_path)
    Store.open(tmp_path / "s").close()
    assert "being written by another process" in other("Store.open(root / 's')")
    reader = Store.open(tmp_path / "s")
    writer.close()
    assert "being read by another process" in other("make(root)")
    assert other("Store.open(root / 's')").strip() == "ok"
    reader.close()
    assert other("make(root)").strip() == "ok"


def test_unreadable_manifest_is_a_store_error(tmp_path):
    make(tmp_path).close()
    (tmp_path / "s" / "manifest.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="manifest.sqlite is unreadable"):
        Store.open(tmp_path / "s")
    with pytest.raises(StoreError, match="unreadable"):
        make(tmp_path)
    make(tmp_path, overwrite=True).close()  # --overwrite replaces it
    assert Store.open(tmp_path / "s").summary().items == 7


def _flip_a_value(path) -> None:
    """Change one float of a shard in place, keeping its shape: only the checksum can tell."""
    arr = np.load(path, mmap_mode="r+")
    arr[0, 0] += 1.0
    arr.flush()
    del arr


def test_a_changed_shard_is_refused_by_readers_and_recomputed_by_the_writer(tmp_path):
    with make(tmp_path) as store:
        fill(store)
    _flip_a_value(tmp_path / "s/shards/shard-00001.npy")
    store = Store.open(tmp_path / "s", kind="descriptors")
    sets = store.sets()
    np.testing.assert_array_equal(sets.x[0:1], item_array(0)[:1])  # an intact shard reads as before
    with pytest.raises(StoreError, match=r"shard-00001.npy: checksum mismatch"):
        sets.x[int(sets.offsets[3])]  # item 3: the first of shard 1
    with pytest.raises(StoreError, match="checksum mismatch"):
        store.shard_array(1)
    with pytest.raises(StoreError, match="checksum mismatch"):
        np.asarray(store.array())
    with make(tmp_path) as writer:  # the writer stage, rerun: the changed shard is pending again
        assert writer.pending_shards() == [1]
        fill(writer)
    sets = Store.open(tmp_path / "s", kind="descriptors").sets()
    a, b = int(sets.offsets[3]), int(sets.offsets[4])
    np.testing.assert_array_equal(sets.x[a:b], item_array(3))


def _clean_manifest(tmp_path) -> bytes:
    """The manifest of the store ``make`` + ``fill`` writes in one uninterrupted run."""
    with make(tmp_path / "clean") as store:
        fill(store)
    return (tmp_path / "clean/s/manifest.sqlite").read_bytes()


def _sql(tmp_path, *statements: str) -> None:
    db = sqlite3.connect(tmp_path / "s/manifest.sqlite", isolation_level=None)
    for sql in statements:
        db.execute(sql)
    db.close()


MANIFEST_DAMAGE = {
    "label": "UPDATE items SET label = 1 - label WHERE idx = 4",
    "rows": "UPDATE items SET rows = rows - 1 WHERE idx = 4",
    "split": "UPDATE items SET split = 'train' WHERE idx = 3",
    "null-sha256": "UPDATE shards SET sha256 = NULL WHERE shard = 1",
    "file-outside": "UPDATE shards SET file = '../../elsewhere.npy' WHERE shard = 1",
    "absolute-file": "UPDATE shards SET file = '/tmp/elsewhere.npy' WHERE shard = 1",
    "item-moved": "UPDATE items SET shard = 2 WHERE idx = 5",
}


@pytest.mark.parametrize("damage", MANIFEST_DAMAGE)
def test_a_changed_manifest_row_is_refused_and_the_rerun_recomputes_its_shard(tmp_path, damage):
    clean = _clean_manifest(tmp_path)
    with make(tmp_path) as store:
        fill(store)
    np.save(tmp_path / "elsewhere.npy", np.load(tmp_path / "s/shards/shard-00001.npy"))  # a reader must not go there
    _sql(tmp_path, MANIFEST_DAMAGE[damage])
    with pytest.raises(StoreError, match="manifest's record of shard 1 is damaged.*rerun the stage"):
        Store.open(tmp_path / "s")
    with make(tmp_path) as store:  # the writer stage, rerun: the shard is recomputed, its items from the run's list
        assert store.pending_shards() == [1]
        fill(store)
    assert (tmp_path / "s/manifest.sqlite").read_bytes() == clean


def test_a_shard_file_outside_the_store_is_refused_even_with_a_matching_checksum(tmp_path):
    """The confinement of shard files does not rest on the checksums, which anyone can recompute."""
    from fvvae_fast.store_manifest import _reseal

    with make(tmp_path) as store:
        fill(store)
    _sql(tmp_path, "UPDATE shards SET file = '../../elsewhere.npy' WHERE shard = 1")
    db = sqlite3.connect(tmp_path / "s/manifest.sqlite", isolation_level=None)
    _reseal(db, 1, 3)
    db.close()
    with pytest.raises(StoreError, match=r"shard 1 is damaged \(its file is '../../elsewhere.npy'"):
        Store.open(tmp_path / "s")


def test_a_shard_linked_out_of_the_store_is_refused_and_the_rerun_writes_it_in_place(tmp_path):
    with make(tmp_path) as store:
        fill(store)
    shard = tmp_path / "s/shards/shard-00001.npy"
    outside = tmp_path / "elsewhere.npy"
    shard.rename(outside)
    shard.symlink_to(outside)  # the same bytes: the checksum alone would pass it
    store = Store.open(tmp_path / "s")
    with pytest.raises(StoreError, match="shard-00001.npy: leads outside the store"):
        store.sets()
    with pytest.raises(StoreError, match="leads outside the store"):
        store.shard_array(1)
    store.close()
    with make(tmp_path) as writer:
        assert writer.pending_shards() == [1]
        fill(writer)
    assert not shard.is_symlink()
    Store.open(tmp_path / "s").sets()


@pytest.mark.parametrize("damage", ["UPDATE meta SET value = '[\"b\", \"a\"]' WHERE key = 'classes'",
                                    "UPDATE meta SET value = '{\"x\": 2}' WHERE key = 'config'",
                                    "DELETE FROM items WHERE idx = 6"])
def test_changed_settings_or_item_count_are_refused_with_what_to_do(tmp_path, damage):
    with make(tmp_path) as store:
        fill(store)
    _sql(tmp_path, damage)
    with pytest.raises(StoreError, match="manifest.sqlite is damaged.*with --overwrite"):
        Store.open(tmp_path / "s")
    with pytest.raises(StoreError, match="manifest.sqlite is damaged.*with --overwrite"):
        make(tmp_path)
    make(tmp_path, overwrite=True).close()
    assert Store.open(tmp_path / "s").summary().pending == 7


@pytest.mark.parametrize("damage", ["empty", "header"])
def test_the_rerun_recomputes_a_damaged_shard_file(tmp_path, damage):
    with make(tmp_path) as store:
        fill(store)
    shard = tmp_path / "s/shards/shard-00001.npy"
    data = shard.read_bytes()
    shard.write_bytes(b"" if damage == "empty" else data.replace(b"'shape': (", b"'shape': (("))  # EOFError, TokenError
    with pytest.raises(StoreError, match="checksum mismatch"):
        Store.open(tmp_path / "s").shard_array(1)
    with make(tmp_path) as store:
        assert store.pending_shards() == [1]
        fill(store)
    assert shard.read_bytes() == data


def _journaled(tmp_path) -> Path:
    """A store whose shard 0 was written by another rank: its journal, not yet recorded."""
    store = make(tmp_path, journal=True)
    fill(store, shards=[0])
    store.close()
    return tmp_path / "s/shards/shard-00000.journal.json"


def _overlapping_sets(text: str, reseal: bool = False) -> str:
    """Item 1's rows start inside item 0's; ``reseal``: with the journal's seal recomputed (a crafted journal)."""
    from fvvae_fast.store_manifest import _seal

    entry = json.loads(text)
    entry["items"][1][0] -= 1
    if reseal:
        entry.pop("seal")
        entry["seal"] = _seal(entry)
    return json.dumps(entry)


JOURNAL_DAMAGE = {
    "garbage": lambda text: "\x00{not json",
    "not-a-dict": lambda text: "[]",
    "overlapping-sets": _overlapping_sets,
    "overlapping-sets-resealed": lambda text: _overlapping_sets(text, reseal=True),
    "other-sha256": lambda text: text.replace('"sha256": "', '"sha256": "0'),
}


@pytest.mark.parametrize("damage", JOURNAL_DAMAGE)
def test_a_damaged_journal_is_dropped_and_its_shard_recomputed(tmp_path, damage):
    journal = _journaled(tmp_path)
    journal.write_text(JOURNAL_DAMAGE[damage](journal.read_text()))
    with make(tmp_path) as store:
        assert store.pending_shards() == [0, 1, 2]
        fill(store)
    assert not journal.exists()
    assert (tmp_path / "s/manifest.sqlite").read_bytes() == _clean_manifest(tmp_path)


def test_an_intact_journal_is_recorded(tmp_path):
    journal = _journaled(tmp_path)
    with make(tmp_path) as store:
        assert store.pending_shards() == [1, 2] and not journal.exists()
        fill(store)
    assert (tmp_path / "s/manifest.sqlite").read_bytes() == _clean_manifest(tmp_path)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_store_on_read_only_media_is_read_under_a_shared_lock(tmp_path, monkeypatch, code):
    """Opening the lock file for writing fails there (root ignores chmod, so the failure is made here); the
    reader takes its shared lock through a read-only descriptor, which still keeps writers out."""
    import builtins

    from fvvae_fast import store_manifest

    with make(tmp_path) as store:
        fill(store)

    def read_only(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            raise OSError(code, os.strerror(code), str(file))
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(store_manifest, "open", read_only, raising=False)
    reader = Store.open(tmp_path / "s")
    np.testing.assert_array_equal(reader.sets().x[:1], item_array(0)[:1])
    script = ("import sys; from pathlib import Path; from tests.test_store import make\n"
              "try:\n    make(Path(sys.argv[1]))\nexcept Exception as err:\n    print(err)")
    other = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    assert "being read by another process" in other.stdout
    reader.close()
    (tmp_path / "s/lock").unlink()  # read-only media without a lock file: nothing can write there, read without one
    Store.open(tmp_path / "s").sets().x[:1]


@pytest.mark.skipif(shutil.which("unshare") is None or subprocess.run(
    ["unshare", "-rm", "true"], capture_output=True).returncode != 0, reason="needs unprivileged mount namespaces")
def test_a_store_on_a_read_only_mount_is_read(tmp_path):
    with make(tmp_path) as store:
        fill(store)
    root = tmp_path / "s"
    read = ("import sys; from fvvae_fast.store import Store; s = Store.open(sys.argv[1]); s.sets().x[:]; "
            "print(s.summary().line())")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" '
                           '&& ! touch "$1/x" 2>/dev/null && exec "$2" -c "$3" "$1"', "sh", str(root), sys.executable,
                           read], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "7 done" in done.stdout


class _FullDisk(sqlite3.Connection):
    def commit(self) -> None:
        raise sqlite3.OperationalError("database or disk is full")


@pytest.mark.parametrize("when", ["record", "rewrite"])
def test_a_full_disk_at_the_manifest_commit_is_one_error_and_leaves_the_store_as_it_was(tmp_path, monkeypatch, when):
    """'record': the commit of a shard's rows; 'rewrite': that of the manifest written afresh once all are done."""
    with make(tmp_path) as store:
        fill(store, shards=[0])
    before = (tmp_path / "s/manifest.sqlite").read_bytes()
    connect = sqlite3.connect
    full = "manifest.sqlite" if when == "record" else ".manifest.sqlite.tmp"
    monkeypatch.setattr(sqlite3, "connect", lambda file, *a, **k: connect(
        file, *a, **k, **({"factory": _FullDisk} if str(file).endswith(full) else {})))
    store = make(tmp_path)
    with pytest.raises(StoreError, match=r"could not write the manifest manifest.sqlite \(database or disk is full\)"):
        fill(store)
        store.close()
    store.close()
    monkeypatch.undo()
    if when == "record":
        assert (tmp_path / "s/manifest.sqlite").read_bytes() == before
        assert Store.open(tmp_path / "s").summary().shards_done == 1
    else:
        assert not (tmp_path / "s/.manifest.sqlite.tmp").exists()
        Store.open(tmp_path / "s").sets()  # complete, recorded shard by shard
    with make(tmp_path) as store:
        fill(store)
    assert (tmp_path / "s/manifest.sqlite").read_bytes() == _clean_manifest(tmp_path)
