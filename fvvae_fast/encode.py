"""Fisher vectors from a trained FV-VAE (paper section 3.4, Eq. 9-13; docs/math.rst, "The Fisher vector")."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from .model import FVVAE
from .ops import fisher_accumulate, fisher_vectors
from .ops.validate import check_eps, opmath_dtype
from .provenance import check_fim_model


class Whitener(Protocol):
    """Anything with ``whiten(G)``: (S, C, d+1) -> (S, D) = F^(-1/2) vec(G) (e.g. FisherInformation)."""

    def whiten(self, G: Tensor) -> Tensor: ...


def as_sets(x: Tensor, offsets: Tensor | None) -> tuple[Tensor, Tensor]:
    """Sets given as (N, C) + offsets (S+1,), or dense (S, T, C) with offsets None -> (N, C), offsets."""
    if offsets is not None:
        return x, offsets
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"x must be (S, T, C) when offsets is None, got {getattr(x, 'shape', type(x).__name__)}")
    s, t, c = x.shape
    return x.reshape(s * t, c), torch.arange(s + 1, device=x.device, dtype=torch.int64) * t


def fisher_gradients(model: FVVAE, x: Tensor, offsets: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """Raw per-set gradient sums G_X (Eq. 11, summed over the set): (S, C, d+1) float32/float64.

    x: raw descriptors (N, C) with offsets (S+1,) int64, or dense (S, T, C) with offsets None.
    """
    x, offsets = as_sets(x, offsets)
    return fisher_accumulate(*_op_inputs(model, x), offsets, backend=backend)


def _op_inputs(model: FVVAE, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x, z, weight, bias, inv_var) of the ops for raw descriptors x (N, C)."""
    xp = model.preprocess(x)
    z = model.encoder(xp)  # mu_z: no dropout, no sampling at extraction (section 3.4)
    dec = model.decoder
    return xp, z, dec.weight, dec.bias, model.inv_var()


# Rows per chunk of the in-place normalisation: about 1 MiB of float32, so each chunk's five passes
# (abs, sqrt, copysign, norm, scale) run in cache; over whole (S, D) tensors they are memory-bound
# and took 3-4x longer than the Fisher accumulation itself at D = 131,072.
_NORMALIZE_CHUNK_ELEMS = 1 << 18


class _SignedSqrt(torch.autograd.Function):
    """sign(v) sqrt(|v|) whose derivative at v = 0 is taken as 0 (it is +inf there).

    Exact zeros are common: a decoder unit that is off for every descriptor of a set zeroes its
    d+1 coordinates (Eq. 11), and an empty set zeroes them all. The plain formula's derivative
    there, inf * 0, is NaN, and one NaN coordinate poisons every gradient of the network.
    """

    @staticmethod
    def forward(ctx, v: Tensor) -> Tensor:
        root = v.abs().sqrt()
        ctx.save_for_backward(root)
        return root.copysign(v)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (root,) = ctx.saved_tensors
        return torch.where(root > 0, grad * 0.5 / root, torch.zeros_like(grad))


def signed_sqrt(v: Tensor) -> Tensor:
    """sign(v) sqrt(abs(v)), elementwise, float tensor of any shape; differentiable with gradient 0 at 0."""
    return _SignedSqrt.apply(v)


def power_l2_normalize(v: Tensor, eps: float = 1e-12, *, negate: bool = False) -> Tensor:
    """Signed square root then row L2 normalisation of v (S, D) float: (S, D); zero rows stay zero.

    ``negate`` normalises -v instead, without forming it. Differentiable (finite gradients
    everywhere, also at zero coordinates and zero rows) when v requires grad. ``eps``: the floor of
    the norms, >= 1.175e-38 as for :func:`fvvae_fast.fisher_vectors`; the norms are taken in float32
    for half-precision v (whose 1e-12 is 0).
    """
    if not isinstance(v, Tensor) or not v.is_floating_point():
        raise TypeError(f"power_l2_normalize: v must be a floating tensor, got {getattr(v, 'dtype', type(v).__name__)}")
    if v.dim() != 2:
        raise ValueError(f"power_l2_normalize: v must be (S, D), got shape {tuple(v.shape)}")
    check_eps(eps, "power_l2_normalize")
    if torch.is_grad_enabled() and v.requires_grad:
        v = signed_sqrt(-v if negate else v)
        return (v / v.norm(dim=1, keepdim=True, dtype=opmath_dtype(v.dtype)).clamp_min(eps)).to(v.dtype)
    out = torch.empty_like(v)
    step = max(1, _NORMALIZE_CHUNK_ELEMS // max(1, v.shape[1]))
    for lo in range(0, v.shape[0], step):
        src, dst = v[lo : lo + step], out[lo : lo + step]
        torch.abs(src, out=dst).sqrt_().copysign_(src)
        if negate:
            dst.neg_()
        dst.div_(dst.norm(dim=1, keepdim=True, dtype=opmath_dtype(v.dtype)).clamp_min_(eps))
    return out


def fisher_encode(
    model: FVVAE,
    x: Tensor,
    offsets: Tensor | None = None,
    fim: Whitener | None = None,
    normalize: bool = True,
    *,
    backend: str | None = None,
) -> Tensor:
    """FV-VAE Fisher vectors, one per set: (S, C*(d+1)) float32 (float64 for float64 input).

    FV_X = -F^(-1/2) vec(G_X) (Eq. 13) with vec row-major over (C, d+1); ``fim=None`` is
    F = I. With ``normalize=True`` the signed square root and L2 normalisation follow; outside
    autograd, with F = I or a diagonal F, they run in the kernel's epilogue
    (:func:`fvvae_fast.fisher_vectors`), which never writes G.

    Args:
        model: a (trained) :class:`FVVAE`; it preprocesses the raw descriptors itself.
        x: raw descriptors (N, C) with ``offsets`` (S+1,) int64, or dense (S, T, C) with ``offsets=None``.
        fim: None or any object with ``whiten(G)`` (e.g. :class:`fvvae_fast.FisherInformation`); one that
            records the model it was estimated for (``model_fingerprint``) must be this model's, else ValueError.
        normalize: apply signed sqrt + L2.
        backend: forwarded to :func:`fvvae_fast.fisher_accumulate`.

    Gradients flow through when autograd is enabled; wrap extraction in ``torch.inference_mode()``.

    Example:
        >>> model = FVVAE(in_dim=8, latent_dim=3).eval()
        >>> fisher_encode(model, torch.rand(2, 5, 8)).shape
        torch.Size([2, 32])
    """
    check_encoder(model, fim, "fisher_encode")
    if fim is not None:
        check_fim_model(fim, model, "fisher_encode")
    return encode_unchecked(model, x, offsets, fim, normalize, backend)


def encode_unchecked(model: FVVAE, x: Tensor, offsets: Tensor | None, fim: Whitener | None, normalize: bool,
                     backend: str | None) -> Tensor:
    """:func:`fisher_encode` without the checks of ``model`` and ``fim`` (done once by the caller)."""
    x, offsets = as_sets(x, offsets)
    if normalize and not _needs_grad(model, x):
        scale = _diagonal_scale(fim, model, x)
        if fim is None or scale is not None:
            # the whitening, sign and normalisation in the kernel's epilogue: G is never written
            return fisher_vectors(*_op_inputs(model, x), offsets, scale=scale, backend=backend)
    G = fisher_gradients(model, x, offsets, backend=backend)
    vec = G.reshape(G.shape[0], -1) if fim is None else fim.whiten(G)
    return power_l2_normalize(vec, negate=True) if normalize else -vec


def check_encoder(model: Any, fim: Any, where: str) -> None:
    """TypeError naming ``where`` unless ``model`` works as an FVVAE (preprocess, encoder, decoder, inv_var) and
    ``fim`` is None or has ``whiten(G)``."""
    if not all(hasattr(model, name) for name in ("preprocess", "encoder", "decoder", "inv_var")):
        raise TypeError(f"{where}: model must be an FVVAE, got {type(model).__name__}")
    if fim is not None and not callable(getattr(fim, "whiten", None)):
        raise TypeError(f"{where}: fim must be None or have whiten(G) (e.g. a FisherInformation; "
                        f"FisherInformation.load(path) reads a FIM file), got {type(fim).__name__} {fim!r:.80}")


def _needs_grad(model: FVVAE, x: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in model.parameters()))


def _diagonal_scale(fim: Whitener | None, model: FVVAE, x: Tensor) -> Tensor | None:
    """F^(-1/2) as a (C*(d+1),) vector when ``fim`` whitens with a diagonal of the model's size, else None."""
    diagonal = getattr(fim, "diagonal_scale", None)
    scale = diagonal(opmath_dtype(x.dtype), x.device) if diagonal is not None else None
    return scale if scale is not None and scale.shape == (model.in_dim * (model.latent_dim + 1),) else None


DEGENERATE_SHARE = 0.1  # a share of all-zero or constant Fisher vectors above which a fitted model is flagged


def degenerate_rows(vectors: Tensor) -> tuple[int, int]:
    """(all-zero rows, constant rows) of vectors (S, D): constant includes all-zero.

    A Fisher vector that is all zero (every decoder unit off on the set: a collapsed model, or an
    empty set) or constant carries no information for a classifier.
    """
    if vectors.shape[0] == 0 or vectors.shape[1] == 0:
        return 0, int(vectors.shape[0])
    lo, hi = vectors.amin(1), vectors.amax(1)
    return int(((lo == 0) & (hi == 0)).sum()), int((lo == hi).sum())


def degenerate_message(zero: int, constant: int, total: int, latent_dim: int) -> str | None:
    """One line when more than ``DEGENERATE_SHARE`` of ``total`` Fisher vectors are constant (``constant``, of
    which ``zero`` all zero; :func:`degenerate_rows`), naming the likely cause and the fix; None otherwise."""
    if total == 0 or constant <= DEGENERATE_SHARE * total:
        return None
    return (f"{constant} of {total} Fisher vectors ({100 * constant / total:.0f}%) are constant, {zero} of them all "
            f"zero: they carry nothing for a classifier. The decoder's units are off on those sets, most likely "
            f"because latent_dim={latent_dim} is too large for the training data or training was too short: train "
            f"with a smaller latent_dim (e.g. 15-31) or more iterations")
