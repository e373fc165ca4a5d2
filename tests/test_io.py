"""Atomic writes: the file appears whole, with the permissions of any new file (umask), not 0600."""

from __future__ import annotations

import os
import stat

import pytest

from fvvae_fast.io import atomic_open, atomic_torch_save


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
