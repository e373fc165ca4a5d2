"""Tensor-descriptor (TMA on sm_90+) kernels of ``fisher_accumulate`` for bf16/fp16: the forward, clean by
construction, and the backward's row and param kernels by the same rules.

Chosen by the launchers of :mod:`fvvae_fast.kernels.fisher_accumulate` (``fisher_accumulate_fwd``,
``fisher_vectors_fwd``, ``fisher_accumulate_bwd``) for 16-bit inputs on a GPU of compute capability 9.0 or later,
when x's rows are 16-byte aligned (C a multiple of 8) and d + 1 fits one tile (d <= 255), and for the backward
when grad's rows in the input dtype are 16-byte aligned too (d + 1 a multiple of 8: :func:`grad_for` converts
grad once); the fused kernels of that module serve every other case. Same
grid, chunk table, split-set partials and epilogues as the fused kernels; what differs is how operands arrive.

Per 64-row step, orientation [C, rows] as flash attention with Q = a W tile and K = V = z:

    a^T  = W_tile z_aug^T                    [BLOCK_C, BLOCK_T]   (W resident in shared memory)
    diff = (ReLU(a^T + b) - x^T) * [a^T + b > 0]
    acc += diff @ z_aug                      [BLOCK_C, BLOCK_J]   (diff as the register operand)

- z_aug = [z | 1 | 0...] (N, LDA), LDA = d + 1 rounded up to 16, and W_aug = [W | 0...] (C, LDA): the ones
  column makes G's bias column (j = d) an ordinary column of the second GEMM, so there is no row sum (a
  cross-warp reduction) in the loop, and the G tile [BLOCK_C, BLOCK_J] is G's row layout as is.
- z, x and W come through tensor descriptors made on the device, z's and x's bounded at the set's last row
  (a chunk ends at its set's end or on a multiple of BLOCK_T): rows past it load as zeros, so the loop has
  no masks and never reads the next set. A zero row of z_aug (ones column included) adds nothing, whatever
  diff is there. The loads land in shared memory in the layout the tensor cores read (no per-step layout
  conversion through registers) and are pipelined over the steps of a chunk (num_stages).
- Loop indices are 32-bit (TMA coordinates); the 64-bit offsets of G are formed once per chunk.
- Epilogue: with d + 1 = BLOCK_J (d = 255) the store mask is uniform along G's rows, so each thread
  stores 16 bytes at a time.

Testing: the interpreter of Triton 3.8 runs ``tl.make_tensor_descriptor`` (bounds zero-filled as on the
GPU), so these very kernels are checked against float64 under ``TRITON_INTERPRET=1``; tests/sm90_compile.py
compiles them for sm_90a and checks their SASS (no spills, no local memory, at most 6 barriers and only
HGMMA in the loop, vectorised or TMA stores; dz, rows of d = 255 elements, is stored 2 bytes at a time).
Not done: loads are pipelined within a chunk, not across the chunks of a persistent program (a frame-sized set
is one or two steps, so its first loads are not hidden). Device-side descriptors need a global scratch allocation
(``triton.set_allocator``): :func:`launch` installs a torch one when the caller has none.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .fisher_accumulate import (
    _batch_jit,
    _chunk_rows,
    _group_chunks,
    _mm,
    _relu_diff,
    _rounded_for,
    _signed_sqrt,
    _whitened,
)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ALIGN = 16  # elements of z_aug's and W_aug's row stride (32 bytes in 16-bit types)
MAX_D = 255  # d + 1 columns in one tile of at most 256 (a TMA box is at most 256 wide)


def _cfg(bt: int, bc: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_T": bt, "BLOCK_C": bc}, num_warps=warps, num_stages=stages)


# G: first a [128, 256] G tile per program with 8 warps (two warpgroups) and 3 stages of z and x (192 KB of shared
# memory with the resident W tile), the tile the fused forward measured fastest on an H200. Normalised vectors:
# the whitening's scale tile is live beside the accumulator in the epilogue, and at 128 accumulator registers per
# thread ptxas spilled 0.5-0.7 KB (tests/sm90_compile.py), so their tiles hold 64 per thread (C tile 64, 8 warps).
if _INTERPRET:
    FWD_CONFIGS = VEC_CONFIGS = [_cfg(16, 32, 4, 1)]
else:
    FWD_CONFIGS = [_cfg(64, 128, 8, 3), _cfg(64, 64, 8, 3), _cfg(32, 64, 4, 3)]
    VEC_CONFIGS = [_cfg(64, 64, 8, 3), _cfg(32, 64, 8, 3)]


def _prune(configs, named_args, **kwargs):
    """Drop C tiles far larger than C; keep the smallest if none fits."""
    cap = max(16, triton.next_power_of_2(named_args["C"]))
    return [cf for cf in configs if cf.kwargs["BLOCK_C"] <= cap] or [min(configs, key=lambda cf: cf.kwargs["BLOCK_C"])]


def block_j(d: int) -> int:
    """The one tile of G's d + 1 columns (z_aug's padded row, rounded up to a power of two)."""
    return max(16, triton.next_power_of_2(row_stride(d)))


def row_stride(d: int) -> int:
    """z_aug's and W_aug's row stride: d + 1 rounded up to a multiple of 16 elements."""
    return triton.cdiv(d + 1, _ALIGN) * _ALIGN


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def usable(x: torch.Tensor, d: int) -> bool:
    """Whether this forward serves inputs ``x`` (N, C) with z of width d (shapes and dtypes only: no sync):
    16-bit inputs, d <= MAX_D, x's rows and base 16-byte aligned, and a GPU with TMA (sm_90+) or the
    interpreter."""
    if x.dtype not in (torch.float16, torch.bfloat16) or d > MAX_D or x.shape[1] % 8 or x.data_ptr() % 16:
        return False
    if x.device.type != "cuda":
        return _INTERPRET
    return _capability(x.device.index if x.device.index is not None else torch.cuda.current_device())[0] >= 9


def augmented(z: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_aug, W_aug): z (N, d) as [z | 1 | 0...] and weight (C, d) as [W | 0...], or [W | bias | 0...] with
    ``bias`` (C,), rows of ``row_stride(d)``."""
    d = z.shape[1]
    ld = row_stride(d)
    z_aug = torch.empty((z.shape[0], ld), dtype=z.dtype, device=z.device)
    z_aug[:, :d].copy_(z)
    z_aug[:, d].fill_(1)
    z_aug[:, d + 1:].zero_()
    w_aug = torch.zeros((weight.shape[0], ld), dtype=weight.dtype, device=weight.device)
    w_aug[:, :d].copy_(weight)
    if bias is not None:
        w_aug[:, d].copy_(bias)
    return z_aug, w_aug


def _scratch_allocator(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Give Triton an allocator for the descriptors made on the device, unless the caller set one."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch_allocator)


@triton.jit
def _g_mask(col_ok, js, D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    """The store mask of a G tile: uniform along a row (vector stores) when the tile is exactly d + 1 wide."""
    if D + 1 == BLOCK_J:
        return tl.broadcast_to(col_ok[:, None], (BLOCK_C, BLOCK_J))
    else:
        return col_ok[:, None] & (js < D + 1)[None, :]


@triton.jit
def _scaled(g, scale_ptr, c0, cols, col_ok, js, C, D: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_C: tl.constexpr,
            BLOCK_J: tl.constexpr):
    """g times its tile of the whitening (C, D+1), 0 past C; through a descriptor when G's rows are 16-byte aligned
    (no pointer tile live beside the accumulator: at [64, 256] ptxas spilled 84 bytes with one)."""
    if HAS_SCALE:
        if (D + 1) % 4 == 0:
            s_desc = tl.make_tensor_descriptor(scale_ptr, shape=[C, D + 1], strides=[D + 1, 1],
                                               block_shape=[BLOCK_C, BLOCK_J])
            g = g * s_desc.load([c0, 0])
        else:
            g = _whitened(g, scale_ptr + cols[:, None] * (D + 1) + js[None, :],
                          _g_mask(col_ok, js, D, BLOCK_C, BLOCK_J), True)
    return g


@_batch_jit
def _fwd_tma_kernel(
    x_ptr, z_ptr, w_ptr, b_ptr, v_ptr, off_ptr,  # x (N, C); z_aug (N, LDA); W_aug (C, LDA); b, v (C,)
    chunk_set_ptr, chunk_ptr_ptr, slot_ptr_ptr,  # chunk table (fisher_accumulate._chunk_table)
    out_ptr, part_ptr,  # (S, C, D+1) output, (slots, C, D+1) fp32 partials of split sets
    scale_ptr, sq_ptr,  # NORMALIZE: (C*(D+1),) whitening (HAS_SCALE), (S, N_SQ) sums of squares per tile
    S, C, D: tl.constexpr, LDA: tl.constexpr, N_ENTRIES, LEN_KEY, N_SQ,
    NORMALIZE: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
):
    # Persistent over chunks as the fused forward: program (C tile, p) takes chunks p, p + P, ...
    c0 = tl.program_id(0) * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    js = tl.arange(0, BLOCK_J)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BLOCK_C]
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[C, LDA], strides=[LDA, 1], block_shape=[BLOCK_C, BLOCK_J])
    w_res = w_desc.load([c0, 0])  # [BLOCK_C, BLOCK_J] resident; rows past C are zeros
    zero_ct = tl.zeros((BLOCK_C, BLOCK_T), tl.float32)  # [BLOCK_C, BLOCK_T]
    for e in range(tl.program_id(1), N_ENTRIES, tl.num_programs(1)):
        s, k, n_chunks, lo, hi = _chunk_rows(chunk_set_ptr, chunk_ptr_ptr, off_ptr, e, S, BLOCK_T)
        if s < S:
            lo32 = lo.to(tl.int32)
            hi32 = hi.to(tl.int32)
            z_desc = tl.make_tensor_descriptor(z_ptr, shape=[hi32, LDA], strides=[LDA, 1],
                                               block_shape=[BLOCK_T, BLOCK_J])
            x_desc = tl.make_tensor_descriptor(x_ptr, shape=[hi32, C], strides=[C, 1],
                                               block_shape=[BLOCK_T, BLOCK_C])
            acc = tl.zeros((BLOCK_C, BLOCK_J), tl.float32)  # [BLOCK_C, BLOCK_J]  sum_t diff_t [z_t ; 1]^T
            for t0 in range(lo32, hi32, BLOCK_T):
                zt = z_desc.load([t0, 0])  # [BLOCK_T, BLOCK_J], zero past the set
                a = _mm(w_res, tl.trans(zt), zero_ct, True, "tf32")  # [BLOCK_C, BLOCK_T]
                _, diff = _relu_diff(a + b[:, None], tl.trans(x_desc.load([t0, c0])), tl.float32)
                acc = _mm(diff.to(zt.dtype), zt, acc, True, "tf32")
            # v loaded per chunk: held across the loop, it cost 16 bytes of spills at the [128, 256] tile
            g = acc * tl.load(v_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]  # [BLOCK_C, BLOCK_J]
            if n_chunks == 1:  # straight into G, in its dtype
                dst = out_ptr + s * C * (D + 1)
                if NORMALIZE:
                    g, sq = _signed_sqrt(_scaled(g, scale_ptr, c0, cols, col_ok, js, C, D, HAS_SCALE, BLOCK_C, BLOCK_J))
                    tl.store(sq_ptr + s * N_SQ + tl.program_id(0), sq)
                tl.store(dst + cols[:, None] * (D + 1) + js[None, :], _rounded_for(g, dst),
                         mask=_g_mask(col_ok, js, D, BLOCK_C, BLOCK_J))
            else:  # an fp32 partial of a split set
                part = part_ptr + (tl.load(slot_ptr_ptr + s) + k) * C * (D + 1)
                tl.store(part + cols[:, None] * (D + 1) + js[None, :], g, mask=_g_mask(col_ok, js, D, BLOCK_C, BLOCK_J))


_fwd_tma = {normalize: triton.autotune(configs=configs, key=["C", "D", "LEN_KEY"],
                                       prune_configs_by={"early_config_prune": _prune})(_fwd_tma_kernel)
            for normalize, configs in ((False, FWD_CONFIGS), (True, VEC_CONFIGS))}


def configs(normalize: bool) -> list[triton.Config]:
    """The autotune candidates of G (``normalize`` False) or of the normalised vectors."""
    return VEC_CONFIGS if normalize else FWD_CONFIGS


def launch(x, z_aug, w_aug, bias, inv_var, offsets, chunk_set, chunk_ptr, slot_ptr, out, part, scale, sq,
           s: int, d: int, n_entries: int, len_key: int, n_sq: int, programs: int, *, NORMALIZE: bool,
           HAS_SCALE: bool) -> None:
    """Launch the forward over the chunk table into ``out`` (or ``part`` for split sets), as the fused
    forward's launcher would; ``programs``: the resident programs to spread over the C tiles."""
    c = x.shape[1]
    if x.device.type == "cuda":
        _ensure_allocator()

    def grid(meta):
        tiles = triton.cdiv(c, meta["BLOCK_C"])
        return (tiles, min(n_entries, triton.cdiv(programs, tiles)))

    _fwd_tma[NORMALIZE][grid](x, z_aug, w_aug, bias, inv_var, offsets, chunk_set, chunk_ptr, slot_ptr, out, part,
                              scale, sq, s, c, d, z_aug.shape[1], n_entries, len_key, n_sq, NORMALIZE=NORMALIZE,
                              HAS_SCALE=HAS_SCALE, BLOCK_J=block_j(d))


# ----------------------------------------------------------------------------------------------
# The backward's param kernel by the same rules:
#     [dW | db] = v * sum_t (m q)_t [z_t ; 1]^T = v * (m q) @ z_aug        [BLOCK_C, BLOCK_J]
#     dv        = sum_t diff_t q_t                                        [BLOCK_C]
# with q^T = P z_aug^T, P = grad[s] = [P_z | p_b] itself (its rows, d + 1 wide, against z_aug's [z | 1]), and
# a^T = W_b z_aug^T, W_b = [W | b | 0...]: no row sum for db and no bias add for a or q; a row of z_aug past
# the set is zero, so q is 0 there and neither GEMM nor dv needs a mask.
# ----------------------------------------------------------------------------------------------
@_batch_jit
def _bwd_params_tma_kernel(
    x_ptr, z_ptr, w_ptr, v_ptr, p_ptr, off_ptr,  # w: W_b (C, LDA); p: grad (S, C, D+1) in z's dtype (grad_for)
    chunk_set_ptr, chunk_ptr_ptr,
    pw_ptr, pv_ptr,  # fp32 partials: (groups, C, D+1) of [dW | db], (groups, C) of dv
    S, C, D: tl.constexpr, LDA: tl.constexpr, LEN_KEY,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
):
    g = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    js = tl.arange(0, BLOCK_J)
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[C, LDA], strides=[LDA, 1], block_shape=[BLOCK_C, BLOCK_J])
    w_res = w_desc.load([c0, 0])  # [BLOCK_C, BLOCK_J] resident, W_b's tile
    acc = tl.zeros((BLOCK_C, BLOCK_J), tl.float32)  # [BLOCK_C, BLOCK_J]  sum_t (m q)_t [z_t ; 1]^T
    acc_v = tl.zeros((BLOCK_C,), tl.float32)  # [BLOCK_C]  sum_t diff_t q_t
    zero_ct = tl.zeros((BLOCK_C, BLOCK_T), tl.float32)  # [BLOCK_C, BLOCK_T]
    e_first, e_end = _group_chunks(chunk_ptr_ptr, S, g)
    for e in range(e_first, e_end):
        s, k, n_chunks, lo, hi = _chunk_rows(chunk_set_ptr, chunk_ptr_ptr, off_ptr, e, S, BLOCK_T)
        if s < S:
            hi32 = hi.to(tl.int32)
            p_desc = tl.make_tensor_descriptor(p_ptr + s * C * (D + 1), shape=[C, D + 1], strides=[D + 1, 1],
                                               block_shape=[BLOCK_C, BLOCK_J])
            p_res = p_desc.load([c0, 0])  # [BLOCK_C, BLOCK_J] in shared memory as it arrives, 0 past D + 1
            z_desc = tl.make_tensor_descriptor(z_ptr, shape=[hi32, LDA], strides=[LDA, 1],
                                               block_shape=[BLOCK_T, BLOCK_J])
            x_desc = tl.make_tensor_descriptor(x_ptr, shape=[hi32, C], strides=[C, 1],
                                               block_shape=[BLOCK_T, BLOCK_C])
            for t0 in range(lo.to(tl.int32), hi32, BLOCK_T):
                zt = z_desc.load([t0, 0])  # [BLOCK_T, BLOCK_J], zero past the set
                a = _mm(w_res, tl.trans(zt), zero_ct, True, "tf32")  # [BLOCK_C, BLOCK_T]
                q = _mm(p_res, tl.trans(zt), zero_ct, True, "tf32")  # [BLOCK_C, BLOCK_T]
                m, diff = _relu_diff(a, tl.trans(x_desc.load([t0, c0])), tl.float32)
                acc = _mm((m * q).to(zt.dtype), zt, acc, True, "tf32")
                acc_v += tl.sum(diff * q, axis=1)
    v = tl.load(v_ptr + cols, mask=col_ok, other=0.0)  # [BLOCK_C]
    tl.store(pw_ptr + g.to(tl.int64) * C * (D + 1) + cols[:, None] * (D + 1) + js[None, :], acc * v[:, None],
             mask=_g_mask(col_ok, js, D, BLOCK_C, BLOCK_J))
    tl.store(pv_ptr + g.to(tl.int64) * C + cols, acc_v, mask=col_ok)


# [BLOCK_T, BLOCK_C]: wgmma takes 64 rows of C per warpgroup. With grad in z's dtype, W and P stay resident in
# shared memory as loaded (a P converted in registers, 64 registers per thread at [64, 256] bf16, spilled 44-316 B
# beside the 128 of the accumulator); steps of 16 rows leave a and q 8 registers each: at 32 rows ptxas spilled
# 44-60 B, at 64 rows 236-252 B with STL/LDL in the loop (tests/sm90_compile.py).
BWD_CONFIGS = [_cfg(16, 32, 4, 1)] if _INTERPRET else [_cfg(16, 128, 8, 3), _cfg(16, 64, 4, 4)]
_bwd_params_tma = triton.autotune(configs=BWD_CONFIGS, key=["C", "D", "LEN_KEY"],
                                  prune_configs_by={"early_config_prune": _prune})(_bwd_params_tma_kernel)


# ----------------------------------------------------------------------------------------------
# The backward's row kernel by the same rules; orientation [rows, C], one chunk per program, the z_aug tile
# resident in shared memory over a loop on C tiles (flash-attention dQ-like):
#     a   = z_aug W_b^T,  q = z_aug P^T                      [BLOCK_T, BLOCK_C]  (b and p_b: the ones column)
#     da  = v m q,  dx = -da                                 per C tile, by a descriptor store (TMA)
#     dz += da W_b + (v diff) P                              [BLOCK_T, BLOCK_J]  (column d: unused, not stored)
# W_b = [W | b | 0...] (augmented with the bias): no bias load or add per step. z, x and dx go through
# descriptors bounded at the chunk's end (zeros past it; dx rows past it are not written). W and P come by
# pointer loads (cp.async, 16 bytes, masks uniform along 16-byte vectors): as descriptor loads each added two
# CTA barriers per step (8 in all).
# ----------------------------------------------------------------------------------------------
@_batch_jit
def _bwd_rows_tma_kernel(
    x_ptr, z_ptr, w_ptr, v_ptr, p_ptr, off_ptr,  # as the param kernel
    chunk_set_ptr, chunk_ptr_ptr,
    dx_ptr, dz_ptr,  # dx (N, C), dz (N, D)
    S, C, D: tl.constexpr, LDA: tl.constexpr, LEN_KEY,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
):
    s, k, n_chunks, lo, hi = _chunk_rows(chunk_set_ptr, chunk_ptr_ptr, off_ptr, tl.program_id(0), S, BLOCK_T)
    if s < S:
        hi32 = hi.to(tl.int32)
        js = tl.arange(0, BLOCK_J)
        p_set = p_ptr + s * C * (D + 1)
        z_desc = tl.make_tensor_descriptor(z_ptr, shape=[hi32, LDA], strides=[LDA, 1], block_shape=[BLOCK_T, BLOCK_J])
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[hi32, C], strides=[C, 1], block_shape=[BLOCK_T, BLOCK_C])
        dx_desc = tl.make_tensor_descriptor(dx_ptr, shape=[hi32, C], strides=[C, 1], block_shape=[BLOCK_T, BLOCK_C])
        zero_tc = tl.zeros((BLOCK_T, BLOCK_C), tl.float32)  # [BLOCK_T, BLOCK_C]
        for t0 in range(lo.to(tl.int32), hi32, BLOCK_T):
            zt = z_desc.load([t0, 0])  # [BLOCK_T, BLOCK_J] resident over C, zero past the chunk
            dz = tl.zeros((BLOCK_T, BLOCK_J), tl.float32)  # [BLOCK_T, BLOCK_J]
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                col_ok = cols < C
                w_cj = tl.load(w_ptr + cols[:, None] * LDA + js[None, :], mask=col_ok[:, None] & (js < LDA)[None, :],
                               other=0.0)  # [BLOCK_C, BLOCK_J]
                p_cj = tl.load(p_set + cols[:, None] * (D + 1) + js[None, :],
                               mask=col_ok[:, None] & (js < D + 1)[None, :], other=0.0)  # [BLOCK_C, BLOCK_J]
                a = _mm(zt, tl.trans(w_cj), zero_tc, True, "tf32")  # [BLOCK_T, BLOCK_C]
                q = _mm(zt, tl.trans(p_cj), zero_tc, True, "tf32")  # [BLOCK_T, BLOCK_C]
                v = tl.load(v_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK_C]
                m, diff = _relu_diff(a, x_desc.load([t0, c0]), tl.float32)  # [BLOCK_T, BLOCK_C]
                da = v * m * q  # [BLOCK_T, BLOCK_C]
                dx_desc.store([t0, c0], (-da).to(dx_ptr.dtype.element_ty))
                dz = _mm(da.to(zt.dtype), w_cj, dz, True, "tf32")
                dz = _mm((diff * v).to(zt.dtype), p_cj, dz, True, "tf32")
            rows = t0 + tl.arange(0, BLOCK_T)
            tl.store(dz_ptr + rows.to(tl.int64)[:, None] * D + js[None, :], dz.to(dz_ptr.dtype.element_ty),
                     mask=(rows < hi32)[:, None] & (js < D)[None, :])


# [BLOCK_T, BLOCK_C]: 128 rows over two warpgroups, then 64 rows for short sets (3 stages: 120 B spilled).
ROWS_CONFIGS = [_cfg(16, 32, 4, 1)] if _INTERPRET else [_cfg(128, 32, 8, 3), _cfg(64, 32, 4, 2)]
_bwd_rows_tma = triton.autotune(configs=ROWS_CONFIGS, key=["C", "D", "LEN_KEY"],
                                prune_configs_by={"early_config_prune": _prune})(_bwd_rows_tma_kernel)


def grad_for(x: torch.Tensor, grad: torch.Tensor, d: int) -> torch.Tensor | None:
    """grad (S, C, d+1) in x's dtype for the backward kernels above, or None where they do not serve these inputs
    (as :func:`usable`, and rows of d + 1 elements 16-byte aligned): converted once here, not per tile in the
    kernels (the GEMMs read it rounded to x's dtype either way)."""
    if not usable(x, d) or ((d + 1) * x.element_size()) % 16:
        return None
    grad = grad.to(x.dtype)
    return grad if grad.data_ptr() % 16 == 0 else grad.clone()


def launch_rows(x, z_aug, w_b, inv_var, grad, offsets, chunk_set, chunk_ptr, dx, dz, s: int, d: int,
                n_entries: int, len_key: int) -> None:
    """The row kernel, one program per chunk-table entry: dx and dz of the rows in each chunk; ``z_aug``, ``w_b``
    from :func:`augmented` (with the bias), ``grad`` from :func:`grad_for`."""
    if x.device.type == "cuda":
        _ensure_allocator()
    _bwd_rows_tma[(n_entries,)](x, z_aug, w_b, inv_var, grad, offsets, chunk_set, chunk_ptr, dx, dz, s,
                                x.shape[1], d, z_aug.shape[1], len_key, BLOCK_J=block_j(d))


def launch_params(x, z_aug, w_b, inv_var, grad, offsets, chunk_set, chunk_ptr, pw, pv, s: int, d: int,
                  len_key: int) -> None:
    """The param kernel over ``pw.shape[0]`` groups of chunks: fp32 partials of [dW | db] into ``pw`` and of dv
    into ``pv``, as the fused param kernel; operands as :func:`launch_rows`."""
    c = x.shape[1]
    if x.device.type == "cuda":
        _ensure_allocator()
    _bwd_params_tma[lambda meta: (pw.shape[0], triton.cdiv(c, meta["BLOCK_C"]))](
        x, z_aug, w_b, inv_var, grad, offsets, chunk_set, chunk_ptr, pw, pv, s, c, d, z_aug.shape[1],
        len_key, BLOCK_J=block_j(d))
