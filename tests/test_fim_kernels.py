"""sum_of_squares, the fused diagonal FIM update (sum over sets of G^2, Eq. 12): every backend against
float64; registration (opcheck, gradcheck, torch.compile); validation."""

from __future__ import annotations

import warnings

import pytest
import torch

from fvvae_fast.ops import dispatch, reference, sum_of_squares

from .cases import generator, poisoned_cpu_kernels
from .conftest import DEVICE

_TRITON = dispatch.available("triton", DEVICE)

# (S, D): one row, one column, tails of the 16 x 256 tiles, a block of rows longer than the tile, no rows
SHAPES = [(1, 1), (3, 5), (17, 257), (40, 1000), (0, 7)]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f64", "f32", "f16", "bf16"]


def _draw(shape, dtype, salt=0):
    return (torch.randn(shape, generator=generator(salt + shape[0] * 7 + shape[1]), dtype=torch.float64) * 3).to(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sum_of_squares_matches_float64(backend, shape, dtype):
    name, device = backend
    g = _draw(shape, dtype)
    want = (g.double() ** 2).sum(0)
    with poisoned_cpu_kernels():  # an element the C++ kernel forgets stays NaN
        out = sum_of_squares(g.to(device), backend=name)
    assert out.dtype == torch.float64 and out.shape == (shape[1],) and out.device.type == torch.device(device).type
    torch.testing.assert_close(out.cpu(), want, rtol=1e-14, atol=0)


@pytest.mark.skipif(_TRITON is not None, reason=str(_TRITON))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_triton_kernel_writes_every_element(shape):
    """The launcher's out= is poisoned with NaN: an element the kernel forgets stays NaN."""
    g = _draw(shape, torch.float32, salt=1).to(DEVICE)
    poisoned = torch.full((shape[1],), float("nan"), dtype=torch.float64, device=DEVICE)
    out = dispatch.import_kernels("sum_of_squares").sum_of_squares(g, out=poisoned)
    torch.testing.assert_close(out.cpu(), (g.cpu().double() ** 2).sum(0), rtol=1e-14, atol=0)


def test_non_contiguous_input_and_kernel_refusals(backend):
    name, device = backend
    g = torch.randn(9, 6, generator=generator(2), dtype=torch.float64).to(device).t()  # (6, 9), not contiguous
    torch.testing.assert_close(sum_of_squares(g, backend=name).cpu(), (g.cpu() ** 2).sum(0), rtol=1e-14, atol=0)
    if name == "cpu":
        with pytest.raises(RuntimeError, match="sum_of_squares_cpu: g must be 2-D"):
            torch.ops.fvvae_fast.sum_of_squares_cpu(torch.ones(3, device=device))
    if name == "triton":
        with pytest.raises(ValueError, match="sum_of_squares: out must be"):
            dispatch.import_kernels("sum_of_squares").sum_of_squares(torch.ones(2, 3, device=device),
                                                                     out=torch.empty(4, dtype=torch.float64))


def test_opcheck_and_gradcheck(backend):
    name, device = backend
    g = _draw((5, 7), torch.float64, salt=3).to(device).requires_grad_()
    torch.library.opcheck(torch.ops.fvvae_fast.sum_of_squares.default, (g, name))
    assert torch.autograd.gradcheck(lambda t: sum_of_squares(t, backend=name), (g,))


def test_torch_compile_has_no_graph_break():
    g = _draw((6, 11), torch.float32, salt=4).requires_grad_()

    def f(t):
        return (sum_of_squares(t) * 2).sum()

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(g)
    out.backward()
    torch.testing.assert_close(out, f(g.detach()))
    torch.testing.assert_close(g.grad, 4 * g.detach())


BAD_INPUTS = [
    ("g-not-tensor", [[1.0, 2.0]], {}, TypeError, "sum_of_squares: g must be a torch.Tensor"),
    ("g-int", torch.ones(2, 3, dtype=torch.int64), {}, TypeError, "sum_of_squares: g must be a floating tensor"),
    ("g-1d", torch.ones(3), {}, ValueError, r"sum_of_squares: g must be \(S, D\), got shape \(3,\)"),
    ("g-3d", torch.ones(2, 3, 4), {}, ValueError, r"sum_of_squares: g must be \(S, D\), got shape \(2, 3, 4\)"),
    ("backend", torch.ones(2, 3), {"backend": "cuda"}, ValueError, "sum_of_squares: backend must be one of"),
]


@pytest.mark.parametrize("g,kwargs,error,match", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused(g, kwargs, error, match):
    with pytest.raises(error, match=match):
        sum_of_squares(g, **kwargs)


def test_fallback_names_the_op(monkeypatch):
    monkeypatch.setattr(dispatch, "available", lambda name, device: "not built (test)")
    dispatch._say_fallback_once.cache_clear()
    g = _draw((3, 4), torch.float32, salt=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(sum_of_squares(g), (g.double() ** 2).sum(0), rtol=1e-14, atol=0)
    assert [str(w.message) for w in caught if "no fast sum_of_squares kernel" in str(w.message)]
    dispatch._say_fallback_once.cache_clear()


def test_reference_is_chunked_like_the_estimator_expects():
    g = torch.randn(50, 70_000, generator=generator(6))
    torch.testing.assert_close(reference.sum_of_squares(g), (g.double() ** 2).sum(0), rtol=1e-13, atol=0)
