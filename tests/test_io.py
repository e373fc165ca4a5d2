"""Atomic writes: the file appears whole, with the permissions of any new file (umask), not 0600; a full disk is
one error naming the file, the old file kept; an output written by one process at a time."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import stat
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from fvvae_fast import io as fvvae_io
from fvvae_fast.io import FileError, atomic_open, atomic_torch_save, output_lock


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_open(tmp_path / "a.txt", "w") as f:
            f.write("x")
        atomic_torch_save({"k": 1}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
    assert (tmp_path / "a.txt").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.pt"]


def test_a_failed_write_leaves_the_old_file(tmp_path):
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_open(tmp_path / "a.txt", "w") as f:
        f.write("new")
        raise RuntimeError("crash")
    assert (tmp_path / "a.txt").read_text() == "old" and len(list(tmp_path.iterdir())) == 1


class _NoSpace(io.RawIOBase):
    """A file descriptor on a disk with ``free`` bytes left: then every write fails with ``code``, as the OS does."""

    def __init__(self, fd: int, free: int, code: int) -> None:
        self.fd, self.free, self.code = fd, free, code

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def write(self, data) -> int:
        if self.free == 0:
            raise OSError(self.code, os.strerror(self.code))
        n = os.write(self.fd, bytes(data)[: self.free])
        self.free -= n
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


@pytest.fixture
def full_disk(monkeypatch):
    """full_disk(free, code): from now on the package's atomic writes find ``free`` bytes left on the disk."""

    def fill(free: int = 100, code: int = errno.ENOSPC) -> None:
        def fdopen(fd, mode="r"):
            buffered = io.BufferedWriter(_NoSpace(fd, free, code), buffer_size=64)
            return buffered if "b" in mode else io.TextIOWrapper(buffered)

        monkeypatch.setattr(fvvae_io, "os", types.SimpleNamespace(**{**vars(os), "fdopen": fdopen}))

    return fill


def _write_json(path):
    with atomic_open(path, "w") as f:
        json.dump({"rows": list(range(1000))}, f)


def _write_npy(path):
    with atomic_open(path, "wb") as f:
        np.lib.format.write_array(types.SimpleNamespace(write=f.write), np.arange(1000.0))  # as a store shard


WRITERS = {"torch.save": lambda path: atomic_torch_save({"w": torch.arange(1000.0)}, path), "json": _write_json,
           "np.save": _write_npy}


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_a_full_disk_is_one_error_naming_the_file_and_keeps_the_old_one(tmp_path, full_disk, writer, code):
    """torch.save reports a full disk as a RuntimeError (the OSError only in its context): every writer's
    full disk is one FileError line with the errno, the temporary file removed, the old file kept."""
    path = tmp_path / "out.bin"
    path.write_bytes(b"previous good output")
    full_disk(free=100, code=code)
    with pytest.raises(FileError) as raised:
        WRITERS[writer](path)
    assert raised.value.errno == code and isinstance(raised.value, OSError)
    assert str(raised.value) == f"{path}: {os.strerror(code).lower()} (the previous file is unchanged; free some " \
                                "space and rerun)"
    assert path.read_bytes() == b"previous good output" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_short_write_without_errno_is_a_full_disk_only_when_the_disk_is_full(tmp_path, monkeypatch):
    """numpy's ndarray.tofile reports a full disk as "N requested and M written", with no errno."""

    def short_write(path):
        with atomic_open(path, "wb"):
            raise OSError("8000 requested and 4096 written")

    for bavail, error in ((0, FileError), (5, OSError)):
        statvfs = types.SimpleNamespace(f_bavail=bavail)
        monkeypatch.setattr(fvvae_io, "os", types.SimpleNamespace(**{**vars(os), "statvfs": lambda _: statvfs}))
        with pytest.raises(OSError) as raised:
            short_write(tmp_path / "a.npy")
        assert type(raised.value) is error and not list(tmp_path.iterdir())
        assert ("no space left on device (nothing was written" in str(raised.value)) == (error is FileError)


@contextlib.contextmanager
def held_elsewhere(path: Path):
    """Another process holding ``path`` for writing (:func:`output_lock`) until the block ends; yields its pid."""
    code = ("import sys\nfrom fvvae_fast.io import output_lock\nwith output_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n    sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).parents[1])
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0


def test_an_output_is_written_by_one_process_at_a_time(tmp_path):
    out = tmp_path / "sub" / "model.pt"
    with held_elsewhere(out) as pid:
        with pytest.raises(FileError) as raised, output_lock(out, "--out"):
            pass
        assert raised.value.errno == errno.EWOULDBLOCK
        assert str(raised.value) == f"{out} is being written by another process (pid {pid}); wait for it or " \
                                    "choose another --out"
    (out.parent / ".model.pt.lock").write_text("999999")  # left by a killed writer: no process holds it
    with output_lock(out), output_lock(out):  # released by the other process; re-entrant in this one
        assert (out.parent / ".model.pt.lock").read_text() == str(os.getpid())
    assert not list(out.parent.iterdir())  # the lock file goes with the last holder
