"""Shared awkward cases and tolerances for every fisher_accumulate backend.

Inputs are fresh random draws each session (seed printed in the pytest header,
fixed with FVVAE_TEST_SEED=<int> to reproduce a failure).
"""

from __future__ import annotations

import os
import random
import zlib
from dataclasses import dataclass

import torch

SEED = int(os.environ.get("FVVAE_TEST_SEED", random.randrange(2**31)))


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

# (atol, rtol) against the float64 reference, relative to the reference's max |value|.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


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


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Compare ``out`` with the float64 ``ref`` under the dtype's tolerance, scaled by max |ref|."""
    atol, rtol = TOLERANCES[dtype]
    scale = max(float(ref.abs().max()), 1.0) if ref.numel() else 1.0
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")
