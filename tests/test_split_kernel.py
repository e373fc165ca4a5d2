"""The split-GEMM design (kernels/fisher_split.py), called directly: R = residuals by a GEMM with an epilogue,
then G_s = R_s^T [z_s | 1] per set, by the Triton segmented GEMM or ``torch._grouped_mm``.

Runs on CUDA when present, else on CPU tensors under TRITON_INTERPRET=1, where every output and scratch
buffer starts as NaN (an element left unwritten fails). Oracle: the float64 reference (tests/cases.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fvvae_fast.ops import dispatch
from fvvae_fast.ops.validate import result_dtype

from .cases import CASE_IDS, CASES, Case, check_forward, make_inputs
from .conftest import DEVICE
from .test_fisher_vectors import check_vectors
from .test_triton_kernel import triton_backends

_reason = dispatch.available("triton", DEVICE)
pytestmark = pytest.mark.skipif(_reason is not None, reason=str(_reason))
K = dispatch.import_kernels("fisher_split") if _reason is None else None

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]
AWKWARD = Case("awkward", 33, 16, (0, 1, 70, 5, 0, 1, 33))  # d+1 = 17: z_aug padded to 32; C tail; 5 row steps


def _inputs(case: Case, dtype: torch.dtype):
    return make_inputs(case, dtype, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", [*CASES, AWKWARD], ids=[*CASE_IDS, AWKWARD.id])
def test_forward_cases(case, dtype):
    inputs = _inputs(case, dtype)
    got = K.fisher_accumulate_split(*inputs, grouped=False)
    assert got.shape == (len(case.lengths), case.c, case.d + 1) and got.dtype == result_dtype(dtype, None)
    check_forward(got, inputs, dtype, f"split {case.id} {dtype}")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["out-bf16", "out-f16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_out_dtype(dtype, out_dtype):
    inputs = _inputs(AWKWARD, dtype)
    got = K.fisher_accumulate_split(*inputs, out_dtype=out_dtype, grouped=False)
    assert got.dtype == out_dtype
    check_forward(got, inputs, dtype, f"split out {out_dtype}", out_dtype)


def _grouped_dtype() -> torch.dtype:
    """bf16 where grouped mm serves the op (CUDA); its CPU fallback takes fp32 only (the same layouts)."""
    return torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


@pytest.mark.parametrize("case", [*CASES, AWKWARD], ids=[*CASE_IDS, AWKWARD.id])
def test_forward_grouped_mm(case):
    """Kernel 2 as torch._grouped_mm: R^T (column-major view of aligned rows), z_aug and the int32 set ends
    written by kernel 1; empty sets give zeros; d+1 not a multiple of 16 is cut from the padded result."""
    dtype = _grouped_dtype()
    if DEVICE.type == "cuda" and not K.grouped_mm_usable(DEVICE, dtype, torch.float32):
        pytest.skip("torch._grouped_mm does not serve bf16 with an fp32 result on this device")
    inputs = _inputs(case, dtype)
    got = K.fisher_accumulate_split(*inputs, grouped=True)
    assert got.is_contiguous() and got.shape == (len(case.lengths), case.c, case.d + 1)
    check_forward(got, inputs, dtype, f"grouped {case.id}")


def test_grouped_mm_only_where_probed_right(monkeypatch):
    """Grouped mm is never used off CUDA, for fp16 (R would overflow) or fp32 (TF32), nor when its probe fails."""
    cuda = torch.device("cuda")
    assert not K.grouped_mm_usable(torch.device("cpu"), torch.bfloat16, torch.float32)
    assert not K.grouped_mm_usable(cuda, torch.float16, torch.float32)
    assert not K.grouped_mm_usable(cuda, torch.float32, torch.float32)
    monkeypatch.setattr(K, "_PROBED", {})
    monkeypatch.setattr(K, "_grouped_mm_probe", lambda *a: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not K.grouped_mm_usable(cuda, torch.bfloat16, torch.float32)
    monkeypatch.setattr(K, "_PROBED", {})
    monkeypatch.setattr(K, "_grouped_mm_probe", lambda *a: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not K.grouped_mm_usable(cuda, torch.bfloat16, torch.float32), "no probe inside a capture"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert K.grouped_mm_usable(cuda, torch.bfloat16, torch.float32)


def test_fp16_large_inv_var_does_not_overflow():
    """inv_var (mu_x - x) past the fp16 range: R holds the unscaled residual, kernel 2 multiplies by inv_var."""
    x, z, w, b, v, off = _inputs(Case("big-inv-var", 6, 4, (30, 2)), torch.float16)
    v = torch.full_like(v, 6.0e4)
    b = b + 4.0
    got = K.fisher_accumulate_split(x, z, w, b, v, off)
    assert bool(torch.isfinite(got).all())
    check_forward(got, (x, z, w, b, v, off), torch.float16, "fp16 large inv_var")


@pytest.mark.parametrize("with_scale", [False, True], ids=["identity", "diagonal"])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float64, None), (torch.float32, None), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, None), (torch.float16, torch.float16)],
                         ids=["f64", "f32", "f32-out-bf16", "bf16", "f16"])
@pytest.mark.parametrize("case", [*CASES, AWKWARD], ids=[*CASE_IDS, AWKWARD.id])
def test_vectors_cases(case, dtype, out_dtype, with_scale):
    inputs = _inputs(case, dtype)
    scale = (0.1 + torch.rand(case.c * (case.d + 1), dtype=torch.float64)).to(DEVICE) if with_scale else None
    got = K.fisher_vectors_split(*inputs, scale, 1e-12, out_dtype=out_dtype)
    assert got.dtype == result_dtype(dtype, out_dtype)
    check_vectors(got, inputs, dtype, scale, out_dtype, f"split vectors {case.id}")
    empty = torch.tensor(case.lengths, device=DEVICE) == 0
    assert bool((got[empty] == 0).all()), "empty sets give exact zeros"


def test_offsets_out_of_range_stay_in_bounds():
    """Unchecked (CUDA) offsets are clamped into [0, N] and made non-decreasing on the device, both kernel 2s."""
    inputs = _inputs(Case("bad-offsets", 5, 3, (4, 3)), torch.float32)
    bad = torch.tensor([-2, 9, 5, 12], device=DEVICE)
    clamped = (*inputs[:5], torch.tensor([0, 7, 7, 7], device=DEVICE))
    for grouped in (False, True) if DEVICE.type == "cpu" else (False,):
        check_forward(K.fisher_accumulate_split(*inputs[:5], bad, grouped=grouped), clamped, torch.float32,
                      f"clamped offsets, grouped={grouped}")


class _CountLaunches(TorchDispatchMode):
    """Counts torch ops that launch device work (allocations and views launch nothing)."""

    _FREE = ("empty", "view", "t.", "transpose", "slice", "alias", "as_strided", "detach", "lift_fresh")

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__) + "."
        if not any(name.startswith(f) for f in self._FREE):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("what", ["accumulate", "accumulate-grouped", "vectors"])
def test_at_most_three_launches(monkeypatch, what):
    """Per call: Triton kernels (stubbed here) plus torch ops that launch work, no more than three."""
    launched = []
    for name in ("_residual", "_segment"):
        for kind, tuner in getattr(K, name).items():
            monkeypatch.setattr(tuner, "run", lambda *a, _n=name, **kw: launched.append(_n))
    monkeypatch.setattr(K._normalize_rows_kernel, "run", lambda *a, **kw: launched.append("normalize"))
    monkeypatch.setattr(K, "_scratch", lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device))
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: torch.empty((3, 9, 32), device=DEVICE))
    inputs = _inputs(Case("count", 9, 16, (3, 0, 20)), torch.bfloat16)  # d+1 = 17: a slice copy
    with _CountLaunches() as mode:
        if what == "vectors":
            K.fisher_vectors_split(*inputs, None, 1e-12)
        else:
            K.fisher_accumulate_split(*inputs, grouped=what.endswith("grouped"))
    total = launched + mode.ops + (["grouped_mm"] if what.endswith("grouped") else [])
    assert len(total) <= 3 and "_residual" in launched, total


def test_deterministic():
    inputs = _inputs(AWKWARD, torch.float32)
    assert torch.equal(K.fisher_accumulate_split(*inputs), K.fisher_accumulate_split(*inputs))


def test_normalising_epilogue_zeroes_the_sums_past_its_tiles():
    """The sums-of-squares buffer is sized for the config with the most tiles; a config with fewer zeroes the rest
    (the normalisation adds them all), whichever config autotuning picked."""
    case = Case("sq", 37, 19, (5, 0, 9))
    x, z, w, b, v, off = _inputs(case, torch.float32)
    r, za, ends = K._residuals(x, z, w, b, v, off, scale_r=True)
    roots = torch.empty((3, case.c * (case.d + 1)), device=DEVICE)
    sq = torch.full((3, 300), float("nan"), device=DEVICE)
    K._segment_gemm(r, za, ends, v, roots, case.d, has_v=False, sq=sq)
    best = K._segment["float32"].best_config.kwargs
    tiles = -(-case.c // best["BLOCK_C"]) * -(-(case.d + 1) // best["BLOCK_J"])
    assert 1 < tiles < 300 and bool((sq[:, tiles:] == 0).all()) and bool(sq.isfinite().all())
    torch.testing.assert_close(sq.sum(1).double().cpu(), roots.double().square().sum(1).cpu(), rtol=1e-5, atol=0)


_SM90_SCRIPT = """
import json, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fvvae_fast.ops import dispatch
S = dispatch.import_kernels("fisher_split")
ELEM = {"half": "bf16", "float32": "fp32", "float64": "fp64"}
INTS = ("N", "S", "C", "LR", "LEN_KEY", "N_SQ")
for kind, elem in ELEM.items():
    acc = tl.float64 if kind == "float64" else tl.float32
    base = {"D": 255, "KA": 256, "ACC": acc, "USE_DOT": kind != "float64",
            "PRECISION": {"half": "tf32", "float32": "tf32x3", "float64": "ieee"}[kind]}
    for fn, configs, extra in ((S._residual_kernel, S._RES_CONFIGS, {"SCALE_R": True}),
                               (S._segment_gemm_kernel, S._SEG_CONFIGS, {"HAS_V": False, "NORMALIZE": True, "HAS_SCALE": True})):
        cf = configs[kind][0]
        sig = {n: "*i64" if n == "off_ptr" else "*i32" if n == "ends_ptr" else
               ("*" + elem if n in ("x_ptr", "z_ptr", "w_ptr", "b_ptr", "v_ptr", "r_ptr", "za_ptr") else "*fp64" if kind == "float64" else "*fp32")
               if n.endswith("_ptr") else "i32" if n in INTS else "constexpr" for n in fn.arg_names}
        out = triton.compile(ASTSource(fn, sig, {**base, **extra, **cf.kwargs}), target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": cf.num_warps, "num_stages": cf.num_stages})
        print(json.dumps({"kernel": fn.__name__, "kind": kind, "wgmma": out.asm["ptx"].count("wgmma.mma_async")}))
"""


def test_first_configs_compile_for_sm90():
    """Ahead of time, no GPU: the first config of both kernels in every dtype kind compiles for sm_90 at the
    paper's d = 255 (a kernel the interpreter runs may still not compile), 16-bit GEMMs on wgmma."""
    if triton_backends() is None:
        pytest.skip("Triton has no CUDA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 6 and all(r["wgmma"] > 0 for r in rows if r["kind"] == "half"), rows
