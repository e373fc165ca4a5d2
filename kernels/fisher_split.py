"""The split-GEMM design of ``fisher_accumulate`` and ``fisher_vectors``: two GEMMs with R in global memory.

An alternative to the fused kernel of :mod:`.fisher_accumulate` (same launcher signatures, chosen by
timing in :mod:`fvvae_fast.ops.dispatch`): the shape of a mixture-of-experts weight gradient, which
plain tensor-core GEMMs run well, at the price of writing and reading R (N, C) once.

Math (paper Eq. 11-13; docs/math.rst, "The Fisher vector"): with a_t = W z_t + b, the per-descriptor residual is
r_t = (mu_x,t - x_t) * inv_var * [a_t > 0] = inv_var * [a_t > 0] * (ReLU(a_t) - x_t) (C,), and
G_s = sum_{t in s} r_t [z_t; 1]^T = R_s^T z_aug,s with z_aug = [z | 1]: the bias column of G is the
GEMM's last output column (the row sum of R_s), so neither kernel reduces over rows by hand.

- kernel 1 (``_residual_kernel``): a = z W^T + b tiled as a GEMM (M = rows, N = C, K = d); its epilogue
  writes R (N, C) in the input dtype (fp32 accumulation) and, from the first C tile, z_aug (N, KA) with
  KA = d+1 rounded up to 16 (zeros past the ones column: 16-byte aligned rows for the second GEMM).
- kernel 2: per set s, G_s = R_s^T z_aug,s (a segmented GEMM over row ranges; an empty set gives
  zeros). ``torch._grouped_mm`` where the device runs it for the dtypes at hand (probed once, its
  empty groups checked), else ``_segment_gemm_kernel`` (Triton), whose epilogue can also whiten,
  take signed square roots and sum their squares (``fisher_vectors``; the L2 normalisation is the
  fused design's ``_normalize_rows_kernel``).

Launches per call: 2 (G), 3 with ``torch._grouped_mm`` when d+1 is not a multiple of 16 (a slice copy),
3 (normalised vectors). No host synchronisation (grids sized from shapes; kernel 1 makes the set ends
non-decreasing within [0, N]), so CUDA graphs capture it once autotuning has run.

fp16: R would overflow where |inv_var (mu_x - x)| > 65504, so R holds (ReLU(a) - x) [a > 0] and the second
GEMM's epilogue multiplies by inv_var (the Triton GEMM then). ``torch._grouped_mm`` serves bf16 only: its fp32 GEMM
may run TF32, short of the float32 tolerance. fp32: ``tl.dot`` at the fused design's ``FP32_PRECISION`` (3xTF32 by default).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fisher_accumulate import (
    _INTERPRET,
    _len_key,
    _mm,
    _modes,
    _normalize_rows_kernel,
    _relu_diff,
    _rounded_for,
    _scratch,
    _signed_sqrt,
    _tile,
    _whitened,
)

__all__ = ["fisher_accumulate_split", "fisher_vectors_split", "grouped_mm_usable"]

_split_jit = triton.jit(do_not_specialize=("N", "S", "LEN_KEY"))
KA_ALIGN = 16  # row strides of R and z_aug: multiples of 32 bytes (torch._grouped_mm asks for 16)


def _cfg(names: tuple[str, str, str], sizes: tuple[int, int, int], warps: int, stages: int) -> triton.Config:
    return triton.Config(dict(zip(names, sizes)), num_warps=warps, num_stages=stages)


_GEMM = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_SEG = ("BLOCK_T", "BLOCK_C", "BLOCK_J")
_KINDS = ("half", "float32", "float64")
if _INTERPRET:  # one small config: tails in every dimension and several row steps per set in the tests
    _RES_CONFIGS = {kind: [_cfg(_GEMM, (32, 32, 16), 4, 1)] for kind in _KINDS}
    _SEG_CONFIGS = {kind: [_cfg(_SEG, (16, 32, 32), 4, 1)] for kind in _KINDS}
else:  # untimed first guesses (no GPU when written), none spilling at sm_90 (ptxas, C = 512, d = 255)
    _RES_CONFIGS = {
        "half": [_cfg(_GEMM, (128, 128, 64), 8, 3), _cfg(_GEMM, (64, 128, 64), 4, 4), _cfg(_GEMM, (128, 64, 64), 4, 3)],
        "float32": [_cfg(_GEMM, (64, 64, 32), 4, 3), _cfg(_GEMM, (32, 64, 32), 4, 3)],
        "float64": [_cfg(_GEMM, (16, 16, 16), 4, 1)],
    }
    _SEG_CONFIGS = {
        "half": [_cfg(_SEG, (64, 128, 128), 8, 3), _cfg(_SEG, (32, 64, 128), 4, 3), _cfg(_SEG, (64, 64, 128), 4, 3)],
        "float32": [_cfg(_SEG, (32, 64, 64), 4, 3), _cfg(_SEG, (32, 64, 128), 4, 3)],
        "float64": [_cfg(_SEG, (16, 16, 16), 4, 1)],
    }


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@_split_jit
def _residual_kernel(
    x_ptr, z_ptr, w_ptr, b_ptr, v_ptr, off_ptr,  # inputs: (N, C), (N, D), (C, D), (C,), (C,), (S+1,) int64
    r_ptr, za_ptr, ends_ptr,  # outputs: R (N, C) rows of stride LR, z_aug (N, KA), (S,) int32 set ends
    N, S, C, LR, D: tl.constexpr, KA: tl.constexpr,
    ACC: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, SCALE_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """R[t, c] = [v_c] (ReLU(a) - x)[t, c] [a > 0] with a = z W^T + b, a [BLOCK_M, BLOCK_N] tile per program;
    the programs of the first C tile also write z_aug = [z | 1 | 0...] over their rows, and program (0, 0)
    the set ends offsets[1:] made non-decreasing within [0, N] (valid offsets unchanged; no row outside x)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < C
    rows64 = rows.to(tl.int64)  # N * C and N * KA may pass 2^31
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)  # [BLOCK_M, BLOCK_N]
    for k0 in range(0, KA, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        zk = _tile(z_ptr, rows64, row_ok, D, ks, k_ok, 1)  # [BLOCK_M, BLOCK_K]
        wk = _tile(w_ptr, cols, col_ok, D, ks, k_ok, 1)  # [BLOCK_N, BLOCK_K]
        acc = _mm(zk, tl.trans(wk), acc, USE_DOT, PRECISION)
        if pid_n == 0:
            za = tl.where(ks[None, :] == D, 1.0, zk.to(ACC))  # [BLOCK_M, BLOCK_K]: [z | 1 | 0...]
            tl.store(za_ptr + rows64[:, None] * KA + ks[None, :], _rounded_for(za, za_ptr),
                     mask=row_ok[:, None] & (ks < KA)[None, :])
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)  # [BLOCK_N]
    xt = _tile(x_ptr, rows64, row_ok, C, cols, col_ok, 1)  # [BLOCK_M, BLOCK_N]
    _, r = _relu_diff(acc + b[None, :], xt, ACC)  # [BLOCK_M, BLOCK_N]
    if SCALE_R:
        r = r * tl.load(v_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    tl.store(r_ptr + rows64[:, None] * LR + cols[None, :], _rounded_for(r, r_ptr),
             mask=row_ok[:, None] & col_ok[None, :])
    if (pid_m == 0) & (pid_n == 0):
        carry = tl.zeros((), tl.int64)
        for s0 in range(0, S, 1024):
            ss = s0 + tl.arange(0, 1024)
            ends = tl.minimum(tl.maximum(tl.load(off_ptr + ss + 1, mask=ss < S, other=0), 0), N)
            ends = tl.maximum(tl.associative_scan(ends, 0, _max_combine), carry)
            tl.store(ends_ptr + ss, ends.to(tl.int32), mask=ss < S)
            carry = tl.max(ends)


@_split_jit
def _segment_gemm_kernel(
    r_ptr, za_ptr, ends_ptr, v_ptr,  # R (N, C) rows of stride LR, z_aug (N, KA), set ends (S,) int32, inv_var (C,)
    out_ptr, scale_ptr, sq_ptr,  # G (S, C, D+1) or roots (S, C*(D+1)); NORMALIZE: scale, (S, N_SQ) sums
    N, S, C, LR, D: tl.constexpr, KA: tl.constexpr, LEN_KEY, N_SQ,
    ACC: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, HAS_V: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """G[s] tile [BLOCK_C, BLOCK_J] = R_s^T z_aug,s over the rows ends[s-1]:ends[s] of set s, times v
    (HAS_V); NORMALIZE: the signed square roots of -scale * G and the tile's sum of their squares instead."""
    s = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_j = tl.program_id(2)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    js = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    col_ok = cols < C
    j_ok = js < D + 1
    lo = tl.load(ends_ptr + s - 1, mask=s > 0, other=0).to(tl.int64)
    hi = tl.load(ends_ptr + s).to(tl.int64)
    acc = tl.zeros((BLOCK_C, BLOCK_J), ACC)  # [BLOCK_C, BLOCK_J]
    for t0 in range(lo, hi, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < hi
        rt = _tile(r_ptr, cols, col_ok, 1, rows, row_ok, LR)  # [BLOCK_C, BLOCK_T] = R_s^T tile
        zt = _tile(za_ptr, rows, row_ok, KA, js, js < KA, 1)  # [BLOCK_T, BLOCK_J]
        acc = _mm(rt, zt, acc, USE_DOT, PRECISION)
    if HAS_V:
        acc = acc * tl.load(v_ptr + cols, mask=col_ok, other=0.0).to(ACC)[:, None]
    dst = out_ptr + s.to(tl.int64) * C * (D + 1) + cols[:, None] * (D + 1) + js[None, :]
    ok = col_ok[:, None] & j_ok[None, :]
    if NORMALIZE:
        root, sq = _signed_sqrt(_whitened(acc, scale_ptr + cols[:, None] * (D + 1) + js[None, :], ok, HAS_SCALE))
        tl.store(dst, _rounded_for(root, out_ptr), mask=ok)
        tiles = tl.num_programs(1) * tl.num_programs(2)
        tl.store(sq_ptr + s * N_SQ + pid_c * tl.num_programs(2) + pid_j, sq)
        if pid_c + pid_j == 0:  # entries past this config's tiles count nothing
            i = tiles + tl.arange(0, 128)
            for i0 in range(0, N_SQ, 128):
                tl.store(sq_ptr + s * N_SQ + i0 + i, 0.0, mask=i0 + i < N_SQ)
    else:
        tl.store(dst, _rounded_for(acc, out_ptr), mask=ok)


def _prune_seg(configs, named_args, **kwargs):
    """Drop tiles far larger than C or d+1 (keep the smallest if none fits)."""
    cap_c = max(16, triton.next_power_of_2(named_args["C"]))
    cap_j = max(16, triton.next_power_of_2(named_args["D"] + 1))
    return [cf for cf in configs if cf.kwargs["BLOCK_C"] <= cap_c and cf.kwargs["BLOCK_J"] <= cap_j] or [
        min(configs, key=lambda cf: cf.kwargs["BLOCK_C"] * cf.kwargs["BLOCK_J"])]


_residual = {kind: triton.autotune(configs=cf, key=["C", "D"])(_residual_kernel) for kind, cf in _RES_CONFIGS.items()}
_segment = {kind: triton.autotune(configs=cf, key=["C", "D", "LEN_KEY", "NORMALIZE"],
                                  prune_configs_by={"early_config_prune": _prune_seg})(_segment_gemm_kernel)
            for kind, cf in _SEG_CONFIGS.items()}


def _residuals(x, z, weight, bias, inv_var, offsets, *, scale_r: bool):
    """Kernel 1: (R (N, C) a view of rows of stride LR = C rounded up to 16, z_aug (N, KA), int32 set ends (S,)
    R and z_aug in the input dtype. The aligned strides are what torch._grouped_mm asks for."""
    n, c = x.shape
    d, s = z.shape[1], offsets.shape[0] - 1
    _, acc_tl, use_dot, precision, kind = _modes(x.dtype)
    ka = triton.cdiv(d + 1, KA_ALIGN) * KA_ALIGN
    r = _scratch((n, triton.cdiv(c, KA_ALIGN) * KA_ALIGN), x.dtype, x.device)
    za = _scratch((n, ka), x.dtype, x.device)
    ends = torch.empty((s,), dtype=torch.int32, device=x.device)
    _residual[kind][lambda m: (triton.cdiv(n, m["BLOCK_M"]), triton.cdiv(c, m["BLOCK_N"]))](
        x, z, weight, bias, inv_var, offsets, r, za, ends, n, s, c, r.shape[1], d, ka,
        ACC=acc_tl, USE_DOT=use_dot, PRECISION=precision, SCALE_R=scale_r,
    )
    return r[:, :c], za, ends


def _segment_gemm(r, za, ends, inv_var, out, d, *, has_v, scale=None, sq=None):
    """Kernel 2 (Triton) into ``out`` (S, C, d+1) or (S, C*(d+1)); ``sq`` not None: normalising epilogue."""
    n, c = r.shape
    s = ends.shape[0]
    _, acc_tl, use_dot, precision, kind = _modes(r.dtype)
    normalize = sq is not None
    _segment[kind][lambda m: (s, triton.cdiv(c, m["BLOCK_C"]), triton.cdiv(d + 1, m["BLOCK_J"]))](
        r, za, ends, inv_var, out, out if scale is None else scale, out if sq is None else sq,
        n, s, c, r.stride(0), d, za.shape[1], _len_key(n, s), sq.shape[1] if normalize else 1,
        ACC=acc_tl, USE_DOT=use_dot, PRECISION=precision, HAS_V=has_v, NORMALIZE=normalize,
        HAS_SCALE=scale is not None,
    )


_PROBED: dict[tuple[torch.device, torch.dtype, torch.dtype], bool] = {}


def _grouped_mm_probe(device: torch.device, dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` computes R^T z_aug per group here for these dtypes, an empty group
    giving zeros (a tiny problem, compared on the host)."""
    g = torch.Generator().manual_seed(0)
    r = torch.randn(24, 16, generator=g).to(device=device, dtype=dtype)
    za = torch.randn(24, 16, generator=g).to(device=device, dtype=dtype)
    ends = torch.tensor([5, 5, 24], dtype=torch.int32, device=device)
    try:
        got = torch._grouped_mm(r.t(), za, offs=ends, out_dtype=out_dtype).double().cpu()
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False
    r64, z64 = r.double().cpu(), za.double().cpu()
    want = torch.stack([r64[:5].t() @ z64[:5], torch.zeros(16, 16, dtype=torch.float64), r64[5:].t() @ z64[5:]])
    return got.shape == want.shape and bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max())))


def grouped_mm_usable(device: torch.device, dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """True where kernel 2 may be ``torch._grouped_mm``: CUDA, bf16 inputs (see the module note), and a probe
    run once per (device, dtypes) outside any CUDA-graph capture found it right (False until then)."""
    if device.type != "cuda" or dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    key = (device, dtype, out_dtype)
    if key not in _PROBED:
        if torch.cuda.is_current_stream_capturing():
            return False
        _PROBED[key] = _grouped_mm_probe(device, dtype, out_dtype)
    return _PROBED[key]


def fisher_accumulate_split(
    x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, inv_var: torch.Tensor,
    offsets: torch.Tensor, *, out_dtype: torch.dtype | None = None, grouped: bool | None = None,
) -> torch.Tensor:
    """G: (S, C, d+1) in ``out_dtype`` (default fp32; fp64 for float64) from x (N, C), z (N, d), weight (C, d),
    bias (C,), inv_var (C,) in one floating dtype and offsets (S+1,) int64. ``grouped``: force kernel 2 to be
    ``torch._grouped_mm`` (True) or the Triton segmented GEMM (False); None: grouped mm where usable."""
    x, z, weight, bias, inv_var, offsets = (t.contiguous() for t in (x, z, weight, bias, inv_var, offsets))
    c, d, s = x.shape[1], z.shape[1], offsets.shape[0] - 1
    acc_dtype = _modes(x.dtype)[0]
    out_dtype = out_dtype or acc_dtype
    if s == 0 or x.shape[0] == 0:  # no kernel runs: no set end would be written
        return torch.zeros((s, c, d + 1), dtype=out_dtype, device=x.device)
    if grouped is None:
        grouped = grouped_mm_usable(x.device, x.dtype, out_dtype)
    scale_r = x.dtype != torch.float16
    r, za, ends = _residuals(x, z, weight, bias, inv_var, offsets, scale_r=scale_r)
    if grouped:
        g = torch._grouped_mm(r.t(), za, offs=ends, out_dtype=out_dtype)  # (S, C, KA)
        return g if g.shape[2] == d + 1 else g[:, :, : d + 1].contiguous()
    out = _scratch((s, c, d + 1), out_dtype, x.device)
    _segment_gemm(r, za, ends, inv_var, out, d, has_v=not scale_r)
    return out


def fisher_vectors_split(
    x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, inv_var: torch.Tensor,
    offsets: torch.Tensor, scale: torch.Tensor | None, eps: float, *, out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Normalised Fisher vectors (S, C*(d+1)) in ``out_dtype`` (default: the accumulation dtype), as
    ``fisher_vectors_fwd`` of the fused design: y = -scale * vec(G[s]), sign(y) sqrt|y| / max(L2 norm, eps).
    Kernel 2 is always the Triton segmented GEMM (its epilogue takes the roots)."""
    x, z, weight, bias, inv_var, offsets = (t.contiguous() for t in (x, z, weight, bias, inv_var, offsets))
    c, d, s = x.shape[1], z.shape[1], offsets.shape[0] - 1
    acc_dtype, acc_tl, *_, kind = _modes(x.dtype)
    e = c * (d + 1)
    if s == 0 or x.shape[0] == 0:
        return torch.zeros((s, e), dtype=out_dtype or acc_dtype, device=x.device)
    out = _scratch((s, e), out_dtype or acc_dtype, x.device)
    scale_r = x.dtype != torch.float16
    r, za, ends = _residuals(x, z, weight, bias, inv_var, offsets, scale_r=scale_r)
    n_sq = max(triton.cdiv(c, cf.kwargs["BLOCK_C"]) * triton.cdiv(d + 1, cf.kwargs["BLOCK_J"])
               for cf in _SEG_CONFIGS[kind])
    sq = _scratch((s, n_sq), acc_dtype, x.device)
    # 16-bit results: the roots wait for the norm in the accumulation dtype, so they are rounded once
    roots = _scratch(out.shape, acc_dtype, x.device) if out.element_size() < 4 else out
    _segment_gemm(r, za, ends, inv_var, roots, d, has_v=not scale_r, scale=scale, sq=sq)
    block = 1024
    _normalize_rows_kernel[(s, triton.cdiv(e, block))](
        roots, out, sq, e, n_sq, eps, ACC=acc_tl, BLOCK_SQ=triton.next_power_of_2(n_sq), BLOCK=block
    )
    return out
