"""The one dispatcher: which implementation of the ops (``fisher_accumulate``, ``fisher_vectors``,
``sum_of_squares``) runs.

A backend implements every op, with the signatures of :mod:`fvvae_fast.ops.reference`
(``forward(..., offsets, *, out_dtype=None)``, ``backward``, ``sum_of_squares(g)``,
``vectors(..., offsets, scale, eps, *, out_dtype=None)``):

- ``"reference"``: plain torch (:mod:`fvvae_fast.ops.reference`), any device.
- ``"cpu"``: the compiled C++ kernel (``fvvae_fast._C``, sources in ``csrc/``), CPU tensors.
- ``"triton"``: the fused Triton kernel (``fvvae_fast.kernels``, see :func:`import_kernels`),
  CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` (how CI runs it).

``backend=None`` picks the fastest available for the device and says once when it
has to fall back to the reference. On CUDA it goes further for the forward ops (:func:`forward_impl`):
it chooses among the designs of :data:`DESIGNS` (the fused Triton kernel, the split GEMMs of
``fvvae_fast.kernels.fisher_split``, the plain-torch composition of :mod:`fvvae_fast.ops.naive`) per
device capability, dtype and shape bucket, from timings taken on the first call of each
(:mod:`fvvae_fast.ops.chooser`; ``FVVAE_DESIGN=fused|split|plain`` forces one, e.g. to benchmark it,
and makes the choice reproducible; the plain composition reads the longest set's length on the host, so
under CUDA-graph capture or a sync debug mode the fastest sync-free design runs instead; ``FVVAE_DESIGN_CACHE=<file.json>`` keeps the timings' rankings across
processes). The backward is the fused Triton kernel's whichever design ran forward.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from . import naive, reference
from .chooser import Chooser, Design

BACKENDS = ("reference", "cpu", "triton")
AUTO = "auto"  # the op's spelling of backend=None: resolved when the op runs, never while tracing


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable[..., torch.Tensor]  # fisher_accumulate
    backward: Callable[..., tuple[torch.Tensor, ...]]  # its gradients
    sum_of_squares: Callable[[torch.Tensor], torch.Tensor]
    vectors: Callable[..., torch.Tensor]  # fisher_vectors


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (not built, not installed, wrong device)."""


_KERNELS = "fvvae_fast.kernels"


def import_kernels(module: str) -> ModuleType:
    """``fvvae_fast.kernels.<module>`` (imports Triton; ImportError without it).

    A wheel ships the repository's top-level ``kernels/`` folder as the sub-package
    ``fvvae_fast/kernels``. A source checkout has no such folder (plain ``PYTHONPATH=<repo>``,
    or an editable install whose mapping may point at another checkout): there the package is
    registered under that name from the ``kernels/`` folder beside this ``fvvae_fast``.
    """
    _register_checkout_kernels()
    return importlib.import_module(f"{_KERNELS}.{module}")


@functools.cache
def _register_checkout_kernels() -> None:
    package = Path(__file__).resolve().parents[1]  # fvvae_fast/
    folder = package.parent / "kernels"
    if _KERNELS in sys.modules or (package / "kernels").is_dir() or not (folder / "fisher_accumulate.py").is_file():
        return  # already imported, an installed wheel, or not our checkout
    spec = importlib.util.spec_from_file_location(_KERNELS, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    kernels = importlib.util.module_from_spec(spec)
    sys.modules[_KERNELS] = kernels
    spec.loader.exec_module(kernels)
    sys.modules["fvvae_fast"].kernels = kernels


@functools.cache
def _load(name: str) -> Backend | str:
    """The backend, or a string saying why it is unavailable (cached: imports run once)."""
    if name == "reference":
        return Backend("reference", reference.forward, reference.backward, reference.sum_of_squares,
                       reference.vectors)
    if name == "cpu":
        try:
            importlib.import_module("fvvae_fast._C")
        except ImportError as err:
            return f"the C++ extension fvvae_fast._C is not built ({err}); reinstall with a C++ compiler"
        return Backend("cpu", _cpu_forward, _cpu_backward, torch.ops.fvvae_fast.sum_of_squares_cpu, _cpu_vectors)
    if name == "triton":
        try:
            kernels, squares = import_kernels("fisher_accumulate"), import_kernels("sum_of_squares")
        except ImportError as err:
            return f"Triton is not importable ({err})"
        return Backend("triton", kernels.fisher_accumulate_fwd, kernels.fisher_accumulate_bwd, squares.sum_of_squares,
                       kernels.fisher_vectors_fwd)
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")


def _cpu_forward(x, z, weight, bias, inv_var, offsets, *, out_dtype=None):
    return torch.ops.fvvae_fast.fisher_accumulate_cpu(x, z, weight, bias, inv_var, offsets, out_dtype)


def _cpu_backward(grad, x, z, weight, bias, inv_var, offsets):
    return torch.ops.fvvae_fast.fisher_accumulate_backward_cpu(grad, x, z, weight, bias, inv_var, offsets)


def _cpu_vectors(x, z, weight, bias, inv_var, offsets, scale, eps, *, out_dtype=None):
    return torch.ops.fvvae_fast.fisher_vectors_cpu(x, z, weight, bias, inv_var, offsets, scale, eps, out_dtype)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` can run on ``device``, else the reason it cannot."""
    loaded = _load(name)
    if isinstance(loaded, str):
        return loaded
    if name == "cpu" and device.type != "cpu":
        return f"backend 'cpu' runs on CPU tensors, got tensors on {device}"
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        return f"backend 'triton' runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
    return None


@functools.cache
def _say_fallback_once(op: str, device_type: str, reason: str) -> None:
    warnings.warn(
        f"fvvae_fast: no fast {op} kernel for {device_type} tensors ({reason}); "
        "using the reference implementation",
        RuntimeWarning,
        stacklevel=3,
    )


def check_name(backend: str | None, op: str) -> None:
    """ValueError naming ``op`` unless ``backend`` is None or one of :data:`BACKENDS`."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {backend!r}")


def resolve(backend: str | None, device: torch.device, op: str = "fisher_accumulate") -> str:
    """The concrete backend name for ``backend`` (None or "auto" = fastest available) on ``device``;
    ``op`` is the op named in warnings and errors."""
    if backend is None or backend == AUTO:
        preferred = {"cuda": "triton", "cpu": "cpu"}.get(device.type)
        if preferred is None:
            return "reference"
        reason = available(preferred, device)
        if reason is None:
            return preferred
        _say_fallback_once(op, device.type, reason)
        return "reference"
    check_name(backend, op)
    reason = available(backend, device)
    if reason is not None:
        raise BackendUnavailable(f"{op}: backend {backend!r} is unavailable: {reason}")
    return backend


def get(name: str) -> Backend:
    """The loaded backend ``name`` (call :func:`resolve` first: it has said why one is unavailable)."""
    loaded = _load(name)
    if isinstance(loaded, str):
        raise BackendUnavailable(f"backend {name!r} is unavailable: {loaded}")
    return loaded


DESIGNS = ("fused", "split", "plain")  # the CUDA forward designs that backend=None chooses among
_OPS = {"forward": "fisher_accumulate", "vectors": "fisher_vectors"}
CHOOSER = Chooser()


def _chooses_design(backend: str, device: torch.device) -> bool:
    """backend=None on CUDA with Triton importable: the chooser runs."""
    return backend in (None, AUTO) and device.type == "cuda" and available("triton", device) is None


@functools.cache
def _designs(op: str) -> tuple[Design, ...]:
    """The designs of ``op`` ("forward" or "vectors"), the default first (run when nothing was timed yet)."""
    fused, split = import_kernels("fisher_accumulate"), import_kernels("fisher_split")
    if op == "forward":
        runs = (fused.fisher_accumulate_fwd, split.fisher_accumulate_split, naive.padded_bmm_accumulate)
    else:
        runs = (fused.fisher_vectors_fwd, split.fisher_vectors_split, naive.padded_bmm_vectors)
    return tuple(Design(name, run, sync_free=name != "plain") for name, run in zip(DESIGNS, runs))


def _device_key(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _bucket(n: int, c: int, d: int, s: int) -> tuple[int, ...]:
    """Shape bucket: C and d exact (a model's constants), sets and typical set length to powers of two."""
    return c, d, 1 << max(s - 1, 0).bit_length(), 1 << max(n // max(s, 1) - 1, 0).bit_length()


def forward_impl(op: str, backend: str, args: tuple, out_dtype: torch.dtype | None) -> Callable[..., torch.Tensor]:
    """The implementation of ``op`` ("forward": fisher_accumulate, "vectors": fisher_vectors) for the op's
    arguments ``args`` (x, z, weight, bias, inv_var, offsets[, scale, eps]): the backend's, or on CUDA with
    backend=None the design :data:`CHOOSER` picks (timing them on ``args`` the first time)."""
    x, offsets = args[0], args[5]
    name = resolve(backend, x.device, _OPS[op])
    if not _chooses_design(backend, x.device):
        return getattr(get(name), op)
    key = (_OPS[op], _device_key(x.device), x.dtype, out_dtype, *_bucket(x.shape[0], x.shape[1], args[1].shape[1],
                                                                        offsets.shape[0] - 1))
    return CHOOSER.pick(key, _designs(op), args, {"out_dtype": out_dtype}).run
