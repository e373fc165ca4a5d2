"""Compile every Triton kernel variant of ``kernels/fisher_accumulate.py`` and ``kernels/fisher_tma.py`` for
sm_90a ahead of time, no GPU needed: each kernel, autotune config and dtype kind at the paper's d = 255, and print
one JSON row each (registers and spill bytes from ptxas, cp.async and scalar 2-byte global loads counted in the PTX,
and from the SASS of the cubin: the loop that holds the tensor-core instructions and the global store widths),
with the argument specialisation Triton applies at run time at C = 512.

    python tests/sm90_compile.py [--dump DIR]      (TRITON_INTERPRET must be unset: it replaces the kernels)

Rows with ``checked: true`` are the bf16/fp16 variants the launchers can pick at the paper's shapes on sm_90 (the
tensor-descriptor forward for G and for the normalised vectors, the backward's tensor-descriptor row and param
kernels); their ``problems`` list what breaks the rules of a clean kernel (no spills; in the loop that holds the
HGMMAs no local memory and at most 6 CTA barriers; HGMMA, never HMMA; some global store wider than 4 bytes, a
tensor-descriptor store (UTMASTG) counting as one). ``EXPECTED_FAILURES`` names the checked variants known to
break them, with the figures measured (none now). fp16 is compiled only at the config
each launcher tries first (its code differs from bf16's in the conversions only).

``--dump DIR``: one folder per variant with ``k.ttgir``, ``k.ptx``, ``k.sass`` (cuobjdump -sass of the cubin),
``ptxas.txt`` (ptxas -v) and ``info.json`` (the row, with ``dtype``, ``num_warps``, ``num_stages``, ``shared``
bytes and ``paper_shape_first``: whether the launcher tries this config first at C = 512, d = 255).

Run by tests/test_triton_kernel.py in a subprocess; CI has no GPU, so this is where a kernel that
would not compile for the GPU machines, or would compile to a slow loop, shows.
"""

from __future__ import annotations

import argparse
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
T = dispatch.import_kernels("fisher_tma")
C, D = 512, 255
TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
PTXAS, CUOBJDUMP = BIN / "ptxas", BIN / "cuobjdump"
# dtype kind -> (element type, accumulator, tl.dot precision)
KINDS = {"half": ("bf16", tl.float32, "tf32"), "float32": ("fp32", tl.float32, "tf32x3"),
         "float64": ("fp64", tl.float64, "ieee")}
_INPUTS = ("x_ptr", "z_ptr", "w_ptr", "b_ptr", "v_ptr", "dx_ptr", "dz_ptr")
_INDICES = ("off_ptr", "chunk_set_ptr", "chunk_ptr_ptr", "slot_ptr_ptr", "split_set_ptr")
_INTS = ("S", "C", "N_ENTRIES", "LEN_KEY", "N_SQ", "E")
MAX_BARRIERS = 6  # CTA-wide BAR.SYNC in the loop that holds the HGMMAs
# Checked variants known to break the rules: (kernel, BLOCK_T, BLOCK_C, BLOCK_J, warps) -> what was measured
# (Triton 3.8.0, sm_90a, bf16; fp16 alike). None since the backward's row kernel is a tensor-descriptor one and
# both backward kernels read grad in the input dtype (the fused row kernel, 64-72 B spilled and dx stored 2 bytes
# at a time, and the param kernel's grad tile converted in registers, 44-316 B spilled, were listed here).
EXPECTED_FAILURES: dict[tuple, str] = {}


def _signature(fn, elem: str, out: str | None = None) -> dict[str, str]:
    acc = "*fp64" if elem == "fp64" else "*fp32"
    sig = {}
    for name in fn.arg_names:
        # the tensor-descriptor backward kernels read grad in the input dtype (fisher_tma.grad_for)
        if name in _INPUTS or (name == "p_ptr" and fn in (T._bwd_rows_tma_kernel, T._bwd_params_tma_kernel)):
            sig[name] = f"*{elem}"
        elif name in _INDICES:
            sig[name] = "*i64"
        elif name == "out_ptr" and out:
            sig[name] = f"*{out}"
        elif name.endswith("_ptr"):
            sig[name] = acc
        elif name in _INTS:
            sig[name] = "i32"
        elif name == "eps":
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
    return sig


def _ptxas(ptx: str) -> str:
    """ptxas -v's report of ``ptx`` (empty without Triton's ptxas)."""
    if not PTXAS.is_file():
        return ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        return subprocess.run([str(PTXAS), "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                              text=True).stderr
    finally:
        os.unlink(f.name)


def _sass(cubin: bytes) -> str:
    """cuobjdump -sass of ``cubin`` (empty without Triton's cuobjdump)."""
    if not CUOBJDUMP.is_file():
        return ""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BACK_BRANCH = re.compile(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)")
_TENSOR_CORE = re.compile(r"\bH(?:G)?MMA\b")


def sass_figures(sass: str) -> dict:
    """Figures of the innermost loop (a backward branch's range) that holds tensor-core instructions, and the
    kernel's global stores by width: {"loop": {...} or None, "stores": {"STG.E.128": n, ...}}."""
    code = [(int(a, 16), text.strip()) for a, text in _SASS_LINE.findall(sass)]
    loop = None
    for addr, text in code:
        branch = _BACK_BRANCH.search(text)
        if branch and int(branch.group(1), 16) <= addr:
            body = [t for a, t in code if int(branch.group(1), 16) <= a <= addr]
            if any(_TENSOR_CORE.search(t) for t in body) and (loop is None or len(body) < len(loop)):
                loop = body

    def count(body, pattern):
        return sum(1 for t in body if re.search(pattern, t))

    stores: dict[str, int] = {}
    for _, text in code:
        op = re.search(r"\b(STG\.E(?:\.(?:U8|S8|U16|S16|64|128))?|UTMASTG)\b", text)
        if op:
            stores[op.group(1)] = stores.get(op.group(1), 0) + 1
    figures = None if loop is None else {
        "instructions": len(loop), "hgmma": count(loop, r"\bHGMMA\b"), "hmma": count(loop, r"\bHMMA\b"),
        "bar_sync": count(loop, r"\bBAR\.SYNC"), "local": count(loop, r"\b(?:STL|LDL)\b"),
        "lds": count(loop, r"\bLDS"), "sts": count(loop, r"\bSTS\b"), "shfl": count(loop, r"\bSHFL\b"),
    }
    return {"loop": figures, "stores": stores}


def problems(row: dict) -> list[str]:
    """What breaks the rules of a clean sm_90 kernel in a compiled ``row`` (see the module's docstring)."""
    found = []
    if row.get("spill_bytes"):
        found.append(f"{row['spill_bytes']} bytes spilled")
    loop = row.get("loop")
    if loop is None:
        return [*found, "no loop with tensor-core instructions"]
    if loop["local"]:
        found.append(f"{loop['local']} STL/LDL in the loop")
    if loop["bar_sync"] > MAX_BARRIERS:
        found.append(f"{loop['bar_sync']} BAR.SYNC in the loop (at most {MAX_BARRIERS})")
    if loop["hmma"] or not loop["hgmma"]:
        found.append(f"{loop['hmma']} HMMA, {loop['hgmma']} HGMMA in the loop")
    if row["stores"] and not any(op.endswith((".64", ".128")) or op == "UTMASTG" for op in row["stores"]):
        found.append(f"only 4-byte or narrower global stores {row['stores']}")
    return found


def compile_variant(fn, elem: str, constants: dict, warps: int, stages: int, out: str | None = None) -> dict:
    """Compile for sm_90a; returns the row's figures and, under "files", the texts a dump writes."""
    sig = _signature(fn, elem, out)
    # As at run time: Triton assumes 16-byte aligned pointers and, for an integer it specialises (all but
    # do_not_specialize), divisibility by 16, which C = 512, E = C (d+1) and N_SQ have at the paper's shapes.
    # Without it the x tile (stride C) would compile to 2-byte loads that the GPU never runs.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or (sig[n] == "i32" and n not in fn.do_not_specialize)}
    compiled = triton.compile(ASTSource(fn, sig, constants, attrs), target=TARGET,
                              options={"num_warps": warps, "num_stages": stages})
    ptx = compiled.asm["ptx"]
    report = _ptxas(ptx)
    sass = _sass(compiled.asm["cubin"])
    regs, spill = re.search(r"Used (\d+) registers", report), re.search(r"(\d+) bytes spill stores", report)
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spill.group(1)) if spill else None,
            "shared": compiled.metadata.shared, "cp_async": len(re.findall(r"cp\.async\.c[ag]", ptx)),
            "scalar_b16_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.b16", ptx)), **(sass_figures(sass) if sass else {}),
            "files": {"k.ttgir": compiled.asm["ttgir"], "k.ptx": ptx, "k.sass": sass, "ptxas.txt": report}}


def _first(configs, prune=K._prune) -> triton.Config:
    """The config an autotuner over ``configs`` tries first at C = 512, d = 255 (after its pruning)."""
    return prune(configs, {"C": C, "D": D})[0]


def variants():
    """(kernel name, dtype, settings, JITFunction, constants, warps, stages, checked, paper_shape_first) of every
    variant; ``checked``: a 16-bit variant a launcher can pick at the paper's shapes on sm_90."""
    ld = triton.cdiv(D, K.ROW_ALIGN) * K.ROW_ALIGN
    for kind, (elem, acc, precision) in KINDS.items():
        base = {"D": D, "LD": ld, "ACC": acc, "USE_DOT": kind != "float64", "PRECISION": precision}
        fused_first = _first(K._FWD_CONFIGS[kind])
        for cf in K._FWD_CONFIGS[kind]:
            for normalize in (False, True):
                # on sm_90 the tensor-descriptor forward serves 16-bit inputs at the paper's shapes
                yield ("fwd", elem, {**cf.kwargs, "normalize": normalize}, K._fwd_kernel,
                       {**base, "NORMALIZE": normalize, "HAS_SCALE": normalize, **cf.kwargs}, cf.num_warps,
                       cf.num_stages, False, kind != "half" and cf is fused_first)
        bwd_first = _first(K._BWD_CONFIGS[kind])
        for cf in K._BWD_CONFIGS[kind]:
            for name, fn in (("bwd_rows", K._bwd_rows_kernel), ("bwd_params", K._bwd_params_kernel)):
                # on sm_90 the tensor-descriptor kernels serve 16-bit inputs at the paper's shapes
                yield (name, elem, dict(cf.kwargs), fn, {**base, **cf.kwargs}, cf.num_warps, cf.num_stages,
                       False, cf is bwd_first and kind != "half")
        for normalize in (False, True):
            yield ("combine", elem, {"normalize": normalize}, K._combine_kernel,
                   {"ACC": acc, "NORMALIZE": normalize, "HAS_SCALE": normalize, "BLOCK": 1024}, 4, 1, False, True)
        yield ("normalize_rows", elem, {}, K._normalize_rows_kernel, {"ACC": acc, "BLOCK_SQ": 128, "BLOCK": 1024},
               4, 1, False, True)
    tma = {"D": D, "LDA": T.row_stride(D), "BLOCK_J": T.block_j(D)}
    for normalize in (False, True):
        configs = T.configs(normalize)
        for cf in configs:
            first = cf is _first(configs, T._prune)
            for dtype in ("bf16", "fp16") if first else ("bf16",):
                yield ("fwd_tma", dtype, {**cf.kwargs, "BLOCK_J": tma["BLOCK_J"], "normalize": normalize},
                       T._fwd_tma_kernel, {**tma, "NORMALIZE": normalize, "HAS_SCALE": normalize, **cf.kwargs},
                       cf.num_warps, cf.num_stages, True, first)
    for name, fn, configs in (("bwd_rows_tma", T._bwd_rows_tma_kernel, T.ROWS_CONFIGS),
                              ("bwd_params_tma", T._bwd_params_tma_kernel, T.BWD_CONFIGS)):
        for cf in configs:
            first = cf is _first(configs, T._prune)
            for dtype in ("bf16", "fp16") if first else ("bf16",):
                yield (name, dtype, {**cf.kwargs, "BLOCK_J": tma["BLOCK_J"]}, fn, {**tma, **cf.kwargs}, cf.num_warps,
                       cf.num_stages, True, first)


def _key(row: dict) -> tuple:
    return (row["kernel"], *(row.get(k) for k in ("BLOCK_T", "BLOCK_C", "BLOCK_J")), row["num_warps"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", type=Path, help="write each variant's ttgir, ptx, sass, ptxas -v and info.json")
    dump = parser.parse_args(argv).dump
    for name, dtype, settings, fn, constants, warps, stages, checked, first in variants():
        row = {"kernel": name, "dtype": dtype, **settings, "num_warps": warps, "num_stages": stages,
               "checked": checked, "paper_shape_first": first}
        # the tensor-descriptor forward writes G in its input dtype (out_dtype=bf16, half the bytes of fp32)
        out = dtype if name == "fwd_tma" and not settings["normalize"] else None
        try:
            row.update(compile_variant(fn, dtype, constants, warps, stages, out))
            files = row.pop("files")
        except Exception as err:  # reported, and the test fails on it
            row["error"] = f"{type(err).__name__}: {err}"[:2000]
            files = {}
        if checked and "error" not in row:
            row["problems"] = problems(row) if "stores" in row else ["no SASS (cuobjdump missing)"]
            row["expected_failure"] = _key(row) in EXPECTED_FAILURES
        if dump:
            folder = dump / "-".join([name, dtype, *(f"{k}{v}" for k, v in settings.items()), f"w{warps}",
                                      f"s{stages}"])
            folder.mkdir(parents=True, exist_ok=True)
            for file, text in files.items():
                (folder / file).write_text(text)
            (folder / "info.json").write_text(json.dumps(row, indent=1) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
