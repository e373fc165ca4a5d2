"""Triton kernel of ``sum_of_squares``, the diagonal Fisher-information update (paper Eq. 12; docs/math.rst,
"The kernels").

    out[j] = sum_s g[s, j]^2        g (S, D) float32/float64 -> out (D,) float64

One program per BLOCK_D columns streams the S rows in [BLOCK_S, BLOCK_D] tiles and accumulates in
float64 on chip: g is read once, nothing but the (D,) result is written, and each column's rows are
added in order (deterministic, no atomics). CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["sum_of_squares"]


@triton.jit
def _sum_of_squares_kernel(g_ptr, out_ptr, S, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    col_ok = cols < D
    acc = tl.zeros((BLOCK_D,), tl.float64)  # [BLOCK_D]
    for s0 in range(0, S, BLOCK_S):
        rows = s0 + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        ptrs = g_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :]
        v = tl.load(ptrs, mask=(rows < S)[:, None] & col_ok[None, :], other=0.0).to(tl.float64)  # [BLOCK_S, BLOCK_D]
        acc += tl.sum(v * v, axis=0)
    tl.store(out_ptr + cols, acc, mask=col_ok)


def sum_of_squares(g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_s g[s]^2: g (S, D) contiguous float32/float64 -> (D,) float64 on g's device.

    ``out``: an optional (D,) float64 tensor to write (every element is written).
    """
    if g.dim() != 2 or g.dtype not in (torch.float32, torch.float64) or not g.is_contiguous():
        raise ValueError(f"sum_of_squares: g must be a contiguous (S, D) float32/float64 tensor, got "
                         f"{tuple(g.shape)} {g.dtype}")
    s, d = g.shape
    if out is None:
        out = torch.empty(d, dtype=torch.float64, device=g.device)
    elif out.shape != (d,) or out.dtype != torch.float64 or out.device != g.device:
        raise ValueError(f"sum_of_squares: out must be ({d},) float64 on {g.device}, got {tuple(out.shape)} "
                         f"{out.dtype} on {out.device}")
    if d:
        block_d = 256 if d >= 256 else max(16, triton.next_power_of_2(d))
        _sum_of_squares_kernel[(triton.cdiv(d, block_d),)](g, out, s, d, BLOCK_S=16, BLOCK_D=block_d, num_warps=4)
    return out
