"""``fvvae_fast::fisher_vectors``: schema, fake, and the public wrapper.

The normalised Fisher vector straight from the descriptors, for callers who want only that (encoding
and extraction): the forward of :mod:`fvvae_fast.ops.fisher_accumulate` whose epilogue applies the
diagonal whitening, the minus sign of Eq. 13, the signed square root and the L2 normalisation, so the
vector is rounded once to the caller's dtype, and G is never written. Inference only: under autograd,
:func:`fvvae_fast.fisher_encode` composes the differentiable ops instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch
from .validate import check_eps, check_inputs, check_values, result_dtype

# Schema of the C++ CPU kernel: defined here, implemented by csrc/fisher_accumulate.cpp
# through TORCH_LIBRARY_IMPL(fvvae_fast, CPU, m) when the extension is built.
_lib = torch.library.Library("fvvae_fast", "FRAGMENT")
_lib.define(
    "fisher_vectors_cpu(Tensor x, Tensor z, Tensor weight, Tensor bias, Tensor inv_var, Tensor offsets, "
    "Tensor? scale, float eps, ScalarType? out_dtype=None) -> Tensor"
)

_OP = "fisher_vectors"


@torch.library.custom_op("fvvae_fast::fisher_vectors", mutates_args=())
def _fisher_vectors_op(
    x: Tensor, z: Tensor, weight: Tensor, bias: Tensor, inv_var: Tensor, offsets: Tensor, scale: Tensor | None,
    eps: float, backend: str, nan_policy: str, out_dtype: torch.dtype | None,
) -> Tensor:
    check_values(x, z, weight, bias, inv_var, offsets, nan_policy, _OP)
    if nan_policy == "raise" and scale is not None and not bool(torch.isfinite(scale).all()):
        raise ValueError(f"{_OP}: scale contains NaN or Inf (nan_policy='raise')")
    s, (c, d) = offsets.shape[0] - 1, weight.shape
    if s == 0 or x.shape[0] == 0:
        return torch.zeros((s, c * (d + 1)), dtype=result_dtype(x.dtype, out_dtype), device=x.device)
    inputs = (x, z, weight, bias, inv_var, offsets, scale, eps)
    return dispatch.forward_impl("vectors", backend, inputs, out_dtype)(*inputs, out_dtype=out_dtype)


@_fisher_vectors_op.register_fake
def _(x, z, weight, bias, inv_var, offsets, scale, eps, backend, nan_policy, out_dtype):
    shape = (offsets.shape[0] - 1, weight.shape[0] * (weight.shape[1] + 1))
    return x.new_empty(shape, dtype=result_dtype(x.dtype, out_dtype))


def _check_scale(scale: Tensor | None, dim: int, device: torch.device) -> None:
    if scale is None:
        return
    if not isinstance(scale, Tensor) or not scale.is_floating_point():
        raise TypeError(f"{_OP}: scale must be None or a floating tensor, got "
                        f"{getattr(scale, 'dtype', type(scale).__name__)}")
    if tuple(scale.shape) != (dim,):
        raise ValueError(f"{_OP}: scale must be (C*(d+1),) = ({dim},), got shape {tuple(scale.shape)}")
    if scale.device != device:
        raise ValueError(f"{_OP}: scale is on {scale.device} but x is on {device}; all inputs must be on one device")


def fisher_vectors(
    x: Tensor,
    z: Tensor,
    weight: Tensor,
    bias: Tensor,
    inv_var: Tensor,
    offsets: Tensor,
    *,
    scale: Tensor | None = None,
    eps: float = 1e-12,
    backend: str | None = None,
    nan_policy: str = "propagate",
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Normalised FV-VAE Fisher vectors per set, G fused with its normalisation (paper Eq. 13, section 4).

    With G[s] as in :func:`fvvae_fast.fisher_accumulate`::

        y = -scale * vec(G[s])                         (diagonal F^(-1/2); vec row-major over (C, d+1))
        out[s] = sign(y) sqrt|y| / max(||sign(y) sqrt|y|||, eps)

    equal to ``power_l2_normalize(fisher_accumulate(...).flatten(1) * scale, eps, negate=True)``.

    Args:
        x, z, weight, bias, inv_var, offsets: as :func:`fvvae_fast.fisher_accumulate`.
        scale: None (F = I) or (C*(d+1),) floating, the diagonal whitening (e.g. ``1 / sqrt(diag F)``).
        eps: the floor of the L2 norm, a real >= 1.175e-38 (float32's smallest normal number; 0 is refused
            with a ValueError); all-zero and empty sets stay zero on every backend.
        backend, nan_policy: as :func:`fvvae_fast.fisher_accumulate`.
        out_dtype: None (float32; float64 for float64 inputs) or float64, float32, float16, bfloat16. Each
            entry is rounded once to it: the signed roots wait for the norm in the accumulation dtype.

    Returns:
        (S, C*(d+1)) in ``out_dtype``; accumulated in float32 (float64 for float64 inputs).
        Not differentiable (a ValueError under autograd with inputs that require grad).

    Example:
        >>> x, z = torch.randn(7, 4), torch.randn(7, 3)
        >>> w, b, iv = torch.randn(4, 3), torch.randn(4), torch.ones(4)
        >>> fisher_vectors(x, z, w, b, iv, torch.tensor([0, 2, 2, 7])).shape
        torch.Size([3, 16])
    """
    check_inputs(x, z, weight, bias, inv_var, offsets, nan_policy, out_dtype, _OP)
    dispatch.check_name(backend, _OP)
    _check_scale(scale, weight.shape[0] * (weight.shape[1] + 1), x.device)
    check_eps(eps, _OP)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, z, weight, bias, inv_var)):
        raise ValueError(f"{_OP}: not differentiable; use fvvae_fast.fisher_encode under autograd, or call it "
                         "inside torch.no_grad() / torch.inference_mode()")
    return torch.ops.fvvae_fast.fisher_vectors(
        x.contiguous(), z.contiguous(), weight.contiguous(), bias.contiguous(), inv_var.contiguous(),
        offsets.contiguous(), None if scale is None else scale.contiguous(), float(eps), backend or dispatch.AUTO,
        nan_policy, out_dtype,
    )
