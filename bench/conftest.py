"""Prints the summary table of a benchmark run: median, p20/p80, GFLOP/s, fraction of the GEMM
ceiling measured in the same run, speed-up over the naive autograd recipe."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, machine_line  # noqa: E402


def pytest_report_header(config):
    return f"machine: {machine_line()}"


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    ceilings = {r["dtype"]: r["gflops"] for r in RESULTS if r["method"] == "gemm-ceiling"}
    naive = {(r["op"], r["shape"], r["dtype"]): r["median_s"] for r in RESULTS if r["method"] == "naive-autograd"}
    plain = {(r["op"], r["shape"], r["dtype"]): r["median_s"] for r in RESULTS if r["method"].startswith("plain-torch")}
    tr = terminalreporter
    tr.write_sep("=", "fvvae_fast benchmark summary")
    tr.write_line(f"machine: {machine_line()}")
    tr.write_line("| op | shape | dtype | method | median ms | p20-p80 ms | GFLOP/s | % GEMM ceiling | x naive | x plain |")
    tr.write_line("|---|---|---|---|---|---|---|---|---|---|")
    for r in RESULTS:
        key = (r["op"], r["shape"], r["dtype"])
        ceiling = ceilings.get(r["dtype"])
        frac = f"{100 * r['gflops'] / ceiling:.0f}%" if ceiling else "-"
        vs_naive = f"{naive[key] / r['median_s']:.1f}" if key in naive else "-"
        vs_plain = f"{plain[key] / r['median_s']:.2f}" if key in plain else "-"
        tr.write_line(
            f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['method']} | {1e3 * r['median_s']:.3f} | "
            f"{1e3 * r['p20_s']:.3f}-{1e3 * r['p80_s']:.3f} | {r['gflops']:.1f} | {frac} | {vs_naive} | {vs_plain} |"
        )
