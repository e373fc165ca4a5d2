"""fisher_accumulate forward: naive autograd, vmap(grad), best plain torch, the fused backend
of the device, and the GEMM ceiling of the same machine, in one run; then the normalised Fisher
vector (whitening, sign, signed sqrt, L2): fisher_vectors against the same steps composed.

    python -m pytest bench/bench_fisher_accumulate.py --benchmark-only [--benchmark-json out.json]
"""

from __future__ import annotations

import pytest
import torch
from common import Shape, default_device, record, run_benchmark

import fvvae_fast as fv
from fvvae_fast.encode import power_l2_normalize
from fvvae_fast.ops import naive

DEVICE = default_device()
D = 255
if DEVICE.type == "cuda":  # enough sets to fill the device
    SHAPES = [Shape(f"C{c}-{k}x{t}", c, D, k, t) for c in (512, 2048) for k, t in ((2048, 50), (256, 784), (128, 1250))]
    DTYPES = [torch.float32, torch.bfloat16]
    FUSED = "triton"
else:
    SHAPES = [Shape("C512-64x50", 512, D, 64, 50), Shape("C512-8x1250", 512, D, 8, 1250),
              Shape("C2048-8x1250", 2048, D, 8, 1250)]
    DTYPES = [torch.float32]
    FUSED = "cpu"
VMAP_SHAPE = Shape("C512-8x50", 512, D, 8, 50)  # vmap materialises (N, C, d+1): small only
VMAP_MAX_ELEMENTS = 1 << 26

METHODS = {
    "naive-autograd": naive.autograd_accumulate,
    "vmap-grad": naive.vmap_accumulate,
    "plain-torch": naive.padded_bmm_accumulate,
    "reference": lambda *a: fv.fisher_accumulate(*a, backend="reference"),
    f"fused-{FUSED}": lambda *a: fv.fisher_accumulate(*a, backend=FUSED),
}


def _without_output_cache(*a):
    """The C++ kernel with a fresh output every call (its pages faulted in and zeroed by the kernel)."""
    from fvvae_fast import _C

    _C._set_output_cache(False)
    try:
        return fv.fisher_accumulate(*a, backend="cpu")
    finally:
        _C._set_output_cache(True)


if FUSED == "cpu":
    METHODS["fused-cpu-no-output-cache"] = _without_output_cache

# The normalised vector -F^(-1/2) vec(G), signed sqrt, L2 (scale: a diagonal F^(-1/2)), three ways.
VECTOR_METHODS = {
    "plain-torch+normalize": lambda *a, scale: power_l2_normalize(naive.padded_bmm_accumulate(*a).flatten(1) * scale,
                                                                  negate=True),
    f"fused-{FUSED}+normalize": lambda *a, scale: power_l2_normalize(
        fv.fisher_accumulate(*a, backend=FUSED).flatten(1) * scale, negate=True),
    f"fisher_vectors-{FUSED}": lambda *a, scale: fv.fisher_vectors(*a, scale=scale, backend=FUSED),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
def test_gemm_ceiling(benchmark, dtype):
    n = 4096 if DEVICE.type == "cuda" else 2048
    a = torch.randn(n, n, device=DEVICE).to(dtype)
    b = torch.randn(n, n, device=DEVICE).to(dtype)
    run_benchmark(benchmark, lambda: torch.mm(a, b), DEVICE, rounds=10)
    record(benchmark, op="mm", method="gemm-ceiling", shape=f"{n}^3", dtype=dtype, flops=2 * n**3,
           nbytes=3 * n * n * a.element_size())


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("shape", [*SHAPES, VMAP_SHAPE], ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
def test_fisher_accumulate(benchmark, method, shape, dtype):
    if method == "vmap-grad" and shape.n * shape.c * (shape.d + 1) > VMAP_MAX_ELEMENTS:
        pytest.skip("vmap(grad) materialises (N, C, d+1): too large")
    if method.startswith("fused") and fv.ops.dispatch.available(FUSED, DEVICE) is not None:
        pytest.skip(f"backend {FUSED!r} unavailable: {fv.ops.dispatch.available(FUSED, DEVICE)}")
    inputs = shape.inputs(dtype, DEVICE)
    fn = METHODS[method]
    slow = method in ("naive-autograd", "vmap-grad", "reference")
    run_benchmark(benchmark, lambda: fn(*inputs), DEVICE, rounds=5 if slow else 20, warmup=1 if slow else 3)
    record(benchmark, op="fisher_accumulate", method=method, shape=shape.name, dtype=dtype,
           flops=shape.flops(), nbytes=shape.bytes(dtype))


@pytest.mark.parametrize("method", list(VECTOR_METHODS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
def test_fisher_vectors(benchmark, method, shape, dtype):
    if fv.ops.dispatch.available(FUSED, DEVICE) is not None:
        pytest.skip(f"backend {FUSED!r} unavailable: {fv.ops.dispatch.available(FUSED, DEVICE)}")
    inputs = shape.inputs(dtype, DEVICE)
    scale = torch.rand(shape.c * (shape.d + 1), device=DEVICE) + 0.5
    fn = VECTOR_METHODS[method]
    with torch.inference_mode():
        run_benchmark(benchmark, lambda: fn(*inputs, scale=scale), DEVICE, rounds=20, warmup=3)
    record(benchmark, op="fisher_vectors", method=method, shape=shape.name, dtype=dtype,
           flops=shape.flops(), nbytes=shape.bytes(dtype))
