"""The fused diagonal FIM update (sum over sets of G^2, Eq. 12) of every backend against float64."""

from __future__ import annotations

import pytest
import torch

from fvvae_fast.fim.diagonal import reference_sum_of_squares, sum_of_squares
from fvvae_fast.ops import dispatch

from .cases import generator

# (S, D): one row, one column, tails of the 16 x 256 tiles, a block of rows longer than the tile
SHAPES = [(1, 1), (3, 5), (17, 257), (40, 1000), (0, 7)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_sum_of_squares_matches_float64(backend, shape, dtype):
    name, device = backend
    g = (torch.randn(shape, generator=generator(shape[0] * 7 + shape[1]), dtype=torch.float64) * 3).to(dtype)
    want = (g.double() ** 2).sum(0)
    if name == "triton":  # poison the output: an element the kernel forgets stays NaN
        poisoned = torch.full((shape[1],), float("nan"), dtype=torch.float64, device=device)
        out = dispatch.import_kernels("fim_update").sum_of_squares(g.to(device), out=poisoned)
    elif name == "cpu":
        from fvvae_fast import _C

        _C._set_poison(True)
        try:
            out = sum_of_squares(g.to(device), backend=name)
        finally:
            _C._set_poison(False)
    else:
        out = sum_of_squares(g.to(device), backend=name)
    assert out.dtype == torch.float64 and out.shape == (shape[1],)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-14, atol=0)


def test_non_contiguous_input_and_refusals(backend):
    name, device = backend
    g = torch.randn(9, 6, dtype=torch.float64, device=device).t()  # (6, 9), not contiguous
    torch.testing.assert_close(sum_of_squares(g, backend=name).cpu(), (g.cpu() ** 2).sum(0), rtol=1e-14, atol=0)
    if name == "cpu":
        with pytest.raises(RuntimeError, match="sum_of_squares_cpu: g must be 2-D"):
            torch.ops.fvvae_fast.sum_of_squares_cpu(torch.ones(3, device=device))
    if name == "triton":
        with pytest.raises(ValueError, match="out must be"):
            dispatch.import_kernels("fim_update").sum_of_squares(torch.ones(2, 3, device=device),
                                                                 out=torch.empty(4, dtype=torch.float64))


def test_reference_is_chunked_like_the_estimator_expects():
    g = torch.randn(50, 70_000)
    torch.testing.assert_close(reference_sum_of_squares(g), (g.double() ** 2).sum(0), rtol=1e-13, atol=0)
