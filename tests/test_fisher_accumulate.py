"""fisher_accumulate: every backend against the float64 reference; the reference against autograd;
registration (opcheck, torch.compile), validation, and property-based fuzzing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fvvae_fast as fv
from fvvae_fast.ops import naive, reference, validate

from .cases import (
    CASE_IDS,
    CASES,
    Case,
    assert_matches_reference,
    check_backward,
    check_forward,
    generator,
    make_inputs,
)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f64", "f32", "f16", "bf16"]
HALF_OUT = [torch.bfloat16, torch.float16]
HALF_OUT_IDS = ["out-bf16", "out-f16"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("recipe", [naive.autograd_accumulate, naive.vmap_accumulate, naive.padded_bmm_accumulate],
                         ids=["autograd", "vmap", "padded-bmm"])
def test_reference_equals_autograd_of_reconstruction_nll(case: Case, recipe):
    inputs = make_inputs(case, torch.float64)
    torch.testing.assert_close(reference.forward(*inputs), recipe(*inputs), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_reference(backend, case: Case, dtype: torch.dtype):
    name, device = backend
    inputs = make_inputs(case, dtype, device)
    out = fv.fisher_accumulate(*inputs, backend=name)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == (len(case.lengths), case.c, case.d + 1)
    assert out.device.type == torch.device(device).type
    check_forward(out, inputs, dtype, f"{name} forward")
    lengths = torch.tensor(case.lengths, dtype=torch.int64)
    assert bool((out[(lengths == 0).to(out.device)] == 0).all()), "empty sets must give exact zeros"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backward_matches_reference(backend, case: Case, dtype: torch.dtype):
    name, device = backend
    inputs = [t.requires_grad_() if t.is_floating_point() else t for t in make_inputs(case, dtype, device)]
    grad = torch.randn((len(case.lengths), case.c, case.d + 1), generator=generator(7), dtype=torch.float64)
    out = fv.fisher_accumulate(*inputs, backend=name)
    grads = torch.autograd.grad(out, inputs[:5], grad.to(out), allow_unused=True)
    for g, t in zip(grads, inputs):
        assert g is not None and g.shape == t.shape and g.dtype == t.dtype
    check_backward(grads, grad.to(out), inputs, dtype, f"{name} backward")


@pytest.mark.parametrize("out_dtype", HALF_OUT, ids=HALF_OUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_out_dtype(backend, case: Case, dtype: torch.dtype, out_dtype: torch.dtype):
    """G written in out_dtype (accumulated in the opmath dtype); the upstream grad arrives in out_dtype
    and the gradients leave in the inputs' dtype."""
    name, device = backend
    inputs = [t.requires_grad_() if t.is_floating_point() else t for t in make_inputs(case, dtype, device)]
    out = fv.fisher_accumulate(*inputs, backend=name, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (len(case.lengths), case.c, case.d + 1)
    check_forward(out, inputs, dtype, f"{name} forward", out_dtype)
    grad = torch.randn(out.shape, generator=generator(7), dtype=torch.float64).to(device=device, dtype=out_dtype)
    grads = torch.autograd.grad(out, inputs[:5], grad)
    assert [g.dtype for g in grads] == [dtype] * 5
    check_backward(grads, grad, inputs, dtype, f"{name} backward")


def _at_zero(device="cpu"):
    """float32 inputs with a_tc = W z_t + b rounded to about 0 for a few (t, c): rows 0, 5, 21 (sets 0, 1, 1)."""
    x, z, w, b, v, off = make_inputs(CASES[4], torch.float32, device)
    for t, c in ((0, 3), (5, 7), (21, 30)):
        b[c] = -(w[c].double() @ z[t].double()).float()
    return x, z, w, b, v, off


def test_oracle_accepts_either_mask_where_a_is_at_rounding_of_zero():
    """The kernel's mask at a (t, c) with |a| at rounding level may be either: the oracle accepts both
    (only there), and a plain comparison would not."""
    inputs = _at_zero()
    x, z, w, b, v = (u.double() for u in inputs[:5])
    want = reference.forward(x, z, w, b, v, inputs[5])
    t, c, s = 5, 7, 1
    r = ((w[c] @ z[t] + b[c]).clamp_min(0) - x[t, c]) * v[c]  # the (t, c) term of G[s, c] with the mask on
    flipped = want.clone()
    flipped[s, c] -= r * torch.cat([z[t], z.new_ones(1)]) * (1 if w[c] @ z[t] + b[c] > 0 else -1)
    with pytest.raises(AssertionError):
        assert_matches_reference(flipped, want, torch.float32, "a flip is no rounding error")
    check_forward(flipped.float(), inputs, torch.float32, "mask flipped")
    broken = flipped.clone()
    broken[0, 1, 2] += 1.0  # a row with no flippable entry is still compared tightly
    with pytest.raises(AssertionError):
        check_forward(broken.float(), inputs, torch.float32)


def test_pre_activation_at_rounding_of_zero(backend):
    name, device = backend
    inputs = [t.requires_grad_() if t.is_floating_point() else t for t in _at_zero(device)]
    out = fv.fisher_accumulate(*inputs, backend=name)
    check_forward(out, inputs, torch.float32, f"{name} forward")
    grad = torch.randn(out.shape, generator=generator(3)).to(out)
    check_backward(torch.autograd.grad(out, inputs[:5], grad), grad, inputs, torch.float32, f"{name} backward")


def test_gradcheck(backend):
    name, device = backend
    inputs = [t.requires_grad_() if t.is_floating_point() else t
              for t in make_inputs(Case("small", 4, 3, (2, 0, 3)), torch.float64, device)]
    assert torch.autograd.gradcheck(lambda *a: fv.fisher_accumulate(*a, inputs[5], backend=name), inputs[:5])


def test_zero_rows_forward_and_backward(backend):
    name, device = backend
    x, z, w, b, v, _ = [t.requires_grad_() if t.is_floating_point() else t
                        for t in make_inputs(Case("zero", 5, 3, ()), torch.float32, device)]
    offsets = torch.zeros(4, dtype=torch.int64, device=device)  # three empty sets
    out = fv.fisher_accumulate(x, z, w, b, v, offsets, backend=name)
    assert out.shape == (3, 5, 4) and bool((out == 0).all())
    out.sum().backward()
    assert x.grad.shape == (0, 5) and bool((w.grad == 0).all()) and bool((v.grad == 0).all())


def test_non_contiguous_inputs(backend):
    name, device = backend
    x, z, w, b, v, off = make_inputs(CASES[4], torch.float32, device)
    out = fv.fisher_accumulate(x.t().contiguous().t(), z.t().contiguous().t(), w.t().contiguous().t(),
                               b, v, off, backend=name)
    check_forward(out, (x, z, w, b, v, off), torch.float32, "non-contiguous")


def test_default_backend_is_fastest_available():
    x, z, w, b, v, off = make_inputs(CASES[1], torch.float32)
    expected = "cpu" if fv.ops.dispatch.available("cpu", x.device) is None else "reference"
    assert fv.ops.dispatch.resolve(None, x.device) == expected
    check_forward(fv.fisher_accumulate(x, z, w, b, v, off), (x, z, w, b, v, off), torch.float32)


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16], ids=["out-default", "out-bf16"])
def test_opcheck_registration(backend, out_dtype):
    name, device = backend
    inputs = make_inputs(CASES[1], torch.float64, device)
    args = (*[t.requires_grad_() if t.is_floating_point() else t for t in inputs], name, "propagate", out_dtype)
    torch.library.opcheck(torch.ops.fvvae_fast.fisher_accumulate.default, args)


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16], ids=["out-default", "out-bf16"])
def test_torch_compile_has_no_graph_break(out_dtype):
    inputs = [t.requires_grad_() if t.is_floating_point() else t for t in make_inputs(CASES[4], torch.float32)]

    def f(x, z, w, b, v, off):
        return (fv.fisher_accumulate(x, z, w, b, v, off, out_dtype=out_dtype).float() * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    out.backward()
    torch.testing.assert_close(out, f(*[t.detach() if t.is_floating_point() else t for t in inputs]))
    assert inputs[0].grad is not None


# ---- validation: every bad input of the contract is refused with a clear error ----

def _good():
    return list(make_inputs(Case("v", 6, 3, (2, 0, 3)), torch.float32))


def _set(i, value):
    def edit(args):
        args[i] = value(args) if callable(value) else value
        return args
    return edit


BAD_INPUTS = [
    ("x-not-tensor", _set(0, lambda a: a[0].tolist()), TypeError, "x must be a torch.Tensor"),
    ("x-int", _set(0, lambda a: a[0].long()), TypeError, "x must be a floating tensor"),
    ("z-dtype-mismatch", _set(1, lambda a: a[1].double()), TypeError, "z has dtype torch.float64"),
    ("x-rank", _set(0, lambda a: a[0][None]), ValueError, r"x must be \(N, C\)"),
    ("z-rows", _set(1, lambda a: a[1][:-1]), ValueError, "z must have N=5 rows"),
    ("weight-shape", _set(2, lambda a: a[2].t()), ValueError, r"weight must be \(C, d\) = \(6, 3\)"),
    ("bias-shape", _set(3, lambda a: a[3][:-1]), ValueError, r"bias must be \(C,\)"),
    ("inv-var-shape", _set(4, lambda a: a[4][None]), ValueError, r"inv_var must be \(C,\)"),
    ("offsets-float", _set(5, lambda a: a[5].float()), TypeError, "offsets must be an int64 tensor"),
    ("offsets-int32", _set(5, lambda a: a[5].int()), TypeError, "offsets must be an int64 tensor"),
    ("offsets-2d", _set(5, lambda a: a[5][None]), ValueError, r"offsets must be \(S\+1,\)"),
    ("offsets-empty", _set(5, torch.zeros(0, dtype=torch.int64)), ValueError, r"offsets must be \(S\+1,\)"),
    ("offsets-start", _set(5, torch.tensor([1, 2, 5])), ValueError, r"from 0 to N=5 \(the rows of x\), but offsets\[0\] = 1"),
    ("offsets-end", _set(5, torch.tensor([0, 2, 4])), ValueError, r"from 0 to N=5 \(the rows of x\), but offsets\[-1\] = 4"),
    ("offsets-decreasing", _set(5, torch.tensor([0, 3, 2, 5])), ValueError, "non-decreasing"),
    ("zero-latent", lambda a: [a[0], a[1][:, :0], a[2][:, :0], *a[3:]], ValueError, "d >= 1"),
]


@pytest.mark.parametrize("edit,error,match", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused(edit, error, match):
    with pytest.raises(error, match=match):
        fv.fisher_accumulate(*edit(_good()))


def test_nan_policy():
    args = _good()
    args[0][1, 2] = float("nan")
    assert torch.isnan(fv.fisher_accumulate(*args)).any()
    with pytest.raises(ValueError, match="x contains NaN"):
        fv.fisher_accumulate(*args, nan_policy="raise")
    with pytest.raises(ValueError, match="nan_policy must be one of"):
        fv.fisher_accumulate(*_good(), nan_policy="omit")


@pytest.mark.parametrize("out_dtype,error,match", [
    ("bfloat16", TypeError, "out_dtype must be a torch.dtype or None, got 'bfloat16'"),
    (torch.int32, ValueError, "out_dtype must be one of .* got torch.int32"),
    (torch.float8_e4m3fn, ValueError, "out_dtype must be one of"),
], ids=["str", "int32", "float8"])
def test_bad_out_dtype_is_refused(out_dtype, error, match):
    with pytest.raises(error, match=match):
        fv.fisher_accumulate(*_good(), out_dtype=out_dtype)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        fv.fisher_accumulate(*_good(), backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_mismatched_devices():
    args = _good()
    args[2] = args[2].cuda()
    with pytest.raises(ValueError, match="weight is on cuda"):
        fv.fisher_accumulate(*args)


def test_offsets_are_checked_on_the_host_only():
    """Reading offsets syncs a CUDA stream: the checks run for CPU tensors, elsewhere with FVVAE_CHECK_OFFSETS=1."""
    on_device = torch.zeros(3, dtype=torch.int64, device="meta")  # stands in for a CUDA tensor
    assert validate._needs_host_checks(torch.zeros(3, dtype=torch.int64))
    assert not validate._needs_host_checks(on_device)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FVVAE_CHECK_OFFSETS", "1")
        assert validate._needs_host_checks(on_device)


def test_device_path_never_reads_offsets(backend, monkeypatch):
    """Inputs treated as CUDA tensors: forward and backward run without the offsets checks (no host sync)."""
    def host_sync(*args):
        raise AssertionError("the offsets checks ran: they read values, a host sync on CUDA")

    monkeypatch.setattr(validate, "_needs_host_checks", lambda t: False)
    monkeypatch.setattr(validate, "check_offsets", host_sync)
    name, device = backend
    inputs = [t.requires_grad_() if t.is_floating_point() else t for t in make_inputs(CASES[1], torch.float32, device)]
    out = fv.fisher_accumulate(*inputs, backend=name)
    out.sum().backward()
    check_forward(out, inputs, torch.float32, f"{name} unchecked")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("design", [None, "fused", "split"])
def test_cuda_op_does_not_sync_and_is_captured_by_a_cuda_graph(design, monkeypatch):
    """None: the chooser's pick (sync-free under the sync debug mode and capture); else that design pinned."""
    if design:
        monkeypatch.setenv("FVVAE_DESIGN", design)
    inputs = [t.requires_grad_() if t.is_floating_point() else t for t in make_inputs(CASES[4], torch.float32, "cuda")]
    grad = torch.randn((len(CASES[4].lengths), CASES[4].c, CASES[4].d + 1), device="cuda")
    torch.autograd.grad(fv.fisher_accumulate(*inputs), inputs[:5], grad)  # warm-up: autotuning syncs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.autograd.grad(fv.fisher_accumulate(*inputs), inputs[:5], grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    static = [t.detach() for t in inputs]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fv.fisher_accumulate(*static)
    graph.replay()
    torch.testing.assert_close(captured, fv.fisher_accumulate(*static))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("design", ["fused", "split"])
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_op_under_inductor_equals_eager(mode, design, monkeypatch):
    """Inductor (and its CUDA-graph trees, which refuse a tensor kept across calls in their pool)
    runs the very kernels of eager mode: the result is bitwise the same (the design pinned: unpinned, a
    captured call runs the fastest sync-free one, which may not be eager's pick)."""
    monkeypatch.setenv("FVVAE_DESIGN", design)
    torch._dynamo.reset()
    inputs = make_inputs(CASES[4], torch.float32, "cuda")
    compiled = torch.compile(lambda *a: fv.fisher_accumulate(*a) * 1.0, fullgraph=True, mode=mode)
    for _ in range(3):  # warm-up, recording, replay
        got = compiled(*inputs).clone()
    assert torch.equal(got, fv.fisher_accumulate(*inputs))


@st.composite
def _fuzzed_inputs(draw):
    c, d = draw(st.integers(0, 9)), draw(st.integers(0, 6))
    lengths = draw(st.lists(st.integers(0, 7), max_size=5))
    n = sum(lengths)
    offsets = [0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()] if lengths else [0]
    corrupt = draw(st.sampled_from(["none", "offsets", "shape", "dtype"]))
    if corrupt == "offsets" and len(offsets) > 1:
        offsets[draw(st.integers(0, len(offsets) - 1))] += draw(st.sampled_from([-3, -1, 1, 2]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**30)))
    x, z = torch.rand(n, c, generator=g), torch.randn(n, d, generator=g)
    w, b, v = torch.randn(c, d, generator=g), torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    if corrupt == "shape":
        w = torch.randn(c + 1, d, generator=g)
    args = [t.to(dtype) for t in (x, z, w, b, v)] + [torch.tensor(offsets, dtype=torch.int64)]
    if corrupt == "dtype":
        args[draw(st.integers(0, 4))] = args[0].to(torch.float64 if dtype != torch.float64 else torch.float32)
    return args, dtype


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_fuzzed_inputs(), st.sampled_from(["reference", None]))
def test_fuzz_computed_correctly_or_refused(case, backend):
    args, dtype = case
    try:
        out = fv.fisher_accumulate(*args, backend=backend)
    except (ValueError, TypeError):
        return
    assert out.shape == (args[5].numel() - 1, args[0].shape[1], args[1].shape[1] + 1)
    check_forward(out, args, dtype, "fuzz")
