"""``fvvae_fast::sum_of_squares``: schema, fake, autograd, and the public wrapper.

The diagonal Fisher-information update (paper Eq. 12): sum over sets of vec(G_X)^2. Laid out like
:mod:`fvvae_fast.ops.fisher_accumulate`: one op whose implementation asks the dispatcher
(:mod:`fvvae_fast.ops.dispatch`) for a backend; the fake sizes the (D,) output so
``torch.compile`` traces through it. The gradient 2 g grad is plain torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch
from .validate import check_sum_of_squares_inputs

# The kernels read float32 and float64; other floating inputs run the reference.
KERNEL_DTYPES = (torch.float32, torch.float64)

# Schema of the C++ CPU kernel: defined here, implemented by csrc/sum_of_squares.cpp
# through TORCH_LIBRARY_IMPL(fvvae_fast, CPU, m) when the extension is built.
_lib = torch.library.Library("fvvae_fast", "FRAGMENT")
_lib.define("sum_of_squares_cpu(Tensor g) -> Tensor")


@torch.library.custom_op("fvvae_fast::sum_of_squares", mutates_args=())
def _sum_of_squares_op(g: Tensor, backend: str) -> Tensor:
    name = dispatch.resolve(backend, g.device, "sum_of_squares")
    return dispatch.get(name if g.dtype in KERNEL_DTYPES else "reference").sum_of_squares(g)


@_sum_of_squares_op.register_fake
def _(g, backend):
    return g.new_empty((g.shape[1],), dtype=torch.float64)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    """d/dg of sum_s g[s]^2 . grad = 2 g grad, in g's dtype."""
    (g,) = ctx.saved_tensors
    return (2 * g.to(torch.float64) * grad).to(g.dtype), None


_sum_of_squares_op.register_autograd(_backward, setup_context=_setup_context)


def sum_of_squares(g: Tensor, *, backend: str | None = None) -> Tensor:
    """sum_s g[s]^2 of g (S, D) float: (D,) float64 on g's device, reading g once.

    Args:
        g: (S, D) floating tensor (any strides; one row per training set, vec(G_X)).
        backend: None (fastest available: Triton on CUDA, the C++ kernel on CPU),
            ``"reference"``, ``"cpu"`` or ``"triton"``. float16/bfloat16 inputs run the reference.

    Returns:
        (D,) float64; zeros when S = 0. Every backend accumulates in float64 without a float64
        copy of g, each column's rows in order: deterministic. Differentiable in g.

    Example:
        >>> sum_of_squares(torch.tensor([[1.0, 2.0], [3.0, 0.5]]))
        tensor([10.0000,  4.2500], dtype=torch.float64)
    """
    check_sum_of_squares_inputs(g)
    dispatch.check_name(backend, "sum_of_squares")
    return torch.ops.fvvae_fast.sum_of_squares(g.contiguous(), backend or dispatch.AUTO)
