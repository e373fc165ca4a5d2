"""Picks the fastest of several designs of an op from timings taken once per key, as Triton's autotuner does.

A key is what the caller buckets on (device capability, dtype, shape bucket). The first call with a new key
times every design on the real inputs and keeps their ranking in memory (and, when ``FVVAE_DESIGN_CACHE``
names a file, in that JSON file, written atomically and read back by later processes). No timing while a
CUDA graph is captured, torch.compile traces or ``torch.cuda.set_sync_debug_mode`` flags synchronisations:
the cached ranking then, else the first design listed; under capture or that mode only designs marked
``sync_free`` run (so eager and captured calls may run different designs: equal within rounding).
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io import atomic_open

DESIGN_ENV = "FVVAE_DESIGN"  # a design name: forced for every key (benchmarking), no timing
CACHE_ENV = "FVVAE_DESIGN_CACHE"  # a JSON file path: rankings kept across processes


@dataclass(frozen=True)
class Design:
    name: str
    run: Callable[..., torch.Tensor]  # the op's forward signature
    sync_free: bool = True  # no host synchronisation: may run while a CUDA graph is captured


def cuda_seconds(fn: Callable[[], object], reps: int = 5) -> float:
    """Median seconds of ``fn`` by CUDA events after one warm-up call (compilation, autotuning)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def sync_allowed() -> bool:
    """False while the current CUDA stream is captured or torch flags synchronisations (sync debug mode)."""
    if not torch.cuda.is_available():
        return True
    return not torch.cuda.is_current_stream_capturing() and torch.cuda.get_sync_debug_mode() == 0


def timing_allowed() -> bool:
    """Timing synchronises: not while torch.compile traces, nor where :func:`sync_allowed` is False."""
    return not torch.compiler.is_compiling() and sync_allowed()


class Chooser:
    """Rankings of designs per key; ``timer(fn) -> seconds`` measures one design on the call's inputs."""

    def __init__(self, timer: Callable[[Callable[[], object]], float] = cuda_seconds):
        self.timer = timer
        self.rankings: dict[str, list[str]] = {}  # key -> design names, fastest first
        self.timings: dict[str, dict[str, float]] = {}  # key -> seconds per design (inf: it failed)

    def pick(self, key: tuple, designs: Sequence[Design], args: tuple, kwargs: dict) -> Design:
        """The design to run for ``key``; times ``designs`` on ``args``/``kwargs`` the first time (if allowed)."""
        by_name = {d.name: d for d in designs}
        forced = os.environ.get(DESIGN_ENV)
        if forced:
            if forced not in by_name:
                raise ValueError(f"{DESIGN_ENV} must be one of {tuple(by_name)} or unset, got {forced!r}")
            return by_name[forced]
        skey = _key_text(key)
        ranking = self.rankings.get(skey)
        if ranking is None:
            ranking = _read_cache(skey)
            if ranking is not None:
                self.rankings[skey] = ranking
        if ranking is None and timing_allowed():
            ranking = self._time(skey, designs, args, kwargs)
        syncs = sync_allowed()
        for name in ranking or ():
            if name in by_name and (syncs or by_name[name].sync_free):
                return by_name[name]
        return designs[0]

    def _time(self, skey: str, designs: Sequence[Design], args: tuple, kwargs: dict) -> list[str]:
        seconds = {}
        for design in designs:
            try:
                seconds[design.name] = self.timer(lambda d=design: d.run(*args, **kwargs))
            except Exception as err:  # noqa: BLE001  a design that cannot run here is never picked
                warnings.warn(f"fvvae_fast: design {design.name!r} failed while timed ({type(err).__name__}: "
                              f"{err}); not used for {skey}", RuntimeWarning, stacklevel=4)
                seconds[design.name] = math.inf
        ranking = [name for name in sorted(seconds, key=seconds.get) if math.isfinite(seconds[name])]
        self.timings[skey], self.rankings[skey] = seconds, ranking
        _write_cache(skey, ranking)
        return ranking


@functools.cache
def _versions() -> str:
    """The versions whose code a ranking timed (a cache file outlives upgrades)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    from .. import __version__

    return f"fvvae_fast {__version__}|torch {torch.__version__}|triton {triton_version}"


def _key_text(key: tuple) -> str:
    return "|".join(map(str, (*key, _versions())))


def _cache_path() -> Path | None:
    path = os.environ.get(CACHE_ENV)
    return Path(path) if path else None


def _read_all(path: Path) -> dict[str, list[str]]:
    """The cache file's rankings; a missing or damaged file reads as empty (it is rewritten whole)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, list) and all(isinstance(n, str) for n in v)}


def _read_cache(skey: str) -> list[str] | None:
    path = _cache_path()
    return None if path is None else _read_all(path).get(skey)


def _write_cache(skey: str, ranking: list[str]) -> None:
    path = _cache_path()
    if path is None:
        return
    data = _read_all(path)
    data[skey] = ranking
    try:
        with atomic_open(path, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
    except OSError as err:
        warnings.warn(f"fvvae_fast: could not write the design cache {path} ({err})", RuntimeWarning, stacklevel=5)
