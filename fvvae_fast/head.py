"""The FV-VAE Fisher vector as a trainable layer (docs/api.rst; paper sections 1 and 4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .encode import Whitener, check_encoder, encode_unchecked
from .model import FVVAE
from .ops.validate import opmath_dtype
from .provenance import check_fim_model


class FisherVectorHead(nn.Module):
    """descriptors -> FV-VAE Fisher vectors, differentiable in the descriptors and in every FV-VAE parameter.

    ``forward(x, offsets)``: x (N, C) float descriptors (raw: the model preprocesses them) with
    offsets (S+1,) int64, or dense (S, T, C) with offsets None -> (S, C*(d+1)), exactly
    :func:`fvvae_fast.fisher_encode` (``fim`` whitening, then signed sqrt + L2 when ``normalize``).
    Gradients are finite everywhere (the signed square root at 0 included) and flow through
    ``fisher_accumulate``'s fused backward into x, so a backbone below the head trains too.
    Under autocast the head runs in float32 (the Fisher accumulation needs one dtype). A ``fim`` that records
    the model it was estimated for must be ``model``'s when the head is built; training the head's model
    afterwards keeps that FIM (F is a constant of the layer).

    Example:
        >>> head = FisherVectorHead(FVVAE(in_dim=8, latent_dim=3))
        >>> head(torch.rand(10, 8, requires_grad=True), torch.tensor([0, 4, 10])).shape
        torch.Size([2, 32])
    """

    def __init__(self, model: FVVAE, fim: Whitener | None = None, normalize: bool = True) -> None:
        super().__init__()
        if not isinstance(model, FVVAE):
            raise TypeError(f"FisherVectorHead: model must be an FVVAE, got {type(model).__name__}")
        check_encoder(model, fim, "FisherVectorHead")
        if fim is not None:
            check_fim_model(fim, model, "FisherVectorHead")
        self.model, self.fim, self.normalize = model, fim, bool(normalize)

    def forward(self, x: Tensor, offsets: Tensor | None = None) -> Tensor:
        for name, value in (("x", x), ("offsets", offsets)):
            if value is not None and not isinstance(value, Tensor):  # a layer takes tensors, as every nn.Module
                raise TypeError(f"FisherVectorHead: {name} must be a torch.Tensor (torch.from_numpy for an array), "
                                f"got {type(value).__name__}")
        with torch.autocast(x.device.type, enabled=False):
            return encode_unchecked(self.model, x.to(opmath_dtype(x.dtype)), offsets, self.fim, self.normalize, None)

    def extra_repr(self) -> str:
        return f"fim={type(self.fim).__name__ if self.fim is not None else None}, normalize={self.normalize}"
