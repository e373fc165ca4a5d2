"""The FV-VAE model (paper section 3-4, Table 7; DESIGN section 1).

Encoder MLP C -> hidden... -> d gives mu_z; a shared, learnt sigma_z gives the
reparametrised sample in training; a one-layer ReLU decoder gives mu_x with a
shared, learnt sigma_x; a linear softmax classifier reads z.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("descriptor", "map", "none")


@dataclass
class Losses:
    """The loss terms of Eq. 8, each a scalar tensor (means over descriptors)."""

    rec: Tensor
    reg: Tensor
    cls: Tensor
    total: Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: getattr(self, k).detach().item() for k in ("rec", "reg", "cls", "total")}


def normalize_map(maps: Tensor, scale: float = 1.0, eps: float = 1e-12) -> Tensor:
    """The release's whole-map normalisation: maps / ||map||_F * scale.

    maps: (B, C, H, W) float conv maps -> same shape, each map scaled to Frobenius norm ``scale``.
    """
    norms = maps.flatten(1).norm(dim=1).clamp_min(eps)
    return maps * (scale / norms).view(-1, *([1] * (maps.dim() - 1)))


def _hidden_dims(hidden_dim: int | Sequence[int] | None, in_dim: int) -> tuple[int, ...]:
    if hidden_dim is None:
        return (in_dim,)
    if isinstance(hidden_dim, int):
        return (hidden_dim,) if hidden_dim > 0 else ()
    return tuple(int(h) for h in hidden_dim)


class FVVAE(nn.Module):
    """FV-VAE: the VAE whose reconstruction-loss gradient is the Fisher vector.

    Args:
        in_dim: C, descriptor size (512 for VGG-19, 2048 for ResNet-152).
        latent_dim: d (255 in the paper: FV of C * 256 dims).
        num_classes: classes of the softmax classifier on z (0: no classifier, L_cls = 0).
        hidden_dim: encoder hidden layer sizes: None = one layer of ``in_dim`` (the paper),
            an int for one layer, a sequence for several, 0 or () for none (the release).
        norm: ``"descriptor"`` (x / ||x||, default), ``"map"`` (maps normalised before SPP by
            :func:`normalize_map` with ``norm_scale``; nothing per descriptor) or ``"none"``.
        norm_scale: the release's map scale (158); used by the descriptor sources.
        dropout: dropout rate on the encoder input during training (0.5 in the paper).

    Example:
        >>> model = FVVAE(in_dim=512, latent_dim=255, num_classes=101)
        >>> model.encode(torch.randn(10, 512)).shape
        torch.Size([10, 255])
    """

    def __init__(
        self,
        in_dim: int = 512,
        latent_dim: int = 255,
        num_classes: int = 0,
        hidden_dim: int | Sequence[int] | None = None,
        norm: str = "descriptor",
        norm_scale: float = 1.0,
        dropout: float = 0.5,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"FVVAE: norm must be one of {NORMS}, got {norm!r}")
        if in_dim < 1 or latent_dim < 1 or num_classes < 0:
            raise ValueError(
                f"FVVAE: need in_dim >= 1, latent_dim >= 1, num_classes >= 0; "
                f"got {in_dim}, {latent_dim}, {num_classes}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"FVVAE: dropout must be in [0, 1), got {dropout}")
        self.in_dim, self.latent_dim, self.num_classes = in_dim, latent_dim, num_classes
        self.hidden_dims = _hidden_dims(hidden_dim, in_dim)
        self.norm, self.norm_scale, self.dropout, self.eps = norm, float(norm_scale), float(dropout), eps
        layers: list[nn.Module] = []
        width = in_dim
        for h in self.hidden_dims:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, latent_dim))
        self.encoder = nn.Sequential(*layers)
        self.decoder = nn.Linear(latent_dim, in_dim)
        # log sigma, shared by all descriptors (section 3.3): sigma_z in R^d, sigma_x in R^C.
        self.log_sigma_z = nn.Parameter(torch.zeros(latent_dim))
        self.log_sigma_x = nn.Parameter(torch.zeros(in_dim))
        self.classifier = nn.Linear(latent_dim, num_classes) if num_classes > 0 else None

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}, norm_scale={self.norm_scale}, dropout={self.dropout}"

    def _check_x(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"FVVAE: x must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"FVVAE: x must be (N, C={self.in_dim}), got shape {tuple(x.shape)}")

    def preprocess(self, x: Tensor) -> Tensor:
        """x: (N, C) raw descriptors -> (N, C) as the model sees them (DESIGN section 1)."""
        self._check_x(x)
        if self.norm == "descriptor":
            return x / x.norm(dim=1, keepdim=True).clamp_min(self.eps)
        return x

    def encode(self, x: Tensor) -> Tensor:
        """mu_z: (N, d) of the preprocessed descriptors x (N, C); no dropout, no sampling."""
        return self.encoder(self.preprocess(x))

    def decode(self, z: Tensor) -> Tensor:
        """mu_x = ReLU(W z + b): (N, C) from z (N, d) (Eq. 10)."""
        return F.relu(self.decoder(z))

    def inv_var(self) -> Tensor:
        """(C,) 1 / sigma_x^2."""
        return torch.exp(-2.0 * self.log_sigma_x)

    def draw_noise(self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor | None, Tensor]:
        """The training noise of n descriptors: dropout keep mask (n, C) bool (None without dropout)
        and eps (n, d) ~ N(0, I), drawn from ``generator`` in this order."""
        keep = None
        if self.dropout != 0.0:
            keep = torch.rand((n, self.in_dim), generator=generator, device=device, dtype=dtype) >= self.dropout
        return keep, torch.randn((n, self.latent_dim), generator=generator, device=device, dtype=dtype)

    def loss(
        self,
        x: Tensor,
        labels: Tensor | None = None,
        lambdas: tuple[float, float, float] = (1.0, 1.0, 1.0),
        generator: torch.Generator | None = None,
        *,
        noise: tuple[Tensor | None, Tensor] | None = None,
        num_rows: int | None = None,
        share: float = 1.0,
    ) -> Losses:
        """The training losses (Algorithm 1, Eq. 8) on descriptors x (N, C).

        ``labels`` (N,) int64 is each descriptor's set label (needed when lambda3 > 0 and the
        model has a classifier). Dropout on the encoder input and the sampling of z use
        ``noise`` (:meth:`draw_noise`), drawn from ``generator`` when not given, so a seeded run
        is reproducible. The loss reconstructs the clean x.

        Data-parallel training evaluates one batch in parts: ``num_rows`` is the batch's total
        number of descriptors (the divisor of the per-descriptor means; default N) and ``share``
        the part of the descriptor-free terms (log sigma_x, the sigma_z part of the KL) this call
        carries, so that the parts' losses add up to the whole batch's.
        """
        xp = self.preprocess(x)
        n = num_rows if num_rows is not None else x.shape[0]
        if self.training:
            keep, eps = noise if noise is not None else self.draw_noise(x.shape[0], generator, x.device, x.dtype)
            x_in = xp if keep is None else xp * keep / (1.0 - self.dropout)
        else:
            x_in = xp
        mu_z = self.encoder(x_in)
        sigma_z = self.log_sigma_z.exp()
        z = mu_z + eps * sigma_z if self.training else mu_z  # reparametrisation (Algorithm 1, line 7)
        mu_x = self.decode(z)
        # L_rec = -log N(x; mu_x, sigma_x^2 I) without the constant (Algorithm 1, line 9).
        rec = ((xp - mu_x) ** 2 * (0.5 * self.inv_var())).sum() / n + share * self.log_sigma_x.sum()
        # L_reg = KL(N(mu_z, sigma_z^2) || N(0, I)) (line 10, with squared norms).
        reg = 0.5 * (mu_z**2).sum() / n + share * (0.5 * (sigma_z**2).sum() - 0.5 * (1 + 2 * self.log_sigma_z).sum())
        l1, l2, l3 = lambdas
        if self.classifier is not None and l3 != 0.0:
            if labels is None:
                raise ValueError("FVVAE.loss: labels (N,) are needed when lambda3 > 0")
            if labels.shape != (x.shape[0],):
                raise ValueError(f"FVVAE.loss: labels must be (N={x.shape[0]},), got {tuple(labels.shape)}")
            cls = F.cross_entropy(self.classifier(z), labels, reduction="sum") / n  # line 11
        else:
            cls = rec.new_zeros(())
        return Losses(rec=rec, reg=reg, cls=cls, total=l1 * rec + l2 * reg + l3 * cls)

    def forward(self, x: Tensor) -> Tensor:
        """mu_z of x: (N, C) -> (N, d); same as :meth:`encode`."""
        return self.encode(x)

    def config(self) -> dict:
        """Constructor arguments, to rebuild the model from a checkpoint."""
        return {
            "in_dim": self.in_dim,
            "latent_dim": self.latent_dim,
            "num_classes": self.num_classes,
            "hidden_dim": list(self.hidden_dims),
            "norm": self.norm,
            "norm_scale": self.norm_scale,
            "dropout": self.dropout,
            "eps": self.eps,
        }
