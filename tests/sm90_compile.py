"""Compile every Triton kernel variant of ``kernels/fisher_accumulate.py`` for sm_90 ahead of time, no GPU
needed: each kernel, autotune config and dtype kind at the paper's d = 255, and print one JSON row each
(registers and spill bytes from ptxas, cp.async and scalar 2-byte global loads counted in the PTX), with the
argument specialisation Triton applies at run time at C = 512.

    python tests/sm90_compile.py            (TRITON_INTERPRET must be unset: it replaces the kernels)

Run by tests/test_triton_kernel.py in a subprocess; CI has no GPU, so this is where a kernel that
would not compile for the GPU machines shows.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fvvae_fast.ops import dispatch

K = dispatch.import_kernels("fisher_accumulate")
D = 255
TARGET = GPUTarget("cuda", 90, 32)
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
# dtype kind -> (element type, accumulator, tl.dot precision)
KINDS = {"half": ("bf16", tl.float32, "tf32"), "float32": ("fp32", tl.float32, "tf32x3"),
         "float64": ("fp64", tl.float64, "ieee")}
_INPUTS = ("x_ptr", "z_ptr", "w_ptr", "b_ptr", "v_ptr", "dx_ptr", "dz_ptr")
_INDICES = ("off_ptr", "chunk_set_ptr", "chunk_ptr_ptr", "slot_ptr_ptr", "split_set_ptr")
_INTS = ("S", "C", "N_ENTRIES", "LEN_KEY", "N_SQ", "E")


def _signature(fn, elem: str) -> dict[str, str]:
    acc = "*fp64" if elem == "fp64" else "*fp32"
    sig = {}
    for name in fn.arg_names:
        if name in _INPUTS:
            sig[name] = f"*{elem}"
        elif name in _INDICES:
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = acc
        elif name in _INTS:
            sig[name] = "i32"
        elif name == "eps":
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
    return sig


def _ptxas(ptx: str) -> tuple[int | None, int | None]:
    if not PTXAS.is_file():
        return None, None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        err = subprocess.run([str(PTXAS), "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                             text=True).stderr
    finally:
        os.unlink(f.name)
    regs, spill = re.search(r"Used (\d+) registers", err), re.search(r"(\d+) bytes spill stores", err)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


def compile_variant(fn, elem: str, constants: dict, warps: int, stages: int) -> dict:
    sig = _signature(fn, elem)
    # As at run time: Triton assumes 16-byte aligned pointers and, for an integer it specialises (all but
    # do_not_specialize), divisibility by 16, which C = 512, E = C (d+1) and N_SQ have at the paper's shapes.
    # Without it the x tile (stride C) would compile to 2-byte loads that the GPU never runs.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or (sig[n] == "i32" and n not in fn.do_not_specialize)}
    ptx = triton.compile(ASTSource(fn, sig, constants, attrs), target=TARGET,
                         options={"num_warps": warps, "num_stages": stages}).asm["ptx"]
    regs, spill = _ptxas(ptx)
    return {"registers": regs, "spill_bytes": spill, "cp_async": len(re.findall(r"cp\.async\.c[ag]", ptx)),
            "scalar_b16_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.b16", ptx))}


def variants():
    """(kernel name, dtype kind, settings, JITFunction, constants, warps, stages) of every variant."""
    ld = triton.cdiv(D, K.ROW_ALIGN) * K.ROW_ALIGN
    for kind, (elem, acc, precision) in KINDS.items():
        base = {"D": D, "LD": ld, "ACC": acc, "USE_DOT": kind != "float64", "PRECISION": precision}
        for cf in K._FWD_CONFIGS[kind]:
            for normalize in (False, True):
                yield ("fwd", kind, {**cf.kwargs, "normalize": normalize}, K._fwd_kernel,
                       {**base, "NORMALIZE": normalize, "HAS_SCALE": normalize, **cf.kwargs}, cf.num_warps,
                       cf.num_stages)
        for cf in K._BWD_CONFIGS[kind]:
            for name, fn in (("bwd_rows", K._bwd_rows_kernel), ("bwd_params", K._bwd_params_kernel)):
                yield name, kind, dict(cf.kwargs), fn, {**base, **cf.kwargs}, cf.num_warps, cf.num_stages
        for normalize in (False, True):
            yield ("combine", kind, {"normalize": normalize}, K._combine_kernel,
                   {"ACC": acc, "NORMALIZE": normalize, "HAS_SCALE": normalize, "BLOCK": 1024}, 4, 1)
        yield ("normalize_rows", kind, {}, K._normalize_rows_kernel, {"ACC": acc, "BLOCK_SQ": 128, "BLOCK": 1024},
               4, 1)


def main() -> None:
    for name, kind, settings, fn, constants, warps, stages in variants():
        row = {"kernel": name, "kind": kind, **settings, "warps": warps, "stages": stages}
        try:
            row.update(compile_variant(fn, KINDS[kind][0], constants, warps, stages))
        except Exception as err:  # reported, and the test fails on it
            row["error"] = f"{type(err).__name__}: {err}"[:2000]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
