"""Fused Triton kernels of ``fisher_accumulate`` (forward and backward) and their launchers.

Loaded by :mod:`fvvae_fast.ops.dispatch` as the ``"triton"`` backend: CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1`` (how CI runs it). Inputs arrive with checked shapes and
dtypes, all in one floating dtype; ``offsets`` is (S+1,) int64, its values unchecked on CUDA (the
launchers clamp it into [0, N] on the device, so no kernel leaves x). No host synchronisation:
every grid is sized from shapes alone, so the launchers are safe under CUDA graphs.

Math (docs/math.rst, "The kernels"; set s = rows offsets[s]:offsets[s+1], inv_var = v):

    a_t = W z_t + b,   m_t = [a_t > 0],   diff_t = (ReLU(a_t) - x_t) * m_t,   r_t = v * diff_t
    G[s] = sum_t r_t [z_t ; 1]^T = v[:, None] * [ sum_t diff_t z_t^T | sum_t diff_t ]   (C, d+1)

``v`` is a per-row (per-c) factor of G, so it multiplies the fp32 accumulator once instead of
every r_t: the on-chip GEMM operand is ``diff`` (the magnitude of x and mu_x), which does not
overflow float16 even when 1/sigma_x^2 is large. The bias column is a row sum, not a GEMM column.

Forward decomposition. A set is cut into *chunks*; a unit of work is (chunk, tile of C, tile of d),
and a persistent program owns a (C, d) tile and loops over every P-th chunk (P about 4 programs per SM
over all tiles).
Orientation [C, rows], like flash attention with Q = a W tile and K = V = z: per BLOCK_T rows it
computes a^T = W_tile z^T over all of d (tensor cores, fp32), the mask and diff on chip, and
accumulates diff^T-tile @ z into an fp32 [BLOCK_C, BLOCK_J] accumulator; mu_x and r never reach
global memory. With d <= BLOCK_J ("one pass": d = 255 and BLOCK_J = 256) the W tile stays on chip
for the whole chunk and each z tile is loaded once for both GEMMs, so the kernel does exactly the
4 N C d flops of the two GEMMs and reads x once and z once per C tile; a larger d is streamed in
BLOCK_K slices and the decoder GEMM is recomputed per d tile. Why this grid: G's tiles are the
natural parallelism, and a chunk's partial G tile stays in registers for all of its rows.
Long sets: the launcher picks ``chunk_rows`` so that there are about 4 units of work per SM; a set
of n rows gets max(1, ceil(n / chunk_rows)) equal chunks. A one-chunk set (and an empty set, one
zero-row chunk that writes zeros) is stored straight into G; the chunks of a longer set store fp32
partials into a scratch buffer and ``_combine_kernel`` adds them in chunk order: deterministic,
no atomics.

On sm_90+ (and under the interpreter) 16-bit inputs with C a multiple of 8 and d <= 255 take the
tensor-descriptor forward, row and param kernels of ``fisher_tma.py`` instead (same grid, chunk table and
epilogues; operands by TMA, G's bias column from a ones column of z; the backward's when grad in the input dtype
has 16-byte rows, d + 1 a multiple of 8): the launchers choose from shapes, dtypes and the device's capability,
so the choice needs no host synchronisation either.

Backward (two fused kernels; nothing of size (N, C, d+1), and of size (N, C) only dx itself).
With P = grad[s] = [P_z | p_b] (C, d+1) and q_t = P [z_t ; 1] = P_z z_t + p_b:

    dx_t      = -v * m_t * q_t                          (C,)      row kernel
    da_t      =  v * m_t * q_t                          (C,)
    dz_t      = W^T da_t + P_z^T (v * diff_t)           (d,)      row kernel, reduction over C on chip
    [dW | db] = sum_t da_t [z_t ; 1]^T                  (C, d+1)  param kernel, as v * sum_t (m q)_t [z_t ; 1]^T
    dv        = sum_t diff_t * q_t                      (C,)      param kernel

Row kernel: program (chunk, tile of d), orientation [rows, C] (flash-attention dQ-like): the z
tile stays on chip while it loops over C tiles; each W and P_z tile feeds both the decoder GEMM
(a, q) and the dz GEMM; dx is stored per C tile, dz once. Param kernel: program (group of chunks,
tile of C, tile of d), orientation [C, rows] as in the forward (W tile on chip, P_z tile on chip
per set); each group stores one fp32 partial of [dW | db] and dv and the launcher sums them with
one ``torch.sum`` over groups (Liger-style: deterministic, no atomics); the groups split the chunks in use
(``chunk_ptr[S]``, read on the device) evenly. a and q are recomputed in
both kernels instead of being stored (2 x 4 N C d extra flops, no (N, C) round trip).

Normalised vectors (``fisher_vectors_fwd``): the same forward, whose epilogue writes the signed square
roots of y = -scale * G (the diagonal whitening of Eq. 13 and its minus sign) and each tile's sum of
|y| = root^2; ``_normalize_rows_kernel`` then divides every row by max(its L2 norm, eps). The roots wait
for the norm in the output itself (fp32, fp64) or, for a 16-bit output, in an accumulation-dtype scratch,
so the vector is rounded once to the caller's dtype (and fp16's range never holds a root); G is never written.

Dtypes. Accumulation is fp32 (fp64 for float64); G is rounded once to ``out_dtype`` (default: the
accumulation dtype; bf16 halves the bytes written) in the store epilogue (``_store_g``, and the
combine kernel for split sets, whose partials stay fp32). fp16/bf16: the GEMM operands computed on chip
(diff, m*q, da, v*diff) and the upstream grad (tile by tile as it is loaded: no cast pass over all of it)
are rounded to the input dtype for ``tl.dot``, as in
any half-precision GEMM (backward: |v q| or |grad| beyond the fp16 range overflows, as fp16
autograd would). fp32: ``tl.dot`` with ``input_precision=FP32_PRECISION``, default ``"tf32x3"``
(3xTF32 on tensor cores, about fp32 accuracy: meant to hold the float32 tolerance of
tests/cases.py, atol 2e-5 x max|G|, rtol 1e-4); ``FVVAE_TRITON_FP32_PRECISION=tf32`` is faster
but its ~1e-3 relative error per product exceeds that tolerance, so it is opt-in; ``"ieee"`` is
plain fp32 FMA. float64: ``tl.dot`` has no portable fp64 tensor-core path, so the same kernels run
with ``USE_DOT=False``, a broadcast multiply + ``tl.sum`` on small tiles (fp64 FMA: correct on
any GPU, not fast); the interpreter runs that very path.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["fisher_accumulate_fwd", "fisher_accumulate_bwd", "fisher_vectors_fwd", "FP32_PRECISION"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter keeps bf16 as raw uint16 and its tl.dot multiplies those bits: feed it fp32.
_UPCAST_BF16_DOT = tl.constexpr(_INTERPRET)
# The interpreter's fp32 -> bf16 cast truncates (a GPU rounds to nearest even): round the bits first.
_ROUND_BF16_BITS = tl.constexpr(_INTERPRET)

# Integer arguments that change with the batch are not specialised: Triton would otherwise compile a
# variant for a value of 1 and for multiples of 16, so a new batch shape could recompile.
_batch_jit = triton.jit(do_not_specialize=("S", "LEN_KEY", "N_ENTRIES"))

_FP32_PRECISIONS = ("tf32x3", "ieee", "tf32")  # all exist in Triton 3.6 and 3.8
FP32_PRECISION = os.environ.get("FVVAE_TRITON_FP32_PRECISION", "tf32x3")
if FP32_PRECISION not in _FP32_PRECISIONS:
    raise ValueError(
        f"fvvae_fast.kernels: FVVAE_TRITON_FP32_PRECISION must be one of {_FP32_PRECISIONS}, got {FP32_PRECISION!r}"
    )


# ----------------------------------------------------------------------------------------------
# Autotune configs per dtype kind, keyed on (C, d, typical set length). The GPU lists are the fastest
# of a sweep of 19 forward and 12 backward candidates on an H200 (Triton 3.6, C = 512, d = 255,
# 64 x 1,250 and 4,096 x 50 rows; bench/RESULTS.md): in bf16 a [128, 256] G tile per program with
# 8 warps leads; fp32 runs 3xTF32, about three times the operand registers and shared memory, so
# its tiles are smaller (every fp32 forward tile with BLOCK_J = 256 and BLOCK_T + BLOCK_C >= 96 ran
# out of shared memory, and the backward's BLOCK_J = 256 tiles spilled: 10x slower). The small
# tiles serve small d or C. The interpreter gets one config (its speed is per op, not per element).
# ----------------------------------------------------------------------------------------------
def _cfg(bt: int, bc: int, bj: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_T": bt, "BLOCK_C": bc, "BLOCK_J": bj, "BLOCK_K": bk}, num_warps=warps, num_stages=stages
    )


_KINDS = ("half", "float32", "float64")  # fp16/bf16 tensor cores, fp32 as 3xTF32, fp64 broadcast FMA
if _INTERPRET:
    _FWD_CONFIGS = _BWD_CONFIGS = {kind: [_cfg(32, 64, 64, 64, 4, 1)] for kind in _KINDS}
else:
    _FWD_CONFIGS = {
        "half": [_cfg(64, 128, 256, 64, 8, 2), _cfg(32, 64, 256, 64, 4, 3), _cfg(16, 64, 256, 64, 4, 3),
                 _cfg(64, 64, 128, 64, 4, 3), _cfg(32, 64, 64, 32, 4, 3)],
        "float32": [_cfg(16, 64, 256, 64, 4, 3), _cfg(64, 64, 128, 64, 4, 3), _cfg(32, 64, 64, 32, 4, 3)],
        # the 3-D temporaries [M, K, N] of _mm's FMA path must fit in registers
        "float64": [_cfg(16, 16, 16, 16, 4, 1), _cfg(16, 32, 32, 8, 8, 1)],
    }
    # The backward keeps two [.., BLOCK_J] operand tiles (W and P_z) and two GEMM results (a, q) live.
    _BWD_CONFIGS = {
        "half": [_cfg(64, 32, 256, 64, 4, 2), _cfg(128, 32, 256, 64, 8, 2), _cfg(32, 32, 256, 64, 4, 2),
                 _cfg(32, 32, 128, 32, 4, 2), _cfg(32, 32, 64, 32, 4, 2)],
        "float32": [_cfg(32, 32, 128, 32, 4, 2), _cfg(32, 64, 128, 64, 4, 2), _cfg(32, 32, 64, 32, 4, 2)],
        "float64": [_cfg(16, 16, 16, 16, 4, 1)],
    }

_TUNE_KEY = ["C", "D", "LEN_KEY"]
# The normalising epilogue holds more registers (the scale tile: ptxas spills 1-3.5 KB more per thread at
# the large tiles, tests/sm90_compile.py), so fisher_vectors picks its config on its own.
_FWD_TUNE_KEY = [*_TUNE_KEY, "NORMALIZE"]


def _prune(configs, named_args, **kwargs):
    """Drop configs with tiles far larger than the problem (small d or C); keep the smallest if none fits."""
    cap_c = max(16, triton.next_power_of_2(named_args["C"]))
    cap_j = max(16, triton.next_power_of_2(named_args["D"]))
    return [cf for cf in configs if cf.kwargs["BLOCK_C"] <= cap_c and cf.kwargs["BLOCK_J"] <= cap_j] or [
        min(configs, key=lambda cf: cf.kwargs["BLOCK_J"] * (cf.kwargs["BLOCK_T"] + cf.kwargs["BLOCK_C"]))
    ]


def _autotune(configs, key=_TUNE_KEY):
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _prune})


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, acc, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b for a [M, K], b [K, N]: tensor cores, or (float64) a broadcast FMA sum."""
    if USE_DOT:
        if _UPCAST_BF16_DOT:
            if a.dtype == tl.bfloat16:  # exact: bf16 products are exact in fp32, accumulation is fp32
                a = a.to(tl.float32)
                b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)  # [M, K, N] -> [M, N]


@triton.jit
def _tile(ptr, i, i_ok, si, j, j_ok, sj):
    """Masked 2-D load ptr[i * si + j * sj] -> [len(i), len(j)], 0 outside."""
    return tl.load(ptr + i[:, None] * si + j[None, :] * sj, mask=i_ok[:, None] & j_ok[None, :], other=0.0)


@triton.jit
def _chunk_rows(chunk_set_ptr, chunk_ptr_ptr, off_ptr, e, S, BLOCK_T: tl.constexpr):
    """(set, chunk index in the set, chunks of the set, first row, end row) of chunk-table entry e.

    A set of n rows cut into n_chunks = max(1, ceil(n / chunk_rows)) chunks gets equal chunks of
    ceil(n / n_chunks) rows rounded up to BLOCK_T (balanced work; a trailing chunk may be empty).
    The set is S for an unused entry (callers skip it); the loads then read set S - 1, in bounds.
    """
    s = tl.load(chunk_set_ptr + e)
    sc = tl.minimum(s, S - 1)
    first = tl.load(chunk_ptr_ptr + sc)
    n_chunks = tl.load(chunk_ptr_ptr + sc + 1) - first
    k = e - first
    set_lo = tl.load(off_ptr + sc)
    set_hi = tl.load(off_ptr + sc + 1)
    per = tl.cdiv(tl.cdiv(set_hi - set_lo, n_chunks), BLOCK_T) * BLOCK_T
    lo = set_lo + k * per
    hi = tl.minimum(lo + per, set_hi)
    return s, k, n_chunks, lo, hi


@triton.jit
def _group_chunks(chunk_ptr_ptr, S, g):
    """[first, end) of the chunk table's entries for parameter group ``g``: the chunks in use (the table's length
    is an upper bound) split evenly over the groups, so that no group is left with only unused entries."""
    n_used = tl.load(chunk_ptr_ptr + S)
    per_group = tl.cdiv(n_used, tl.num_programs(0))
    return g * per_group, tl.minimum((g + 1) * per_group, n_used)


@triton.jit
def _relu_diff(a, x, ACC: tl.constexpr):
    """m = [a > 0] and diff = (ReLU(a) - x) * m, elementwise in ACC.

    Written like the reference (clamp, then multiply by the 0/1 mask) so NaN propagates alike.
    """
    m = (a > 0).to(ACC)
    return m, (tl.where(a < 0, 0.0, a) - x.to(ACC)) * m


@triton.jit
def _rounded_for(val, ptr):
    """``val`` (any float) rounded to nearest even in ``ptr``'s element type; a 16-bit type is
    reached through fp32, as in the C++ kernel."""
    ty: tl.constexpr = ptr.dtype.element_ty
    if ty.primitive_bitwidth == 16:
        val = val.to(tl.float32)
        if _ROUND_BF16_BITS:
            if ty == tl.bfloat16:  # add half an ulp of bf16 (ties to even), then truncation is exact
                bits = val.to(tl.uint32, bitcast=True)
                bits = bits + 0x7FFF + ((bits >> 16) & 1)
                val = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return val.to(ty)


@triton.jit
def _whitened(g, scale_ptrs, ok, HAS_SCALE: tl.constexpr):
    """g times the diagonal whitening diag(F)^-1/2 of Eq. 13, one factor per entry at ``scale_ptrs`` (0 off ``ok``)."""
    if HAS_SCALE:
        g = g * tl.load(scale_ptrs, mask=ok, other=0.0)
    return g


@triton.jit
def _signed_sqrt(g):
    """The Fisher vector's entries before the L2 norm, of a whitened G (Eq. 13's minus sign, then the signed
    square root): y = -g, returns (sign(y) sqrt|y|, sum of |y|), |y| being the root's square. g is 0 where
    nothing was accumulated, so the sum needs no mask."""
    a = tl.abs(g)
    return tl.where(g > 0, -tl.sqrt(a), tl.sqrt(a)), tl.sum(a)


@triton.jit
def _store_g(dst, cols, col_ok, js, j_ok, acc, acc_b, v, pid_j, D: tl.constexpr,
             scale_ptr, sq_ptr, NORMALIZE: tl.constexpr, HAS_SCALE: tl.constexpr):
    """Epilogue of a [BLOCK_C, BLOCK_J] tile of G (Eq. 13 before F): dst[c, j] = v_c acc[c, j] and, from
    the first d tile, the bias column dst[c, D] = v_c acc_b[c]; rounded once to dst's dtype (out_dtype).
    NORMALIZE: the signed square roots of -scale * G instead, and the tile's sum of their squares
    stored at ``sq_ptr`` (the L2 norm follows in ``_normalize_rows_kernel``)."""
    # Pointers and masks are written out in each load and store: computed once and shared, they stay live as
    # [BLOCK_C, BLOCK_J] tensors, and at the [128, 256] bf16 tile ptxas spilled 3.6 KB per thread instead of 1 KB
    # (NORMALIZE) and 20x more (G) at sm_90 (tests/sm90_compile.py).
    if NORMALIZE:
        root, sq = _signed_sqrt(_whitened(acc * v[:, None], scale_ptr + cols[:, None] * (D + 1) + js[None, :],
                                          col_ok[:, None] & j_ok[None, :], HAS_SCALE))
        tl.store(dst + cols[:, None] * (D + 1) + js[None, :], _rounded_for(root, dst),
                 mask=col_ok[:, None] & j_ok[None, :])
        if pid_j == 0:
            root_b, sq_b = _signed_sqrt(_whitened(acc_b * v, scale_ptr + cols * (D + 1) + D, col_ok, HAS_SCALE))
            tl.store(dst + cols * (D + 1) + D, _rounded_for(root_b, dst), mask=col_ok)
            sq += sq_b
        tl.store(sq_ptr, sq)
    else:
        tl.store(dst + cols[:, None] * (D + 1) + js[None, :], _rounded_for(acc * v[:, None], dst),
                 mask=col_ok[:, None] & j_ok[None, :])
        if pid_j == 0:
            tl.store(dst + cols * (D + 1) + D, _rounded_for(acc_b * v, dst), mask=col_ok)


@triton.jit
def _decode_t(w_ptr, p_ptr, z_ptr, cols, col_ok, rows, row_ok, D: tl.constexpr, LD: tl.constexpr,
              WITH_Q: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Transposed decoder GEMM tile over all of d, streaming d in BLOCK_K slices (d > BLOCK_J):
    a^T = W z^T and (WITH_Q) q^T = P_z z^T, each [BLOCK_C, BLOCK_T], bias not added.
    ``p_ptr`` is P = grad[s] (C, d+1) in G's dtype, rounded to z's dtype tile by tile as it is loaded;
    z and W rows have stride LD >= D, zero past D (see ``_aligned_rows``)."""
    a = tl.zeros((BLOCK_C, BLOCK_T), ACC)  # [BLOCK_C, BLOCK_T]
    q = tl.zeros((BLOCK_C, BLOCK_T), ACC)  # [BLOCK_C, BLOCK_T]
    for k0 in range(0, LD, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        kz_ok = ks < LD
        zk = _tile(z_ptr, ks, kz_ok, 1, rows, row_ok, LD)  # [BLOCK_K, BLOCK_T]
        a = _mm(_tile(w_ptr, cols, col_ok, LD, ks, kz_ok, 1), zk, a, USE_DOT, PRECISION)  # [BLOCK_C, BLOCK_K] @
        if WITH_Q:
            q = _mm(_rounded_for(_tile(p_ptr, cols, col_ok, D + 1, ks, k_ok, 1), z_ptr), zk, q, USE_DOT, PRECISION)
    return a, q


# ----------------------------------------------------------------------------------------------
# Forward. Orientation [C, rows] like flash attention's S = Q K^T with Q = a W tile, K = V = z:
# a^T = W_tile z^T, then G += diff^T-tile @ z, both GEMMs on chip. With d <= BLOCK_J ("one pass",
# d = 255 with BLOCK_J = 256) the W tile stays on chip for the whole chunk and each z tile is
# loaded once and feeds both GEMMs; otherwise d is streamed in BLOCK_K slices per (d tile).
# The bias column of G (j = d) is sum_t r_t: a row sum, no GEMM.
# ----------------------------------------------------------------------------------------------
@_batch_jit
def _fwd_kernel(
    x_ptr, z_ptr, w_ptr, b_ptr, v_ptr, off_ptr,  # inputs
    chunk_set_ptr, chunk_ptr_ptr, slot_ptr_ptr,  # chunk table (see _chunk_table)
    out_ptr, part_ptr,  # (S, C, D+1) output, (slots, C, D+1) fp32 partials of split sets
    scale_ptr, sq_ptr,  # NORMALIZE: (C*(D+1),) whitening (HAS_SCALE), (S, N_SQ) sums of squares per tile
    S, C, D: tl.constexpr, LD: tl.constexpr, N_ENTRIES, LEN_KEY, N_SQ,
    ACC: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Persistent over chunks: program (C tile, p, d tile) takes chunks p, p + P, ... so its W tile,
    # bias and v are loaded once, and the store of one chunk's G tile overlaps the next chunk's loads
    # (frame-sized sets are bound by writing G). The C tile is the fastest grid axis: the programs
    # that run together read the same z rows, which then come from L2 for all C tiles but the first.
    pid_j = tl.program_id(2)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    js = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    col_ok = cols < C
    j_ok = js < D
    jz_ok = js < LD  # z and W: rows of stride LD, zero past D: masks uniform over 16-byte vectors
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)  # [BLOCK_C]
    v = tl.load(v_ptr + cols, mask=col_ok, other=0.0).to(ACC)  # [BLOCK_C]; r_t = v * diff_t
    if D <= BLOCK_J:
        w_res = _tile(w_ptr, cols, col_ok, LD, js, jz_ok, 1)  # [BLOCK_C, BLOCK_J] resident
    zero_ct = tl.zeros((BLOCK_C, BLOCK_T), ACC)  # [BLOCK_C, BLOCK_T]
    for e in range(tl.program_id(1), N_ENTRIES, tl.num_programs(1)):
        s, k, n_chunks, lo, hi = _chunk_rows(chunk_set_ptr, chunk_ptr_ptr, off_ptr, e, S, BLOCK_T)
        if s < S:  # entries past the last chunk (the table is an upper bound) do nothing
            acc = tl.zeros((BLOCK_C, BLOCK_J), ACC)  # [BLOCK_C, BLOCK_J]  sum_t diff_t z_t^T
            acc_b = tl.zeros((BLOCK_C,), ACC)  # [BLOCK_C]  sum_t diff_t
            for t0 in range(lo, hi, BLOCK_T):
                rows = t0 + tl.arange(0, BLOCK_T)
                row_ok = rows < hi
                zt = _tile(z_ptr, rows, row_ok, LD, js, jz_ok, 1)  # [BLOCK_T, BLOCK_J]
                if D <= BLOCK_J:
                    a = _mm(w_res, tl.trans(zt), zero_ct, USE_DOT, PRECISION)  # [BLOCK_C, BLOCK_T]
                else:
                    a, _ = _decode_t(w_ptr, w_ptr, z_ptr, cols, col_ok, rows, row_ok, D, LD, False,
                                     ACC, USE_DOT, PRECISION, BLOCK_T, BLOCK_C, BLOCK_K)  # [BLOCK_C, BLOCK_T]
                xt = _tile(x_ptr, cols, col_ok, 1, rows, row_ok, C)  # [BLOCK_C, BLOCK_T]
                _, diff = _relu_diff(a + b[:, None], xt, ACC)  # [BLOCK_C, BLOCK_T]
                diff = tl.where(row_ok[None, :], diff, 0.0)
                acc = _mm(diff.to(zt.dtype), zt, acc, USE_DOT, PRECISION)
                acc_b += tl.sum(diff, axis=1)
            if n_chunks == 1:  # straight into G, in its dtype
                tile = tl.program_id(0) * tl.num_programs(2) + pid_j
                _store_g(out_ptr + s * C * (D + 1), cols, col_ok, js, j_ok, acc, acc_b, v, pid_j, D,
                         scale_ptr, sq_ptr + s * N_SQ + tile, NORMALIZE, HAS_SCALE)
            else:  # an ACC partial of a split set
                _store_g(part_ptr + (tl.load(slot_ptr_ptr + s) + k) * C * (D + 1), cols, col_ok, js, j_ok, acc,
                         acc_b, v, pid_j, D, scale_ptr, sq_ptr, False, False)


@_batch_jit
def _combine_kernel(part_ptr, out_ptr, split_set_ptr, chunk_ptr_ptr, slot_ptr_ptr, scale_ptr, sq_ptr, S, E, N_SQ,
                    ACC: tl.constexpr, NORMALIZE: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """out[s] = sum over the chunks of split set s of their partials, in chunk order, in out's dtype
    (NORMALIZE: their signed square roots as in ``_store_g``, the block's sum of squares at sq[s, block])."""
    s = tl.load(split_set_ptr + tl.program_id(0))
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] over the C*(D+1) elements
    ok = idx < E
    if s < S:
        n_chunks = tl.load(chunk_ptr_ptr + s + 1) - tl.load(chunk_ptr_ptr + s)
        slot0 = tl.load(slot_ptr_ptr + s)
        acc = tl.zeros((BLOCK,), ACC)
        for k in range(0, n_chunks):
            acc += tl.load(part_ptr + (slot0 + k) * E + idx, mask=ok, other=0.0)
        if NORMALIZE:
            acc, sq = _signed_sqrt(_whitened(acc, scale_ptr + idx, ok, HAS_SCALE))
            tl.store(sq_ptr + s * N_SQ + tl.program_id(1), sq)
        tl.store(out_ptr + s * E + idx, _rounded_for(acc, out_ptr), mask=ok)


@_batch_jit
def _normalize_rows_kernel(src_ptr, out_ptr, sq_ptr, E, N_SQ, eps, ACC: tl.constexpr, BLOCK_SQ: tl.constexpr,
                           BLOCK: tl.constexpr):
    """The L2 normalisation: out[s] = src[s] / max(sqrt(sum of sq[s]), eps), rounded to out's dtype (src may
    be out); the partial sums are added in one fixed order (deterministic)."""
    s = tl.program_id(0)
    i = tl.arange(0, BLOCK_SQ)
    norm = tl.sqrt(tl.sum(tl.load(sq_ptr + s * N_SQ + i, mask=i < N_SQ, other=0.0)))
    inv = 1.0 / tl.maximum(norm, eps)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < E
    row = tl.load(src_ptr + s * E + idx, mask=ok, other=0.0).to(ACC)
    tl.store(out_ptr + s * E + idx, _rounded_for(row * inv, out_ptr), mask=ok)


_fwd = {kind: _autotune(configs, _FWD_TUNE_KEY)(_fwd_kernel) for kind, configs in _FWD_CONFIGS.items()}


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@_batch_jit
def _bwd_rows_kernel(
    x_ptr, z_ptr, w_ptr, b_ptr, v_ptr, p_ptr, off_ptr,
    chunk_set_ptr, chunk_ptr_ptr,
    dx_ptr, dz_ptr,
    S, C, D: tl.constexpr, LD: tl.constexpr, LEN_KEY,
    ACC: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Rows of one chunk, one d tile; orientation [rows, C] (flash-attention dQ-like: z tile on chip,
    loop over C tiles, the W and P_z tiles feed both the decoder GEMM and dz):

        a_t = W z_t + b,  q_t = P_z z_t + p_b                [BLOCK_T, BLOCK_C] per C tile
        da_t = v m_t q_t,   dx_t = -da_t                     stored per C tile
        dz_t = sum over C tiles of W^T da_t + P_z^T (v diff_t)   [BLOCK_T, BLOCK_J] accumulator
    """
    e = tl.program_id(0)
    pid_j = tl.program_id(1)
    js = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = js < D
    jz_ok = js < LD  # z and W: rows of stride LD, zero past D: masks uniform over 16-byte vectors
    s, k, n_chunks, lo, hi = _chunk_rows(chunk_set_ptr, chunk_ptr_ptr, off_ptr, e, S, BLOCK_T)
    if s < S:
        p_set = p_ptr + s * C * (D + 1)
        zero_tc = tl.zeros((BLOCK_T, BLOCK_C), ACC)  # [BLOCK_T, BLOCK_C]
        for t0 in range(lo, hi, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            row_ok = rows < hi
            if D <= BLOCK_J:
                zt = _tile(z_ptr, rows, row_ok, LD, js, jz_ok, 1)  # [BLOCK_T, BLOCK_J] resident over C
            dz = tl.zeros((BLOCK_T, BLOCK_J), ACC)  # [BLOCK_T, BLOCK_J]
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                col_ok = cols < C
                w_cj = _tile(w_ptr, cols, col_ok, LD, js, jz_ok, 1)  # [BLOCK_C, BLOCK_J]
                p_cj = _rounded_for(_tile(p_set, cols, col_ok, D + 1, js, j_ok, 1), z_ptr)  # [BLOCK_C, BLOCK_J]
                if D <= BLOCK_J:
                    a = _mm(zt, tl.trans(w_cj), zero_tc, USE_DOT, PRECISION)  # [BLOCK_T, BLOCK_C]
                    q = _mm(zt, tl.trans(p_cj), zero_tc, USE_DOT, PRECISION)  # [BLOCK_T, BLOCK_C]
                else:
                    a_t, q_t = _decode_t(w_ptr, p_set, z_ptr, cols, col_ok, rows, row_ok, D, LD, True,
                                         ACC, USE_DOT, PRECISION, BLOCK_T, BLOCK_C, BLOCK_K)  # [BLOCK_C, BLOCK_T]
                    a = tl.trans(a_t)
                    q = tl.trans(q_t)
                b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]  # [1, BLOCK_C]
                p_b = tl.load(p_set + cols * (D + 1) + D, mask=col_ok, other=0.0).to(ACC)[None, :]  # [1, BLOCK_C]
                v = tl.load(v_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]  # [1, BLOCK_C]
                q = q + p_b
                m, diff = _relu_diff(a + b, _tile(x_ptr, rows, row_ok, C, cols, col_ok, 1), ACC)  # [BLOCK_T, BLOCK_C]
                da = v * m * q  # [BLOCK_T, BLOCK_C]; rows past the chunk only reach their own (unstored) dz row
                if pid_j == 0:
                    tl.store(dx_ptr + rows[:, None] * C + cols[None, :], (-da).to(dx_ptr.dtype.element_ty),
                             mask=row_ok[:, None] & col_ok[None, :])
                dz = _mm(da.to(w_cj.dtype), w_cj, dz, USE_DOT, PRECISION)
                dz = _mm((diff * v).to(p_cj.dtype), p_cj, dz, USE_DOT, PRECISION)
            tl.store(dz_ptr + rows[:, None] * D + js[None, :], dz.to(dz_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & j_ok[None, :])


@_batch_jit
def _bwd_params_kernel(
    x_ptr, z_ptr, w_ptr, b_ptr, v_ptr, p_ptr, off_ptr,
    chunk_set_ptr, chunk_ptr_ptr,
    pw_ptr, pv_ptr,  # fp32 partials: (groups, C, D+1) of [dW | db], (groups, C) of dv
    S, C, D: tl.constexpr, LD: tl.constexpr, LEN_KEY,
    ACC: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One group of chunks, one (C, d) tile; orientation [C, rows] as in the forward:

        [dW | db] = v * sum_t (m q)_t [z_t ; 1]^T     [BLOCK_C, BLOCK_J] + [BLOCK_C] (row sum)
        dv        = sum_t diff_t q_t                  [BLOCK_C]
    """
    g = tl.program_id(0)
    pid_j = tl.program_id(2)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    js = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    col_ok = cols < C
    j_ok = js < D
    jz_ok = js < LD  # z and W: rows of stride LD, zero past D: masks uniform over 16-byte vectors
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)[:, None]  # [BLOCK_C, 1]
    if D <= BLOCK_J:
        w_res = _tile(w_ptr, cols, col_ok, LD, js, jz_ok, 1)  # [BLOCK_C, BLOCK_J] resident
    acc = tl.zeros((BLOCK_C, BLOCK_J), ACC)  # [BLOCK_C, BLOCK_J]  sum_t (m q)_t z_t^T
    acc_b = tl.zeros((BLOCK_C,), ACC)  # [BLOCK_C]  sum_t (m q)_t
    acc_v = tl.zeros((BLOCK_C,), ACC)  # [BLOCK_C]  sum_t diff_t q_t
    zero_ct = tl.zeros((BLOCK_C, BLOCK_T), ACC)  # [BLOCK_C, BLOCK_T]
    e_first, e_end = _group_chunks(chunk_ptr_ptr, S, g)
    for e in range(e_first, e_end):
        s, k, n_chunks, lo, hi = _chunk_rows(chunk_set_ptr, chunk_ptr_ptr, off_ptr, e, S, BLOCK_T)
        if s < S:
            p_set = p_ptr + s * C * (D + 1)
            p_b = tl.load(p_set + cols * (D + 1) + D, mask=col_ok, other=0.0).to(ACC)[:, None]  # [BLOCK_C, 1]
            if D <= BLOCK_J:
                p_res = _rounded_for(_tile(p_set, cols, col_ok, D + 1, js, j_ok, 1), z_ptr)  # [BLOCK_C, BLOCK_J]
            for t0 in range(lo, hi, BLOCK_T):
                rows = t0 + tl.arange(0, BLOCK_T)
                row_ok = rows < hi
                zt = _tile(z_ptr, rows, row_ok, LD, js, jz_ok, 1)  # [BLOCK_T, BLOCK_J]
                if D <= BLOCK_J:
                    a = _mm(w_res, tl.trans(zt), zero_ct, USE_DOT, PRECISION)  # [BLOCK_C, BLOCK_T]
                    q = _mm(p_res, tl.trans(zt), zero_ct, USE_DOT, PRECISION)  # [BLOCK_C, BLOCK_T]
                else:
                    a, q = _decode_t(w_ptr, p_set, z_ptr, cols, col_ok, rows, row_ok, D, LD, True,
                                     ACC, USE_DOT, PRECISION, BLOCK_T, BLOCK_C, BLOCK_K)  # [BLOCK_C, BLOCK_T]
                q = q + p_b
                m, diff = _relu_diff(a + b, _tile(x_ptr, cols, col_ok, 1, rows, row_ok, C), ACC)  # [BLOCK_C, BLOCK_T]
                mq = tl.where(row_ok[None, :], m * q, 0.0)  # [BLOCK_C, BLOCK_T]
                acc = _mm(mq.to(zt.dtype), zt, acc, USE_DOT, PRECISION)
                acc_b += tl.sum(mq, axis=1)
                acc_v += tl.sum(tl.where(row_ok[None, :], diff * q, 0.0), axis=1)
    v = tl.load(v_ptr + cols, mask=col_ok, other=0.0).to(ACC)  # [BLOCK_C]
    _store_g(pw_ptr + g.to(tl.int64) * C * (D + 1), cols, col_ok, js, j_ok, acc, acc_b, v, pid_j, D,
             pw_ptr, pv_ptr, False, False)
    if pid_j == 0:
        tl.store(pv_ptr + g.to(tl.int64) * C + cols, acc_v, mask=col_ok)


_bwd_rows = {kind: _autotune(configs)(_bwd_rows_kernel) for kind, configs in _BWD_CONFIGS.items()}
_bwd_params = {kind: _autotune(configs)(_bwd_params_kernel) for kind, configs in _BWD_CONFIGS.items()}


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(device: torch.device, per_sm: int, interpreted: int) -> int:
    """``per_sm`` programs per SM of a CUDA device; ``interpreted`` under the interpreter."""
    if device.type != "cuda":
        return interpreted
    return per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


RESIDENT_PER_SM = 4  # programs of the persistent forward per SM (1 was 1.4-1.7x slower on an H200; 2-16 alike)


def _resident_programs(device: torch.device) -> int:
    """Programs of the persistent forward grid; a handful under the interpreter (each loops over chunks)."""
    return _programs(device, RESIDENT_PER_SM, 4)


def _target_programs(device: torch.device) -> int:
    """About 4 resident programs per SM; a handful under the interpreter (so long sets still split)."""
    return _programs(device, 4, 8)


def _len_key(n: int, s: int) -> int:
    """Typical set length bucketed to a power of two (autotune key)."""
    return min(triton.next_power_of_2(max(1, n // max(s, 1))), 4096)


def _default_chunk(n: int, tiles: int, device: torch.device) -> int:
    """Rows per program so that all chunks x ``tiles`` give about the target number of programs."""
    step, least = (16, 16) if _INTERPRET else (64, 256)
    rows = triton.cdiv(n * tiles, _target_programs(device))
    return max(least, triton.cdiv(rows, step) * step)


def _chunk_table(offsets: torch.Tensor, chunk: int, n: int):
    """Device-side chunk table (no host sync; the grid is sized by an upper bound).

    Returns (chunk_set, chunk_ptr, slot_ptr, split_set, n_entries, n_slots, n_split):
    set s has max(1, ceil(len_s / chunk)) chunks, entries chunk_ptr[s] : chunk_ptr[s+1] of
    chunk_set (value s; S marks the unused tail). n_entries = S + n // chunk bounds the number of
    chunks. A *split* set (more than one chunk) owns partial slots slot_ptr[s] + k; there are fewer
    than 2 n / chunk slots and at most n // (chunk + 1) split sets, listed first in split_set.
    """
    s = offsets.shape[0] - 1
    lengths = offsets[1:] - offsets[:-1]
    counts = torch.clamp_min((lengths + chunk - 1) // chunk, 1)
    zero = offsets.new_zeros(1)
    chunk_ptr = torch.cat([zero, torch.cumsum(counts, 0)])
    n_entries = s + n // chunk
    chunk_set = torch.searchsorted(chunk_ptr[1:], torch.arange(n_entries, device=offsets.device), right=True)
    split = counts > 1
    slot_ptr = torch.cat([zero, torch.cumsum(torch.where(split, counts, 0), 0)])
    n_split = n // (chunk + 1)
    split_set = torch.searchsorted(torch.cumsum(split.to(torch.int64), 0),
                                   torch.arange(1, n_split + 1, device=offsets.device))
    n_slots = (2 * n) // chunk + 1 if n_split else 0
    return chunk_set, chunk_ptr, slot_ptr, split_set, n_entries, n_slots, n_split


def _in_bounds(offsets: torch.Tensor, n: int) -> torch.Tensor:
    """``offsets`` made non-decreasing within [0, n], on the device (no host sync; the identity on
    valid offsets, which CUDA callers do not check): every row the kernels touch is a row of x."""
    return torch.cummax(offsets.clamp(0, n), 0).values


def _scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised scratch of ``shape``, NaN-filled under the interpreter so an unwritten element
    shows in tests. A plain ``torch.empty``: the caching allocator hands the same block back to a
    steady batch shape (no cudaMalloc), and a buffer kept across calls would outlive the private
    memory pool of a CUDA graph (torch.compile's reduce-overhead mode refuses such a tensor)."""
    view = torch.empty(shape, dtype=dtype, device=device)
    return view.fill_(float("nan")) if _INTERPRET else view


ROW_ALIGN = 16  # elements: z and W rows of any dtype start on 32-byte boundaries


def _aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """t (R, d) with its rows padded with zeros to a stride of a multiple of ``ROW_ALIGN`` (t itself when
    d is one). At d = 255 the unpadded rows start at odd 2-byte offsets: the kernels' z and W tiles then
    load element by element and cannot use cp.async; with the padded stride (and masks at the stride,
    which are uniform over 16-byte vectors) they load 16 bytes at a time. The zero columns add nothing."""
    r, d = t.shape
    ld = triton.cdiv(d, ROW_ALIGN) * ROW_ALIGN
    if ld == d:
        return t
    out = torch.empty((r, ld), dtype=t.dtype, device=t.device)
    out[:, d:].zero_()
    out[:, :d].copy_(t)
    return out


def _modes(dtype: torch.dtype):
    """(accumulator dtype, tl accumulator, use tl.dot, dot input precision, config kind) for an input dtype."""
    if dtype == torch.float64:
        return torch.float64, tl.float64, False, "ieee", "float64"
    if dtype == torch.float32:
        return torch.float32, tl.float32, True, FP32_PRECISION, "float32"
    return torch.float32, tl.float32, True, "tf32", "half"


def _contiguous(*ts: torch.Tensor):
    return tuple(t.contiguous() for t in ts)


def _check_out(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype or t.device != device or not t.is_contiguous():
        raise ValueError(
            f"fisher_accumulate (triton): {name} must be a contiguous {shape} {dtype} tensor on {device}, "
            f"got {tuple(t.shape)} {t.dtype} on {t.device} (contiguous={t.is_contiguous()})"
        )


def fisher_accumulate_fwd(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    inv_var: torch.Tensor,
    offsets: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """G: (S, C, d+1) from x (N, C), z (N, d), weight (C, d), bias (C,), inv_var (C,), offsets
    (S+1,) int64; accumulated in fp32 (fp64 for float64 input) and written in ``out_dtype``
    (default: the accumulation dtype) by the kernels' epilogue. Deterministic (no atomics).

    ``out``: optional preallocated (S, C, d+1) contiguous result in that dtype (every element is overwritten).
    ``chunk_rows``: rows per program (default: chosen to fill the device); sets longer than it
    are split across programs and their fp32 partials summed in order.
    """
    c, d, s = x.shape[1], z.shape[1], offsets.shape[0] - 1
    out_dtype = out_dtype or _modes(x.dtype)[0]
    if out is None:
        out = torch.empty((s, c, d + 1), dtype=out_dtype, device=x.device)
    _check_out("out", out, (s, c, d + 1), out_dtype, x.device)
    return _forward(x, z, weight, bias, inv_var, offsets, out, None, None, chunk_rows)


def fisher_vectors_fwd(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    inv_var: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor | None,
    eps: float,
    *,
    out_dtype: torch.dtype | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Normalised Fisher vectors (S, C*(d+1)) in ``out_dtype`` (default: the accumulation dtype):
    y = -scale * vec(G[s]) (``scale`` (C*(d+1),) or None for 1), sign(y) sqrt|y| in the forward's
    epilogue, then divided by max(its L2 norm, eps). Inputs as :func:`fisher_accumulate_fwd`."""
    c, d, s = x.shape[1], z.shape[1], offsets.shape[0] - 1
    acc_dtype = _modes(x.dtype)[0]
    out = torch.empty((s, c * (d + 1)), dtype=out_dtype or acc_dtype, device=x.device)
    if scale is not None:
        scale = scale.to(acc_dtype).contiguous()
    return _forward(x, z, weight, bias, inv_var, offsets, out, scale, eps, chunk_rows)


_COMBINE_BLOCK = 1024


@functools.cache
def _tma_kernels():
    """The tensor-descriptor kernels (kernels/fisher_tma.py), imported on first use: they import this module."""
    from . import fisher_tma

    return fisher_tma


def _forward(x, z, weight, bias, inv_var, offsets, out, scale, eps, chunk_rows):
    """Launch the forward into ``out`` (S, C, d+1) or (S, C*(d+1)); ``eps`` not None: normalised vectors."""
    x, z, weight, bias, inv_var, offsets = _contiguous(x, z, weight, bias, inv_var, offsets)
    n, c = x.shape
    d = z.shape[1]
    s = offsets.shape[0] - 1
    if s == 0:
        return out
    offsets = _in_bounds(offsets, n)
    acc_dtype, acc_tl, use_dot, precision, kind = _modes(x.dtype)
    e = c * (d + 1)
    normalize = eps is not None
    tma = _tma_kernels() if _tma_kernels().usable(x, d) else None
    # one sum of squares per (C tile, d tile) of the forward or block of the combine, whichever config runs
    configs = tma.configs(normalize) if tma else _FWD_CONFIGS[kind]
    d_tiles = 1 if tma else triton.cdiv(d, min(cf.kwargs["BLOCK_J"] for cf in configs))
    n_sq = max(triton.cdiv(c, min(cf.kwargs["BLOCK_C"] for cf in configs)) * d_tiles,
               triton.cdiv(e, _COMBINE_BLOCK)) if normalize else 1
    # (G alone: out stands in for the unused scale and sum pointers, no allocation or launch)
    sq = torch.zeros((s, n_sq), dtype=acc_dtype, device=x.device) if normalize else out
    chunk = chunk_rows or _default_chunk(n, triton.cdiv(c, 128) * triton.cdiv(d, 256), x.device)
    chunk_set, chunk_ptr, slot_ptr, split_set, n_entries, n_slots, n_split = _chunk_table(offsets, chunk, n)
    part = _scratch((max(n_slots, 1), c, d + 1), acc_dtype, x.device)
    modes = dict(NORMALIZE=normalize, HAS_SCALE=scale is not None)
    scale = sq if scale is None else scale
    # The signed roots wait for the norm in the accumulation dtype when out is 16-bit: in fp16 they overflow
    # above 65504 (|y| > 4.3e9) and lose their digits below 6e-5, and either would be rounded twice.
    roots = _scratch(out.shape, acc_dtype, x.device) if normalize and out.element_size() < 4 else out

    def grid(meta):
        tiles = triton.cdiv(c, meta["BLOCK_C"]) * triton.cdiv(d, meta["BLOCK_J"])
        per_tile = min(n_entries, triton.cdiv(_resident_programs(x.device), tiles))
        return (triton.cdiv(c, meta["BLOCK_C"]), per_tile, triton.cdiv(d, meta["BLOCK_J"]))

    if tma:
        tma.launch(x, *tma.augmented(z, weight), bias, inv_var, offsets, chunk_set, chunk_ptr, slot_ptr, roots, part,
                   scale, sq, s, d, n_entries, _len_key(n, s), n_sq, _resident_programs(x.device), **modes)
    else:
        z, weight = _aligned_rows(z), _aligned_rows(weight)
        _fwd[kind][grid](
            x, z, weight, bias, inv_var, offsets, chunk_set, chunk_ptr, slot_ptr, roots, part, scale, sq,
            s, c, d, z.shape[1], n_entries, _len_key(n, s), n_sq, ACC=acc_tl, USE_DOT=use_dot, PRECISION=precision,
            **modes,
        )
    if n_split:
        _combine_kernel[(n_split, triton.cdiv(e, _COMBINE_BLOCK))](
            part, roots, split_set, chunk_ptr, slot_ptr, scale, sq, s, e, n_sq, ACC=acc_tl, BLOCK=_COMBINE_BLOCK,
            **modes,
        )
    if normalize:
        block = 1024
        _normalize_rows_kernel[(s, triton.cdiv(e, block))](
            roots, out, sq, e, n_sq, eps, ACC=acc_tl, BLOCK_SQ=triton.next_power_of_2(n_sq), BLOCK=block
        )
    return out


def fisher_accumulate_bwd(
    grad: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    inv_var: torch.Tensor,
    offsets: torch.Tensor,
    *,
    out: tuple[torch.Tensor, ...] | None = None,
    chunk_rows: int | None = None,
    groups: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx, dz, dweight, dbias, dinv_var) of <grad, G>, each in its input's dtype.

    ``grad``: (S, C, d+1) upstream gradient of G, in any floating dtype (G's). ``out``: optional preallocated
    (dx, dz, dweight, dbias, dinv_var), every element overwritten. ``chunk_rows``: rows per
    program of the row kernel and the unit of work of the param kernel; ``groups``: programs
    along the rows of the param kernel (one fp32 partial each, summed by ``torch.sum``).
    Deterministic (no atomics).
    """
    x, z, weight, bias, inv_var, offsets, grad = _contiguous(x, z, weight, bias, inv_var, offsets, grad)
    n, c = x.shape
    d = z.shape[1]
    s = offsets.shape[0] - 1
    offsets = _in_bounds(offsets, n)
    acc_dtype, acc_tl, use_dot, precision, kind = _modes(x.dtype)
    inputs = (x, z, weight, bias, inv_var)
    if out is None:
        out = tuple(torch.empty_like(t) for t in inputs)
    for name, o, t in zip(("dx", "dz", "dweight", "dbias", "dinv_var"), out, inputs):
        _check_out(f"out {name}", o, tuple(t.shape), t.dtype, t.device)
    dx, dz, dw, db, dv = out
    if s == 0 or n == 0:
        for t in out:
            t.zero_()
        return out
    chunk = chunk_rows or (48 if _INTERPRET else 128)
    chunk_set, chunk_ptr, _, _, n_entries, _, _ = _chunk_table(offsets, chunk, n)
    len_key = _len_key(n, s)
    meta_args = dict(ACC=acc_tl, USE_DOT=use_dot, PRECISION=precision)
    rows_kernel, params_kernel = _bwd_rows[kind], _bwd_params[kind]
    # the tensor-descriptor kernels take grad in x's dtype (dx through a descriptor: 16-byte aligned)
    p_half = _tma_kernels().grad_for(x, grad, d) if dx.data_ptr() % 16 == 0 else None
    tma = _tma_kernels() if p_half is not None else None
    z_rows, w_rows = tma.augmented(z, weight, bias) if tma else (_aligned_rows(z), _aligned_rows(weight))

    if tma:
        tma.launch_rows(x, z_rows, w_rows, inv_var, p_half, offsets, chunk_set, chunk_ptr, dx, dz, s, d, n_entries,
                        len_key)
    else:
        rows_kernel[lambda meta: (n_entries, triton.cdiv(d, meta["BLOCK_J"]))](
            x, z_rows, w_rows, bias, inv_var, grad, offsets, chunk_set, chunk_ptr, dx, dz,
            s, c, d, z_rows.shape[1], len_key, **meta_args,
        )

    tiles = triton.cdiv(c, 64) * triton.cdiv(d, 256)  # (C, d) tiles of the param kernel, about
    n_groups = groups or max(1, min(n_entries, triton.cdiv(_target_programs(x.device), tiles)))
    pw = _scratch((n_groups, c, d + 1), acc_dtype, x.device)
    pv = _scratch((n_groups, c), acc_dtype, x.device)
    if tma:
        tma.launch_params(x, z_rows, w_rows, inv_var, p_half, offsets, chunk_set, chunk_ptr, pw, pv, s, d, len_key)
    else:
        params_kernel[lambda meta: (n_groups, triton.cdiv(c, meta["BLOCK_C"]), triton.cdiv(d, meta["BLOCK_J"]))](
            x, z_rows, w_rows, bias, inv_var, grad, offsets, chunk_set, chunk_ptr, pw, pv,
            s, c, d, z_rows.shape[1], len_key, **meta_args,
        )
    gw = pw.sum(0)  # (C, d+1) fixed-order reduction over groups: deterministic
    dw.copy_(gw[:, :d])
    db.copy_(gw[:, d])
    dv.copy_(pv.sum(0))
    return dx, dz, dw, db, dv
