"""Input checks for the ops (``fisher_accumulate``, ``sum_of_squares``) and the offsets of sets.

Shape, dtype and device checks run in the Python wrapper (they only read
metadata, so they are free under ``torch.compile``). Checks that read tensor
*values* (offsets monotone, NaN policy) run inside the op's implementation,
which always executes eagerly, so a compiled graph never breaks on them.

Reading values synchronises a CUDA stream with the host (and makes the op
impossible to capture in a CUDA graph), so the offsets checks run on CPU tensors
only, or everywhere with ``FVVAE_CHECK_OFFSETS=1`` (debugging). On CUDA the
kernels stay in bounds whatever the offsets; invalid offsets give an unspecified G.
``nan_policy="raise"`` is a scan the caller asks for: it synchronises on CUDA.
"""

from __future__ import annotations

import math
import os

import torch

NAN_POLICIES = ("propagate", "raise")
OUT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_FLOAT_NAMES = ("x", "z", "weight", "bias", "inv_var")


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation ("opmath") dtype of inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def result_dtype(dtype: torch.dtype, out_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of G: ``out_dtype`` when given, else the opmath dtype of the inputs."""
    return opmath_dtype(dtype) if out_dtype is None else out_dtype


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}"


def check_inputs(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    inv_var: torch.Tensor,
    offsets: torch.Tensor,
    nan_policy: str,
    out_dtype: torch.dtype | None = None,
    op: str = "fisher_accumulate",
) -> None:
    """Raise TypeError/ValueError naming ``op`` and the argument when metadata is wrong."""
    tensors = dict(zip(_FLOAT_NAMES, (x, z, weight, bias, inv_var)), offsets=offsets)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name in _FLOAT_NAMES:
        t = tensors[name]
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor, got dtype {t.dtype}")
        if t.dtype != x.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {t.dtype} but x has dtype {x.dtype}; "
                "all floating inputs must share one dtype"
            )
        if t.device != x.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but x is on {x.device}; "
                "all inputs must be on one device"
            )
    if offsets.dtype != torch.int64:
        raise TypeError(f"{op}: offsets must be an int64 tensor, got dtype {offsets.dtype}")
    if offsets.device != x.device:
        raise ValueError(
            f"{op}: offsets is on {offsets.device} but x is on {x.device}; "
            "all inputs must be on one device"
        )
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be (N, C), got {_describe(x)}")
    if z.dim() != 2:
        raise ValueError(f"{op}: z must be (N, d), got {_describe(z)}")
    n, c = x.shape
    d = z.shape[1]
    if z.shape[0] != n:
        raise ValueError(f"{op}: z must have N={n} rows like x, got {_describe(z)}")
    if c < 1 or d < 1:
        raise ValueError(f"{op}: need C >= 1 and d >= 1, got x {_describe(x)}, z {_describe(z)}")
    if tuple(weight.shape) != (c, d):
        raise ValueError(f"{op}: weight must be (C, d) = ({c}, {d}), got {_describe(weight)}")
    if tuple(bias.shape) != (c,):
        raise ValueError(f"{op}: bias must be (C,) = ({c},), got {_describe(bias)}")
    if tuple(inv_var.shape) != (c,):
        raise ValueError(f"{op}: inv_var must be (C,) = ({c},), got {_describe(inv_var)}")
    check_offsets_shape(offsets, op)
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"{op}: nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if out_dtype is not None and not isinstance(out_dtype, torch.dtype):
        raise TypeError(f"{op}: out_dtype must be a torch.dtype or None, got {out_dtype!r}")
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise ValueError(f"{op}: out_dtype must be one of {OUT_DTYPES} or None, got {out_dtype}")


def check_values(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    inv_var: torch.Tensor,
    offsets: torch.Tensor,
    nan_policy: str,
    op: str = "fisher_accumulate",
) -> None:
    """Data-dependent checks: offsets form a valid partition of the N rows (host-checked tensors
    only, see :func:`_needs_host_checks`); NaN policy."""
    if _needs_host_checks(offsets):
        check_offsets(offsets, x.shape[0], op)
    if nan_policy == "raise":
        for name, t in zip(_FLOAT_NAMES, (x, z, weight, bias, inv_var)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{op}: {name} contains NaN or Inf (nan_policy='raise')")


# The smallest floor of an L2 norm: float32's smallest normal number. A smaller one is 0 or subnormal in the
# float32 arithmetic of the kernels, where 1 / eps overflows: an all-zero row would become 0 * inf = NaN.
EPS_MIN = 2.0**-126


def check_eps(eps: float, where: str) -> None:
    """eps (the L2 norm's floor) is a finite real >= ``EPS_MIN``; ValueError naming ``where`` otherwise."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < EPS_MIN:
        raise ValueError(f"{where}: eps must be a finite real >= {EPS_MIN:.4g} (float32's smallest normal number; "
                         f"all-zero rows stay zero), got {eps!r}")


def _needs_host_checks(t: torch.Tensor) -> bool:
    """True for CPU tensors (reading them is free), else only with FVVAE_CHECK_OFFSETS=1."""
    return t.device.type == "cpu" or os.environ.get("FVVAE_CHECK_OFFSETS", "0") == "1"


def check_offsets_shape(offsets: torch.Tensor, where: str) -> None:
    """offsets is (S+1,) with S >= 0 (metadata only); ValueError naming ``where`` otherwise."""
    if offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"{where}: offsets must be (S+1,) with S >= 0, got {_describe(offsets)}")


def check_offsets(offsets: torch.Tensor, n: int, where: str) -> None:
    """offsets (S+1,) integers: offsets[0] = 0, non-decreasing, offsets[-1] = n, the rows of x.

    Reads values (syncs on CUDA). Raises ValueError naming ``where`` and the first defect found.
    """
    check_offsets_shape(offsets, where)
    rule = f"{where}: offsets must be non-decreasing from 0 to N={n} (the rows of x), but"
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0:
        raise ValueError(f"{rule} offsets[0] = {first}")
    if last != n:
        raise ValueError(f"{rule} offsets[-1] = {last}")
    down = torch.nonzero(offsets[1:] < offsets[:-1])
    if down.numel():
        bad = int(down[0, 0])
        raise ValueError(f"{rule} offsets[{bad + 1}] = {int(offsets[bad + 1])} < offsets[{bad}] = {int(offsets[bad])}")


def check_sum_of_squares_inputs(g: torch.Tensor) -> None:
    """g must be a floating (S, D) tensor: TypeError/ValueError naming ``sum_of_squares`` and g otherwise."""
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"sum_of_squares: g must be a torch.Tensor, got {type(g).__name__}")
    if not g.is_floating_point():
        raise TypeError(f"sum_of_squares: g must be a floating tensor, got dtype {g.dtype}")
    if g.dim() != 2:
        raise ValueError(f"sum_of_squares: g must be (S, D), got {_describe(g)}")
