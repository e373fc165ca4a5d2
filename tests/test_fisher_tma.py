"""The tensor-descriptor kernels of bf16/fp16 inputs (kernels/fisher_tma.py), through the Triton launchers
``fisher_accumulate_fwd``, ``fisher_vectors_fwd`` and ``fisher_accumulate_bwd``, against the float64 reference.

Runs on CUDA with TMA (sm_90+) when present, else on CPU tensors under TRITON_INTERPRET=1, whose interpreter
runs the kernel's tensor descriptors (rows past a set load as zeros, as on the GPU). Every case spies on the
launches, so a case that silently fell back to the fused kernel fails. Outputs are poisoned with NaN.
"""

from __future__ import annotations

import pytest
import torch

from fvvae_fast.ops import dispatch

from .cases import SEED, Case, check_backward, check_forward, make_inputs
from .conftest import DEVICE
from .test_fisher_vectors import EPS, _scale, check_vectors

_reason = dispatch.available("triton", DEVICE)
pytestmark = pytest.mark.skipif(_reason is not None, reason=str(_reason))
K = dispatch.import_kernels("fisher_accumulate") if _reason is None else None
T = dispatch.import_kernels("fisher_tma") if _reason is None else None
if T is not None and DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE)[0] < 9:
    pytestmark = pytest.mark.skip(reason="no TMA before sm_90: the fused forward serves 16-bit inputs")

HALF = [torch.bfloat16, torch.float16]
HALF_IDS = ["bf16", "f16"]
# C a multiple of 8 (16-byte rows of x) with a tail in the C tile, d + 1 below, at and filling a tile of
# 16 (d = 15: the store mask is uniform) and the paper's d = 255; empty, one-row and long sets.
CASES = [
    Case("one-row", 8, 3, (1,)),
    Case("empty-sets", 16, 4, (0, 3, 0, 0, 2)),
    Case("all-empty", 8, 2, (0, 0)),
    Case("tails", 40, 19, (5, 17, 1, 0)),
    Case("d15-long", 24, 15, (70, 3, 1)),
    Case("d255", 48, 255, (37, 1, 0, 18)),
]
CASE_IDS = [c.id for c in CASES]
SPLIT = {"default": {}, "split": {"chunk_rows": 16}}  # 16: chunks of one interpreter step, sets cut in several


@pytest.fixture
def launches(monkeypatch):
    """The name of each forward, row or param kernel launched (tensor-descriptor or fused), in order."""
    seen = []
    for kernel in (T._fwd_tma_kernel, K._fwd_kernel, T._bwd_rows_tma_kernel, K._bwd_rows_kernel,
                   T._bwd_params_tma_kernel, K._bwd_params_kernel):
        def spy(*args, _run=kernel.run, _name=kernel.__name__, **kwargs):
            seen.append(_name)
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", spy)
    return seen


def _poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("split", list(SPLIT))
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_accumulate_matches_reference(case, dtype, split, launches):
    inputs = make_inputs(case, dtype, DEVICE)
    out = _poisoned((len(case.lengths), case.c, case.d + 1), torch.float32)
    got = K.fisher_accumulate_fwd(*inputs, out=out, **SPLIT[split])
    check_forward(got, inputs, dtype, f"tma forward {case.id} {dtype}")
    assert launches == ["_fwd_tma_kernel"] * bool(case.lengths)


@pytest.mark.parametrize("split", list(SPLIT))
@pytest.mark.parametrize("case", CASES[3:], ids=CASE_IDS[3:])
def test_bf16_g_matches_reference(case, split, launches):
    """G rounded once to bf16 in the epilogue (straight stores) or in the combine kernel (split sets)."""
    inputs = make_inputs(case, torch.bfloat16, DEVICE)
    out = _poisoned((len(case.lengths), case.c, case.d + 1), torch.bfloat16)
    got = K.fisher_accumulate_fwd(*inputs, out_dtype=torch.bfloat16, out=out, **SPLIT[split])
    check_forward(got, inputs, torch.bfloat16, f"tma forward {case.id} out bf16", torch.bfloat16)
    assert launches == ["_fwd_tma_kernel"]


@pytest.mark.parametrize("with_scale", [True, False], ids=["scale", "no-scale"])
@pytest.mark.parametrize("split", list(SPLIT))
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_vectors_match_reference(case, dtype, split, with_scale, launches):
    """The normalising epilogue (whitening, signed square root, sums of squares per C tile) of the same kernel."""
    inputs = make_inputs(case, dtype, DEVICE)
    scale = _scale(case, DEVICE) if with_scale else None
    got = K.fisher_vectors_fwd(*inputs, scale, EPS, **SPLIT[split])
    check_vectors(got, inputs, dtype, scale, None, f"tma vectors {case.id} {dtype}")
    assert launches == ["_fwd_tma_kernel"] * bool(case.lengths)


@pytest.mark.parametrize(("c", "d", "dtype"), [(12, 9, torch.bfloat16), (16, 256, torch.float16),
                                               (16, 9, torch.float32)], ids=["c-not-8", "d-256", "fp32"])
def test_fused_forward_serves_the_rest(c, d, dtype, launches):
    """x rows not 16-byte aligned, d + 1 past one 256-wide tile, or a 32-bit dtype: the fused forward."""
    case = Case("fallback", c, d, (9, 1))
    inputs = make_inputs(case, dtype, DEVICE)
    check_forward(K.fisher_accumulate_fwd(*inputs), inputs, dtype, f"fallback {case.id}")
    assert launches == ["_fwd_kernel"]


def test_launcher_reads_no_tensor_values_on_the_host(monkeypatch, launches):
    """No host sync on this path either (CUDA graphs capture it), forward and backward."""
    inputs = make_inputs(CASES[3], torch.bfloat16, DEVICE)
    aligned = make_inputs(CASES[4], torch.bfloat16, DEVICE)  # d + 1 = 16: the tensor-descriptor backward
    grad = torch.ones((len(CASES[4].lengths), CASES[4].c, CASES[4].d + 1), device=DEVICE)

    def host_sync(*args):
        raise AssertionError("a launcher read a tensor value on the host")

    with monkeypatch.context() as mp:
        for method in ("item", "tolist", "__bool__", "__int__", "__float__"):
            mp.setattr(torch.Tensor, method, host_sync)
        K.fisher_accumulate_fwd(*inputs, chunk_rows=16)
        K.fisher_vectors_fwd(*inputs, None, EPS)
        K.fisher_accumulate_bwd(grad, *aligned, chunk_rows=16)
    assert launches == ["_fwd_tma_kernel"] * 2 + ["_bwd_rows_tma_kernel", "_bwd_params_tma_kernel"]


@pytest.mark.parametrize("grad_dtype", ["f32", "input"])
@pytest.mark.parametrize("split", ["split", "default"])
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("case", CASES[1:], ids=CASE_IDS[1:])
def test_backward_matches_reference(case, dtype, split, grad_dtype, launches):
    """The row kernel (dx, dz; q's p_b from z_aug's ones column) and the param kernel ([dW | db] from the ones
    column, dv); the upstream grad in fp32 (G's default dtype) or the input dtype, which both kernels read;
    'split': one-step chunks in three row groups."""
    inputs = make_inputs(case, dtype, DEVICE)
    g = torch.Generator().manual_seed(SEED + 7)
    grad = torch.randn((len(case.lengths), case.c, case.d + 1), generator=g, dtype=torch.float64)
    grad = grad.to(device=DEVICE, dtype=torch.float32 if grad_dtype == "f32" else dtype)
    out = tuple(_poisoned(t.shape, t.dtype) for t in inputs[:5])
    kw = {"chunk_rows": 16, "groups": 3} if split == "split" else {}
    got = K.fisher_accumulate_bwd(grad, *inputs, out=out, **kw)
    check_backward(got, grad, inputs, dtype, f"tma backward {case.id} {dtype}")
    # grad in the input dtype: its rows of d + 1 = 5, 20 elements are not 16-byte aligned: the fused kernels
    aligned = (case.d + 1) * inputs[0].element_size() % 16 == 0
    kind = "_tma" if aligned else ""
    assert launches == [f"_bwd_rows{kind}_kernel", f"_bwd_params{kind}_kernel"] * bool(sum(case.lengths))


def test_backward_into_a_misaligned_dx_takes_the_fused_kernels(launches):
    """dx goes out through a tensor descriptor, which needs a 16-byte aligned base: a caller's ``out`` dx that
    starts 2 bytes in is served by the fused kernels, with the same gradients."""
    case = CASES[4]
    inputs = make_inputs(case, torch.bfloat16, DEVICE)
    g = torch.Generator().manual_seed(SEED + 7)
    grad = torch.randn((len(case.lengths), case.c, case.d + 1), generator=g).to(DEVICE)
    n, c = inputs[0].shape
    dx = torch.full((n * c + 1,), float("nan"), dtype=torch.bfloat16, device=DEVICE)[1:].view(n, c)
    out = (dx, *(_poisoned(t.shape, t.dtype) for t in inputs[1:5]))
    check_backward(K.fisher_accumulate_bwd(grad, *inputs, out=out), grad, inputs, torch.bfloat16, "misaligned dx")
    assert launches == ["_bwd_rows_kernel", "_bwd_params_kernel"]
