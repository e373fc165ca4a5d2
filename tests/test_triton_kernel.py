"""The fused Triton kernels of fisher_accumulate, called directly (kernels/fisher_accumulate.py).

Runs on CUDA when present, else on CPU tensors under TRITON_INTERPRET=1 (set by conftest.py
before anything imports Triton). Every output is poisoned with NaN before the launch, so an
element a kernel forgot to write fails. Oracle: ``check_forward`` / ``check_backward`` of
tests/cases.py (the float64 reference on float64 copies of the rounded inputs, its tolerances).
Reproduce a failure with FVVAE_TEST_SEED=<seed from the pytest header>.
"""

from __future__ import annotations

import random

import pytest
import torch

from fvvae_fast.ops import dispatch, reference
from fvvae_fast.ops.validate import result_dtype

from .cases import CASE_IDS, CASES, SEED, Case, check_backward, check_forward, make_inputs, tolerance
from .conftest import DEVICE


def triton_backends():
    """Triton's CUDA backend module, or None."""
    try:
        from triton.backends import nvidia
    except ImportError:
        return None
    return nvidia

_reason = dispatch.available("triton", DEVICE)
pytestmark = pytest.mark.skipif(_reason is not None, reason=str(_reason))
K = dispatch.import_kernels("fisher_accumulate") if _reason is None else None

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]
HALF_OUT = [torch.bfloat16, torch.float16]
HALF_OUT_IDS = ["out-bf16", "out-f16"]


def _block(name: str, pick=max) -> int:
    """A block size over every tensor-core config (there is one under the interpreter)."""
    configs = [cf for kind in ("half", "float32") for cf in (*K._FWD_CONFIGS[kind], *K._BWD_CONFIGS[kind])]
    return pick(cf.kwargs[name] for cf in configs)


def _awkward_case() -> Case:
    """Fresh random sizes with more than one tile and a tail in every tiled dimension (C, d, rows)
    for every config, empty and 1-row sets, and one set several chunks long."""
    rng = random.Random(SEED + 4)
    bc, bj, bk, bt = (_block(n) for n in ("BLOCK_C", "BLOCK_J", "BLOCK_K", "BLOCK_T"))
    c = bc + rng.randrange(1, bc)
    d = max(bj, bk) + rng.randrange(1, min(bj, bk) - 1)  # d > BLOCK_K and d > BLOCK_J, both with tails
    long = 3 * bt + rng.randrange(1, bt)
    lengths = [0, 1, long, rng.randrange(2, bt), 0, 1]
    rng.shuffle(lengths)
    return Case(f"awkward-c{c}-d{d}", c, d, tuple(lengths))


def _inputs(case: Case, dtype: torch.dtype, salt: int = 0):
    return make_inputs(case, dtype, DEVICE, salt=salt)


def _poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _check_forward(case: Case, dtype: torch.dtype, out_dtype: torch.dtype | None = None, **kw) -> None:
    inputs = _inputs(case, dtype)
    s = len(case.lengths)
    out = _poisoned((s, case.c, case.d + 1), result_dtype(dtype, out_dtype))
    got = K.fisher_accumulate_fwd(*inputs, out_dtype=out_dtype, out=out, **kw)
    assert got.data_ptr() == out.data_ptr() and got.dtype == result_dtype(dtype, out_dtype)
    check_forward(got, inputs, dtype, f"forward {case.id} {dtype}", out_dtype)


def _check_backward(case: Case, dtype: torch.dtype, grad_dtype: torch.dtype | None = None, **kw) -> None:
    """The upstream grad in ``grad_dtype`` (G's dtype), the gradients in the inputs' dtype."""
    inputs = _inputs(case, dtype)
    g = torch.Generator().manual_seed(SEED + 7)
    grad = torch.randn((len(case.lengths), case.c, case.d + 1), generator=g, dtype=torch.float64)
    grad = grad.to(device=DEVICE, dtype=result_dtype(dtype, grad_dtype))
    out = tuple(_poisoned(t.shape, t.dtype) for t in inputs[:5])
    got = K.fisher_accumulate_bwd(grad, *inputs, out=out, **kw)
    for o, t, inp in zip(got, out, inputs):
        assert o.data_ptr() == t.data_ptr() and o.dtype == inp.dtype
    check_backward(got, grad, inputs, dtype, f"backward {case.id} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_cases(case, dtype):
    _check_forward(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backward_cases(case, dtype):
    _check_backward(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("split", ["split", "default"])
def test_forward_awkward(dtype, split):
    """Several tiles and tails in C, d, d+1; 'split': the long set cut into chunks summed by the combine kernel."""
    kw = {"chunk_rows": _block("BLOCK_T", min)} if split == "split" else {}
    _check_forward(_awkward_case(), dtype, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("split", ["split", "default"])
def test_backward_awkward(dtype, split):
    """'split': one-tile chunks and three row groups, each writing its partial of dW, db, dinv_var."""
    kw = {"chunk_rows": _block("BLOCK_T", min), "groups": 3} if split == "split" else {}
    _check_backward(_awkward_case(), dtype, **kw)


@pytest.mark.parametrize("out_dtype", HALF_OUT, ids=HALF_OUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_out_dtype_cases(case, dtype, out_dtype):
    """G rounded to out_dtype in the store epilogue; the backward takes the upstream grad in out_dtype."""
    _check_forward(case, dtype, out_dtype)
    _check_backward(case, dtype, out_dtype)


@pytest.mark.parametrize("out_dtype", HALF_OUT, ids=HALF_OUT_IDS)
@pytest.mark.parametrize("split", ["split", "default"])
def test_out_dtype_awkward(out_dtype, split):
    """'split': split sets go through fp32 partials and the combine kernel, which rounds to out_dtype."""
    kw = {"chunk_rows": _block("BLOCK_T", min)} if split == "split" else {}
    _check_forward(_awkward_case(), torch.float32, out_dtype, **kw)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="model sizes are too slow for the interpreter")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_model_sizes_cuda(dtype):
    """The paper's sizes (d = 255: the one-pass tiles), frame and image sets, forward and backward."""
    case = Case("model", 512, 255, (50, 784, 0, 1, 50, 1250))
    _check_forward(case, dtype)
    _check_backward(case, dtype)


def test_long_set_split_many_ways():
    """A set far longer than a tile, split into 1..many chunks: the same G up to fp32 rounding."""
    bt = _block("BLOCK_T", min)
    case = Case("very-long", 9, 5, (2, 11 * bt + 3, 0, 1))
    inputs = _inputs(case, torch.float32)
    for chunk in (1, bt, 3 * bt + 1, 100 * bt):
        out = _poisoned((4, 9, 6), torch.float32)
        check_forward(K.fisher_accumulate_fwd(*inputs, out=out, chunk_rows=chunk), inputs, torch.float32,
                      f"chunk_rows={chunk}")


@pytest.mark.parametrize("groups", [1, 2, 7, 64])
def test_backward_param_groups_any_count(groups):
    """The param kernel's groups share the chunks in use evenly, whether there are fewer groups than
    chunks, about as many, or more (then some get none and store zero partials)."""
    case = Case("many-sets", 11, 6, (0, 3, 1, 0, 5, 2, 9, 1, 0, 4))
    _check_backward(case, torch.float32, chunk_rows=_block("BLOCK_T", min), groups=groups)


@pytest.mark.parametrize("d", [1, 15, 16, 17, 255])
def test_aligned_rows_pad_with_zeros_to_the_stride(d):
    t = torch.randn(5, d, dtype=torch.bfloat16, device=DEVICE)
    out = K._aligned_rows(t)
    assert out.shape[1] % K.ROW_ALIGN == 0 and d <= out.shape[1] < d + K.ROW_ALIGN
    assert torch.equal(out[:, :d], t) and bool((out[:, d:] == 0).all())
    assert (out is t) == (d % K.ROW_ALIGN == 0)


@pytest.mark.skipif(triton_backends() is None, reason="Triton has no CUDA backend to compile with")
def test_every_kernel_variant_compiles_for_sm90(tmp_path):
    """Ahead of time, no GPU needed (tests/sm90_compile.py --dump): every kernel, autotune config and dtype kind
    compiles for sm_90 at d = 255, and every bf16/fp16 variant a launcher can pick at the paper's shapes compiles
    clean (no spills; no local memory and at most 6 barriers in the loop that holds the HGMMAs; HGMMA, not HMMA;
    stores wider than 4 bytes), but for the variants listed with their figures in EXPECTED_FAILURES, which must
    still fail (an entry that passes is stale). The fused bf16 forward loads its z and W tiles through cp.async
    in 16-byte vectors, which needs the padded row stride: unpadded, d = 255 rows start at odd 2-byte offsets
    (about 200 scalar 2-byte loads per kernel and no cp.async). Spill bytes come from ptxas and SASS from
    cuobjdump, which Triton bundles (absent, those checks are left out)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(root / "tests" / "sm90_compile.py"), "--dump", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=root, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(rows) >= 50, run.stdout[-2000:]
    failed = [r for r in rows if "error" in r]
    assert not failed, failed
    forward = [r for r in rows if r["kernel"] == "fwd" and r["dtype"] == "bf16" and r["BLOCK_J"] >= 128]
    assert forward and all(r["cp_async"] > 0 and r["scalar_b16_loads"] < 64 for r in forward), forward
    # the normalising epilogue (fisher_vectors) keeps within 1 KB of spills per thread of G's at the same config
    # (with its pointers and masks computed once and shared, it spilled 3.5 KB more at the [128, 256] tile)
    if all(r["spill_bytes"] is not None for r in rows):
        spills = {}
        for r in rows:
            if r["kernel"] == "fwd":
                spills.setdefault(tuple(r[k] for k in ("dtype", "BLOCK_T", "BLOCK_C", "BLOCK_J", "num_warps")), {})[
                    r["normalize"]] = r["spill_bytes"]
        assert all(s[True] - s[False] < 1024 for s in spills.values()), spills
    # the static checks of the variants the launchers pick at the paper's shapes on sm_90
    checked = [r for r in rows if r["checked"]]
    first_forward = [r for r in checked if r["kernel"] == "fwd_tma" and r["paper_shape_first"]]
    assert {(r["dtype"], r["normalize"]) for r in first_forward} == {(t, n) for t in ("bf16", "fp16")
                                                                          for n in (False, True)}
    assert {r["kernel"] for r in checked} == {"fwd_tma", "bwd_rows_tma", "bwd_params_tma"}
    assert all(not r["problems"] for r in first_forward), first_forward
    broken = [r for r in checked if bool(r["problems"]) != r["expected_failure"]]
    assert not broken, broken
    # --dump: one folder per variant with what ships
    folders = sorted(tmp_path.iterdir())
    assert len(folders) == len(rows)
    for folder in folders:
        assert {f.name for f in folder.iterdir()} >= {"k.ttgir", "k.ptx", "k.sass", "ptxas.txt", "info.json"}, folder
        info = json.loads((folder / "info.json").read_text())
        assert {"kernel", "dtype", "num_warps", "num_stages", "shared", "paper_shape_first"} <= set(info), folder
    firsts = [json.loads((f / "info.json").read_text()) for f in folders]
    assert sum(i["kernel"] == "fwd_tma" and i["paper_shape_first"] for i in firsts) == 4


def test_deterministic():
    """No atomics: a second run is bitwise identical, forward and backward, split or not."""
    case = _awkward_case()
    inputs = _inputs(case, torch.float32)
    kw = {"chunk_rows": _block("BLOCK_T", min)}
    a, b = K.fisher_accumulate_fwd(*inputs, **kw), K.fisher_accumulate_fwd(*inputs, **kw)
    assert torch.equal(a, b)
    grad = torch.randn_like(a)
    ga = K.fisher_accumulate_bwd(grad, *inputs, groups=3, **kw)
    gb = K.fisher_accumulate_bwd(grad, *inputs, groups=3, **kw)
    assert all(torch.equal(u, v) for u, v in zip(ga, gb))


def test_fp16_large_inv_var_does_not_overflow():
    """r = v * diff exceeds the fp16 range; the kernel multiplies by v after the fp32 accumulation."""
    case = Case("big-inv-var", 6, 4, (30, 2))
    x, z, w, b, v, off = _inputs(case, torch.float16)
    v = torch.full_like(v, 6.0e4)
    b = b + 4.0  # active ReLUs with |mu_x - x| > 1, so |r| > 6e4 > fp16 max
    got = K.fisher_accumulate_fwd(x, z, w, b, v, off)
    assert torch.isfinite(got).all()
    check_forward(got, (x, z, w, b, v, off), torch.float16, "fp16 large inv_var")


def test_nan_propagates_like_reference():
    """A NaN in x (even where the ReLU is off) poisons its set's row of G, as in the reference."""
    case = Case("nan", 5, 3, (4, 3))
    inputs = _inputs(case, torch.float32)
    x = inputs[0].clone()
    x[5, 2] = float("nan")
    got = K.fisher_accumulate_fwd(x, *inputs[1:])
    want = reference.forward(x.double().cpu(), *[t.double().cpu() if t.is_floating_point() else t.cpu()
                                                 for t in inputs[1:]])
    assert torch.isnan(got[1, 2]).all() and not torch.isnan(got[0]).any()
    atol, rtol = tolerance(torch.float32, scale=max(1.0, float(want.nan_to_num().abs().max())))
    torch.testing.assert_close(got.double().cpu(), want, atol=atol, rtol=rtol, equal_nan=True)


def test_rejects_bad_out():
    case = Case("bad-out", 4, 3, (2,))
    inputs = _inputs(case, torch.float32)
    with pytest.raises(ValueError, match="out"):
        K.fisher_accumulate_fwd(*inputs, out=torch.empty((1, 4, 3), device=DEVICE))


def test_launchers_read_no_tensor_values_on_the_host(monkeypatch):
    """No host sync (CUDA graphs can capture the op): the forward, normalised-vector and backward
    launchers, fused and split (kernels/fisher_split.py), never turn a tensor into a Python value."""
    split = dispatch.import_kernels("fisher_split")
    inputs = _inputs(_awkward_case(), torch.float32)
    scale = torch.rand(inputs[0].shape[1] * (inputs[1].shape[1] + 1), device=DEVICE)

    def host_sync(*args):
        raise AssertionError("a launcher read a tensor value on the host")

    with monkeypatch.context() as mp:
        for method in ("item", "tolist", "__bool__", "__int__", "__float__"):
            mp.setattr(torch.Tensor, method, host_sync)
        out = K.fisher_accumulate_fwd(*inputs, chunk_rows=_block("BLOCK_T", min))
        K.fisher_vectors_fwd(*inputs, scale, 1e-12, chunk_rows=_block("BLOCK_T", min))
        K.fisher_accumulate_bwd(torch.ones_like(out), *inputs, groups=3)
        split.fisher_accumulate_split(*inputs, grouped=DEVICE.type == "cpu")  # grouped mm runs fp32 on CPU only
        split.fisher_accumulate_split(*inputs, grouped=False)
        split.fisher_vectors_split(*inputs, scale, 1e-12)


def test_offsets_out_of_range_stay_in_bounds():
    """Unchecked (CUDA) offsets are clamped on the device: rows past N or before 0 are never read."""
    case = Case("bad-offsets", 5, 3, (4, 3))
    inputs = _inputs(case, torch.float64)
    bad = torch.tensor([-2, 9, 5, 12], device=DEVICE)  # clamped: [0, 7, 7, 7]
    clamped = (*inputs[:5], torch.tensor([0, 7, 7, 7], device=DEVICE))
    got = K.fisher_accumulate_fwd(*inputs[:5], bad)
    check_forward(got, clamped, torch.float64, "clamped offsets")
    grad = torch.ones_like(got)
    check_backward(K.fisher_accumulate_bwd(grad, *inputs[:5], bad), grad, clamped, torch.float64, "clamped offsets")


_LAUNCHED = ("_fwd_kernel", "_combine_kernel", "_bwd_rows_kernel", "_bwd_params_kernel")


def _launch_args(monkeypatch, *batches) -> dict[str, list[dict]]:
    """{kernel: [its arguments by name, per launch]} over forward and backward of each batch."""
    seen: dict[str, list[dict]] = {}
    with monkeypatch.context() as mp:
        for name in _LAUNCHED:
            kernel = getattr(K, name)

            def recording(*args, _kernel=kernel, _name=name, _run=kernel.run, **kwargs):
                seen.setdefault(_name, []).append(dict(zip(_kernel.arg_names, args)))
                return _run(*args, **kwargs)

            mp.setattr(kernel, "run", recording)
        for inputs in batches:
            out = K.fisher_accumulate_fwd(*inputs, chunk_rows=_block("BLOCK_T", min))
            K.fisher_accumulate_bwd(torch.ones_like(out), *inputs, groups=2)
    return seen


def test_batch_shapes_do_not_respecialise(monkeypatch):
    """Integer arguments that vary with the batch (sets, lengths, entries) are not specialised on, so a
    new batch shape reuses the compiled kernels (Triton specialises ints on == 1 and % 16)."""
    batches = [_inputs(Case(f"batch{i}", 9, 5, lengths), torch.float32)
               for i, lengths in enumerate([(40, 2, 9), (1,), (17, 0, 33, 5, 16, 64)])]
    seen = _launch_args(monkeypatch, *batches)
    assert set(seen) == set(_LAUNCHED)
    for name, launches in seen.items():
        kernel = getattr(K, name)
        unspecialised = set(getattr(kernel, "do_not_specialize", None) or kernel.kwargs["do_not_specialize"])
        varying = {arg for arg, value in launches[0].items()
                   if isinstance(value, int) and any(launch[arg] != value for launch in launches)}
        assert varying and varying <= unspecialised, (name, varying - unspecialised)
