"""Shared awkward cases and tolerances for every fisher_accumulate backend.

Inputs are fresh random draws each session (seed printed in the pytest header,
fixed with FVVAE_TEST_SEED=<int> to reproduce a failure).
"""

from __future__ import annotations

import contextlib
import os
import random
import zlib
from dataclasses import dataclass

import torch

from fvvae_fast.ops import dispatch, reference
from fvvae_fast.ops.validate import opmath_dtype

SEED = int(os.environ.get("FVVAE_TEST_SEED", random.randrange(2**31)))


@contextlib.contextmanager
def poisoned_cpu_kernels():
    """The C++ kernels fill their outputs and scratch with NaN before computing, so an element a kernel
    forgot to write cannot pass for a value (nothing to do when the extension is not built)."""
    if dispatch.available("cpu", torch.device("cpu")) is not None:
        yield
        return
    from fvvae_fast import _C

    _C._set_poison(True)
    try:
        yield
    finally:
        _C._set_poison(False)


@dataclass(frozen=True)
class Case:
    id: str
    c: int
    d: int
    lengths: tuple[int, ...]


# Tails in every tiled dimension (C, d+1, rows), empty sets, 1-row sets, one set
# longer than any tile, no sets at all.
CASES = [
    Case("one-row", 5, 3, (1,)),
    Case("empty-sets", 7, 4, (0, 3, 0, 0, 2)),
    Case("all-empty", 6, 2, (0, 0)),
    Case("no-sets", 4, 3, ()),
    Case("odd-tails", 37, 19, (5, 17, 1, 0)),
    Case("long-set", 20, 9, (300, 3, 1)),
    Case("wide", 130, 65, (33, 64, 1)),
]
CASE_IDS = [c.id for c in CASES]

# (atol, rtol) against the float64 reference, relative to the reference's max |value|, by input dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
# A kernel's pre-activation a = W z + b (accumulated in float32, float64 for float64 inputs) is within
# this many unit roundoffs of sum_k |W_ck z_tk| + |b_c| of the exact one (about d u in the worst case,
# u sqrt(d) typically; Triton's 3xTF32 about 4 u sqrt(d)).
_MASK_ROUNDOFFS = 64


def generator(salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + salt)


def make_inputs(case: Case, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu", salt: int = 0):
    """(x, z, weight, bias, inv_var, offsets) for ``case``: a mix of active and inactive ReLUs."""
    g = generator(salt + zlib.crc32(case.id.encode()) % 10_000)  # str hash() differs per process
    n = sum(case.lengths)
    x = torch.rand(n, case.c, generator=g, dtype=torch.float64)
    z = torch.randn(n, case.d, generator=g, dtype=torch.float64)
    weight = torch.randn(case.c, case.d, generator=g, dtype=torch.float64) / case.d**0.5
    bias = torch.randn(case.c, generator=g, dtype=torch.float64) * 0.5
    inv_var = 0.5 + torch.rand(case.c, generator=g, dtype=torch.float64)
    offsets = torch.tensor((0, *case.lengths), dtype=torch.int64).cumsum(0)
    floats = [t.to(dtype=dtype, device=device) for t in (x, z, weight, bias, inv_var)]
    return (*floats, offsets.to(device))


def tolerance(dtype: torch.dtype, out_dtype: torch.dtype | None = None, scale: float = 1.0) -> tuple[float, float]:
    """(atol, rtol) against the float64 reference for inputs of ``dtype`` and a result of max |ref| ``scale``.

    A result written in a narrower ``out_dtype`` adds its rounding to nearest: half an ulp of each
    element (2^-8 relative for bfloat16, 2^-11 for float16), half the subnormal spacing near 0, and
    half an ulp of float32 when a float64 result reaches a 16-bit type through float32.
    """
    atol, rtol = TOLERANCES[dtype]
    atol *= scale
    if out_dtype is not None and torch.finfo(out_dtype).eps > torch.finfo(opmath_dtype(dtype)).eps:
        info = torch.finfo(out_dtype)
        rtol += info.eps / 2
        atol += info.smallest_normal * info.eps / 2
        if dtype == torch.float64 and info.bits == 16:
            rtol += torch.finfo(torch.float32).eps / 2
    return atol, rtol


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "",
                             out_dtype: torch.dtype | None = None, loose: torch.Tensor | None = None,
                             cancellation: float = 1.0) -> None:
    """Compare ``out`` with the float64 ``ref`` under :func:`tolerance` (atol scaled by max |ref|).

    ``loose``: a bool mask (broadcast against ``out``) of entries a ReLU mask flip may change; there
    ``out`` need only be finite where ``ref`` is (an unwritten, NaN-poisoned entry still fails).
    """
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    atol, rtol = tolerance(dtype, out_dtype, max(float(ref.abs().max()), 1.0) if ref.numel() else 1.0)
    atol *= cancellation
    if loose is not None:
        loose = loose.expand_as(ref)
        unwritten = loose & ref.isfinite() & ~out.isfinite()
        assert not bool(unwritten.any()), f"{what}: {int(unwritten.sum())} entries not finite"
        out, ref = out.masked_fill(loose, 0.0), ref.masked_fill(loose, 0.0)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _float64(inputs):
    return [t.detach().double().cpu() if t.is_floating_point() else t.detach().cpu() for t in inputs]


def mask_may_flip(inputs, dtype: torch.dtype) -> torch.Tensor:
    """(N, C) bool: the (t, c) whose pre-activation a = W z_t + b lies within a kernel's rounding of 0.

    There a kernel's mask [a > 0] and the float64 reference's may differ, and with it the whole
    contribution r_tc [z_t; 1] (|r_tc| ~ |x_tc| inv_var_c, not a rounding error), so the entries
    that depend on such a (t, c) are compared loosely (:func:`check_forward`, :func:`check_backward`).
    """
    _, z, weight, bias, *_ = _float64(inputs)
    u = torch.finfo(opmath_dtype(dtype)).eps / 2
    bound = _MASK_ROUNDOFFS * u * torch.addmm(bias.abs(), z.abs(), weight.abs().t())
    return torch.addmm(bias, z, weight.t()).abs() <= bound


def check_forward(out: torch.Tensor, inputs, dtype: torch.dtype, what: str = "",
                  out_dtype: torch.dtype | None = None) -> None:
    """``out`` = G of ``inputs`` (x, z, weight, bias, inv_var, offsets) against the float64 reference;
    rows G[s, c] of a set holding a flippable (t, c) are only required to be finite."""
    as64 = _float64(inputs)
    offsets = as64[5]
    owner = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff())
    flips = mask_may_flip(inputs, dtype)
    per_set = torch.zeros((offsets.numel() - 1, flips.shape[1]), dtype=torch.float64)
    per_set.index_add_(0, owner, flips.double())
    assert_matches_reference(out, reference.forward(*as64), dtype, what, out_dtype, (per_set > 0)[..., None])


def check_backward(grads, grad: torch.Tensor, inputs, dtype: torch.dtype, what: str = "") -> None:
    """``grads`` = (dx, dz, dweight, dbias, dinv_var) of <grad, G> against the float64 reference;
    dx[t, c], dz[t], and dweight[c], dbias[c], dinv_var[c] of a flippable (t, c) only need be finite."""
    flips = mask_may_flip(inputs, dtype)
    by_col = flips.any(0)
    looses = (flips, flips.any(1)[:, None], by_col[:, None], by_col, by_col)
    expected = reference.backward(grad.detach().double().cpu(), *_float64(inputs))
    # 16-bit inputs: the backward's GEMM operands (and the upstream grad) are rounded to the input dtype,
    # so a sum whose terms cancel keeps errors of a few ulps of its terms, not of its result (a 1-row
    # bfloat16 dz was 2% off on 1 draw in 100 at the plain tolerance)
    cancellation = 3.0 if torch.finfo(dtype).bits == 16 else 1.0
    for name, g, e, loose in zip(("dx", "dz", "dweight", "dbias", "dinv_var"), grads, expected, looses):
        assert_matches_reference(g, e, dtype, f"{what} {name}", loose=loose, cancellation=cancellation)
