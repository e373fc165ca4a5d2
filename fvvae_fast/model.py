"""The FV-VAE model (paper section 3-4, Table 7; docs/math.rst, "The model").

Encoder MLP C -> hidden... -> d gives mu_z; a shared, learnt sigma_z gives the
reparametrised sample in training; a one-layer ReLU decoder gives mu_x with a
shared, learnt sigma_x; a linear softmax classifier reads z.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops.training import dropout_keep, linear_relu, normalize_dropout, reconstruction_error
from .ops.validate import _needs_host_checks

NORMS = ("descriptor", "map", "none")
# init_from_data: sigma_x >= SIGMA_FLOOR x the data's RMS; the latent noise moves the decoder's
# pre-activations by INIT_NOISE x each channel's spread at the start.
SIGMA_FLOOR = 1e-2
INIT_NOISE = 0.1


def _default_floor(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints written before the sigma_x floor existed load with no floor."""
    state_dict.setdefault(prefix + "log_sigma_x_floor", torch.tensor(-math.inf))


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


def _whole(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_size(name: str, value: object, low: int) -> None:
    if not _whole(value):
        raise TypeError(f"FVVAE: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"FVVAE: {name} must be >= {low}, got {value}")


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"FVVAE: {name} must be a finite number > 0, got {value!r}")


def _hidden_dims(hidden_dim: int | Sequence[int] | None, in_dim: int) -> tuple[int, ...]:
    if hidden_dim is None:
        return (in_dim,)
    if _whole(hidden_dim):
        _check_size("hidden_dim", hidden_dim, 0)
        return (int(hidden_dim),) if hidden_dim > 0 else ()
    if isinstance(hidden_dim, (str, bytes)) or not isinstance(hidden_dim, Sequence) \
            or not all(_whole(h) and h >= 1 for h in hidden_dim):
        raise ValueError(f"FVVAE: hidden_dim must be None, an int >= 0 or a sequence of ints >= 1 (the hidden "
                         f"layers' widths), got {hidden_dim!r}")
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
        seed: seed of the initial weights (None: torch's global generator, as for any module).

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
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"FVVAE: norm must be one of {NORMS}, got {norm!r}")
        for name, value, low in (("in_dim", in_dim, 1), ("latent_dim", latent_dim, 1), ("num_classes", num_classes, 0)):
            _check_size(name, value, low)
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"FVVAE: dropout must be in [0, 1), got {dropout!r}")
        _check_positive("norm_scale", norm_scale)
        _check_positive("eps", eps)
        self.in_dim, self.latent_dim, self.num_classes = in_dim, latent_dim, num_classes
        self.hidden_dims = _hidden_dims(hidden_dim, in_dim)
        self.norm, self.norm_scale, self.dropout, self.eps = norm, float(norm_scale), float(dropout), eps
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            layers: list[nn.Module] = []
            width = in_dim
            for h in self.hidden_dims:
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
            layers.append(nn.Linear(width, latent_dim))
            self.encoder = nn.Sequential(*layers)
            self.decoder = nn.Linear(latent_dim, in_dim)
            self.classifier = nn.Linear(latent_dim, num_classes) if num_classes > 0 else None
        # log sigma, shared by all descriptors (section 3.3): sigma_z in R^d, sigma_x in R^C.
        self.log_sigma_z = nn.Parameter(torch.zeros(latent_dim))
        self.log_sigma_x = nn.Parameter(torch.zeros(in_dim))
        # Lower bound of log sigma_x (-inf: none); set relative to the data by init_from_data.
        self.register_buffer("log_sigma_x_floor", torch.tensor(-math.inf))
        self.register_load_state_dict_pre_hook(_default_floor)

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}, norm_scale={self.norm_scale}, dropout={self.dropout}"

    def _check_x(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"FVVAE: x must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"FVVAE: x must be (N, C={self.in_dim}), got shape {tuple(x.shape)}")
        param = self.log_sigma_x
        if x.device != param.device:
            raise ValueError(f"FVVAE: x is on {x.device} but the model is on {param.device}; move one to the other")
        if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"FVVAE: x is {x.dtype} but the model's parameters are {param.dtype}; convert one "
                            f"(x.to({param.dtype}) or model.to({x.dtype}))")

    def preprocess(self, x: Tensor) -> Tensor:
        """x: (N, C) raw descriptors -> (N, C) as the model sees them (docs/math.rst, "The model")."""
        self._check_x(x)
        return normalize_dropout(x, None, self.dropout, self.norm == "descriptor", self.eps)[0]

    def encode(self, x: Tensor) -> Tensor:
        """mu_z: (N, d) of the preprocessed descriptors x (N, C); no dropout, no sampling."""
        return self.encoder(self.preprocess(x))

    def _encoder_fused(self, x: Tensor) -> Tensor:
        """The encoder of :meth:`loss`: each hidden layer's bias and ReLU in one pass after its GEMM
        (:func:`~fvvae_fast.ops.training.linear_relu`); equal to ``self.encoder(x)`` to rounding."""
        *hidden, last = self.encoder
        for linear in hidden[::2]:  # (Linear, ReLU) pairs
            x = linear_relu(x, linear.weight, linear.bias)
        return last(x)

    def decode(self, z: Tensor) -> Tensor:
        """mu_x = ReLU(W z + b): (N, C) from z (N, d) (Eq. 10)."""
        return F.relu(self.decoder(z))

    def sigma_x_log(self) -> Tensor:
        """(C,) log sigma_x as the model uses it: the parameter floored at ``log_sigma_x_floor``."""
        return self.log_sigma_x.clamp_min(self.log_sigma_x_floor)

    def inv_var(self) -> Tensor:
        """(C,) 1 / sigma_x^2."""
        return torch.exp(-2.0 * self.sigma_x_log())

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Start the decoder and sigma_x at the scale of the data: x (n, C) raw descriptors, a sample.

        With PyTorch's default start the decoder's output (W z + b, z ~ N(mu_z, 1)) is about 10x
        larger than descriptor-normalised entries (about 1/sqrt(C)) and sigma_x = 1 is 20x too
        wide: the gradient of L_rec then pushes every b_c below zero before the encoder has
        learnt anything, the ReLU units die (no gradient ever reaches them again) and every
        Fisher vector is 0. Here b = the mean of each channel (each unit starts alive on average
        data), W is scaled so that the latent noise moves W z + b by a tenth of the channel's
        spread, log sigma_x = log(spread of the channel), and sigma_x is floored at
        ``SIGMA_FLOOR`` x the data's RMS: a channel that is always zero (a dead conv channel)
        would otherwise drive sigma_x to 0 and the loss to -inf (the release floors sigma_x
        at 1e-4 on entries of RMS about 1).
        """
        xp = self.preprocess(x).double()
        if xp.shape[0] == 0 or not bool(torch.isfinite(xp).all()) or not bool(xp.abs().amax(1).gt(0).any()):
            raise ValueError(f"FVVAE.init_from_data: x must hold finite values and at least one non-zero row, got "
                             f"{xp.shape[0]} rows, {int((~torch.isfinite(xp)).any(1).sum())} with NaN or Inf, "
                             f"{int(xp.abs().amax(1).eq(0).sum())} all zero")
        mean, std = xp.mean(0), xp.std(0, correction=0)
        floor = SIGMA_FLOOR * float(xp.pow(2).mean().sqrt().clamp_min(self.eps))
        spread = std.clamp_min(floor)
        dec = self.decoder
        dec.bias.copy_(mean)
        dec.weight.mul_((INIT_NOISE * spread / dec.weight.norm(dim=1).clamp_min(self.eps))[:, None].to(dec.weight))
        self.log_sigma_x.copy_(spread.log())
        self.log_sigma_x_floor.fill_(math.log(floor))

    @torch.no_grad()
    def liveness(self, x: Tensor) -> dict[str, float]:
        """Health of the ReLU decoder on raw descriptors x (n, C): the share of active pre-activations
        W mu_z + b > 0 (``active``), of units active on at least one row (``alive``), and the range of
        sigma_x (``sigma_x_min``, ``sigma_x_max``)."""
        on = self.decoder(self.encode(x)) > 0
        sigma = self.sigma_x_log().exp()
        return {"active": float(on.float().mean()) if on.numel() else 0.0,
                "alive": float(on.any(0).float().mean()) if on.numel() else 0.0,
                "sigma_x_min": float(sigma.min()), "sigma_x_max": float(sigma.max())}

    def draw_noise(self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor | None, Tensor]:
        """The training noise of n descriptors: dropout keep mask (n, C) bool (None without dropout)
        and eps (n, d) ~ N(0, I), drawn from ``generator`` in this order.

        The keep mask (``fvvae_fast.ops.training.dropout_keep``) compares 16-bit slices of random
        words with the dropout rate (P(keep) = 1 - round(65536 p) / 65536, exactly 0.5 for p = 0.5).
        """
        keep = dropout_keep(n, self.in_dim, self.dropout, generator, device) if self.dropout != 0.0 else None
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
        self._check_x(x)
        n = num_rows if num_rows is not None else x.shape[0]
        keep, eps = None, None
        if self.training:
            keep, eps = noise if noise is not None else self.draw_noise(x.shape[0], generator, x.device, x.dtype)
        xp, x_in = normalize_dropout(x, keep, self.dropout, self.norm == "descriptor", self.eps)
        mu_z = self._encoder_fused(x_in)
        sigma_z = self.log_sigma_z.exp()
        z = mu_z + eps * sigma_z if self.training else mu_z  # reparametrisation (Algorithm 1, line 7)
        # L_rec = -log N(x; mu_x, sigma_x^2 I) without the constant (Algorithm 1, line 9).
        log_sigma_x = self.sigma_x_log()
        rec = reconstruction_error(z, self.decoder.weight, self.decoder.bias, xp, log_sigma_x) / n \
            + share * log_sigma_x.sum()
        # L_reg = KL(N(mu_z, sigma_z^2) || N(0, I)) (line 10, with squared norms).
        reg = 0.5 * (mu_z**2).sum() / n + share * (0.5 * (sigma_z**2).sum() - 0.5 * (1 + 2 * self.log_sigma_z).sum())
        l1, l2, l3 = lambdas
        if self._uses_labels(labels, x.shape[0], l3):
            cls = F.cross_entropy(self.classifier(z), labels, reduction="sum") / n  # line 11
        else:
            cls = rec.new_zeros(())
        return Losses(rec=rec, reg=reg, cls=cls, total=l1 * rec + l2 * reg + l3 * cls)

    def _uses_labels(self, labels: Tensor | None, n: int, lambda3: float) -> bool:
        """Whether the loss has its classification term (a classifier and lambda3 != 0); then ``labels``
        must be (n,)."""
        if self.classifier is None or lambda3 == 0.0:
            return False
        if labels is None:
            raise ValueError("FVVAE.loss: labels (N,) are needed when lambda3 > 0")
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
                or labels.dtype == torch.bool:
            raise TypeError(f"FVVAE.loss: labels must be an integer tensor (class indices), got "
                            f"{getattr(labels, 'dtype', type(labels).__name__)}")
        if labels.shape != (n,):
            raise ValueError(f"FVVAE.loss: labels must be (N={n},), got {tuple(labels.shape)}")
        if _needs_host_checks(labels):  # no ignore index: every descriptor's label is a class
            bad = torch.nonzero((labels < 0) | (labels >= self.num_classes))
            if bad.numel():
                raise ValueError(f"FVVAE.loss: labels must be in [0, num_classes={self.num_classes}), got "
                                 f"{int(labels[bad[0, 0]])} at {int(bad[0, 0])}")
        return True

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
