"""``FisherInformation``: streaming, mergeable estimates of F (paper Eq. 12) and its F^(-1/2) (Eq. 13).

    F = mean over training sets X of vec(G_X) vec(G_X)^T        (D, D), D = C (d+1)   (Eq. 12)
    whiten(G_X) = F^(-1/2) vec(G_X)                                                  (Eq. 13, before the minus sign)

F is never formed: three modes estimate it in O(k D) memory or less.

- ``"diagonal"``: exact diag F (float64 running sum of squares).
- ``"lowrank"``: exact diag F plus a Frequent Directions sketch of the vec(G_X) rows;
  F_hat = U L U^T + diag(max(diag F - diag(U L U^T), floor)) (see :mod:`.lowrank`). F is the
  second moment of whole sets: on labelled data its top directions are the class means, and the
  whitening flattens them (held-out accuracy falls as k grows); keep k small (a few).
- ``"kronecker"``: F ~ T_bar * B (x) A + c * m m^T from per-descriptor residuals and latents
  (see :mod:`.kronecker`; m = E[r (x) z~] is the mean per-descriptor gradient and c the mean of
  T(T-1) over sets); it needs the descriptors, so it is fed by
  :meth:`FisherInformation.update_descriptors` / :meth:`FisherInformation.estimate`.

``damping`` is a floor relative to the mean diagonal of F, default 1e-4: no
direction of F is taken to have less than 0.01 % of the average per-coordinate
variance, which caps the gain of F^(-1/2) at 100x that of an average coordinate.
Decoder units that the ReLU mask of Eq. 11 (almost) never lets through give
coordinates with (almost) no training variance; unfloored, their test-time values,
mostly noise, would be blown up. The low-rank and Kronecker spectra decay fast
(on generated data the 60th eigenvalue of F is below 1e-4 of the mean diagonal),
so they need a floor most. 1e-4 keeps the diagonal mode close to the paper's
exact normalisation (on generated data it floors 3 % of the live coordinates,
where 1e-3 floors 28 %) and gave lowrank k=128 its best held-out whitening among
0, 1e-6 ... 1e-2 (bench/bench_fim.py --quality). In lowrank mode the floor is
also never below the resolution of the sketch's float64 eigenproblem.
``damping=0.0`` is exact: in the diagonal mode it gives the release's
``normalize_raw_fv`` after signed sqrt + L2, dead coordinates mapping to 0.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..errors import UserError
from ..io import load_torch_file
from ..provenance import model_fingerprint, notice_unknown, seal, short, verify
from ..ops.validate import check_offsets, opmath_dtype
from .diagonal import DiagonalStatistics
from .kronecker import KroneckerStatistics
from .lowrank import LowRankStatistics
from .statistics import Statistics, Whitener

FORMAT = "fvvae_fast.FisherInformation"
# 2: kronecker files hold the mean term (m_sum, pairs); version 1 files load without it
# 3: the fingerprint of the model and the payload's checksum; files of versions 1 and 2 load without them
VERSION = 3
_STATISTICS: dict[str, type[Statistics]] = {cls.mode: cls for cls in (DiagonalStatistics, LowRankStatistics,
                                                                         KroneckerStatistics)}
MODES = tuple(_STATISTICS)
DEFAULT_DAMPING = 1e-4
_S = TypeVar("_S", bound=Statistics)


def _matrix_shape(G: Tensor) -> tuple[int, int] | None:
    """(C, d+1) of G (S, C, d+1); None for G (S, D)."""
    return (int(G.shape[1]), int(G.shape[2])) if G.dim() == 3 else None


class EmptyEstimateError(UserError, ValueError, RuntimeError):
    """A FisherInformation asked for its estimate before any training set was added."""


def _plain_tensors(method):
    """Run a method that creates or changes the statistics outside inference mode, under no_grad: tensors
    made inside ``torch.inference_mode()`` could never be updated in place outside it again."""
    return torch.inference_mode(False)(torch.no_grad()(method))


class _ClassOrInstanceMethod:
    """``FisherInformation.load(path)`` builds a new estimator; ``fim.load(path)`` loads into ``fim``."""

    def __init__(self, func):
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, obj, cls):
        return functools.partial(self.func, cls, obj)


class FisherInformation:
    """A streaming estimate of the Fisher information F of the FV-VAE decoder (Eq. 12).

    Args:
        mode: ``"diagonal"``, ``"lowrank"`` or ``"kronecker"`` (module docstring).
        rank: k, the rank of the low-rank part; required by (and only valid for)
            ``mode="lowrank"`` (``None`` or 0 for the other modes).
        damping: floor relative to the mean diagonal of F (default 1e-4, see the module
            docstring); 0.0 = no floor (pseudo-inverse of dead coordinates).
        sketch: l, the Frequent Directions sketch size (lowrank only; default 2k, >= k).
            Memory is a (2l, D) buffer in the dtype of the first update.
        dim: D, optional: checked against every input (otherwise set by the first update).

    The statistics of the mode live in a ``fvvae_fast.fim.statistics.Statistics`` of that mode; this
    class checks inputs and configuration and holds the damping, D, (C, d+1), the set count,
    the cached whitening factors and the file format.

    Example:
        >>> fim = FisherInformation(mode="lowrank", rank=4)
        >>> G = torch.randn(100, 8, 5, dtype=torch.float64)
        >>> fim.update(G).whiten(G).shape
        torch.Size([100, 40])
    """

    def __init__(
        self,
        mode: str = "diagonal",
        rank: int | None = None,
        *,
        damping: float = DEFAULT_DAMPING,
        sketch: int | None = None,
        dim: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"FisherInformation: mode must be one of {MODES}, got {mode!r}")
        for name, value in (("rank", rank), ("sketch", sketch), ("dim", dim)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise TypeError(f"FisherInformation: {name} must be an int or None, got {type(value).__name__}")
        rank, sketch, dim = (None if v is None else int(v) for v in (rank, sketch, dim))
        self._stats = _STATISTICS[mode](rank, sketch)
        if dim is not None and dim < 1:
            raise ValueError(f"FisherInformation: dim must be >= 1, got {dim}")
        self.damping = damping
        self.dim: int | None = dim
        self.shape: tuple[int, int] | None = None  # (C, d+1) once an input showed it
        self.num_sets = 0
        # the model whose descriptors fed it (:func:`fvvae_fast.provenance.model_fingerprint`); None: not known
        self.model_fingerprint: str | None = None

    # ------------------------------------------------------------------ configuration

    @property
    def mode(self) -> str:
        return self._stats.mode

    @property
    def rank(self) -> int:
        """k (lowrank), else 0."""
        return self._stats.rank

    @property
    def sketch_rows(self) -> int:
        """l, the sketch size (lowrank), else 0."""
        return self._stats.sketch_rows

    @property
    def num_descriptors(self) -> int:
        """Descriptors seen (kronecker; 0 in the other modes)."""
        return self._stats.num_descriptors

    @property
    def damping(self) -> float:
        """Floor relative to the mean diagonal of F (a float >= 0); setting it rebuilds the whitening."""
        return self._damping

    @damping.setter
    def damping(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"FisherInformation: damping must be a float, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"FisherInformation: damping must be finite and >= 0, got {value}")
        self._damping = float(value)
        self._invalidate()

    @property
    def device(self) -> torch.device | None:
        """Device of the statistics (that of the first update), None before any data."""
        return self._stats.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the statistics (the sketch buffer included), not counting cached whitening factors."""
        return self._stats.nbytes

    def __repr__(self) -> str:
        extra = f", rank={self.rank}, sketch={self.sketch_rows}" if self.rank else ""
        return (f"FisherInformation(mode={self.mode!r}{extra}, damping={self.damping}, dim={self.dim}, "
                f"num_sets={self.num_sets})")

    def _invalidate(self) -> None:
        self._factors: Whitener | None = None  # float64 whitening factors, built lazily
        self._cast: dict[tuple[torch.dtype, torch.device], Whitener] = {}

    # ------------------------------------------------------------------ input checks

    def _rows(self, G: Tensor, where: str, *, allow_empty: bool) -> Tensor:
        """G (S, C, d+1) or (S, D) -> (S, D) view, checked against this estimator's D and (C, d+1)."""
        if not isinstance(G, Tensor):
            raise TypeError(f"FisherInformation.{where}: G must be a torch.Tensor, got {type(G).__name__}")
        if not G.is_floating_point():
            raise TypeError(f"FisherInformation.{where}: G must be a floating tensor, got dtype {G.dtype}")
        if G.dim() not in (2, 3):
            raise ValueError(f"FisherInformation.{where}: G must be (S, C, d+1) or (S, D), expected "
                             f"{self._expected_shape()}, got shape {tuple(G.shape)}")
        s, dim = G.shape[0], math.prod(G.shape[1:])
        if s == 0 and not allow_empty:
            raise ValueError(f"FisherInformation.{where}: G is empty (S=0 sets, shape {tuple(G.shape)}); "
                             f"an update needs at least one set")
        if dim == 0:
            raise ValueError(f"FisherInformation.{where}: G has D=0 (shape {tuple(G.shape)}), expected "
                             f"{self._expected_shape()}")
        self._check_size(where, f"G has shape {tuple(G.shape)}", dim, _matrix_shape(G))
        return G.reshape(s, dim)

    def _check_size(self, where: str, what: str, dim: int, shape: tuple[int, int] | None) -> None:
        """ValueError unless an input of D = dim (and (C, d+1) = shape, when known) fits this estimator."""
        if self.dim is not None and dim != self.dim:
            raise ValueError(f"FisherInformation.{where}: {what}, D={dim}, but this estimator holds D={self.dim}, "
                             f"expected {self._expected_shape()}")
        if shape is not None and self.shape is not None and shape != self.shape:
            raise ValueError(f"FisherInformation.{where}: {what}, (C, d+1)={shape}, but this estimator holds "
                             f"{self.shape}, expected {self._expected_shape()}")
        if self.rank > dim:
            raise ValueError(f"FisherInformation.{where}: rank={self.rank} exceeds D={dim} ({what})")

    def _expected_shape(self) -> str:
        if self.shape is not None:
            return f"(S, {self.shape[0]}, {self.shape[1]}) or (S, {self.dim})"
        return f"(S, C, d+1) or (S, {self.dim})" if self.dim is not None else "(S, C, d+1) or (S, D)"

    def _added(self, sets: int, dim: int, shape: tuple[int, int] | None) -> FisherInformation:
        """Record ``sets`` new training sets of D = dim (and (C, d+1) = shape, when known)."""
        self.dim, self.shape = dim, shape or self.shape
        self.num_sets += sets
        self._invalidate()
        return self

    # ------------------------------------------------------------------ streaming updates

    @_plain_tensors
    def update(self, G: Tensor) -> FisherInformation:
        """Add a batch of training sets: G (S, C, d+1) or (S, D) float, raw gradient sums of any sign.

        Reads G once (float64 chunks for the diagonal; lowrank also copies its rows into
        the sketch buffer). Non-finite values are rejected before anything changes.
        Not available in ``mode="kronecker"``: G has no per-descriptor statistics there;
        use :meth:`update_descriptors` or :meth:`estimate`. Returns self.
        """
        rows = self._rows(G, "update", allow_empty=False)
        self._stats.update(rows)
        return self._added(rows.shape[0], rows.shape[1], _matrix_shape(G))

    @_plain_tensors
    def update_descriptors(
        self, model: Any, x: Tensor, offsets: Tensor, *, backend: str | None = None
    ) -> FisherInformation:
        """Add the training sets of raw descriptors x (N, C) float with offsets (S+1,) int64.

        ``diagonal``/``lowrank``: G = :func:`fvvae_fast.fisher_gradients` then :meth:`update`.
        ``kronecker``: r_t (Eq. 11, ``fvvae_fast.ops.reference.residual``) and
        z~_t = [mu_z(x_t); 1] give sums of r r^T (C, C) and z~ z~^T (d+1, d+1);
        no per-descriptor gradient is formed. ``model`` follows :class:`fvvae_fast.FVVAE`
        (``preprocess``, ``encode``, ``decoder``, ``inv_var``). Returns self.
        """
        where = "FisherInformation.update_descriptors"
        if not isinstance(offsets, Tensor) or offsets.dim() != 1 or offsets.numel() < 1:
            raise ValueError(f"{where}: offsets must be (S+1,) int64, got "
                             f"{tuple(offsets.shape) if isinstance(offsets, Tensor) else type(offsets).__name__}")
        if offsets.numel() == 1:
            raise ValueError(f"{where}: offsets describe no set (S=0); an update needs at least one set")
        weight = model.decoder.weight
        x, offsets = x.to(weight.device), offsets.to(weight.device)
        c, d = weight.shape
        shape = (c, d + 1)
        self._check_size("update_descriptors", f"the model has (C, d+1)={shape}", c * (d + 1), shape)
        if x.dim() != 2 or x.shape[1] != c:
            raise ValueError(f"{where}: x must be (N, C={c}), got shape {tuple(x.shape)}")
        check_offsets(offsets, x.shape[0], where)
        fingerprint = model_fingerprint(model)
        self._same_model(where, fingerprint, "the model given")
        self._stats.update_descriptors(model, x, offsets, backend)
        self.model_fingerprint = self.model_fingerprint or fingerprint
        return self._added(offsets.numel() - 1, c * (d + 1), shape)

    def estimate(
        self, model: Any, loader: Iterable, *, backend: str | None = None, progress: bool = True
    ) -> FisherInformation:
        """One pass over a training loader with a progress bar; returns self.

        loader: yields batches whose first two items are raw x (N, C) float and offsets
        (S+1,) int64 (labels etc. may follow). Each batch goes to :meth:`update_descriptors`.
        """
        from tqdm.auto import tqdm

        total = len(loader) if hasattr(loader, "__len__") else None
        with tqdm(loader, total=total, desc=f"FIM ({self.mode})", unit="batch", disable=not progress) as bar:
            for batch in bar:
                self.update_descriptors(model, batch[0], batch[1], backend=backend)
                bar.set_postfix(sets=self.num_sets, refresh=False)
        if self.num_sets == 0:
            raise ValueError("FisherInformation.estimate: the loader yielded no sets")
        return self

    # ------------------------------------------------------------------ merging

    def _same_model(self, where: str, fingerprint: str | None, other: str) -> None:
        """ValueError when this estimator holds statistics of another model than ``fingerprint`` (both known)."""
        known = None not in (fingerprint, self.model_fingerprint)
        if self.num_sets and known and fingerprint != self.model_fingerprint:
            raise ValueError(f"{where}: this estimator holds the statistics of model {short(self.model_fingerprint)}, "
                             f"{other} is model {short(fingerprint)}: a FIM is of one model")

    def _same_config(self, other_mode: str, other_rank: int, other_sketch: int) -> bool:
        return (other_mode, other_rank, other_sketch) == (self.mode, self.rank, self.sketch_rows)

    @_plain_tensors
    def merge(self, other: FisherInformation) -> FisherInformation:
        """Absorb ``other``'s data: self becomes the estimator over the union; returns self.

        Diagonal and Kronecker sums add exactly; the sketch of ``other`` is appended to
        this one's and shrunk, so the Frequent Directions bound holds over the union
        (:attr:`sketch_error`). ``other`` is unchanged; this estimator's damping is kept.
        """
        if not isinstance(other, FisherInformation):
            raise TypeError(f"FisherInformation.merge: other must be a FisherInformation, got {type(other).__name__}")
        if not self._same_config(other.mode, other.rank, other.sketch_rows):
            raise ValueError(
                f"FisherInformation.merge: other has mode={other.mode!r}, rank={other.rank}, sketch="
                f"{other.sketch_rows}; this estimator has mode={self.mode!r}, rank={self.rank}, "
                f"sketch={self.sketch_rows}"
            )
        if self.dim is not None and other.dim is not None and self.dim != other.dim:
            raise ValueError(f"FisherInformation.merge: other holds D={other.dim}, this estimator D={self.dim}")
        if self.shape is not None and other.shape is not None and self.shape != other.shape:
            raise ValueError(f"FisherInformation.merge: other holds (C, d+1)={other.shape}, "
                             f"this estimator {self.shape}")
        self._same_model("FisherInformation.merge", other.model_fingerprint, "other")
        if other.num_sets == 0:
            return self
        self.model_fingerprint = self.model_fingerprint or other.model_fingerprint
        if self.num_sets == 0:
            state = other.state_dict()
            state["damping"] = self.damping
            return self.load_state_dict(state, device=other.device)
        self._stats.merge(other._stats)
        return self._added(other.num_sets, self.dim, other.shape)

    @_plain_tensors
    def all_reduce(self) -> FisherInformation:
        """Make every rank's estimator the one over all ranks' data (torch.distributed; alone, a no-op).

        Counts and sums (diagonal sums of squares, Kronecker moments) are all-reduced; the Frequent
        Directions sketches are all-gathered and merged in rank order, so all ranks end with the
        same estimator, as :meth:`merge` of every rank's would give. A rank that saw no set takes part
        too. Returns self.
        """
        from .. import distributed

        _, world = distributed.rank_world()
        if world == 1:
            return self
        c, j = self.shape or (0, 0)
        meta = torch.tensor([self.num_sets, self.dim or 0, c, j], dtype=torch.float64)
        metas = torch.stack(distributed.all_gather(meta))
        seen = metas[metas[:, 0] > 0]
        if len(seen) == 0:
            return self
        if bool((seen[:, 1:] != seen[0, 1:]).any()):
            raise ValueError(f"FisherInformation.all_reduce: the ranks hold different sizes (D, C, d+1): "
                             f"{seen[:, 1:].long().tolist()}")
        dim, shape = int(seen[0, 1]), (int(seen[0, 2]), int(seen[0, 3])) if seen[0, 2] else None
        self._stats.all_reduce(dim, shape)
        self.dim, self.shape = dim, shape
        self.num_sets = int(metas[:, 0].sum())
        self._invalidate()
        return self

    # ------------------------------------------------------------------ the estimate

    def _require_data(self, where: str) -> None:
        if self.num_sets == 0:
            raise EmptyEstimateError(f"FisherInformation.{where}: no data yet (num_sets=0: the estimate holds no "
                                     f"training set, as a FIM file made from no data); call update(), "
                                     f"update_descriptors() or estimate() first")

    def _only(self, kind: type[_S], where: str) -> _S:
        """This estimator's statistics, which ``where`` needs to be of mode ``kind.mode``, with data."""
        self._require_data(where)
        if type(self._stats) is not kind:
            raise ValueError(f"FisherInformation.{where}: needs mode={kind.mode!r}, this estimator has "
                             f"mode={self.mode!r}")
        return self._stats

    def diagonal(self) -> Tensor:
        """diag F: (D,) float64: the exact mean of vec(G_X)^2 over the training sets (diagonal, lowrank),
        or the diagonal of T_bar B (x) A + c m m^T (kronecker)."""
        self._require_data("diagonal")
        return self._stats.diagonal(self.num_sets)

    def low_rank(self) -> tuple[Tensor, Tensor]:
        """The low-rank part U L U^T of F_hat (lowrank mode): U (D, k') orthonormal, L (k',), float64, k' <= k."""
        return self._only(LowRankStatistics, "low_rank").low_rank(self.num_sets)

    @property
    def sketch_error(self) -> float:
        """The bound Delta / n with 0 <= F - B^T B / n <= sketch_error * I for the sketch B (lowrank; 0 otherwise)."""
        return self._stats.sketch_error(self.num_sets) if self.num_sets else 0.0

    def kronecker_factors(self) -> tuple[Tensor, Tensor, float]:
        """B = E[r r^T] (C, C), A = E[z~ z~^T] (d+1, d+1) float64 and T_bar: F ~ T_bar B (x) A (kronecker)."""
        return self._only(KroneckerStatistics, "kronecker_factors").factors(self.num_sets)

    def mean_term(self) -> tuple[Tensor, float]:
        """m = E[r z~^T] (C, d+1) float64, the mean per-descriptor gradient, and c = mean over sets of
        T (T - 1): F's rank-one part c vec(m) vec(m)^T (kronecker)."""
        return self._only(KroneckerStatistics, "mean_term").mean_term(self.num_sets)

    @torch.inference_mode(False)
    @torch.no_grad()
    def _factors_for(self, dtype: torch.dtype, device: torch.device) -> Whitener:
        """The cached factors in ``dtype`` on ``device``: plain tensors even when first asked for inside
        ``torch.inference_mode()``, so that a later whitening under autograd can use them."""
        if self._factors is None:
            self._factors = self._stats.whitener(self.num_sets, self.damping)
        key = (dtype, device)
        if key not in self._cast:
            self._cast[key] = self._factors.to(dtype, device)
        return self._cast[key]

    def diagonal_scale(self, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """diag(F)^(-1/2) (D,) in ``dtype`` on ``device`` when the whitening is diagonal (mode "diagonal"),
        else None: what :func:`fvvae_fast.fisher_encode` hands to the fused normalisation."""
        if type(self._stats) is not DiagonalStatistics:
            return None
        self._require_data("whiten")
        return self._factors_for(dtype, device).scale

    def whiten(self, G: Tensor) -> Tensor:
        """A vec(G) per set with A^T A = F_hat^(-1): G (S, C, d+1) or (S, D) float -> (S, D), row-major vec.

        Which A each mode applies (F_hat floored by ``damping`` as in the module docstring):

        - ``diagonal``: A = diag(F)^(-1/2), the symmetric F_hat^(-1/2) (the paper's Eq. 13).
        - ``lowrank``: A = (I + Q ((1 + Sigma)^(-1/2) - 1) Q^T) Delta_d^(-1/2) (``fvvae_fast.fim.lowrank``): the
          symmetric whitening of Delta_d^(-1/2) F_hat Delta_d^(-1/2), not F_hat^(-1/2) itself.
        - ``kronecker``: A = (I + (1/sqrt(1 + ||w||^2) - 1) w^ w^T) K^(-1/2) with K^(-1/2) the symmetric
          (T_bar B (x) A)^(-1/2) and the rank-one shrink of the mean term (``fvvae_fast.fim.kronecker``).

        Both non-diagonal forms give the exact Fisher kernel G^T F_hat^(-1) G; they differ from the
        symmetric F_hat^(-1/2) by a rotation, which the signed square root that follows does not ignore.

        float64 in -> float64 out, else float32; on G's device. O(k D) time and memory
        per set for diagonal (k = 0) and lowrank; O((C + d + 1) D) for kronecker. No sign
        is applied (:func:`fvvae_fast.fisher_encode` adds the minus of Eq. 13).
        Differentiable in G (F is a constant), so gradients pass through ``fisher_encode``.
        """
        self._require_data("whiten")
        rows = self._rows(G, "whiten", allow_empty=True)
        rows = rows.to(opmath_dtype(rows.dtype))
        return self._factors_for(rows.dtype, rows.device).apply(rows)

    # ------------------------------------------------------------------ state, save, load

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this estimator: plain values and CPU tensors (the file format)."""
        state: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "mode": self.mode, "rank": self.rank,
            "sketch": self.sketch_rows, "damping": self.damping, "dim": self.dim,
            "shape": list(self.shape) if self.shape is not None else None,
            "num_sets": self.num_sets, "num_descriptors": self.num_descriptors,
            "model_fingerprint": self.model_fingerprint,
        }
        if self._stats.started:
            state.update(self._stats.state())
        return state

    @_plain_tensors
    def load_state_dict(self, state: dict[str, Any], *, device: torch.device | str | None = None) -> FisherInformation:
        """Restore from :meth:`state_dict` (checks format, version, mode, rank and D); returns self."""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"FisherInformation: not a {FORMAT} state (format={found!r})")
        if not isinstance(state.get("version"), int) or not 1 <= state["version"] <= VERSION:
            raise ValueError(f"FisherInformation: state version {state.get('version')!r} is not one this "
                             f"fvvae_fast reads (1..{VERSION})")
        if not self._same_config(state["mode"], state["rank"], state["sketch"]):
            raise ValueError(
                f"FisherInformation: the state is for mode={state['mode']!r}, rank={state['rank']}, sketch="
                f"{state['sketch']}; this estimator has mode={self.mode!r}, rank={self.rank}, sketch={self.sketch_rows}"
            )
        if self.dim is not None and state["dim"] is not None and state["dim"] != self.dim:
            raise ValueError(f"FisherInformation: the state is for D={state['dim']}, this estimator holds D={self.dim}")
        shape = tuple(state["shape"]) if state["shape"] is not None else None
        if self.shape is not None and shape is not None and shape != self.shape:
            raise ValueError(f"FisherInformation: the state is for (C, d+1)={shape}, this estimator holds {self.shape}")
        _check_sums(state)
        device = torch.device(device) if device is not None else (self.device or torch.device("cpu"))
        self.model_fingerprint = state.get("model_fingerprint")
        self.damping = state["damping"]
        self.dim, self.shape = state["dim"], shape
        self.num_sets = state["num_sets"]
        self._stats.load(state, device)
        self._invalidate()
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write the estimator to ``path`` atomically (temp file in the same folder, then os.replace).

        Versioned format (``format``/``version`` keys, tensors on CPU, the model's fingerprint, a ``checksum`` of
        the rest: :func:`fvvae_fast.provenance.seal`), readable with ``torch.load(weights_only=True)``.
        """
        from ..io import atomic_torch_save

        atomic_torch_save(seal(self.state_dict()), path)

    @_ClassOrInstanceMethod
    def load(
        cls,
        self: FisherInformation | None,
        path: str | os.PathLike,
        *,
        mode: str | None = None,
        dim: int | None = None,
        map_location: torch.device | str = "cpu",
    ) -> FisherInformation:
        """Read a file written by :meth:`save`.

        ``FisherInformation.load(path, mode=..., dim=...)`` returns a new estimator;
        ``fim.load(path)`` loads into ``fim`` (keeping its mode, rank and, once known, D).
        Either way a file made for another mode, rank or D (or with an unknown format or a
        newer version), whose contents do not match its checksum, or whose sums are negative or not
        finite raises ValueError. The file's statistics, damping and model fingerprint are restored
        (a file of an earlier version records no fingerprint: one notice, and it is not checked).
        """
        state = load_torch_file(path, f"{FORMAT} file")
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"FisherInformation.load: {os.fspath(path)!r} is not a {FORMAT} file")
        if state.get("version") in range(1, VERSION):
            notice_unknown(path, "FIM file")
        elif state.get("version") == VERSION:  # (other versions are refused by load_state_dict)
            if state.get("checksum") is None:
                raise ValueError(f"FisherInformation.load: {os.fspath(path)!r}: the checksum is missing: the file "
                                 f"changed after it was written")
            verify(state, path, "FIM file")
        if self is None:
            if mode is not None and state["mode"] != mode:
                raise ValueError(f"FisherInformation.load: {os.fspath(path)!r} holds mode={state['mode']!r}, "
                                 f"expected mode={mode!r}")
            self = cls(state["mode"], state["rank"] or None, damping=state["damping"],
                       sketch=state["sketch"] or None, dim=dim)
        elif mode is not None and mode != self.mode:
            raise ValueError(f"FisherInformation.load: mode={mode!r} but this estimator has mode={self.mode!r}")
        elif dim is not None and self.dim is not None and dim != self.dim:
            raise ValueError(f"FisherInformation.load: dim={dim} but this estimator holds D={self.dim}")
        else:
            self.dim = self.dim if dim is None else dim
        try:
            return self.load_state_dict(state, device=map_location)
        except ValueError as err:
            raise ValueError(f"FisherInformation.load: {os.fspath(path)!r}: {err}") from None

    def to(self, device: torch.device | str) -> FisherInformation:
        """Move the statistics to ``device`` (whitening also follows G's device by itself); returns self."""
        return self.load_state_dict(self.state_dict(), device=device) if self.num_sets else self


# statistics that are sums of squares (or of outer products, whose diagonals are): never negative
_SQUARES = {"sumsq": lambda t: t, "b_sum": torch.diagonal, "a_sum": torch.diagonal}


def _check_sums(state: dict[str, Any]) -> None:
    """ValueError when a state's statistics hold NaN or Inf, or sums of squares below zero (a damaged file)."""
    for key, value in state.items():
        if isinstance(value, Tensor) and value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"FisherInformation: the state's {key} holds NaN or Inf")
            if key in _SQUARES and bool((_SQUARES[key](value) < 0).any()):
                raise ValueError(f"FisherInformation: the state's {key} is a sum of squares but holds negative values")
