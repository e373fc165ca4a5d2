"""fisher_vectors (G with the whitening, sign, signed square root and L2 norm in the epilogue): every
backend against the float64 reference, fisher_encode's fused path against its autograd path,
registration, validation, and the CPU kernel's reuse of freed outputs."""

from __future__ import annotations

import pytest
import torch

import fvvae_fast as fv
from fvvae_fast.ops import dispatch, reference
from fvvae_fast.ops.validate import EPS_MIN

from .cases import CASE_IDS, CASES, Case, generator, make_inputs, mask_may_flip, poisoned_cpu_kernels, tolerance

# (input dtype, out_dtype)
DTYPES = [(torch.float64, None), (torch.float32, None), (torch.float32, torch.bfloat16), (torch.bfloat16, None)]
DTYPE_IDS = ["f64", "f32", "f32-out-bf16", "bf16"]
EPS = 1e-12
_CPU_REASON = dispatch.available("cpu", torch.device("cpu"))


@pytest.fixture(autouse=True)
def _poisoned():
    with poisoned_cpu_kernels():
        yield


def _scale(case: Case, device) -> torch.Tensor:
    return (0.1 + torch.rand(case.c * (case.d + 1), generator=generator(3), dtype=torch.float64)).to(device)


def check_vectors(out: torch.Tensor, inputs, dtype: torch.dtype, scale: torch.Tensor | None,
                  out_dtype: torch.dtype | None, what: str) -> None:
    """``out`` against :func:`reference.vectors` in float64 on the same inputs.

    An error e in y = -scale * vec(G) moves sign(y) sqrt|y| by at most sqrt|e| (more than e near 0)
    and the row's squared norm by at most sum |e|; the allowance follows G's tolerance through both.
    Rows of a set holding a pre-activation within rounding of 0 need only be finite (mask flips).
    """
    as64 = [t.detach().double().cpu() if t.is_floating_point() else t.detach().cpu() for t in inputs]
    s64 = None if scale is None else scale.double().cpu()
    ref = reference.vectors(*as64, s64, EPS)
    out = out.detach().double().cpu()
    assert out.shape == ref.shape, what
    if ref.numel() == 0:
        return
    y = -reference.forward(*as64).flatten(1) * (1 if s64 is None else s64)
    atol, rtol = tolerance(dtype)
    err = atol * y.abs().amax(1, keepdim=True) + rtol * y.abs()  # bound on |error of y|
    sq = y.abs().sum(1, keepdim=True)  # the squared norm of the signed square roots
    norm = sq.sqrt().clamp_min(EPS)
    allowed = err.sqrt() / norm + ref.abs() * (err.sum(1, keepdim=True) / sq.clamp_min(EPS**2))
    if out_dtype is not None:
        allowed = allowed + ref.abs() * torch.finfo(out_dtype).eps / 2 + torch.finfo(out_dtype).smallest_normal
    offsets = as64[5]
    owner = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff())
    loose = torch.zeros(offsets.numel() - 1, dtype=torch.bool)
    loose[owner[mask_may_flip(inputs, dtype).any(1)]] = True
    assert bool(out.isfinite().all()), f"{what}: {int((~out.isfinite()).sum())} entries not finite"
    bad = ((out - ref).abs() > allowed + 1e-300) & ~loose[:, None]
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {bad.numel()} entries off, worst "
                                 f"{float(((out - ref).abs() - allowed).max()):.3g} past the allowance")


@pytest.mark.parametrize("with_scale", [False, True], ids=["identity", "diagonal"])
@pytest.mark.parametrize("dtype,out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_reference(backend, case: Case, dtype, out_dtype, with_scale):
    name, device = backend
    inputs = make_inputs(case, dtype, device)
    scale = _scale(case, device) if with_scale else None
    out = fv.fisher_vectors(*inputs, scale=scale, backend=name, out_dtype=out_dtype)
    expected = out_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.dtype == expected and out.shape == (len(case.lengths), case.c * (case.d + 1))
    check_vectors(out, inputs, dtype, scale, out_dtype, f"{name} vectors")
    lengths = torch.tensor(case.lengths, dtype=torch.int64)
    assert bool((out[(lengths == 0).to(out.device)] == 0).all()), "empty sets must give exact zeros"
    nonzero = out.double().norm(dim=1)[(lengths > 0).to(out.device)]
    torch.testing.assert_close(nonzero, torch.ones_like(nonzero), atol=1e-2 if expected.itemsize == 2 else 1e-5,
                               rtol=0)


@pytest.mark.skipif(_CPU_REASON is not None, reason=str(_CPU_REASON))
@pytest.mark.parametrize("c,d,lengths", [(40, 7000, (3, 0, 9)), (512, 255, (50,) * 64), (512, 255, (1250, 0, 700))],
                         ids=["c-tiles", "frames", "videos"])
@pytest.mark.parametrize("threads", [1, 2], ids=["1thread", "2threads"])
def test_cpu_whole_set_and_split_set_paths(c, d, lengths, threads):
    """The C++ kernel normalises a set inside its unit when its vector fits one tile of C (frames), or
    after all units from per-tile sums (c-tiles, videos)."""
    case = Case("paths", c, d, lengths)
    inputs = make_inputs(case, torch.float32)
    scale = _scale(case, "cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = fv.fisher_vectors(*inputs, scale=scale, backend="cpu")
    finally:
        torch.set_num_threads(before)
    check_vectors(out, inputs, torch.float32, scale, None, "cpu vectors")


def _check_rounded_once(backend: str, case: Case, magnitude: float, out_dtype: torch.dtype) -> None:
    """float64 inputs (x, W and b scaled by ``magnitude``) into a 16-bit output: each entry is the float64
    result rounded once, within half a unit in the last place (|ref| eps / 2, or half the subnormal step)."""
    x, z, w, b, v, off = make_inputs(case, torch.float64)
    inputs = (x * magnitude, z, w * magnitude, b * magnitude, v, off)
    out = fv.fisher_vectors(*inputs, backend=backend, out_dtype=out_dtype)
    ref = reference.vectors(*(t.cpu() for t in inputs), None, EPS)
    got = out.double().cpu()
    assert bool(got.isfinite().all()), f"{backend}: {int((~got.isfinite()).sum())} entries not finite"
    info = torch.finfo(out_dtype)
    allowed = ref.abs() * info.eps / 2 * (1 + 2**-12) + info.tiny * info.eps
    assert bool(((got - ref).abs() <= allowed).all()), (
        f"{backend}: {int(((got - ref).abs() > allowed).sum())} entries off by more than half an ulp, worst "
        f"{float(((got - ref).abs() / allowed).max()):.3g} x the allowance")


_HALF_OUT = pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=["out-f16", "out-bf16"])
# |y| up to 1e13 (its root overflows fp16), about 1, and down to 1e-13 (its root is an fp16 subnormal)
_MAGNITUDES = pytest.mark.parametrize("magnitude", [1e10, 1.0, 1e-12], ids=["huge", "unit", "tiny"])


@_HALF_OUT
@_MAGNITUDES
def test_16bit_output_is_rounded_once(backend, magnitude, out_dtype):
    """The signed roots wait for the norm in the accumulation dtype, not in a 16-bit output: there fp16
    overflowed to inf (then NaN) above 65504, lost its digits below 6e-5, and every entry was rounded twice
    (up to a whole ulp off)."""
    _check_rounded_once(backend[0], Case("rounded-once", 64, 31, (40, 0, 17, 1)), magnitude, out_dtype)


@pytest.mark.skipif(_CPU_REASON is not None, reason=str(_CPU_REASON))
@_HALF_OUT
@_MAGNITUDES
def test_cpu_16bit_output_of_split_sets_is_rounded_once(magnitude, out_dtype):
    """The same where the C++ kernel's set spans several tiles of C and a last pass divides by the norm."""
    _check_rounded_once("cpu", Case("rounded-once-c-tiles", 40, 7000, (9, 0, 3)), magnitude, out_dtype)


def _model_and_fim(mode: str):
    from fvvae_fast.model import FVVAE

    torch.manual_seed(0)
    model = FVVAE(in_dim=24, latent_dim=6).eval()
    x = torch.rand(5, 30, 24)
    fim = fv.FisherInformation(mode=mode, **({"rank": 4} if mode == "lowrank" else {}))
    fim.update(fv.fisher_gradients(model, x).detach())
    return model, fim, torch.rand(4, 11, 24)


@pytest.mark.parametrize("mode", [None, "diagonal", "lowrank"])
def test_fisher_encode_fused_path_equals_its_autograd_path(mode):
    model, fim, x = _model_and_fim(mode or "diagonal")
    fim = fim if mode else None
    with torch.inference_mode():
        fused = fv.fisher_encode(model, x, fim=fim)
    plain = fv.fisher_encode(model, x.clone().requires_grad_(), fim=fim)  # autograd: the composed ops
    assert plain.requires_grad and not fused.requires_grad
    torch.testing.assert_close(fused, plain.detach(), atol=1e-6, rtol=1e-5)


def test_fisher_encode_uses_the_fused_op_only_outside_autograd(monkeypatch):
    import fvvae_fast.encode as encode

    calls = []
    real = encode.fisher_vectors
    monkeypatch.setattr(encode, "fisher_vectors", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, fim, x = _model_and_fim("diagonal")
    with torch.no_grad():
        fv.fisher_encode(model, x, fim=fim)
        fv.fisher_encode(model, x, fim=fim, normalize=False)
    assert calls == [1]
    fv.fisher_encode(model, x, fim=fim)  # parameters require grad: autograd path
    assert calls == [1]


def _good():
    return make_inputs(CASES[1], torch.float32)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"scale": torch.ones(3)}, ValueError, r"fisher_vectors: scale must be \(C\*\(d\+1\),\) = \(35,\)"),
    ({"scale": torch.ones(35, dtype=torch.int64)}, TypeError, "fisher_vectors: scale must be None or a floating"),
    ({"scale": [1.0] * 35}, TypeError, "fisher_vectors: scale must be None or a floating"),
    ({"eps": -1.0}, ValueError, "fisher_vectors: eps must be a finite real >= 1.175e-38"),
    ({"eps": float("nan")}, ValueError, "fisher_vectors: eps must be a finite real >= 1.175e-38"),
    ({"eps": True}, ValueError, "fisher_vectors: eps must be a finite real >= 1.175e-38"),
    ({"eps": 0.0}, ValueError, "fisher_vectors: eps must be a finite real >= 1.175e-38"),
    ({"eps": 1e-39}, ValueError, "fisher_vectors: eps must be a finite real >= 1.175e-38"),
    ({"backend": "gpu"}, ValueError, "fisher_vectors: backend must be one of"),
    ({"out_dtype": torch.int32}, ValueError, "fisher_vectors: out_dtype must be one of"),
    ({"nan_policy": "ignore"}, ValueError, "fisher_vectors: nan_policy must be one of"),
    ({"scale": torch.full((35,), float("nan")), "nan_policy": "raise"}, ValueError,
     r"fisher_vectors: scale contains NaN or Inf \(nan_policy='raise'\)"),
])
def test_bad_input_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        fv.fisher_vectors(*_good(), **kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_all_zero_and_empty_sets_stay_zero_on_every_backend(backend, dtype):
    """Sets whose G is zero (no active decoder unit) and empty sets: zero rows from the smallest eps up on every
    backend; eps = 0 (NaN rows on every backend, 0 or NaN for empty sets by backend) and a subnormal eps (NaN on
    the CPU kernel, where 1 / eps overflows) are refused."""
    name, device = backend
    g = generator(8)
    x, z, w = (torch.rand(*shape, generator=g).to(device, dtype) for shape in ((6, 4), (6, 3), (4, 3)))
    b, iv = torch.full((4,), -100.0, device=device, dtype=dtype), torch.ones(4, device=device, dtype=dtype)
    offsets = torch.tensor([0, 0, 2, 6, 6], device=device)
    for eps in (EPS_MIN, EPS):
        out = fv.fisher_vectors(x, z, w, b, iv, offsets, eps=eps, backend=name)
        assert torch.equal(out, torch.zeros_like(out)), (eps, out)
    for eps in (0.0, EPS_MIN / 2):
        with pytest.raises(ValueError, match="eps must be a finite real >= 1.175e-38"):
            fv.fisher_vectors(x, z, w, b, iv, offsets, eps=eps, backend=name)


def test_bad_tensors_are_refused_naming_the_op():
    x, z, w, b, v, off = _good()
    with pytest.raises(ValueError, match=r"fisher_vectors: weight must be \(C, d\)"):
        fv.fisher_vectors(x, z, w[:, :2], b, v, off)
    with pytest.raises(ValueError, match="fisher_vectors: offsets"):
        fv.fisher_vectors(x, z, w, b, v, torch.tensor([0, 3, 2, 5, 5, 5]))


def test_refused_under_autograd():
    x, z, w, b, v, off = _good()
    with pytest.raises(ValueError, match="fisher_vectors: not differentiable"):
        fv.fisher_vectors(x, z, w.requires_grad_(), b, v, off)
    with torch.no_grad():
        assert fv.fisher_vectors(x, z, w, b, v, off).shape == (5, 35)


def test_opcheck_registration(backend):
    name, device = backend
    args = (*make_inputs(CASES[1], torch.float64, device), _scale(CASES[1], device), EPS, name, "propagate", None)
    torch.library.opcheck(torch.ops.fvvae_fast.fisher_vectors.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_has_no_graph_break():
    inputs = make_inputs(CASES[4], torch.float32)
    scale = _scale(CASES[4], "cpu")

    def f(x, z, w, b, v, off):
        return fv.fisher_vectors(x, z, w, b, v, off, scale=scale) * 2

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(*inputs), f(*inputs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("design", ["fused", "split"])
def test_cuda_op_does_not_sync_and_is_captured_by_a_cuda_graph(design, monkeypatch):
    """As fisher_accumulate: no host sync after the first call (autotuning), and a CUDA graph replays it;
    each sync-free design the op may choose (pinned: eager and captured calls then run the same kernels)."""
    monkeypatch.setenv("FVVAE_DESIGN", design)
    inputs = make_inputs(CASES[4], torch.float32, "cuda")
    scale = _scale(CASES[4], "cuda").float()
    with torch.no_grad():
        expected = fv.fisher_vectors(*inputs, scale=scale)  # warm-up: autotuning syncs
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fv.fisher_vectors(*inputs, scale=scale)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fv.fisher_vectors(*inputs, scale=scale)
        graph.replay()
    assert torch.equal(captured, expected)


@pytest.mark.skipif(_CPU_REASON is not None, reason=str(_CPU_REASON))
def test_cpu_outputs_reuse_freed_buffers():
    """An output of >= 32 MiB reuses the pages of one freed before (no page faults on a steady batch
    shape); each call still writes every element (outputs are poisoned), and the tensor stays an
    ordinary one: it grows, and the cache can be switched off."""
    from fvvae_fast import _C

    case = Case("big", 512, 255, (1,) * 64)  # G: 64 x 512 x 256 float32 = 32 MiB
    inputs = make_inputs(case, torch.float32)
    first = fv.fisher_accumulate(*inputs)
    ptr, expected = first.data_ptr(), first.clone()
    del first
    again = fv.fisher_accumulate(*inputs)
    assert again.data_ptr() == ptr
    torch.testing.assert_close(again, expected, atol=0, rtol=0)
    other = fv.fisher_vectors(*make_inputs(Case("other", 512, 255, (1,) * 64), torch.float32, salt=1))
    assert other.data_ptr() != ptr  # the buffer is in use
    again.resize_(65, 512, 256)
    torch.testing.assert_close(again[:64], expected, atol=0, rtol=0)
    try:
        _C._set_output_cache(False)
        del again, other
        fresh = fv.fisher_accumulate(*inputs)
        torch.testing.assert_close(fresh, expected, atol=0, rtol=0)
    finally:
        _C._set_output_cache(True)
