"""The one benchmark harness: inputs built outside the timed region, device sync, FLOP/byte
counts for the roofline, the machine line. Results are summarised by bench/conftest.py."""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass

import torch

RESULTS: list[dict] = []  # one row per benchmark, filled by record(), printed at the end


def machine_line() -> str:
    """Device, torch and Triton versions, threads: the line every result table carries."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{device}; torch {torch.__version__}; triton {triton_version}; python {platform.python_version()}"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a device sync, so the timer sees the work finish."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def run_benchmark(benchmark, fn: Callable[[], object], device: torch.device, rounds: int = 20, warmup: int = 3):
    """Time ``fn`` with pytest-benchmark: warm-up rounds (autotune, caches) then ``rounds`` timed calls."""
    return benchmark.pedantic(synchronized(fn, device), rounds=rounds, warmup_rounds=warmup, iterations=1)


@dataclass(frozen=True)
class Shape:
    """A fisher_accumulate problem: ``sets`` sets of ``length`` descriptors of size C, latent d."""

    name: str
    c: int
    d: int
    sets: int
    length: int

    @property
    def n(self) -> int:
        return self.sets * self.length

    def flops(self) -> int:
        """Decoder GEMM (2 N C d) plus the outer-product accumulation (2 N C (d+1))."""
        return 2 * self.n * self.c * self.d + 2 * self.n * self.c * (self.d + 1)

    def bytes(self, dtype: torch.dtype) -> int:
        """Compulsory traffic: read x, z, W once, write G (fp32/fp64)."""
        item = torch.empty((), dtype=dtype).element_size()
        out_item = 8 if dtype == torch.float64 else 4
        return item * (self.n * self.c + self.n * self.d + self.c * self.d) + out_item * self.sets * self.c * (self.d + 1)

    def inputs(self, dtype: torch.dtype, device: torch.device, seed: int = 0):
        """(x, z, weight, bias, inv_var, offsets) with realistic magnitudes (unit-norm x, half the ReLUs on)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(self.n, self.c, generator=g)
        x = x / x.norm(dim=1, keepdim=True)
        z = torch.randn(self.n, self.d, generator=g)
        w = torch.randn(self.c, self.d, generator=g) / self.d**0.5
        b = torch.randn(self.c, generator=g) * 0.1
        v = 1.0 + torch.rand(self.c, generator=g)
        offsets = torch.arange(self.sets + 1, dtype=torch.int64) * self.length
        return (*[t.to(device=device, dtype=dtype) for t in (x, z, w, b, v)], offsets.to(device))


def record(benchmark, *, op: str, method: str, shape: str, dtype: torch.dtype, flops: int, nbytes: int,
           seconds: list[float] | None = None) -> None:
    """Attach FLOPs/bytes to the pytest-benchmark row and keep it for the summary table.

    ``seconds``: timings measured inside the timed calls (e.g. by worker processes, without their
    start-up) that replace pytest-benchmark's for the summary.
    """
    if benchmark.disabled:  # --benchmark-disable: the function ran once as a check, untimed
        return
    data = sorted(seconds if seconds is not None else benchmark.stats.stats.data)
    median = data[len(data) // 2] if seconds is not None else benchmark.stats.stats.median
    row = {"op": op, "method": method, "shape": shape, "dtype": str(dtype).removeprefix("torch."),
           "median_s": median, "p20_s": _quantile(data, 0.2), "p80_s": _quantile(data, 0.8),
           "gflops": flops / median / 1e9, "gbytes_s": nbytes / median / 1e9}
    benchmark.extra_info.update(row)
    RESULTS.append(row)


def _quantile(data: list[float], q: float) -> float:
    return data[min(len(data) - 1, int(q * len(data)))]
