"""How many threads torch should run here: the CPUs this process may use, and its share of them.

torch starts one OpenMP thread per core of the machine. Under a CPU quota (a container, ``taskset``, a
cgroup limit) or beside other busy processes that oversubscribes: threads spin on a shared core, and
training ran 6x slower with 2 threads than with 1 on a 2-core machine with one other busy process. The
package's heavy CPU work (``train``, the encode stage, ``FVVAEEncoder``, the ``fvvae`` command) runs
under :func:`limit_torch_threads`, which only ever lowers torch's count. On a shared machine set
``OMP_NUM_THREADS`` (or ``torch.set_num_threads``) to your share: it is followed as the upper bound.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_cpus(root: Path) -> float | None:
    """CPUs allowed by the cgroup's quota: v2 ``cpu.max`` ("quota period" or "max period"), else v1
    ``cpu/cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: none); None when there is no limit."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cpu_quota() -> int:
    """CPUs this process may use (>= 1): its affinity mask (``os.sched_getaffinity``, else ``os.cpu_count``),
    capped by the CPU quota of the cgroup mounted at ``CGROUP_ROOT``, rounded up (1.5 CPUs of quota -> 2)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS, Windows)
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpus(CGROUP_ROOT)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def _in_joblib_worker() -> bool:
    """Inside a task of joblib's ``Parallel`` (scikit-learn's ``n_jobs``): joblib raises the nesting level there."""
    try:
        from joblib.parallel import get_active_backend
    except ImportError:
        return False
    return (getattr(get_active_backend()[0], "nesting_level", 0) or 0) > 0


def advised_threads() -> int:
    """Threads for torch here: :func:`cpu_quota`, at most ``OMP_NUM_THREADS`` when set (joblib's process
    workers get their share of the CPUs there, as scikit-learn's own estimators do), 1 in a joblib worker
    that was given no share (its thread and multiprocessing back ends)."""
    threads = cpu_quota()
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return min(threads, int(env))
    return 1 if _in_joblib_worker() else threads


@contextlib.contextmanager
def limit_torch_threads(threads: int | None = None) -> Iterator[int]:
    """Run the block with torch's intra-op threads (of this thread) at most ``threads`` (default
    :func:`advised_threads`), then restore the count; yields the count in force. Never raises it."""
    import torch

    before = torch.get_num_threads()
    now = min(before, threads or advised_threads())
    if now != before:
        torch.set_num_threads(now)
    try:
        yield now
    finally:
        if now != before:
            torch.set_num_threads(before)
