"""sum_of_squares (the diagonal FIM update, Eq. 12) at D = 131,072 (C = 512, d = 255): plain torch
(a float64 copy of G), the chunked reference and the fused backend of the device, in one run.

    python -m pytest bench/bench_sum_of_squares.py --benchmark-only [--benchmark-json out.json]
"""

from __future__ import annotations

import pytest
import torch
from common import default_device, record, run_benchmark

import fvvae_fast as fv

DEVICE = default_device()
DIM = 512 * 256
SETS = [256, 2048] if DEVICE.type == "cuda" else [64, 512]
DTYPES = [torch.float32, torch.float64]
FUSED = "triton" if DEVICE.type == "cuda" else "cpu"

METHODS = {
    "plain-torch": lambda g: g.double().square().sum(0),
    "reference": lambda g: fv.ops.sum_of_squares(g, backend="reference"),
    f"fused-{FUSED}": lambda g: fv.ops.sum_of_squares(g, backend=FUSED),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("sets", SETS, ids=lambda s: f"S{s}xD{DIM}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
def test_sum_of_squares(benchmark, method, sets, dtype):
    if method.startswith("fused") and fv.ops.dispatch.available(FUSED, DEVICE) is not None:
        pytest.skip(f"backend {FUSED!r} unavailable: {fv.ops.dispatch.available(FUSED, DEVICE)}")
    g = torch.randn(sets, DIM, generator=torch.Generator().manual_seed(0)).to(device=DEVICE, dtype=dtype)
    fn = METHODS[method]
    run_benchmark(benchmark, lambda: fn(g), DEVICE)
    record(benchmark, op="sum_of_squares", method=method, shape=f"S{sets}xD{DIM}", dtype=dtype,
           flops=2 * sets * DIM, nbytes=g.numel() * g.element_size() + DIM * 8)
