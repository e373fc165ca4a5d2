"""The compiled CPU kernel (``fvvae_fast._C``, sources in ``csrc/``), called directly.

The cross-backend tests (tests/test_fisher_accumulate.py) run this kernel through the public
API; these tests check what is specific to it: the two ops ``fisher_accumulate_cpu`` and
``fisher_accumulate_backward_cpu`` against the float64 reference with 1 and 2 threads and
every GEMM path (the BLAS torch links, at::addmm_ on tile views, plain loops), bitwise
determinism for a fixed thread count, NaN/Inf propagated exactly as the reference does, and
bad arguments refused with a RuntimeError that names the op and the argument (the ops can be
called through ``torch.ops`` without the Python wrapper's checks).

Every test here runs with the kernel's poisoning hook on: outputs and scratch buffers are
filled with NaN before the kernel computes, so an element it forgot to write fails the
comparison with the (finite) reference.

Run: ``pytest tests/test_cpu_kernel.py`` (a few seconds). The AddressSanitizer check builds
a second copy of the extension with ``-fsanitize=address`` and runs it in a subprocess:
``pytest -m slow tests/test_cpu_kernel.py`` (a minute or two; needs g++ with libasan and ninja).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fvvae_fast.ops import dispatch, reference

from .cases import (
    CASE_IDS,
    CASES,
    SEED,
    Case,
    check_backward,
    check_forward,
    generator,
    make_inputs,
    poisoned_cpu_kernels,
)

REPO = Path(__file__).resolve().parents[1]

_reason = dispatch.available("cpu", torch.device("cpu"))
if _reason is not None:
    pytest.skip(f"the C++ extension is not available: {_reason}", allow_module_level=True)

import fvvae_fast._C as _C  # noqa: E402  (importable: checked just above)

fwd = torch.ops.fvvae_fast.fisher_accumulate_cpu
bwd = torch.ops.fvvae_fast.fisher_accumulate_backward_cpu

GRAD_NAMES = ("x", "z", "weight", "bias", "inv_var")
GEMMS = ["auto", "torch", "naive"]


@pytest.fixture(autouse=True)
def _poisoned_kernel():
    """Outputs and scratch start as NaN: an unwritten element cannot pass for a value."""
    with poisoned_cpu_kernels():
        yield
    _C._set_gemm("auto")


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# Beyond the shared CASES: several C tiles with a tail, a set split into row tiles next to
# groups of short sets, many sets, a latent dim that is not a multiple of the vector width.
EXTRA = [
    Case("c-tiles", 300, 40, (700, 0, 50, 50, 1, 333)),
    Case("many-short", 33, 17, tuple(int(n) for n in torch.randint(0, 9, (60,), generator=generator(11)))),
    Case("odd-latent", 64, 255, (3, 70, 2)),
]
ALL = CASES + EXTRA
ALL_IDS = CASE_IDS + [c.id for c in EXTRA]


def _random_case(salt: int) -> Case:
    """A fresh random shape (drawn from the session seed, printed in the pytest header)."""
    g = generator(1000 + salt)
    c, d = (int(v) for v in torch.randint(1, 160, (2,), generator=g))
    lengths = tuple(int(v) for v in torch.randint(0, 90, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g))
    return Case(f"random{salt}-c{c}-d{d}", c, d, lengths)


RANDOM = [_random_case(i) for i in range(4)]


def _grad_for(case: Case, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn((len(case.lengths), case.c, case.d + 1), generator=generator(7), dtype=torch.float64).to(dtype)


def _check_case(case: Case, dtype: torch.dtype, salt: int = 0, out_dtype: torch.dtype | None = None) -> None:
    """Forward (G in out_dtype) and backward (the upstream grad in G's dtype) against the float64 reference."""
    inputs = make_inputs(case, dtype, salt=salt)
    out = fwd(*inputs, out_dtype)
    assert out.dtype == (out_dtype or dtype) and out.shape == (len(case.lengths), case.c, case.d + 1)
    assert not out.isnan().any(), "an output element was not written (poisoned NaN left)"
    check_forward(out, inputs, dtype, f"{case.id} forward", out_dtype)
    grad = _grad_for(case, out.dtype)
    grads = bwd(grad, *inputs)
    for name, g, t in zip(GRAD_NAMES, grads, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert not g.isnan().any(), f"d{name}: an element was not written (poisoned NaN left)"
    check_backward(grads, grad, inputs, dtype, case.id)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", ALL, ids=ALL_IDS)
def test_matches_reference(case: Case, dtype: torch.dtype, threads: int):
    _check_case(case, dtype)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["out-bf16", "out-f16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", ALL, ids=ALL_IDS)
def test_out_dtype_written_from_the_accumulators(case: Case, dtype: torch.dtype, out_dtype: torch.dtype,
                                                 threads: int):
    _check_case(case, dtype, out_dtype=out_dtype)


@pytest.mark.parametrize("gemm", GEMMS[1:])
def test_out_dtype_on_every_gemm_path(gemm: str):
    _C._set_gemm(gemm)
    _check_case(EXTRA[0], torch.float32, out_dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", RANDOM, ids=[c.id for c in RANDOM])
def test_fresh_random_shapes(case: Case, dtype: torch.dtype, threads: int):
    _check_case(case, dtype, salt=SEED % 997)


@pytest.mark.parametrize("gemm", GEMMS[1:])
@pytest.mark.parametrize("case", [CASES[4], CASES[5], EXTRA[0]], ids=[CASES[4].id, CASES[5].id, EXTRA[0].id])
def test_every_gemm_path(case: Case, gemm: str, threads: int):
    _C._set_gemm(gemm)
    _check_case(case, torch.float64)
    _check_case(case, torch.float32)


def test_blas_is_used_when_torch_exports_it():
    assert isinstance(_C._blas_available(), bool)
    if "BLAS_INFO=mkl" in torch.__config__.show():
        assert _C._blas_available(), "torch links MKL but the kernel did not find sgemm_/dgemm_"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_inputs_compute_in_float32(dtype: torch.dtype):
    case = CASES[4]
    inputs = make_inputs(case, dtype)
    out = fwd(*inputs)
    assert out.dtype == torch.float32
    check_forward(out, inputs, dtype, "half forward")
    grad = _grad_for(case, torch.float32)
    grads = bwd(grad, *inputs)
    for name, g, t in zip(GRAD_NAMES, grads, inputs):
        assert g.dtype == dtype and g.shape == t.shape, name
    check_backward(grads, grad, inputs, dtype, "half")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_bitwise_deterministic_for_a_fixed_thread_count(dtype: torch.dtype, threads: int):
    case = EXTRA[0]
    inputs = make_inputs(case, dtype)
    grad = _grad_for(case, dtype)
    first_out, first_grads = fwd(*inputs), bwd(grad, *inputs)
    for _ in range(3):
        assert torch.equal(fwd(*inputs), first_out)
        for g, g0 in zip(bwd(grad, *inputs), first_grads):
            assert torch.equal(g, g0)


def test_nan_and_inf_propagate_like_the_reference():
    case = CASES[4]
    x, z, w, b, v, off = make_inputs(case, torch.float64)
    x[1, 2], x[20, 0], z[22, 3], w[5, 1] = float("nan"), float("inf"), float("nan"), float("-inf")
    inputs = (x, z, w, b, v, off)
    _C._set_poison(False)  # NaN is expected in the output here
    torch.testing.assert_close(fwd(*inputs), reference.forward(*inputs), equal_nan=True)
    grad = _grad_for(case, torch.float64)
    for name, g, e in zip(GRAD_NAMES, bwd(grad, *inputs), reference.backward(grad, *inputs)):
        torch.testing.assert_close(g, e, equal_nan=True, msg=lambda m, name=name: f"d{name}: {m}")


def test_empty_inputs():
    x, z, w, b, v, _ = make_inputs(Case("e", 5, 3, ()), torch.float32)
    out = fwd(x, z, w, b, v, torch.zeros(1, dtype=torch.int64))
    assert out.shape == (0, 5, 4)
    off = torch.zeros(4, dtype=torch.int64)
    out = fwd(x, z, w, b, v, off)
    assert out.shape == (3, 5, 4) and bool((out == 0).all())
    grads = bwd(torch.randn(3, 5, 4), x, z, w, b, v, off)
    assert [tuple(g.shape) for g in grads] == [(0, 5), (0, 3), (5, 3), (5,), (5,)]
    assert all(bool((g == 0).all()) for g in grads)


# ---- bad arguments: a RuntimeError naming the op and the argument, never a crash ----

def _args():
    return list(make_inputs(Case("v", 6, 3, (2, 0, 3)), torch.float32))


def _edit(i, value):
    def edit(args):
        args[i] = value(args) if callable(value) else value
        return args
    return edit


_MONOTONE = "offsets must be non-decreasing, but "
BAD = [
    ("x-int", _edit(0, lambda a: a[0].long()), "x must be float32, float64, float16 or bfloat16"),
    ("x-rank", _edit(0, lambda a: a[0][None]), r"x must be 2-D \(N, C\)"),
    ("z-dtype", _edit(1, lambda a: a[1].double()), "z has dtype Double but expected Float"),
    ("z-rows", _edit(1, lambda a: a[1][:-1]), r"z must have shape \(N, d\)"),
    ("x-non-contiguous", _edit(0, lambda a: a[0].t().contiguous().t()), "x must be contiguous"),
    ("weight-non-contiguous", _edit(2, lambda a: a[2].t().contiguous().t()), "weight must be contiguous"),
    ("weight-shape", _edit(2, lambda a: a[2][:, :-1]), r"weight must have shape \(C, d\)"),
    ("bias-shape", _edit(3, lambda a: a[3][:-1]), r"bias must have shape \(C,\)"),
    ("inv-var-dtype", _edit(4, lambda a: a[4].double()), "inv_var has dtype Double"),
    ("zero-latent", lambda a: [a[0], a[1][:, :0], a[2][:, :0], *a[3:]], "need C >= 1 and d >= 1"),
    ("offsets-int32", _edit(5, lambda a: a[5].int()), "offsets must be int64"),
    ("offsets-2d", _edit(5, lambda a: a[5][None]), r"offsets must be a 1-D tensor \(S\+1,\)"),
    ("offsets-empty", _edit(5, torch.zeros(0, dtype=torch.int64)), r"offsets must be a 1-D tensor \(S\+1,\)"),
    ("offsets-non-contiguous", _edit(5, torch.tensor([0, 9, 2, 9, 5, 9])[::2]), "offsets must be contiguous"),
    ("offsets-start", _edit(5, torch.tensor([1, 2, 5])), r"offsets\[0\] must be 0"),
    ("offsets-past-end", _edit(5, torch.tensor([0, 2, 9])), r"offsets\[-1\] must equal N"),
    ("offsets-short", _edit(5, torch.tensor([0, 2, 4])), r"offsets\[-1\] must equal N"),
    ("offsets-decreasing", _edit(5, torch.tensor([0, 4, 2, 5])), _MONOTONE + r"offsets\[2\] = 2 < offsets\[1\] = 4"),
    ("offsets-out-of-range", _edit(5, torch.tensor([0, 9, 5])), _MONOTONE + r"offsets\[2\] = 5 < offsets\[1\] = 9"),
    ("offsets-negative", _edit(5, torch.tensor([0, -3, 5])), _MONOTONE + r"offsets\[1\] = -3 < offsets\[0\] = 0"),
]


@pytest.mark.parametrize("edit,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_arguments_are_refused(edit, match):
    args = edit(_args())
    with pytest.raises(RuntimeError, match="fisher_accumulate_cpu: " + match):
        fwd(*args)
    with pytest.raises(RuntimeError, match="fisher_accumulate_backward_cpu: " + match):
        bwd(torch.zeros(3, 6, 4), *args)


@pytest.mark.parametrize(
    "grad,match",
    [
        (torch.zeros(3, 6, 3), r"grad must have shape \(S, C, d\+1\)"),
        (torch.zeros(2, 6, 4), r"grad must have shape \(S, C, d\+1\)"),
        (torch.zeros(3, 6, 4, dtype=torch.int32), "grad must be float32, float64, float16 or bfloat16, got Int"),
        (torch.zeros(3, 4, 6).transpose(1, 2), "grad must be contiguous"),
        (torch.zeros(3, 6 * 4), r"grad must be 3-D \(S, C, d\+1\)"),
    ],
    ids=["grad-latent", "grad-sets", "grad-dtype", "grad-non-contiguous", "grad-rank"],
)
def test_bad_grad_is_refused(grad, match):
    with pytest.raises(RuntimeError, match="fisher_accumulate_backward_cpu: " + match):
        bwd(grad, *_args())


def test_bad_out_dtype_is_refused():
    with pytest.raises(RuntimeError, match="fisher_accumulate_cpu: out_dtype must be float32, float64, float16 or "
                                           "bfloat16, got Int"):
        fwd(*_args(), torch.int32)


def test_gemm_hook_refuses_unknown_names():
    with pytest.raises(ValueError, match="expected 'auto', 'torch' or 'naive'"):
        _C._set_gemm("mkl")


# ---- AddressSanitizer (slow) ----

_ASAN_CHILD = textwrap.dedent(
    """
    import itertools, os, sys
    os.environ.pop("LD_PRELOAD", None)  # the compilers below run without the sanitizer runtime
    import torch
    from torch.utils.cpp_extension import load

    repo, build = sys.argv[1], sys.argv[2]
    flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address", "-fopenmp", "-std=c++20"]
    mod = load(name="fvvae_fast_asan", sources=[f"{repo}/csrc/fisher_accumulate.cpp",
               f"{repo}/csrc/cpu/fisher_accumulate_cpu.cpp"], extra_cflags=flags,
               extra_ldflags=["-fsanitize=address", "-fopenmp"], build_directory=build, verbose=False)
    sys.modules["fvvae_fast._C"] = mod  # the dispatcher's "cpu" backend is now the ASan build
    sys.path.insert(0, repo)
    import fvvae_fast as fv
    from tests.cases import CASES, Case, check_backward, check_forward, make_inputs

    cases = CASES + [Case("c-tiles", 300, 40, (700, 0, 50, 50, 1, 333)), Case("odd", 64, 255, (3, 70, 2))]
    mod._set_poison(True)
    for gemm in ("naive", "auto"):  # naive: ASan sees every access the tile GEMMs make
        mod._set_gemm(gemm)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for case in cases:
                for dtype, out_dtype in itertools.product((torch.float32, torch.float64), (None, torch.bfloat16)):
                    inputs = [t.requires_grad_() if t.is_floating_point() else t for t in make_inputs(case, dtype)]
                    out = fv.fisher_accumulate(*inputs, backend="cpu", out_dtype=out_dtype)
                    check_forward(out, inputs, dtype, case.id, out_dtype)
                    grad = torch.randn(out.shape, dtype=torch.float64).to(out.dtype)
                    if out.numel():
                        got = torch.autograd.grad(out, inputs[:5], grad, allow_unused=True)
                        check_backward(got, grad, inputs, dtype, case.id)
    # bad offsets through torch.ops: refused before any access
    x, z, w, b, v, _ = make_inputs(Case("v", 6, 3, (2, 0, 3)), torch.float32)
    for off in ([0, 9, 5], [0, 4, 2, 5], [0, 2, 9], [1, 5]):
        try:
            torch.ops.fvvae_fast.fisher_accumulate_cpu(x, z, w, b, v, torch.tensor(off))
        except RuntimeError:
            continue
        raise AssertionError(f"offsets {off} were accepted")
    print("ASAN-CLEAN")
    """
)


def _slow_selected(config) -> bool:
    expr = config.getoption("markexpr") or ""
    return "slow" in expr and "not slow" not in expr


@pytest.mark.slow
def test_kernel_is_clean_under_address_sanitizer(request, tmp_path):
    """Builds the extension with -fsanitize=address and runs forward and backward (every
    case, 1 and 2 threads, plain-loop and BLAS GEMMs, G in the opmath dtype and in bfloat16) in a
    subprocess with libasan preloaded.

    Run with ``pytest -m slow tests/test_cpu_kernel.py``.
    """
    if not _slow_selected(request.config):
        pytest.skip("slow: run with pytest -m slow tests/test_cpu_kernel.py")
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None or shutil.which("ninja") is None:
        pytest.skip("needs g++ and ninja")
    # libstdc++ is preloaded with libasan so the sanitizer's __cxa_throw interceptor finds the
    # real one (python itself does not link libstdc++).
    preload = [subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
               for lib in ("libasan.so", "libstdc++.so")]
    if not all(os.path.isabs(p) and os.path.exists(p) for p in preload):
        pytest.skip("libasan or libstdc++ not found")
    script = tmp_path / "asan_child.py"
    script.write_text(_ASAN_CHILD)
    build = tmp_path / "build"
    build.mkdir()
    env = dict(os.environ, LD_PRELOAD=":".join(preload), FVVAE_TEST_SEED=str(SEED),
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:alloc_dealloc_mismatch=0",
               TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    proc = subprocess.run([sys.executable, str(script), str(REPO), str(build)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    report = proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "AddressSanitizer" not in proc.stderr, report
    assert proc.returncode == 0 and "ASAN-CLEAN" in proc.stdout, report
