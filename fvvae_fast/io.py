"""Atomic file writes (a crash or a full disk leaves either the old file or the new one, never half of one),
locked outputs and checked reads."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch


FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


class FileError(OSError):
    """An OSError whose message is one line naming the file (``str`` gives just that line); ``errno`` as usual."""

    def __str__(self) -> str:
        return str(self.strerror)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync it and rename it onto ``path``.

    The file gets the permissions of any new file (0666 less the umask), not mkstemp's private 0600:
    a store or a model is meant to be read by a team. On any failure the temporary file is removed and
    ``path`` keeps its old contents; a full disk or quota (however the writer reports it: torch.save raises
    a RuntimeError over the OSError) raises one :class:`FileError` with errno ENOSPC or EDQUOT naming ``path``.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        code = _full_disk(err, path.parent)  # before the temporary file's space is freed
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if code is None:
            raise
        kept = "the previous file is unchanged" if path.exists() else "nothing was written"
        raise FileError(code, f"{path}: {os.strerror(code).lower()} ({kept}; free some space and rerun)") from err


def _full_disk(err: BaseException, folder: Path) -> int | None:
    """ENOSPC or EDQUOT when ``err`` or an exception it chains is that OSError, or an OSError without errno (numpy's
    short write: "N requested and M written") while ``folder``'s file system has no block left; else None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError):
            if err.errno in FULL_DISK:
                return err.errno
            if err.errno is None:
                with contextlib.suppress(OSError):
                    if os.statvfs(folder).f_bavail == 0:
                        return errno.ENOSPC
        err = err.__cause__ or err.__context__
    return None


def try_lock(f: IO[Any], exclusive: bool) -> bool:
    """Take an advisory lock on the open file ``f`` without waiting (POSIX ``lockf``: it belongs to the process
    and goes when the process dies, even by SIGKILL); False when another process holds it. True where there is no
    fcntl (Windows): only in-process checks protect the file there."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fcntl.lockf(f.fileno(), (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


_OUTPUTS: dict[str, tuple[IO[Any], int]] = {}  # real path of an output -> this process's lock file and its holds


@contextlib.contextmanager
def output_lock(path: str | os.PathLike | None, option: str = "output path") -> Iterator[None]:
    """Hold ``path`` (a single-file output) for writing: an exclusive lock on the file ``.NAME.lock`` beside it,
    which names this process's pid and is removed on release. Another process holding it: a :class:`FileError`
    (EWOULDBLOCK) naming its pid and ``option``. Re-entrant in one process (a job that holds it may call a
    function that takes it again); None holds nothing."""
    if path is None:
        yield
        return
    key = os.path.realpath(path)
    if key in _OUTPUTS:
        f, holds = _OUTPUTS[key]
        _OUTPUTS[key] = f, holds + 1
    else:
        _OUTPUTS[key] = _lock_output(Path(path), option), 1
    try:
        yield
    finally:
        f, holds = _OUTPUTS.pop(key)
        if holds > 1:
            _OUTPUTS[key] = f, holds - 1
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f.name)  # while still locked: a process that opened it first finds it gone and retries
            f.close()


def _lock_output(path: Path, option: str) -> IO[Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.parent / f".{path.name}.lock"
    while True:
        f = open(name, "a+")
        if not try_lock(f, exclusive=True):
            f.seek(0)
            pid = f.read().strip() or "unknown"
            f.close()
            raise FileError(errno.EWOULDBLOCK, f"{path} is being written by another process (pid {pid}); wait for "
                                               f"it or choose another {option}")
        with contextlib.suppress(FileNotFoundError):
            if os.stat(name).st_ino == os.fstat(f.fileno()).st_ino:
                break
        f.close()  # removed by its last holder after this process opened it: lock the new one
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def load_torch_file(path: str | os.PathLike, what: str, *, error: type[Exception] = ValueError) -> Any:
    """``torch.load(weights_only=True)`` of ``path`` onto the CPU: the only way the package reads a torch file.

    Every file it writes holds tensors, plain containers, strings and numbers, so no file is ever unpickled with
    arbitrary globals: a crafted file (a model someone shares) cannot run code when read. A missing file raises
    FileNotFoundError; a file torch cannot read (damaged, not a torch file, or one that needs other globals) one
    ``error`` naming the path and ``what`` it should hold."""
    if Path(path).is_dir():
        raise IsADirectoryError(f"{path}: a folder, not a file; expected a {what}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file; expected a {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file (UnpicklingError, RuntimeError, EOFError)
        raise error(f"{path}: not a readable {what} ({type(err).__name__}: {err})") from None


def load_npy(path: str | os.PathLike, what: str, kinds: str, *, mmap: bool = False,
             error: type[Exception] = ValueError) -> np.ndarray:
    """A ``.npy`` array of ``path`` (memory-mapped with ``mmap``), never unpickled, of a dtype kind in ``kinds``
    (NumPy's letters: 'f' float, 'i' int, 'u' unsigned). A missing file raises FileNotFoundError; a file that is
    no .npy (text, a pickle), holds Python objects, has a damaged header or is shorter than its header says, or an
    array of another kind, one ``error`` naming the path and ``what`` it should hold."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file; expected {what}")
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise error(f"{path}: not a .npy file (saved with numpy.save); expected {what}")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as err:  # numpy raises many types for a bad header (ValueError, EOFError, SyntaxError, ...)
        raise error(f"{path}: not a readable .npy file of {what} ({type(err).__name__}: {err})") from None
    if arr.dtype.kind not in kinds:
        raise error(f"{path}: expected {what}, got an array of dtype {arr.dtype}")
    return arr


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds NumPy arrays and nothing else: any other global in the pickle is refused before it is looked up."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only NumPy arrays are read")
        return super().find_class(module, name)


def load_array_pickle(f: IO[bytes], what: str) -> Any:
    """A pickled NumPy array read from the binary file ``f`` without running code: only the globals that rebuild
    an array are resolved; anything else is one ValueError naming ``what``."""
    try:
        return _ArrayUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
        raise ValueError(f"{what}: not a pickled NumPy array ({err})") from None


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it
    os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
