"""``fvvae_fast::fisher_accumulate``: schema, fake, autograd, and the public wrapper.

One op in the ``fvvae_fast`` torch.library namespace. Its implementation (always eager,
even inside a compiled graph) asks the dispatcher (:mod:`fvvae_fast.ops.dispatch`) for a backend; the fake sizes the output
from ``offsets.shape[0] - 1`` so ``torch.compile`` traces through it without a
graph break. The backward is an op of its own (fused in every backend), never
autograd through the forward's internals.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch
from .validate import check_inputs, check_values, result_dtype

# Schemas of the C++ CPU kernels: defined here, implemented by csrc/ through
# TORCH_LIBRARY_IMPL(fvvae_fast, CPU, m) when the extension is built.
_lib = torch.library.Library("fvvae_fast", "FRAGMENT")
_lib.define(
    "fisher_accumulate_cpu(Tensor x, Tensor z, Tensor weight, Tensor bias, Tensor inv_var, "
    "Tensor offsets, ScalarType? out_dtype=None) -> Tensor"
)
_lib.define(
    "fisher_accumulate_backward_cpu(Tensor grad, Tensor x, Tensor z, Tensor weight, Tensor bias, "
    "Tensor inv_var, Tensor offsets) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("fvvae_fast::fisher_accumulate", mutates_args=())
def _fisher_accumulate_op(
    x: Tensor, z: Tensor, weight: Tensor, bias: Tensor, inv_var: Tensor, offsets: Tensor, backend: str,
    nan_policy: str, out_dtype: torch.dtype | None,
) -> Tensor:
    check_values(x, z, weight, bias, inv_var, offsets, nan_policy)
    s, (c, d) = offsets.shape[0] - 1, weight.shape
    if s == 0 or x.shape[0] == 0:
        return torch.zeros((s, c, d + 1), dtype=result_dtype(x.dtype, out_dtype), device=x.device)
    inputs = (x, z, weight, bias, inv_var, offsets)
    return dispatch.forward_impl("forward", backend, inputs, out_dtype)(*inputs, out_dtype=out_dtype)


@_fisher_accumulate_op.register_fake
def _(x, z, weight, bias, inv_var, offsets, backend, nan_policy, out_dtype):
    shape = (offsets.shape[0] - 1, weight.shape[0], weight.shape[1] + 1)
    return x.new_empty(shape, dtype=result_dtype(x.dtype, out_dtype))


@torch.library.custom_op("fvvae_fast::fisher_accumulate_backward", mutates_args=())
def _fisher_accumulate_backward_op(
    grad: Tensor, x: Tensor, z: Tensor, weight: Tensor, bias: Tensor, inv_var: Tensor, offsets: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if offsets.shape[0] == 1 or x.shape[0] == 0:
        return (torch.zeros_like(x), torch.zeros_like(z), torch.zeros_like(weight), torch.zeros_like(bias),
                torch.zeros_like(inv_var))
    impl = dispatch.get(dispatch.resolve(backend, x.device, "fisher_accumulate"))
    return tuple(impl.backward(grad.contiguous(), x, z, weight, bias, inv_var, offsets))


@_fisher_accumulate_backward_op.register_fake
def _(grad, x, z, weight, bias, inv_var, offsets, backend):
    return tuple(torch.empty_like(t) for t in (x, z, weight, bias, inv_var))


def _setup_context(ctx, inputs, output):
    x, z, weight, bias, inv_var, offsets, backend, *_ = inputs
    ctx.save_for_backward(x, z, weight, bias, inv_var, offsets)
    ctx.backend = backend


def _backward(ctx, grad):
    """The upstream grad arrives in G's dtype (out_dtype); the gradients leave in the inputs' dtypes."""
    grads = torch.ops.fvvae_fast.fisher_accumulate_backward(grad, *ctx.saved_tensors, ctx.backend)
    return (*grads, None, None, None, None)


_fisher_accumulate_op.register_autograd(_backward, setup_context=_setup_context)


def fisher_accumulate(
    x: Tensor,
    z: Tensor,
    weight: Tensor,
    bias: Tensor,
    inv_var: Tensor,
    offsets: Tensor,
    *,
    backend: str | None = None,
    nan_policy: str = "propagate",
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Per-set raw FV-VAE gradient sums G_X (docs/math.rst, "The Fisher vector"; paper Eq. 11-13 before F).

    For set s (rows ``offsets[s]:offsets[s+1]``)::

        r_t = (ReLU(W z_t + b) - x_t) * inv_var * [W z_t + b > 0]
        G[s] = sum_t r_t [z_t ; 1]^T

    Args:
        x: (N, C) float descriptors (already preprocessed).
        z: (N, d) float latents, mu_z of each descriptor.
        weight: (C, d) decoder weight; bias: (C,) decoder bias.
        inv_var: (C,) 1 / sigma_x^2.
        offsets: (S+1,) int64, offsets[0] = 0, non-decreasing, offsets[-1] = N.
        backend: None (fastest available), ``"reference"``, ``"cpu"`` or ``"triton"``.
        nan_policy: ``"propagate"`` (default, no scan) or ``"raise"`` (ValueError on NaN/Inf input).
        out_dtype: None, or the dtype G is written in (float64, float32, float16, bfloat16):
            accumulation stays float32 (float64 for float64 inputs), only the store rounds;
            ``torch.bfloat16`` halves the bytes written for short sets.

    Returns:
        (S, C, d+1) in ``out_dtype``, by default float32 (float64 for float64 inputs); empty sets
        give zeros.
        ``G[s, c, j]`` is dL/dW[c, j] for j < d and dL/db[c] for j = d, without the minus
        sign of the Fisher vector. Differentiable in x, z, weight, bias and inv_var.
        Deterministic for a fixed backend, device and thread count (on CUDA with ``backend=None``, for a
        fixed design: ``FVVAE_DESIGN=fused|split|plain``).

    Example:
        >>> x, z = torch.randn(7, 4), torch.randn(7, 3)
        >>> w, b, iv = torch.randn(4, 3), torch.randn(4), torch.ones(4)
        >>> fisher_accumulate(x, z, w, b, iv, torch.tensor([0, 2, 2, 7])).shape
        torch.Size([3, 4, 4])
    """
    check_inputs(x, z, weight, bias, inv_var, offsets, nan_policy, out_dtype)
    dispatch.check_name(backend, "fisher_accumulate")
    return torch.ops.fvvae_fast.fisher_accumulate(
        x.contiguous(), z.contiguous(), weight.contiguous(), bias.contiguous(), inv_var.contiguous(),
        offsets.contiguous(), backend or dispatch.AUTO, nan_policy, out_dtype,
    )
